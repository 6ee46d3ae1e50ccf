"""Per-example norms of the constructs real models are built from: tied input/output
embeddings, tensors of batch size 1 broadcast over the batch (position ids, a ViT's
cls_token), nn.MultiheadAttention (incl. dropout), a parameter registered on a module
and its child. Each against exact values; the misuses are refused, never answered.

Run: .venv/bin/python -m pytest tests/noise/test_per_example_constructs.py -q
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bsfind.noise.per_example import PerExampleGradNorms, PerExampleUnsupported, plan
from tests.noise.test_per_example import (
    RTOL,
    check,
    exact_sq_norms,
    hooked_sq_norms,
    plain_grads,
    token_ce,
)

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_thread(_threads: None) -> None:
    # Tiny models: one thread is faster, and immune to OpenMP threads spinning while other
    # work holds the second core (the ViT probe: 1 s on one thread, 35 s on two, then).
    torch.set_num_threads(1)


def same_forward_sq_norms(
    model: nn.Module, x: Tensor, y: Tensor, **kwargs: object
) -> tuple[Tensor, Tensor]:
    """(hooks, exact) per-example squared norms of one forward with token cross-entropy.

    The exact ones are each example's own gradient back-propagated through the SAME
    forward (so random ops such as dropout are the same for both); and the gradients the
    context leaves equal those of a plain step from the same random state.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    token_ce(model(x), y).backward()
    plain = [p.grad.clone() for p in params if p.grad is not None]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    with PerExampleGradNorms(model, **kwargs) as norms:  # type: ignore[arg-type]
        out = model(x)
        tokens = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        want = []
        for i in range(x.shape[0]):
            g = torch.autograd.grad(tokens[i].sum() / y.numel(), params, retain_graph=True)
            want.append(sum(v.double().square().sum() for v in g))
        (tokens.sum() / y.numel()).backward()
        got = norms.sq_norms()
    for p, q in zip(params, plain, strict=True):
        torch.testing.assert_close(p.grad, q, rtol=1e-5, atol=1e-6 * float(q.abs().max()))
    return got, torch.stack(want)


# -- tied input/output embeddings ------------------------------------------------------------


class TiedLM(nn.Module):
    """Embedding -> tanh -> Linear head sharing the embedding's weight."""

    def __init__(self, vocab: int = 7, dim: int = 5, **emb: object) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, **emb)  # type: ignore[arg-type]
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.emb(x)))


@pytest.mark.parametrize("path", ["direct", "gram"])
@pytest.mark.parametrize("emb", [{}, {"padding_idx": 3}])
def test_tied_embedding_and_head(emb: dict[str, object], path: str) -> None:
    model = TiedLM(**emb)
    p = plan(model)
    assert p.ok and "'emb.weight' tied across 'emb', 'head'" in p.reason
    x, y = torch.randint(0, 7, (6, 9)), torch.randint(0, 7, (6, 9))
    paths = check(model, x, token_ce, y, linear_path=path)
    assert paths["head"] == ("linear-fused" if path == "direct" else "linear-gram")


def test_tied_cross_term_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    from bsfind.noise.per_example import rules

    monkeypatch.setattr(rules, "MAX_TEMP_ELEMENTS", 20)  # T·T' = 81 per example: 1 a chunk
    check(TiedLM(), torch.randint(0, 7, (6, 9)), token_ce, torch.randint(0, 7, (6, 9)))


def test_tied_scale_grad_by_freq() -> None:
    # torch divides each row's gradient by the index's count in the whole batch, so the
    # example's contribution is not its own loss's gradient: build it by hand
    model = TiedLM(scale_grad_by_freq=True)
    x, y = torch.randint(0, 7, (6, 9)), torch.randint(0, 7, (6, 9))
    got, _ = hooked_sq_norms(model, x, y, token_ce)
    h = torch.tanh(model.emb(x))
    logits = model.head(h)
    dlogits, dh = torch.autograd.grad(token_ce(logits, y), [logits, h])
    de = (dh * (1 - h.square())).double()  # through the tanh
    counts = torch.bincount(x.flatten(), minlength=7).double()
    want = torch.zeros(6, dtype=torch.float64)
    for i in range(6):
        g = dlogits[i].double().T @ h[i].double()  # the head's (V, d) gradient
        g.index_add_(0, x[i], de[i] / counts[x[i]].unsqueeze(-1))
        want[i] = g.square().sum() + dlogits[i].double().sum(0).square().sum()  # + bias
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


