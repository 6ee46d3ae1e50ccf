"""bsfind.torch_compat: every torch internal it looks up is present on the pinned torch
(a fallback in use would go unnoticed: bsfind stays correct, if slower or less precise),
and the fallbacks of the per-example hooks' pass checks keep the numbers exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsfind import torch_compat as compat
from bsfind.noise.per_example import PerExampleGradNorms
from tests.noise.test_per_example import exact_sq_norms


def test_the_internals_are_present_on_this_torch() -> None:
    assert compat.has_graph_task_id()
    assert compat._WILL_EXECUTE is not None
    assert getattr(torch.autograd.graph, "get_gradient_edge", None) is not None
    assert getattr(torch._C, "_are_functorch_transforms_active", None) is not None
    assert hasattr(torch.autograd.forward_ad, "_current_level")
    assert getattr(torch.ops.aten, "_unsafe_view", None) is not None
    assert compat._BATCHNORM_BASE is not None
    assert None not in (compat._FOREACH_NORM, compat._FOREACH_SUB_, compat._FOREACH_COPY_)
    assert compat.can_queue_backward_callback()
    assert compat.hook_next_id() is not None  # (a loaded copy's hook ids: Hook.__reduce__)
    # a second tracker on one DDP model finds the first's comm hook in DDP's own list
    import inspect

    from torch.nn.parallel import DistributedDataParallel
    assert "self._comm_hooks.append" in inspect.getsource(
        DistributedDataParallel.register_comm_hook)


def test_gradient_reach_tells_what_a_pass_does_with_a_parameters_gradient() -> None:
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3, requires_grad=True)
    seen: list[str] = []

    def forward() -> torch.Tensor:
        out = lin(x)
        out.register_hook(lambda g: seen.append(compat.gradient_reach(lin.weight)))
        return out.square().sum()

    forward().backward()
    torch.autograd.grad(forward(), x)
    torch.autograd.grad(forward(), [lin.weight, lin.bias])
    forward().backward(inputs=[x])
    assert seen == ["accumulates", "untouched", "returns", "untouched"]
    lin.weight.requires_grad_(False)
    forward().backward()
    assert seen[-1] == "untouched"  # a frozen weight gets no gradient


@pytest.mark.parametrize("missing", ["_WILL_EXECUTE", "_TASK_ID"])
def test_without_the_internals_the_hooks_stay_exact(missing: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallbacks: every pass counts as accumulating (no will-execute), every hook as
    its own backward (no task id); one plain backward is measured exactly either way."""
    monkeypatch.setattr(compat, missing, None)
    assert compat.gradient_reach(torch.zeros(1, requires_grad=True)) == "accumulates" or (
        missing == "_TASK_ID")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with PerExampleGradNorms(model) as norms:
        F.cross_entropy(model(x), y).backward()
        got = norms.sq_norms()
    want = exact_sq_norms(model, x, y, F.cross_entropy)
    assert torch.allclose(got, want, rtol=1e-6)


def test_a_backward_over_part_of_the_parameters_is_measured_over_that_part() -> None:
    """A review: backward(inputs=...) (or autograd.grad over some parameters, assigned to
    .grad) reaching the first and last layers: a layer the pass skips added its norms
    (1.6x), when the pass's reach was read once from the first module. Module by module,
    the norms are those of the parameters the pass reached; a pass over part of one
    layer's parameters is refused (its norms cover them together)."""
    from bsfind.noise.per_example import PerExampleUnsupported

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    reached = [*model[4].parameters(), *model[0].parameters()]
    with PerExampleGradNorms(model) as norms:
        F.cross_entropy(model(x), y).backward(inputs=reached)
        got = norms.sq_norms()
    model[2].requires_grad_(False)  # the exact value over the parameters the pass reached
    want = exact_sq_norms(model, x, y, F.cross_entropy)
    model[2].requires_grad_(True)
    assert torch.allclose(got, want, rtol=1e-6)
    with PerExampleGradNorms(model) as norms:
        F.cross_entropy(model(x), y).backward(inputs=[model[4].weight, model[0].weight])
        with pytest.raises(PerExampleUnsupported, match="reached some of its parameters"):
            norms.sq_norms()


def test_a_parameter_moved_to_another_dtype_is_still_measured() -> None:
    """A review: .double() (as .to() and .half()) gives a parameter a new AccumulateGrad
    node; the kept one then read every pass as leaving it untouched, and the layer's
    norms were dropped (tr(Σ) 1.38 for 5.28), or nothing was measured."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    with PerExampleGradNorms(model) as norms:
        F.cross_entropy(model(x), y).backward()
        norms.sq_norms()
        model.zero_grad()
        model.double()
        F.cross_entropy(model(x.double()), y).backward()
        got = norms.sq_norms()
    want = exact_sq_norms(model, x.double(), y, F.cross_entropy)
    assert torch.allclose(got, want, rtol=1e-9)


def test_a_module_read_by_torch_func_may_leave_a_parameter_unused() -> None:
    """A review: a leaf module (no rule: torch.func reads it) whose forward uses its
    gate only on a flag was refused as a pass over part of its parameters."""
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 3) * 0.3)
            self.gate = nn.Parameter(torch.ones(3))
            self.use_gate = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.tanh(x @ self.w)
            return out * self.gate if self.use_gate else out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), Gated())
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    with PerExampleGradNorms(model) as norms:
        F.cross_entropy(model(x), y).backward()
        got = norms.sq_norms()
    assert torch.allclose(got, exact_sq_norms(model, x, y, F.cross_entropy), rtol=1e-6)
