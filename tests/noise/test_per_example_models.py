"""Per-example norms of the models users bring (issue #15), built from the real libraries
with tiny configs and random weights (nothing is downloaded): transformers' GPT-2 (tied
embeddings, position ids (1, T), Conv1D) and BERT (tied MLM decoder, its bias registered
twice), torch's TransformerEncoder (nn.MultiheadAttention; dropout in training mode), and
a timm-style ViT (tests/assets/vit.py: root-owned cls_token and pos_embed; timm cannot
be installed here). Each against torch.func, with the gradients the context leaves equal
to plain autograd's; the per-example probe's B_simple against the exact value; what stays
refused, and that the refusal reads the same on every run.

Run: .venv/bin/python -m pytest tests/noise/test_per_example_models.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsfind.budget import Deadline
from bsfind.noise.per_example import plan
from bsfind.noise.probe import NoiseProbe, ProbeOptions
from bsfind.workload import Workload
from tests.assets.vit import VisionTransformer
from tests.exact import exact_noise
from tests.noise.test_per_example import check, token_ce
from tests.noise.test_per_example_constructs import same_forward_sq_norms

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

VOCAB, T, N = 97, 16, 256
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread(_threads: None) -> None:
    # Tiny models: one thread is faster, and immune to OpenMP threads spinning while other
    # work holds the second core (the ViT probe: 1 s on one thread, 35 s on two, then).
    torch.set_num_threads(1)


class Logits(nn.Module):
    """A transformers model returning only ``.logits`` (the loss functions take tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x).logits


def gpt2(dropout: float = 0.0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0,
        eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return Logits(transformers.GPT2LMHeadModel(config))  # tied: lm_head.weight is wte.weight


def bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    return Logits(transformers.BertForMaskedLM(config))  # tied decoder


class Encoder(nn.Module):
    """Token embedding, a causal nn.TransformerEncoder (batch_first) and a head."""

    def __init__(self, dropout: float = 0.0, batch_first: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=dropout, batch_first=batch_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.encoder(self.emb(x), mask=mask, is_causal=True))


def text(seed: int) -> tuple[Tensor, Tensor]:
    """N sequences of T + 1 tokens from one Zipf-like distribution, as (inputs, next
    tokens): every sequence pulls the untrained model the same way (B_simple 13-21)."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.arange(1, VOCAB + 1, dtype=torch.float).pow(-0.7)
    seq = torch.multinomial(probs, N * (T + 1), replacement=True, generator=gen)
    seq = seq.view(N, T + 1)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def images(seed: int) -> tuple[Tensor, Tensor]:
    """N one-channel 8×8 noise images of two classes, shifted by ±0.5 (B_simple ≈ 6.4;
    labels by the sign of the image mean needed ~10x the probe rounds)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (N,), generator=gen)
    return torch.randn(N, 1, 8, 8, generator=gen) + 0.5 * (2 * y - 1).view(-1, 1, 1, 1), y


# -- per-example norms against torch.func ---------------------------------------------------


@pytest.mark.parametrize("path", ["auto", "direct"])
def test_gpt2(path: str) -> None:
    model = gpt2()
    p = plan(model)
    assert p.ok, p.reason
    assert p.tied[0].embeddings == ("model.transformer.wte",)
    assert p.tied[0].head == "model.lm_head"
    assert p.rules["model.transformer.h.0.attn.c_attn"] == "transposed_linear"
    x, y = text(1)
    paths = check(model, x[:5], token_ce, y[:5], linear_path=path)
    assert paths["model.transformer.wpe"] == "embedding-scatter"  # position ids (1, T)
    if path == "direct":
        assert paths["model.transformer.h.0.mlp.c_fc"] == "transposed_linear-fused"


def test_gpt2_default_dropout_in_training() -> None:
    x, y = text(1)
    got, want = same_forward_sq_norms(gpt2(dropout=0.1).train(), x[:5], y[:5])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_bert_masked_lm() -> None:
    model = bert()
    p = plan(model)
    assert p.ok, p.reason
    assert p.tied[0].head == "model.cls.predictions.decoder"
    assert p.aliases == {"model.cls.predictions.bias": "model.cls.predictions.decoder"}
    x, y = text(2)
    check(model, x[:5], token_ce, y[:5])


@pytest.mark.parametrize("path", ["auto", "direct"])
def test_transformer_encoder(path: str) -> None:
    model = Encoder()
    p = plan(model)
    assert p.ok and p.rules["encoder.layers.0.self_attn"] == "attention"
    x, y = text(3)
    paths = check(model, x[:5], token_ce, y[:5], linear_path=path)
    assert {"encoder.layers.1.self_attn.in_proj", "encoder.layers.1.self_attn.out_proj"} <= set(
        paths)