class TwoEmbeddingsAndHead(nn.Module):
    """T5's layout: encoder and decoder embeddings and the head share one weight; the
    decoder's embedding is called after the head's input is known, another after it."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Embedding(7, 5)
        self.dec = nn.Embedding(7, 5)
        self.head = nn.Linear(5, 7, bias=False)
        self.dec.weight = self.head.weight = self.enc.weight

    def forward(self, x: Tensor) -> Tensor:
        context = torch.tanh(self.enc(x)).mean(1, keepdim=True)
        return self.head(context + self.dec(x.flip(1)))


def test_two_embeddings_tied_to_a_head() -> None:
    assert plan(TwoEmbeddingsAndHead()).tied[0].embeddings == ("enc", "dec")
    check(TwoEmbeddingsAndHead(), torch.randint(0, 7, (6, 4)), token_ce,
          torch.randint(0, 7, (6, 4)))


def test_embedding_called_after_its_tied_head() -> None:
    class HeadFirst(TiedLM):
        def forward(self, x: Tensor) -> Tensor:
            logits = self.head(torch.ones(x.shape[0], 1, 5))
            return logits + self.emb(x).sum(-1, keepdim=True)

    check(HeadFirst(), torch.randint(0, 7, (6, 4)), token_ce, torch.randint(0, 7, (6, 4)))


# -- tensors of batch size 1 broadcast over the batch ----------------------------------------


class PositionIds(nn.Module):
    """GPT-2's embedding: token embeddings plus position embeddings of ids (1, T)."""

    def __init__(self, misuse: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.wpe = nn.Embedding(6, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 11)
        self.misuse = misuse

    def forward(self, x: Tensor) -> Tensor:
        pos = self.wpe(torch.arange(x.shape[1]).unsqueeze(0))  # (1, T, d)
        if self.misuse:
            pos = pos[0]  # the same values, but a per-example gradient no longer exists
        return self.head(self.ln(self.wte(x) + pos))


def test_position_ids_of_batch_one() -> None:
    model = PositionIds()
    x, y = torch.randint(0, 11, (5, 6)), torch.randint(0, 11, (5, 6))
    assert check(model, x, token_ce, y)["wpe"] == "embedding-scatter"
    with PerExampleGradNorms(model) as norms:  # a batch of one stays one
        token_ce(model(x[:1]), y[:1]).backward()
        assert norms.sq_norms().shape == (1,)


def test_position_ids_when_the_sequence_is_as_long_as_the_batch() -> None:
    # arange(T).unsqueeze(0) is a view of a tensor of T elements: with T == B it must not
    # be taken for a row of a batch-sized tensor (found with GPT-2 at batch 32, context 32)
    model = PositionIds()
    x, y = torch.randint(0, 11, (6, 6)), torch.randint(0, 11, (6, 6))
    assert check(model, x, token_ce, y)["wpe"] == "embedding-scatter"


def test_batch_one_input_that_is_not_broadcast_is_refused() -> None:
    model = PositionIds(misuse=True)
    x, y = torch.randint(0, 11, (5, 6)), torch.randint(0, 11, (5, 6))
    with PerExampleGradNorms(model) as norms:
        token_ce(model(x), y).backward()
        with pytest.raises(PerExampleUnsupported, match="batch-1 input of module 'wpe'"):
            norms.sq_norms()
        # checked on the first forward only, and refused on every later one
        token_ce(model(x), y).backward()
        with pytest.raises(PerExampleUnsupported, match="batch-1 input of module 'wpe'"):
            norms.sq_norms()


class RelativeBias(nn.Module):
    """T5's attention with a relative position bias: an Embedding of buckets (T_q, T_k),
    permuted to (1, heads, T_q, T_k) and added in place to the scores. The last
    ``queries`` positions attend to all (one: a one-token target, whose buckets are a
    batch-1 input whose 1 is the query length, not the batch)."""

    def __init__(self, queries: int, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.queries, self.heads = queries, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.bias = nn.Embedding(6, heads)
        self.head = nn.Linear(d, 3)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q[:, -self.queries:].reshape(b, self.queries, self.heads, -1).transpose(1, 2)
        k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (k, v))
        buckets = (torch.arange(t)[None, :]
                   - torch.arange(t - self.queries, t)[:, None]).abs().clamp(max=5)
        scores = q @ k.transpose(-1, -2)
        scores += self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # as T5 does
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, self.queries, d)
        return self.head(out)


