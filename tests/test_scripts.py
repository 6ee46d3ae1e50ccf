"""The validation scripts (scripts/critical_batch.py, scripts/equal_time.py) on a tiny setting.

Not a check of the evidence (docs/validation.md has that), only that the
scripts still run end to end against the current bsfind API, in a few seconds.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import _train  # noqa: E402
import branch_eval  # noqa: E402
import critical_batch  # noqa: E402
import equal_time  # noqa: E402

pytest.importorskip("sklearn")  # the digits dataset
pytest.importorskip("matplotlib")


def test_fit_recovers_exact_critical_batch() -> None:
    bs = np.array([4, 8, 16, 32, 64, 128, 256, 512])
    steps = 100.0 * (1 + 50.0 / bs)
    fit = _train.fit_critical(list(zip(bs.tolist(), steps.tolist(), strict=True)))
    assert fit is not None
    assert fit.b_crit == pytest.approx(50.0, rel=1e-9)
    assert fit.s_min == pytest.approx(100.0, rel=1e-9)
    assert fit.r2 == pytest.approx(1.0)
    assert fit.rel_rms < 1e-9


def test_fit_flags_no_saturation_and_too_few_points() -> None:
    # S halves with every doubling: pure 1/B, S_min = 0, B_crit unbounded.
    fit = _train.fit_critical([(4, 800.0), (8, 400.0), (16, 200.0), (32, 100.0)])
    assert fit is not None and (math.isinf(fit.b_crit) or fit.b_crit > 1e6)
    assert _train.fit_critical([(4, 10.0), (8, 9.0)]) is None


@pytest.fixture
def one_thread() -> None:
    # The scripts default to one thread: two threads on a shared 2-core runner
    # oversubscribe it and slow this test tenfold.
    torch.set_num_threads(1)


@pytest.mark.usefixtures("one_thread")
def test_critical_batch_runs_end_to_end(tmp_path: Path) -> None:
    spec, job = _train.load_job(str(ROOT / "configs" / "digits-mlp.yaml"))
    res = critical_batch.gather(
        spec, job, batches=[16, 64, 256], lr_mults=[0.5], seeds=1, targets=[1.5, 1.0],
        max_steps=150, extend=0, eval_examples=256, probe_seconds=0.25, curv_batch=64,
        window_points=2, window_seconds=0.1,
    )
    assert [b.batch_size for b in res.batches] == [16, 64, 256]
    for b in res.batches:
        assert all(v is not None for v in b.best_steps.values())
    # More examples per step, never more steps.
    s = [b.best_steps[1.0] for b in res.batches]
    assert s[0] >= s[1] >= s[2]  # type: ignore[operator]
    assert res.fits[1.0] is not None
    # Two probe runs (data orders) by default, each probed at the crossing and at one
    # neighbouring checkpoint; the pooled estimate combines all four.
    assert sum(p.at_crossing for p in res.probes[1.0]) == 2
    assert len(res.probes[1.0]) == 4
    assert all(p.b_simple_rounds > 0 for p in res.probes[1.0])
    pooled = res.pooled[1.0]
    assert pooled is not None and pooled.checkpoints == 4
    md = critical_batch.render_markdown(res)
    assert "B_crit" in md and "| 1 |" in md
    critical_batch.plot(res, tmp_path / "cb.png")
    assert (tmp_path / "cb.png").stat().st_size > 0
    assert critical_batch.to_json(res)["targets"] == [1.5, 1.0]


@pytest.mark.usefixtures("one_thread")
def test_equal_time_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "et"
    rc = equal_time.main([str(ROOT / "configs" / "digits-mlp.yaml"), "--batch", "128",
                          "--lr", "0.003", "--seconds", "0.3", "--max-factor", "3",
                          "--eval-examples", "256", "--threads", "1", "--out", str(out)])
    assert rc == 0
    md = out.with_suffix(".md").read_text()
    assert "manual (--batch/--lr)" in md and "recommended, same budget" in md
    doc = out.with_suffix(".json").read_text()
    assert '"measured"' in doc


@pytest.mark.usefixtures("one_thread")
def test_branch_eval_runs_end_to_end(tmp_path: Path) -> None:
    """A tiny sweep's JSON, then the branches from its probe runs' crossings."""
    import json

    spec, job = _train.load_job(str(ROOT / "configs" / "digits-mlp.yaml"))
    res = critical_batch.gather(
        spec, job, batches=[16, 64, 256], lr_mults=[1.0], seeds=1, targets=[1.0],
        max_steps=150, extend=0, eval_examples=256, probe_seconds=0.25, curv_batch=64,
        window_points=1, probe_seeds=1)
    crit = tmp_path / "crit.json"
    crit.write_text(json.dumps(critical_batch.to_json(res)))
    out = tmp_path / "branch"
    rc = branch_eval.main([str(ROOT / "configs" / "digits-mlp.yaml"), "--crit", str(crit),
                           "--seeds", "0", "--threads", "1", "--out", str(out)])
    assert rc == 0
    md = out.with_suffix(".md").read_text()
    assert "branch critical batch" in md and "% of sweep" in md
    doc = json.loads(out.with_suffix(".json").read_text())
    row = doc["summary"][0]
    assert row["target"] == 1.0 and row["critical_batch"][0] in (64, 128, 256, 512, 1024)
    assert row["sweep_examples"] == sum(r.steps * r.batch_size
                                        for b in res.batches for r in b.runs)
    assert doc["measurements"][0]["branches"]["optimizer_state"] == "carried"
