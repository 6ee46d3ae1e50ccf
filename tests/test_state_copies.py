"""Saved states live in host memory, and the run's optimizer state is moved there while
the hardware is measured: on a GPU neither takes the device's memory from the runs, nor
counts in the memory line measured there (whose fixed part is every tensor allocated).
On this CPU machine the moves are swapped for dtype changes to check the bookkeeping."""

from __future__ import annotations

import collections
import gc
import weakref

import pytest
import torch

from bsfind import training
from bsfind.training import host_copy, offloaded, restored_weights
from tests.test_along import GOOD, _steady_ladder, run_json
from tests.test_branches import tiny_job, trained


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


def test_offloaded_moves_every_state_tensor_out_and_back() -> None:
    job = tiny_job()
    opt = trained(job)
    before = [t.clone() for t in _state_tensors(opt)]
    originals = [weakref.ref(t) for t in _state_tensors(opt)]
    with offloaded(opt, which=lambda t: True, move=lambda t: t.to(torch.float64),
                   back=lambda host, device: host.to(torch.float32)):
        inside = _state_tensors(opt)
        assert len(inside) == len(before) and all(t.dtype == torch.float64 for t in inside)
        del inside
        gc.collect()  # nothing holds the originals: on a GPU their memory is free
        assert all(ref() is None for ref in originals)
    after = _state_tensors(opt)
    assert [t.dtype for t in after] == [t.dtype for t in before]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    training.training_step(job, opt, torch.arange(8))  # and the optimizer still steps


def test_offloaded_puts_the_state_back_after_an_interrupt() -> None:
    job = tiny_job()
    opt = trained(job)
    dtypes = [t.dtype for t in _state_tensors(opt)]
    with pytest.raises(KeyboardInterrupt), offloaded(
            opt, which=lambda t: True, move=lambda t: t.to(torch.float64),
            back=lambda host, device: host.to(torch.float32)):
        raise KeyboardInterrupt
    assert [t.dtype for t in _state_tensors(opt)] == dtypes


def test_host_tensors_stay_where_they_are() -> None:
    job = tiny_job()
    opt = trained(job)
    ids = [id(t) for t in _state_tensors(opt)]
    with offloaded(opt):  # everything is on the host already
        assert [id(t) for t in _state_tensors(opt)] == ids
    assert [id(t) for t in _state_tensors(opt)] == ids
    with offloaded(None):  # no run along training, no optimizer
        pass


def test_host_copy_copies_every_tensor_of_a_nested_state() -> None:
    state = {"w": torch.ones(2), "groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0]}],
             "step": torch.tensor(3.0)}
    copied = host_copy(state)
    assert isinstance(copied, dict)
    assert torch.equal(copied["w"], state["w"]) and copied["w"].data_ptr() != state["w"].data_ptr()
    assert copied["groups"] == state["groups"] and copied["groups"] is not state["groups"]
    assert copied["groups"][0]["betas"] == (0.9, 0.999)
    state["step"] += 1  # an optimizer's in-place update does not reach the copy
    assert copied["step"].item() == 3.0
    pair = collections.namedtuple("pair", "a b")(torch.ones(1), 2.0)
    again = host_copy({"pair": pair})
    assert isinstance(again, dict) and type(again["pair"]) is type(pair)
    assert torch.equal(again["pair"].a, pair.a) and again["pair"].b == 2.0


def test_restored_weights_come_back_from_the_host_copy() -> None:
    job = tiny_job()
    before = {k: v.clone() for k, v in job.model.state_dict().items()}
    opt = job.make_optimizer(0.5)
    with restored_weights(job.model):
        training.training_step(job, opt, torch.arange(16))
        assert any(not torch.equal(v, before[k]) for k, v in job.model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in job.model.state_dict().items())
    assert all(p.grad is None for p in job.model.parameters())


def test_the_hardware_and_the_learning_rate_are_measured_with_the_runs_state_away(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's optimizer state is moved (here: to float64, standing in for the host)
    before the hardware measurement and stays there through the learning-rate runs."""
    from bsfind import branches, pipeline
    from bsfind.runner import LocalRunner

    _steady_ladder(monkeypatch)
    held: list[torch.optim.Optimizer] = []
    seen: list[tuple[str, set[torch.dtype]]] = []

    def away(optimizer: torch.optim.Optimizer | None):  # type: ignore[no-untyped-def]
        assert optimizer is not None and optimizer.state  # the run's, with its state
        held.append(optimizer)
        return offloaded(optimizer, which=lambda t: t.is_floating_point(),
                         move=lambda t: t.to(torch.float64),
                         back=lambda host, device: host.to(torch.float32))

    def dtypes() -> set[torch.dtype]:
        return {t.dtype for t in _state_tensors(held[0]) if t.dim() > 0}

    hardware, lr = LocalRunner.measure_hardware, branches.measure_lr

    def measuring(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(("hardware", dtypes()))
        return hardware(self, *args, **kwargs)

    def searching(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(("learning rate", dtypes()))
        return lr(*args, **kwargs)

    monkeypatch.setattr(pipeline, "offloaded", away)
    monkeypatch.setattr(LocalRunner, "measure_hardware", measuring)
    monkeypatch.setattr(branches, "measure_lr", searching)
    doc = run_json("recommend", GOOD, "--set", "probe.max_seconds=6",
                   "--set", "optimizer.name=adam", "--set", "optimizer.lr=0.01")
    assert seen == [("hardware", {torch.float64}), ("learning rate", {torch.float64})]
    assert dtypes() == {torch.float32}  # back after the block
    assert doc["recommendation"]["batch_size"] >= 1