def test_a_batch_one_input_whose_one_is_not_the_batch_is_refused_not_raised() -> None:
    """T5 with a one-token target: the relative position buckets (1, T_k), expanded to
    the batch, made the user's own forward raise under the hooks (a trial: "output with
    shape [8, 4, 1, 1] doesn't match the broadcast shape [8, 4, 8, 1]"). The root's
    forward runs again without the expansion, with the output and gradients of a run
    without bsfind, and that module is refused by name."""
    model, x = RelativeBias(queries=1), torch.randn(6, 5, 8)
    y = torch.randint(0, 3, (6, 1))
    want = model(x)
    grads = plain_grads(model, x, y, token_ce)
    with PerExampleGradNorms(model) as norms:
        for _ in range(2):  # refused again on the next forward, which is not expanded
            out = model(x)
            assert torch.equal(out, want)
            token_ce(out, y).backward()
            with pytest.raises(PerExampleUnsupported, match=r"the batch-1 input of module "
                               r"'bias' is not broadcast .*the forward raised RuntimeError"):
                norms.sq_norms()
            for p, g in zip(model.parameters(), grads, strict=True):
                torch.testing.assert_close(p.grad, g)
            model.zero_grad()
    assert "forward" not in vars(model)  # the root's guard is gone with the hooks


class Positions(nn.Module):
    """nanoGPT's embedding: position embeddings of ``torch.arange(T)`` (T, d), and token
    ids clamped inside the forward (indices made there that are the examples)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 8)
        self.wpe = nn.Embedding(6, 8)
        self.head = nn.Linear(8, 11)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.wte(x.clamp(max=10)) + self.wpe(torch.arange(x.shape[1])))


@pytest.mark.parametrize("model", [Positions(), RelativeBias(queries=6)],
                         ids=["arange", "buckets"])
def test_indices_made_in_the_forward_as_many_as_the_batch_are_refused(
        model: nn.Module) -> None:
    """Positions or buckets made in the forward, with T equal to the batch, read as
    examples, silently (B_simple 31% high in a trial's tracker; the probe's pass at
    another batch size caught it, the tracker never did). Their module's output is
    checked: example i's outputs must depend on row i alone. Token ids made from the
    root's input in the forward pass that check; other batch sizes are refused by size."""
    x = torch.randint(0, 11, (6, 6)) if isinstance(model, Positions) else torch.randn(6, 6, 8)
    y = torch.randint(0, 3 if isinstance(model, RelativeBias) else 11, (6, 6))
    name = "wpe" if isinstance(model, Positions) else "bias"
    with PerExampleGradNorms(model) as norms:
        for _ in range(2):  # checked on the first forward, refused on the later ones
            token_ce(model(x), y).backward()
            with pytest.raises(PerExampleUnsupported, match=rf"the input of module '{name}' "
                               r"has the batch's size on dim 0 \(6\) but its rows are not"):
                norms.sq_norms()
    if isinstance(model, Positions):
        x, y = torch.randint(0, 11, (5, 6)), torch.randint(0, 11, (5, 6))
        with PerExampleGradNorms(model) as norms:
            token_ce(model(x), y).backward()
            with pytest.raises(PerExampleUnsupported, match="module 'wpe' saw a batch of 6"):
                norms.sq_norms()
        clamped = nn.Sequential(nn.Embedding(11, 8), nn.Linear(8, 11))
        clamped.forward = lambda x: nn.Sequential.forward(clamped, x.clamp(max=10))
        assert check(clamped, x, token_ce, y)["0"] == "embedding-scatter"