def test_transformer_encoder_dropout_in_training() -> None:
    # dropout 0.1 (the default) in training mode: torch.func cannot reproduce the masks,
    # so each example's gradient is back-propagated through the same forward
    x, y = text(3)
    got, want = same_forward_sq_norms(Encoder(dropout=0.1).train(), x[:5], y[:5])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("path", ["auto", "direct"])
def test_vit(path: str) -> None:
    model = VisionTransformer()
    p = plan(model)
    assert p.ok and p.rules[""] == "broadcast" and p.rules["blocks.0.ls1"] == "func"
    x, y = images(4)
    paths = check(model, x[:6], F.cross_entropy, y[:6], linear_path=path)
    assert paths["cls_token"] == paths["pos_embed"] == "broadcast"


# -- the noise probe against the exact B_simple ----------------------------------------------


def probe_b_simple(job: Workload, batch_size: int, seed: int = 3) -> float:
    """B_simple from the per-example probe (the one call to adapt when the probe's
    constructor changes)."""
    opts = ProbeOptions(method="per-example", batch_size=batch_size, target_rel_error=0.05)
    est = NoiseProbe(job, opts, seed=seed).run(Deadline.after(60))
    assert est.method == "per-example", est
    return est.b_simple


PROBLEMS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Tensor, Tensor]],
                          Callable[[Tensor, Tensor], Tensor], int]] = {
    "gpt2": (gpt2, lambda: text(1), token_ce, 32),
    "bert": (bert, lambda: text(2), token_ce, 32),
    "transformer_encoder": (Encoder, lambda: text(3), token_ce, 32),
    "vit": (lambda: VisionTransformer(num_classes=2), lambda: images(4), F.cross_entropy, 64),
}


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_probe_within_10_percent_of_exact(problem: str) -> None:
    build, data, loss_fn, batch_size = PROBLEMS[problem]
    model = build()
    job = Workload.from_objects(model, torch.utils.data.TensorDataset(*data()), loss_fn)
    exact = exact_noise(job, chunk=128)
    assert probe_b_simple(job, batch_size) == pytest.approx(exact.b_simple, rel=0.10)


# -- what stays refused ------------------------------------------------------------------------


class Shared(nn.Module):
    """Two Linear layers sharing their weight."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.again = nn.Linear(4, 4)
        self.again.weight = self.lin.weight


class RootScale(nn.Module):
    """A learned scale of shape (d,) owned by the root next to its children."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(16))
        self.body = nn.Linear(16, 16)


REFUSED: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "batch_first=False": (
        lambda: Encoder(batch_first=False),
        "MultiheadAttention at 'encoder.layers.0.self_attn' (parameter 'in_proj_weight') has "
        "batch_first=False: dim 0 of its input is the sequence, not the batch; build it (or "
        "the nn.TransformerEncoderLayer / nn.TransformerDecoderLayer / nn.Transformer that "
        "creates it) with batch_first=True (and 1 more)"),
    "shared parameter": (
        Shared,
        "parameter 'lin.weight' is shared by 'lin' (Linear) and 'again' (Linear, as 'weight'): "
        "the per-example norm of a shared parameter needs the cross terms between its uses, "
        "implemented only for Embedding layers tied to one Linear head (input/output "
        "embeddings); untie it (give each module its own copy)"),
    "root parameter": (
        RootScale,
        "RootScale at the root owns parameter 'scale' of shape (16,) and has children with "
        "parameters ('body'); a parameter used by such a module's own forward is covered "
        "only if it has a leading dimension of 1 broadcast over the batch (like a ViT's "
        "cls_token of shape (1, 1, d)): give it that shape, or move it into a submodule "
        "without parameterised children (the torch.func fallback handles that)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_naming_module_parameter_and_fix(case: str) -> None:
    build, reason = REFUSED[case]
    p = plan(build())
    assert not p.ok
    assert p.reason == reason


class Many(nn.Module):
    """Every obstacle above at once, and BatchNorm in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.a = RootScale()
        self.b = Shared()
        self.c = Encoder(batch_first=False)
        self.d = nn.BatchNorm1d(4)


def test_refusal_is_the_same_in_every_process() -> None:
    """plan() reports the first obstacle in model order: the same text whatever the hash
    seed (it used to depend on set iteration order)."""
    script = (
        "import torch\n"
        "from tests.noise.test_per_example_models import Many\n"
        "from bsfind.noise.per_example import plan\n"
        "print(plan(Many()).reason)\n"
    )
    here = plan(Many()).reason
    assert here.startswith("RootScale at 'a' owns parameter 'scale'") and "(and 4 more)" in here
    for seed in ("0", "1"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.strip()
        assert out == here
