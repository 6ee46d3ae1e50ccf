"""Per-example gradient norms from hooks against exact torch.func values.

Run: .venv/bin/python -m pytest tests/noise/test_per_example.py
On a GPU: BSFIND_TEST_DEVICE=cuda python3 -m pytest tests/noise/test_per_example.py
(``check``, the autocast and the double-backward tests then run there; tests/device.py)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bsfind import models
from bsfind.noise.per_example import (
    PerExampleGradNorms,
    PerExamplePlan,
    PerExampleUnsupported,
    plan,
    rules,
)
from tests.device import DEVICE, on_device

pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),  # vmap of SDPA
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

LossFn = Callable[[Tensor, Tensor], Tensor]
RTOL = 1e-4


def mse(out: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch AND every other axis (a sequence / spatial mean)."""
    return (out - target).square().mean()


def token_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy averaged over B·T tokens."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def exact_sq_norms(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
    """|(1/B)·∇L_i|² from vmap(grad) of each example's own loss."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss_fn(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    b = x.shape[0]
    return sum(v.double().flatten(1).square().sum(1) for v in g.values()) / b**2


def plain_grads(model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> list[Tensor]:
    """.grad of every trainable parameter after an ordinary backward, no hooks."""
    model.zero_grad(set_to_none=True)
    loss_fn(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def hooked_sq_norms(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, **kwargs: object
) -> tuple[Tensor, dict[str, str]]:
    want_grads = plain_grads(model, x, y, loss_fn)
    with PerExampleGradNorms(model, **kwargs) as norms:  # type: ignore[arg-type]
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        sq, paths = norms.sq_norms(), dict(norms.paths)
    # the step the caller trains with is unchanged (fused layers form ∇W themselves)
    got_grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(got_grads) == len(want_grads)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    return sq, paths


def check(
    model: nn.Module, x: Tensor, loss_fn: LossFn = mse, y: Tensor | None = None, **kwargs: object
) -> dict[str, str]:
    """Compare hooks with exact values, and the gradients with plain autograd's; return
    the forms the hooks used."""
    model, x, y = on_device(model, x, y)  # $BSFIND_TEST_DEVICE; the CPU by default
    if y is None:
        with torch.no_grad():
            y = torch.randn_like(model(x))
    got, paths = hooked_sq_norms(model, x, y, loss_fn, **kwargs)
    want = exact_sq_norms(model, x, y, loss_fn)
    assert got.shape == (x.shape[0],)
    assert want.max() > 0
    rel = ((got - want).abs() / want.clamp_min(1e-30)).max().item()
    assert rel < RTOL, f"max relative error {rel:.2e}; paths {paths}"
    return paths


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# -- one layer at a time -------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_2d(bias: bool) -> None:
    paths = check(nn.Linear(7, 5, bias=bias), torch.randn(6, 7))
    assert paths == {"": "linear-outer"}


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("path", ["direct", "gram"])
@pytest.mark.parametrize("shape", [(6, 9, 7), (5, 3, 4, 7)])
def test_linear_sequence(path: str, shape: tuple[int, ...], bias: bool, fuse: bool) -> None:
    paths = check(nn.Linear(7, 5, bias=bias), torch.randn(*shape), linear_path=path, fuse=fuse)
    # the direct form's per-example products also give the weight gradient (fused)
    assert paths == {"": "linear-fused" if path == "direct" and fuse else f"linear-{path}"}


def test_linear_auto_picks_cheaper_form() -> None:
    assert check(nn.Linear(64, 64), torch.randn(3, 4, 64)) == {"": "linear-gram"}  # short T
    assert check(nn.Linear(4, 3), torch.randn(3, 20, 4)) == {"": "linear-fused"}  # long T
    long_t = check(nn.Linear(4, 3), torch.randn(3, 20, 4), fuse=False)
    assert long_t == {"": "linear-direct"}


def test_chunked_over_examples(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "MAX_TEMP_ELEMENTS", 50)
    assert rules.chunk_size(6, 9 * 7, torch.zeros(1)) == 1  # so every case below is chunked
    check(nn.Linear(7, 5), torch.randn(6, 9, 7), linear_path="direct")
    check(nn.Linear(7, 5), torch.randn(6, 9, 7), linear_path="gram")
    check(nn.Conv2d(4, 6, 3, groups=2), torch.randn(5, 4, 6, 6))
    check(nn.Conv2d(4, 6, 3), torch.randn(5, 4, 6, 6), linear_path="gram")
    # the fused weight gradient summed over chunks (and over interleaved groups)
    assert check(nn.Conv2d(4, 6, 3), torch.randn(5, 4, 6, 6), linear_path="direct") == {
        "": "conv2d-fused"}
    assert check(nn.Conv1d(4, 6, 3, groups=2), torch.randn(5, 4, 9), linear_path="direct") == {
        "": "conv1d-fused"}


def test_frozen_weight_counts_only_bias() -> None:
    layer = nn.Linear(7, 5)
    layer.weight.requires_grad_(False)
    check(layer, torch.randn(6, 7))
    check(layer, torch.randn(6, 3, 7))


@pytest.mark.parametrize("path", ["direct", "gram"])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=2, dilation=2, padding=2, groups=2),
        dict(kernel_size=4, padding="same"),
        dict(kernel_size=3, padding="same", dilation=2, bias=False),
        dict(kernel_size=3, padding=1, padding_mode="reflect", bias=False),
    ],
)
def test_conv1d(conv: dict[str, object], path: str) -> None:
    check(nn.Conv1d(4, 6, **conv), torch.randn(5, 4, 11), linear_path=path)  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["direct", "gram"])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(2, 3), stride=(1, 2), dilation=(2, 1), padding=(1, 0), groups=2),
        dict(kernel_size=4, padding="same"),
        dict(kernel_size=3, padding="valid", stride=2),
        dict(kernel_size=3, padding=1, padding_mode="circular"),
    ],
)
def test_conv2d(conv: dict[str, object], path: str) -> None:
    check(nn.Conv2d(4, 6, **conv), torch.randn(5, 4, 7, 8), linear_path=path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("conv", "fused"),
    [
        (dict(padding=1), True),
        (dict(padding="same", dilation=2), True),
        (dict(padding="valid", groups=2), True),
        (dict(padding=1, padding_mode="reflect"), False),  # F.pad outside the convolution
        (dict(kernel_size=2, padding="same"), False),  # asymmetric: likewise
    ],
)
def test_conv_fused_only_where_zero_padding_is_inside(conv: dict[str, object], fused: bool) -> None:
    layer = nn.Conv2d(4, 6, **{"kernel_size": 3, **conv})  # type: ignore[arg-type]
    paths = check(layer, torch.randn(5, 4, 7, 8), linear_path="direct")
    assert paths == {"": "conv2d-fused" if fused else "conv2d-direct"}


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("shape", [(6, 12), (6, 3, 4), (6,)])
def test_embedding_repeated_indices(padding_idx: int | None, shape: tuple[int, ...]) -> None:
    emb = nn.Embedding(5, 4, padding_idx=padding_idx)
    idx = torch.randint(0, 5, shape)  # 5 rows, up to 12 positions: indices repeat
    check(emb, idx)


def test_embedding_scale_grad_by_freq() -> None:
    # torch divides each row's gradient by the index's count in the whole batch, so the
    # contributions are not those of each example's own loss: build them by hand
    emb = nn.Embedding(5, 4, scale_grad_by_freq=True)
    idx, y = torch.randint(0, 5, (6, 7)), torch.randn(6, 7, 4)
    got, _ = hooked_sq_norms(emb, idx, y, mse)
    counts = torch.bincount(idx.flatten(), minlength=5).double()
    delta = 2 * (emb(idx) - y).detach().double() / y.numel()  # ∂mse/∂output
    parts = torch.zeros(6, 5, 4, dtype=torch.float64)
    for i in range(6):
        parts[i].index_add_(0, idx[i], delta[i] / counts[idx[i]].unsqueeze(-1))
    assert emb.weight.grad is not None
    torch.testing.assert_close(parts.sum(0), emb.weight.grad.double(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got, parts.square().sum((1, 2)), rtol=RTOL, atol=0)


def test_embedding_only_padding_gets_zero() -> None:
    emb = nn.Embedding(5, 4, padding_idx=1)
    idx = torch.tensor([[1, 1], [3, 1]])
    y = torch.randn(2, 2, 4)
    got, _ = hooked_sq_norms(emb, idx, y, mse)
    assert got[0] == 0 and got[1] > 0


@pytest.mark.parametrize(
    ("layer", "shape"),
    [
        (nn.LayerNorm(6), (5, 6)),
        (nn.LayerNorm(6), (5, 4, 6)),
        (nn.LayerNorm((3, 6), bias=False), (5, 2, 3, 6)),
        (nn.GroupNorm(2, 6), (5, 6)),
        (nn.GroupNorm(3, 6), (5, 6, 4, 3)),
        (nn.RMSNorm(6), (5, 4, 6)),
        (nn.RMSNorm((2, 6), eps=1e-5), (5, 2, 6)),
    ],
)
def test_norm_layers(layer: nn.Module, shape: tuple[int, ...]) -> None:
    with torch.no_grad():  # affine parameters away from (1, 0) so both matter
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    check(layer, torch.randn(*shape))


class Scale(nn.Module):
    """A leaf with no rule: a learned elementwise scale."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))

    def forward(self, x: Tensor, shift: float = 0.0) -> Tensor:
        return x * self.scale + shift