class Reshaped(nn.Module):
    """Position embeddings of ids (1, T), then reshaped or reduced as a user may (a
    trial's nanoGPT variants)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.wte, self.wpe, self.head = nn.Embedding(16, 8), nn.Embedding(8, 8), nn.Linear(8, 16)

    def forward(self, x: Tensor) -> Tensor:
        b, t = x.shape
        pe = self.wpe(torch.arange(t).unsqueeze(0))  # (1, T, C)
        pe = {"view": lambda p: p.view(t, -1), "flatten": lambda p: p.flatten(0, 1),
              "repeat": lambda p: p.repeat(b, 1, 1), "sum0": lambda p: p.sum(0),
              "mean0": lambda p: p.mean(0, keepdim=True)}[self.how](pe)
        return self.head(self.wte(x) + pe)


@pytest.mark.parametrize("how", ["view", "flatten", "repeat", "sum0", "mean0"])
def test_a_batch_one_input_reshaped_or_reduced_leaves_the_users_values(how: str) -> None:
    """Expanded to the batch, a position embedding the forward reshapes made it raise in
    the user's loop (.view(T, -1), .flatten(0, 1), .repeat(B, 1, 1)), and one it sums
    over dim 0 changed the user's loss on that step, silently (a trial: 2.9296 to
    3.5742), the check refusing it only after the forward. The root's guard checks it
    when the forward returns, and runs it again without: the user's loss and gradients
    on every step, and the module refused by name."""
    model = Reshaped(how)
    x, y = torch.randint(0, 16, (4, 8)), torch.randint(0, 16, (4, 8))
    want = token_ce(model(x), y)
    grads = plain_grads(model, x, y, token_ce)
    with PerExampleGradNorms(model) as norms:
        for _ in range(2):
            loss = token_ce(model(x), y)
            assert torch.equal(loss, want)
            loss.backward()
            with pytest.raises(PerExampleUnsupported, match="the batch-1 input of module 'wpe'"):
                norms.sq_norms()
            for p, g in zip(model.parameters(), grads, strict=True):
                torch.testing.assert_close(p.grad, g)
            model.zero_grad()


def looped_sq_norms(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """(hooks, exact) |(1/B)·∇L_i|² of token cross-entropy, the exact ones from a loop
    over examples (torch.func cannot run activation checkpointing)."""
    b = x.shape[0]
    want = []
    for i in range(b):
        model.zero_grad()
        (token_ce(model(x[i:i + 1]), y[i:i + 1]) / b).backward()
        want.append(sum(p.grad.double().square().sum() for p in model.parameters()))
    model.zero_grad()
    with PerExampleGradNorms(model) as norms:
        token_ce(model(x), y).backward()
        got = norms.sq_norms()
    return got, torch.stack(want)


class TwoBiases(nn.Module):
    """Two relative-bias layers, one query each (UMT5: a bias in every layer); dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = RelativeBias(queries=1), RelativeBias(queries=1)
        self.proj, self.drop = nn.Linear(3, 8), nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(self.proj(self.a(x)))  # (B, 1, 8)
        return self.b(torch.cat([x[:, :-1], h], 1))


def test_each_layers_batch_one_input_is_refused_in_turn_with_the_same_random_numbers() -> None:
    """A review: with a relative bias in each of two layers, the forward run again after
    refusing the first raised at the second, and the user's loop failed on every step;
    and the rerun drew new dropout masks (T5's loss 5.1346 became 5.7101). The forward
    runs again until it passes, on the random numbers of its first attempt."""
    model, x, y = TwoBiases(), torch.randn(6, 5, 8), torch.randint(0, 3, (6, 1))
    torch.manual_seed(3)
    want = token_ce(model(x), y)
    after = torch.rand(1)
    with PerExampleGradNorms(model) as norms:
        torch.manual_seed(3)
        loss = token_ce(model(x), y)
        assert torch.equal(loss, want) and torch.equal(torch.rand(1), after)
        loss.backward()
        with pytest.raises(PerExampleUnsupported, match="the batch-1 input of module 'a.bias'"):
            norms.sq_norms()


def test_a_batch_sorted_inside_the_forward_is_measured() -> None:
    """A review: token ids sorted by length in the forward (``ids[order]``, the output
    put back in order) are one example per row, in another order; the check of indices
    made in the forward refused them. A permutation passes, exactly."""
    class Sorted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(11, 8), nn.Linear(8, 11)

        def forward(self, x: Tensor) -> Tensor:
            order = torch.argsort((x > 5).sum(1), stable=True)
            return self.head(self.emb(x[order]))[order.argsort()]

    x, y = torch.randint(0, 11, (6, 4)), torch.randint(0, 11, (6, 4))
    got, want = looped_sq_norms(Sorted(), x, y)  # (sorted: rows in another order)
    torch.testing.assert_close(got.sort().values, want.sort().values, rtol=RTOL, atol=0)


def test_a_model_returning_its_loss_alone_is_checked_on_its_last_layer() -> None:
    """A review: with no output of the batch's size (``model(x, y) -> loss``) the check was
    skipped, and positions of a sequence as long as the batch read as examples."""
    class LossOnly(Positions):
        def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
            return token_ce(super().forward(x), x)

    model, x = LossOnly(), torch.randint(0, 11, (6, 6))
    with PerExampleGradNorms(model) as norms:
        model(x).backward()
        with pytest.raises(PerExampleUnsupported, match="the input of module 'wpe' has the "
                           "batch's size"):
            norms.sq_norms()


@pytest.mark.parametrize("reentrant", [True, False])
def test_token_ids_made_in_the_forward_under_checkpointing_are_measured(
        reentrant: bool) -> None:
    """A review: the check of indices made in the forward cannot walk a checkpointed
    graph twice, and refused every model making its token ids there (ids.long(),
    clamp(), HF LLaMA behind such a wrapper). Such a check is left out; exact."""
    from torch.utils.checkpoint import checkpoint

    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.body, self.head = nn.Embedding(11, 8), nn.Linear(8, 8), nn.Linear(8, 11)

        def forward(self, x: Tensor) -> Tensor:
            h = self.emb(x.clamp(max=10))
            h = checkpoint(self.body, h, use_reentrant=reentrant)
            return self.head(h)

    x, y = torch.randint(0, 11, (6, 4)), torch.randint(0, 11, (6, 4))
    got, want = looped_sq_norms(Clamped(), x, y)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


def test_ctrl_c_in_the_forward_leaves_no_open_call() -> None:
    """A review: torch runs no end hook on a KeyboardInterrupt, even always_call, so the
    root's call stayed open and the check never ran again in that context."""
    class Interrupted(Positions):
        stop = True

        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            if self.stop:
                raise KeyboardInterrupt
            return out

    model, x = Interrupted(), torch.randint(0, 11, (6, 6))
    with PerExampleGradNorms(model) as norms:
        with pytest.raises(KeyboardInterrupt):
            model(x)
        model.stop = False
        token_ce(model(x), x).backward()
        with pytest.raises(PerExampleUnsupported, match="the input of module 'wpe' has the "
                           "batch's size"):
            norms.sq_norms()


def test_a_root_forward_that_raises_unexpanded_too_refuses_nothing() -> None:
    """The root's forward raises a shape error of the user's own, with a batch-1 input
    expanded and without: it raises once more, and nothing is refused."""
    class Fails(PositionIds):
        fail = True

        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            if self.fail:
                raise RuntimeError("The size of tensor a (5) must match the size of b (3)")
            return out

    model = Fails()
    x, y = torch.randint(0, 11, (5, 6)), torch.randint(0, 11, (5, 6))
    with PerExampleGradNorms(model) as norms:
        with pytest.raises(RuntimeError, match="size of tensor a"):
            model(x)
        norms.forget()
        model.fail = False
        token_ce(model(x), y).backward()
        assert norms.sq_norms().shape == (5,)  # still measured: 'wpe' not refused


def test_the_guarded_root_keeps_its_forwards_signature() -> None:
    """A Hugging Face Trainer keeps the dataset columns the model's forward names
    (inspect.signature), and bsfind's own workload reads it too."""
    import inspect

    model = PositionIds()
    want = inspect.signature(model.forward)
    with PerExampleGradNorms(model):
        assert "forward" in vars(model)
        assert inspect.signature(model.forward) == want