class ScaledGelu(nn.Module):
    """A parameter on a module whose only child has no parameters."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(x) * self.scale


def test_func_fallback() -> None:
    model = nn.Sequential(nn.Linear(5, 6), Scale(6), nn.Conv1d(3, 2, 1), ScaledGelu(6))
    assert plan(model).rules == {"0": "linear", "1": "func", "2": "conv1d", "3": "func"}
    paths = check(model, torch.randn(4, 3, 5))
    assert paths["1"] == paths["3"] == "func"


def test_func_fallback_for_known_layer_types() -> None:
    model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.Flatten(), nn.LazyLinear(4))
    assert not plan(model).ok and "lazy" in plan(model).reason
    model(torch.randn(1, 2, 3, 3, 3))
    assert plan(model).rules == {"0": "func", "2": "linear"}
    check(model, torch.randn(4, 2, 3, 3, 3))


def test_func_fallback_refuses_a_module_that_mixes_examples() -> None:
    class Centre(Scale):
        def forward(self, x: Tensor, shift: float = 0.0) -> Tensor:
            return (x - x.mean(0)) * self.scale

    model = nn.Sequential(nn.Linear(5, 6), Centre(6))
    with PerExampleGradNorms(model) as norms:
        model(torch.randn(4, 5)).square().mean().backward()
        with pytest.raises(PerExampleUnsupported, match="mixes examples"):
            norms.sq_norms()


class Masked(nn.Module):
    """A leaf module given a tensor without the batch on dim 0 (a (T, T) mask)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(d))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return (mask @ h) * self.w