def test_batch_one_input_of_a_fallback_module_names_it_and_the_fix() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.randn(8))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.scale

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos = Scale()
            self.head = nn.Linear(8, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(x + self.pos(torch.ones(1, 8)))

    model = Model()
    with PerExampleGradNorms(model) as norms:
        model(torch.randn(4, 8)).sum().backward()
        with pytest.raises(PerExampleUnsupported) as info:
            norms.sq_norms()
    assert info.value.message.startswith("module 'pos' saw a batch of 1 where the model's "
                                         "batch is 4")
    assert "pass the tensor with the batch size" in info.value.message


def test_the_batch_most_modules_saw_is_the_one_named() -> None:
    """Window attention folds windows into dim 0: its projections saw batch × windows
    rows, and the message named the one module that saw a batch of 1, with advice about
    position ids a Swin user cannot follow (a trial). It names what most modules saw."""
    class Table(nn.Module):  # a bias table read on a constant input of batch 1
        def __init__(self) -> None:
            super().__init__()
            self.t = nn.Parameter(torch.randn(4))

        def forward(self, x: Tensor) -> Tensor:
            return x * self.t

    class Windows(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = Table()
            self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:  # x (B, 8, 4): 2 windows of 4 per example
            w = x.reshape(-1, 4, 4)  # (2B, 4, 4)
            h = self.q(w) + self.k(w) + self.bias(torch.ones(1, 4))
            return self.head(h.reshape(x.shape[0], 8, 4).mean(1))

    model = Windows()
    with PerExampleGradNorms(model) as norms:
        model(torch.randn(3, 8, 4)).sum().backward()
        with pytest.raises(PerExampleUnsupported) as info:
            norms.sq_norms()
    assert re.match(r"module '[qk]' saw a batch of 6 where the model's batch is 3 \(and 2 "
                    r"more\)", info.value.message), info.value.message
    assert "folds another axis into dim 0" in info.value.message


def test_root_parameters_broadcast_over_the_batch() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls = nn.Parameter(torch.randn(1, 1, 4))
            self.scale = nn.Parameter(torch.randn(1, 4))  # (1, d) against (B, d)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.body(x)], dim=1)
            return self.head(h[:, 0] * self.scale + h[:, 1:].mean(1))

    model = Tokens()
    assert plan(model).rules[""] == "broadcast"
    paths = check(model, torch.randn(5, 3, 4))
    assert paths["cls"] == paths["scale"] == "broadcast"


def test_root_parameter_indexed_along_the_batch_is_refused() -> None:
    class Indexed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = nn.Parameter(torch.randn(1, 4))
            self.body = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x) + self.bias[0]

    model = Indexed()
    with PerExampleGradNorms(model) as norms:
        model(torch.randn(3, 4)).square().sum().backward()
        with pytest.raises(PerExampleUnsupported, match="parameter 'bias' of the root is "
                           "expanded over the batch"):
            norms.sq_norms()


class ReZero(nn.Module):
    """A residual block scaled by a learned scalar on the block itself (ReZero)."""

    def __init__(self, d: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.ff = nn.Linear(d, d)
        self.resweight = nn.Parameter(torch.full(shape, 0.1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.resweight * torch.tanh(self.ff(x))


@pytest.mark.parametrize("batch", [16, 8, 2])  # 8 = d: the expanded scale broadcast
def test_a_leading_one_that_is_not_the_batchs_dim_is_refused_not_raised(batch: int) -> None:
    """A (1,) scale times (B, d) activations, expanded to (B,) by the broadcast rule,
    made the user's own forward raise (B != d) under the hooks, in their training loop
    (a review). The forward runs again unexpanded, with the same output and gradients as
    without bsfind, and the parameter is refused by name; (1, 1) is measured exactly."""
    model = nn.Sequential(nn.Linear(6, 8), ReZero(8, (1,)), nn.Linear(8, 3))
    x = torch.randn(batch, 6)
    want = model(x)
    model.zero_grad()
    want.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with PerExampleGradNorms(model) as norms:
        for _ in range(2):  # refused again on the next forward, which is not expanded
            out = model(x)
            assert torch.allclose(out, want)
            out.square().sum().backward()
            why = ("is expanded over the batch.*meets a tensor of more dimensions" if
                   batch == 8 else r"\(shape \(1,\)\) is not broadcast over the batch")
            with pytest.raises(PerExampleUnsupported, match="parameter 'resweight' of '1' "
                               + why):
                norms.sq_norms()
            assert all(torch.allclose(p.grad, g) for p, g in zip(model.parameters(), grads,
                                                                  strict=True))
            model.zero_grad()
    assert isinstance(model[1].resweight, nn.Parameter)
    assert "forward" not in vars(model[1])  # the guard is gone with the hooks
    check(nn.Sequential(nn.Linear(6, 8), ReZero(8, (1, 1)), nn.Linear(8, 3)),
          torch.randn(batch, 6))


class Cls(nn.Module):
    """A root owning a cls token (1, 1, d) beside its children; raises on request."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.calls = 0
        self.fail: Exception | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.body(x)], dim=1)
        return self.head(h[:, 0] + h[:, 1:].mean(1))


def test_a_copy_made_while_the_hooks_are_on_runs_its_own_forward() -> None:
    """A deep copy made while the hooks are on (torch's AveragedModel for an EMA) copies
    them: its guard was a closure that ran the original's forward for good, and after a
    backward the copy failed on the AccumulateGrad nodes the hooks keep (a review). The
    copy runs its own weights, and its own guard catches its own expansion."""
    import copy

    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model, x = Cls(), torch.randn(5, 3, 4)
    with PerExampleGradNorms(model) as norms:
        model(x).square().sum().backward()
        norms.sq_norms()
        twin = copy.deepcopy(model)
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(2.0)
        assert torch.allclose(twin(x), Cls.forward(twin, x))
        assert not torch.allclose(twin(x), model(x))
        ema.update_parameters(model)
        assert torch.allclose(ema(x), model(x))  # (an EMA of one step is the model)
    rezero = nn.Sequential(nn.Linear(6, 8), ReZero(8, (1,)), nn.Linear(8, 3))
    with PerExampleGradNorms(rezero):
        copied = copy.deepcopy(rezero)
    y = torch.randn(16, 6)
    assert torch.allclose(copied(y), rezero(y))  # with grad on: nothing expanded
    assert "forward" not in vars(copied[1]) or not hasattr(vars(copied[1])["forward"],
                                                           "owners")


def test_a_copy_of_a_hooked_model_is_not_measured_and_copies_after_a_backward() -> None:
    """torch copies a module's hooks with it: a copy's hooks measured the copy (an EMA
    1.7x slower, for good), and copying or torch.save failed after a backward, on the
    hooks' AccumulateGrad nodes and weak references (a trial). A copied hook does
    nothing; the original's measurement is untouched by the copy's passes."""
    import copy
    import io

    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x = torch.randn(8, 6)
    want = exact_sq_norms(model, x, torch.zeros(8, 3), lambda o, t: o.square().mean())
    with PerExampleGradNorms(model) as norms:
        model(x).square().mean().backward()
        twin = copy.deepcopy(model)
        torch.save(model, io.BytesIO())
        twin(torch.randn(5, 6)).square().mean().backward()  # the copy's pass: not seen
        got = norms.sq_norms()
    assert torch.allclose(got.double(), want, rtol=1e-4)
    assert all(h.__name__ == "_nothing" for h in twin[0]._forward_hooks.values())


def test_an_error_the_user_raises_is_theirs_and_refuses_nothing() -> None:
    """Any exception out of a broadcast owner read as an expansion failure: the forward
    ran twice and per-example norms were refused for good (a review: a loop skipping a
    batch on out of memory). Only a shape error is retried; one that raises unexpanded
    too is the user's, and nothing is refused."""
    model, x = Cls(), torch.randn(5, 3, 4)
    with PerExampleGradNorms(model) as norms:
        for error in (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
                      KeyError("stop"), RuntimeError("The size of tensor a (5) must match")):
            model.fail, model.calls = error, 0
            with pytest.raises(type(error)):
                model(x)
            assert model.calls == (2 if "size" in str(error) else 1)
            norms.forget()
        model.fail = None
        model(x).square().sum().backward()
        assert norms.sq_norms().shape == (5,)  # still measured


def test_hooks_closed_out_of_order_leave_no_guard() -> None:
    """Two sets of hooks on one model: each puts its parameters back last-in-first-out
    (the second put the first's expanded tensor back, for good: a review), and the
    guard goes with the last of them, in whatever order they close."""
    model, x = Cls(), torch.randn(5, 3, 4)
    a, b = PerExampleGradNorms(model), PerExampleGradNorms(model)
    a.__enter__()
    b.__enter__()
    model(x)
    assert isinstance(model.cls, nn.Parameter) and model.cls.shape == (1, 1, 4)
    a.__exit__(None, None, None)
    assert "forward" in vars(model)  # b's hooks still on
    b.__exit__(None, None, None)
    assert "forward" not in vars(model)
    assert [n for n, _ in model.named_parameters()][0] == "cls"


def test_a_scale_read_as_a_number_is_refused_not_raised() -> None:
    """.item(), float() or `if p > 0` on an expanded (1,) parameter raise no shape error
    but "cannot be converted" or "ambiguous" (a review): retried unexpanded too."""
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Parameter(torch.ones(1))
            self.body = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.body(x)
            return h * self.gate if self.gate.detach().item() > 0 else h

    model, x = Gated(), torch.randn(6, 4)
    want = model(x)
    with PerExampleGradNorms(model) as norms:
        out = model(x)
        assert torch.allclose(out, want)
        out.square().sum().backward()
        with pytest.raises(PerExampleUnsupported, match="parameter 'gate' of the root"):
            norms.sq_norms()


def test_parameter_registered_on_a_module_and_its_child() -> None:
    # transformers' BERT: the MLM head registers its decoder's bias as its own too
    class Head(nn.Module):
        def __init__(self, use_it: bool) -> None:
            super().__init__()
            self.decoder = nn.Linear(4, 3)
            self.bias = self.decoder.bias
            self.use_it = use_it

        def forward(self, x: Tensor) -> Tensor:
            out = self.decoder(x)
            return out + self.bias if self.use_it else out

    p = plan(Head(use_it=False))
    assert p.ok and p.aliases == {"bias": "decoder"}
    check(Head(use_it=False), torch.randn(5, 4))
    model = Head(use_it=True)
    with PerExampleGradNorms(model) as norms:
        model(torch.randn(5, 4)).sum().backward()
        with pytest.raises(PerExampleUnsupported, match="the root uses parameter 'bias' in "
                           "its own forward, but it is also the parameter of its submodule "
                           "'decoder'"):
            norms.sq_norms()
    assert isinstance(model.bias, nn.Parameter)  # swapped back


# -- nn.MultiheadAttention ---------------------------------------------------------------------


class Attend(nn.Module):
    """One nn.MultiheadAttention called in one of several ways."""

    def __init__(self, how: str, dropout: float = 0.0) -> None:
        super().__init__()
        extra = {"kdim": 5, "vdim": 3} if how == "kdim" else {}
        self.attn = nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True,
                                          bias=how != "no_bias", **extra)  # type: ignore[arg-type]
        self.how = how
        self.register_buffer("mask3d", torch.randn(1, 6, 6))

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t)
        pad = torch.zeros(x.shape[0], t, dtype=torch.bool)
        pad[:, -2:] = True
        if self.how == "cross":  # query from part of the sequence, keys and values all of it
            out, w = self.attn(x[:, :3], x, x, average_attn_weights=False)
            assert w is not None
            return out + w.sum(1).mean(-1, keepdim=True)
        if self.how == "kdim":
            return self.attn(x, x[..., :5], x[..., 5:], attn_mask=causal.bool(),
                             need_weights=False)[0]
        if self.how == "qkv":  # three different tensors: three slices of in_proj
            return self.attn(x, x.flip(1), torch.tanh(x), key_padding_mask=pad)[0]
        if self.how == "causal":
            return self.attn(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
        if self.how == "mask3d":  # one float mask per (example, head)
            mask = self.mask3d.expand(x.shape[0] * 2, t, t)
            return self.attn(x, x, x, attn_mask=mask, key_padding_mask=pad)[0]
        return self.attn(x, x, x)[0]


@pytest.mark.parametrize("how", ["self", "no_bias", "cross", "kdim", "qkv", "causal", "mask3d"])
def test_multihead_attention(how: str) -> None:
    model = Attend(how)
    assert plan(model).rules == {"attn": "attention"}
    paths = check(model, torch.randn(4, 6, 8))
    assert "attn.out_proj" in paths


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_dropout_in_training(need_weights: bool) -> None:
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(11, 8)
            self.attn = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
            self.head = nn.Linear(8, 11)

        def forward(self, x: Tensor) -> Tensor:
            e = self.emb(x)
            return self.head(self.attn(e, e, e, need_weights=need_weights)[0])

    x, y = torch.randint(0, 11, (5, 7)), torch.randint(0, 11, (5, 7))
    got, want = same_forward_sq_norms(Model().train(), x, y)
    torch.testing.assert_close(got, want, rtol=RTOL, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"batch_first": False}, "has batch_first=False"),
        ({"batch_first": True, "add_bias_kv": True}, "has add_bias_kv=True"),
        ({"batch_first": True, "add_zero_attn": True}, "has add_zero_attn=True"),
    ],
)
def test_multihead_attention_refused(kwargs: dict[str, bool], problem: str) -> None:
    p = plan(nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2, **kwargs)))
    assert not p.ok
    assert p.reason.startswith(f"MultiheadAttention at '1' (parameter 'in_proj_weight') "
                               f"{problem}")


def test_unbatched_attention_input_is_refused_at_run_time() -> None:
    model = Attend("self")
    with PerExampleGradNorms(model) as norms:
        model(torch.randn(6, 8)).sum().backward()
        with pytest.raises(PerExampleUnsupported, match="MultiheadAttention at 'attn' got an "
                           "unbatched"):
            norms.sq_norms()


def test_a_loop_over_examples_is_not_expanded() -> None:
    # x[i:i+1] is a slice of the batch, not a tensor broadcast over it: the layer is
    # called once per example, which is refused (as before), not expanded
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            return torch.cat([self.lin(x[i : i + 1]) for i in range(x.shape[0])])

    model = Loop()
    with PerExampleGradNorms(model) as norms:
        model(torch.randn(3, 4)).sum().backward()
        with pytest.raises(PerExampleUnsupported, match="called more than once"):
            norms.sq_norms()


def test_attention_with_frozen_in_projection() -> None:
    model = Attend("self")
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.in_proj_bias.requires_grad_(False)
    paths = check(model, torch.randn(4, 6, 8))
    assert set(paths) == {"attn.out_proj"}


def test_position_ids_inside_activation_checkpointing() -> None:
    # the checkpointed segment is recomputed during the backward, outside the root's
    # forward: its batch-1 input is expanded to the last forward's batch again
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(PositionIds):
        checkpointing = True

        def forward(self, x: Tensor) -> Tensor:
            if not self.checkpointing:
                return super().forward(x)
            return self.head(self.ln(checkpoint(self.embed, x, use_reentrant=False)))

        def embed(self, x: Tensor) -> Tensor:
            return self.wte(x) + self.wpe(torch.arange(x.shape[1]).unsqueeze(0))

    model = Checkpointed()
    x, y = torch.randint(0, 11, (5, 6)), torch.randint(0, 11, (5, 6))
    got, _ = hooked_sq_norms(model, x, y, token_ce)
    model.checkpointing = False  # torch.func cannot trace through the checkpoint
    torch.testing.assert_close(got, exact_sq_norms(model, x, y, token_ce), rtol=RTOL, atol=0)