class MaskedNet(nn.Module):
    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.a, self.m, self.h = nn.Linear(d, d), Masked(d), nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        return self.h(self.m(self.a(x), torch.tril(torch.ones(t, t))).mean(1))


def test_func_fallback_gives_a_tensor_of_another_size_to_every_example() -> None:
    """vmap split every tensor argument over the examples, and a (T, T) mask raised
    vmap's ValueError out of the user's backward (a review); a tensor whose dim 0 is
    not the batch's is now given whole to each example, the output check guarding it."""
    paths = check(MaskedNet(), torch.randn(8, 5, 6))
    assert paths["m"] == "func"
    bag = nn.EmbeddingBag(10, 4)  # flat ids and offsets: one example alone differs

    class Bags(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag = bag

        def forward(self, x: Tensor) -> Tensor:
            return self.bag(x.flatten(), torch.arange(0, x.numel(), x.shape[1]))

    model = Bags()
    with PerExampleGradNorms(model) as norms:
        model(torch.randint(0, 10, (4, 3))).square().mean().backward()
        with pytest.raises(PerExampleUnsupported, match="fallback for 'bag' failed"):
            norms.sq_norms()


def test_func_fallback_keeps_functorchs_performance_warning_to_itself() -> None:
    """vmap over EmbeddingBag warns "There is a performance drop" on every measured step
    (a review): internal to bsfind, not the user's to act on."""
    model = nn.Sequential(nn.EmbeddingBag(10, 4), nn.Linear(4, 2))
    x = torch.randint(0, 10, (6, 3))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with PerExampleGradNorms(model) as norms:
            model(x).square().mean().backward()
            norms.sq_norms()
    assert norms.paths["0"] == "func"
    assert not [w for w in seen if "performance drop" in str(w.message)], seen


class AddToFirstColumn(nn.Module):
    """An in-place op on a view of the previous layer's output."""

    def forward(self, x: Tensor) -> Tensor:
        x[..., 0] += 1.0
        return x


class Bias(nn.Module):
    """A func-fallback module whose output is a view of its parameter."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(shape))

    def forward(self, x: Tensor) -> Tensor:
        return self.bias.expand(x.shape[0], *self.bias.shape)


@pytest.mark.parametrize("path", ["auto", "direct"])  # direct: the fused Function
@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 5)])
def test_inplace_ops_after_hooked_layers(shape: tuple[int, ...], path: str) -> None:
    # 3-D input + bias: nn.Linear returns a view, which in-place ops re-route around
    model = nn.Sequential(
        nn.Linear(5, 6), nn.ReLU(inplace=True), nn.LayerNorm(6), AddToFirstColumn(),
        nn.Linear(6, 6), nn.Tanh(), Scale(6), nn.ReLU(inplace=True), nn.Linear(6, 3),
    )
    paths = check(model, torch.randn(*shape), linear_path=path)
    if len(shape) == 3 and path == "direct":
        assert paths["0"] == paths["4"] == "linear-fused"


def test_expanded_output_gradient() -> None:
    # loss = sum / B: every δ is an expanded (stride-0) tensor
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(9, 4))
    check(model, torch.randn(5, 2, 5), lambda out, y: out.sum() / out.shape[0])


def test_func_output_that_is_a_view_of_a_parameter() -> None:
    both = nn.ModuleList([nn.Linear(5, 4), Bias((4,))])

    class Sum(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.parts = both

        def forward(self, x: Tensor) -> Tensor:
            return self.parts[0](x) + self.parts[1](x)

    assert plan(Sum()).rules == {"parts.0": "linear", "parts.1": "func"}
    check(Sum(), torch.randn(6, 5))


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing(reentrant: bool) -> None:
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6))
            self.head = nn.Linear(6, 2)
            self.checkpointing = True

        def forward(self, x: Tensor) -> Tensor:
            if not self.checkpointing:
                return self.head(self.inner(x))
            h = checkpoint(self.inner, x.requires_grad_(), use_reentrant=reentrant)
            return self.head(h)

    model = Checkpointed()
    x, y = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    got, paths = hooked_sq_norms(model, x, y, mse)
    assert set(paths) == {"inner.0", "inner.2", "head"}
    model.checkpointing = False  # torch.func cannot trace through the checkpoint
    torch.testing.assert_close(got, exact_sq_norms(model, x, y, mse), rtol=RTOL, atol=0)


def test_eval_batchnorm_goes_through_func() -> None:
    model = models.cnn(norm="batch").eval()
    p = plan(model)
    assert p.ok and p.rules["1"] == "func"
    check(model, torch.randn(4, 1, 8, 8), F.cross_entropy, torch.randint(0, 10, (4,)))


# -- whole models ----------------------------------------------------------------------------


def test_mlp() -> None:
    model = models.mlp(in_features=16, hidden=12)
    check(model, torch.randn(10, 16), F.cross_entropy, torch.randint(0, 10, (10,)))


def test_cnn_groupnorm() -> None:
    model = models.cnn(channels=8, norm="group")
    paths = check(model, torch.randn(6, 1, 8, 8), F.cross_entropy, torch.randint(0, 10, (6,)))
    assert paths["1"] == "groupnorm-direct"


@pytest.mark.parametrize("path", ["auto", "direct", "gram"])
def test_transformer(path: str) -> None:
    model = models.transformer(vocab=11, context=8, d_model=16, heads=2, layers=1)
    idx = torch.randint(0, 11, (5, 8))
    target = torch.randint(0, 11, (5, 8))
    paths = check(model, idx, token_ce, target, linear_path=path)
    assert set(paths) == set(plan(model).rules)


def test_instance_with_its_own_forward_goes_through_func() -> None:
    layer = nn.Linear(5, 3)
    layer.forward = lambda x: torch.tanh(F.linear(x, layer.weight, layer.bias))  # type: ignore[method-assign]
    assert plan(layer).rules == {"": "func"}  # not the Linear rule: it computes more
    check(layer, torch.randn(4, 2, 5))
    assert "forward" in vars(layer)  # the context left the user's own forward in place


def test_fused_layers_under_autocast() -> None:
    model = models.transformer(vocab=11, context=8, d_model=16, heads=2, layers=1)
    idx, target = torch.randint(0, 11, (5, 8)), torch.randint(0, 11, (5, 8))
    model, idx, target = on_device(model, idx, target)

    def run(**kwargs: object) -> tuple[list[Tensor], Tensor, dict[str, str]]:
        model.zero_grad(set_to_none=True)
        with PerExampleGradNorms(model, linear_path="direct", **kwargs) as norms:  # type: ignore[arg-type]
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                loss = token_ce(model(idx), target)
            loss.backward()
            sq = norms.sq_norms()
            paths = dict(norms.paths)
        return [p.grad.clone() for p in model.parameters() if p.grad is not None], sq, paths

    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = token_ce(model(idx), target)
    loss.backward()
    plain = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    fused, sq_fused, paths = run()
    unfused, sq_unfused, _ = run(fuse=False)
    assert paths["blocks.0.fc"] == "linear-fused"
    for f, u, p in zip(fused, unfused, plain, strict=True):
        assert f.dtype == p.dtype == torch.float32
        # bf16 products: the fused ∇W is summed in float32, autograd's in bfloat16
        torch.testing.assert_close(f, p, rtol=0, atol=2e-2 * float(p.abs().max()))
        torch.testing.assert_close(u, p, rtol=0, atol=1e-6 * float(p.abs().max()))
    torch.testing.assert_close(sq_fused, sq_unfused, rtol=1e-3, atol=0)


# torch's forward-AD decompositions are built with torch.jit.script on first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fused_context_leaves_copies_inplace_weights_and_functorch_alone() -> None:
    import copy

    from torch.func import functional_call, vmap

    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(3, 10, 6)
    with PerExampleGradNorms(model, linear_path="direct") as norms:
        snapshot = copy.deepcopy(model)  # an EMA / snapshot copy taken meanwhile
        assert plan(snapshot).rules == {"0": "linear", "2": "linear"}
        # torch.func transforms of the model still run (their calls are not hooked)
        params = {n: p.detach() for n, p in model.named_parameters()}
        vmap(lambda xi: functional_call(model, params, (xi,)))(x)
        with torch.autograd.forward_ad.dual_level():
            dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
            torch.autograd.forward_ad.unpack_dual(model(dual))
        # a Linear whose input needs no gradient does not keep its weight for backward
        out = model[0](x)
        with torch.no_grad():
            model[0].weight.mul_(2.0)
        out.square().mean().backward()
        assert norms.paths["0"] == "linear-fused" and norms.sq_norms().shape == (3,)
    with PerExampleGradNorms(snapshot, linear_path="direct") as norms:
        snapshot(x).square().mean().backward()
        assert norms.sq_norms().shape == (3,)


def test_double_backward_through_fused_layers() -> None:
    # a Hessian-vector product taken inside the context: the fused layers' gradients
    # must stay differentiable
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(1),
                          nn.Unflatten(1, (4, 6)), nn.Linear(6, 2))
    x, y = torch.randn(5, 3, 6), torch.randn(5, 4, 2)
    model, x, y = on_device(model, x, y)
    params = list(model.parameters())
    vs = [torch.randn_like(p) for p in params]

    def hvp() -> list[Tensor]:
        grads = torch.autograd.grad(mse(model(x), y), params, create_graph=True)
        gv = torch.stack([(g * v).sum() for g, v in zip(grads, vs, strict=True)]).sum()
        return list(torch.autograd.grad(gv, params))

    want = hvp()
    with PerExampleGradNorms(model, linear_path="direct"):
        got = hvp()
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6 * float(w.abs().max()))


# -- what is refused -------------------------------------------------------------------------


def test_batchnorm_in_training_is_not_ok() -> None:
    p = plan(models.cnn(norm="batch"))
    assert not p.ok
    assert "BatchNorm2d at '1' mixes examples" in p.reason
    with pytest.raises(ValueError, match="BatchNorm2d"):
        PerExampleGradNorms(models.cnn(norm="batch"))


def test_batchnorm_switched_to_training_after_plan_is_caught() -> None:
    model = models.cnn(norm="batch").eval()
    with PerExampleGradNorms(model) as norms:
        model.train()
        F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.randint(0, 10, (4,))).backward()
        with pytest.raises(PerExampleUnsupported, match="BatchNorm2d"):
            norms.sq_norms()


def test_other_shared_parameters_are_not_ok() -> None:
    # an Embedding tied to a Linear head is covered (tests/noise/test_per_example_models.py);
    # two Linear layers sharing a weight are not
    model = models.mlp(in_features=8, hidden=8, depth=2)
    model[2].weight = model[4].weight = nn.Parameter(torch.randn(8, 8))
    p = plan(model)
    assert not p.ok
    assert p.reason.startswith("parameter '2.weight' is shared by '2' (Linear) and '4' (Linear")
    assert "untie it" in p.reason


def test_parameter_on_a_non_leaf_module_is_not_ok() -> None:
    class WithToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls = nn.Parameter(torch.zeros(4))
            self.body = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x + self.cls)

    p = plan(WithToken())
    assert not p.ok and "WithToken at the root owns parameter 'cls'" in p.reason


def test_plan_reason_and_frozen_modules() -> None:
    model = models.mlp(in_features=8, hidden=8, depth=2)
    p = plan(model)
    assert p == PerExamplePlan(True, "all 3 parameterised modules have per-example rules",
                               {"0": "linear", "2": "linear", "4": "linear"})
    for q in model.get_submodule("0").parameters():
        q.requires_grad_(False)
    assert set(plan(model).rules) == {"2", "4"}
    check(model, torch.randn(5, 8), F.cross_entropy, torch.randint(0, 10, (5,)))


def test_weight_reuse_raises() -> None:
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    with PerExampleGradNorms(model) as norms:
        model(torch.randn(3, 4)).sum().backward()
        with pytest.raises(PerExampleUnsupported, match="more than once"):
            norms.sq_norms()
        # the error is not sticky: the next clean batch works
        model[0](torch.randn(3, 4)).sum().backward()
        assert norms.sq_norms().shape == (3,)


def test_two_forwards_backpropagated_together_raise() -> None:
    model = nn.Linear(4, 2)
    with PerExampleGradNorms(model) as norms:
        (model(torch.randn(3, 4)).sum() + model(torch.randn(3, 4)).sum()).backward()
        with pytest.raises(PerExampleUnsupported, match="two gradients"):
            norms.sq_norms()


def test_most_recent_backward_and_state_cleared() -> None:
    model = nn.Linear(4, 2)
    x1, x2 = torch.randn(3, 4), torch.randn(5, 4)
    y2 = torch.randn(5, 2)
    with PerExampleGradNorms(model) as norms:
        with pytest.raises(RuntimeError, match="no backward"):
            norms.sq_norms()
        model(x1).sum().backward()
        mse(model(x2), y2).backward()  # not read in between: the last backward counts
        got = norms.sq_norms()
        with pytest.raises(RuntimeError, match="no backward"):
            norms.sq_norms()
    want = exact_sq_norms(model, x2, y2, mse)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


def test_no_hooks_left_after_exit() -> None:
    model = models.transformer(vocab=11, context=8, d_model=16, heads=2, layers=1)
    idx = torch.randint(0, 11, (2, 8))
    with PerExampleGradNorms(model) as norms:
        out = model(idx)  # a graph left un-backwarded when the context closes
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
        assert not m._backward_hooks and not m._backward_pre_hooks
        assert "forward" not in vars(m)  # the fused layers' replaced forward is gone
    out.sum().backward()  # the hook left on the live graph is inert
    with pytest.raises(RuntimeError, match="no backward"):
        norms.sq_norms()
    with norms:  # and the context can be entered again
        model(idx).sum().backward()
        assert norms.sq_norms().shape == (2,)


def test_parametrized_layers_are_refused_and_the_old_weight_norm_measured() -> None:
    """torch.nn.utils.parametrize computes the weight from other parameters: the plan
    gave the ParametrizationList the func rule, which failed on every step with torch's
    own message (a review). It is refused by name; the hook-based weight_norm, whose
    weight is recomputed before each forward, is exact."""
    from torch.nn.utils import parametrizations

    for make in (parametrizations.weight_norm, parametrizations.spectral_norm,
                 parametrizations.orthogonal):
        model = nn.Sequential(make(nn.Linear(6, 6, bias=False)), nn.Tanh(), nn.Linear(6, 3))
        p = plan(model)
        assert not p.ok and p.reason.startswith("Linear at '0' is parametrized ('weight'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated for the above)
        old = nn.Sequential(nn.utils.weight_norm(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 3))
    assert plan(old).ok
    check(old, torch.randn(8, 6))


def test_plan_must_match_the_model() -> None:
    wrong = PerExamplePlan(True, "", {"head": "linear"})
    with pytest.raises(ValueError, match="no module 'head'"):
        PerExampleGradNorms(nn.Linear(2, 2), wrong).__enter__()
