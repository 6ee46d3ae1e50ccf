"""``--plot``: PNG and SVG from the advisor's candidates; clear errors otherwise."""

from __future__ import annotations

import builtins
import math
from pathlib import Path

import pytest

from bsfind.advisor import AdvisorInputs, advise
from bsfind.plot import MISSING, plot_candidates
from bsfind.results import Candidate, Interval, TimingCurve


def _candidates(timed: bool = True) -> tuple[Candidate, ...]:
    curve = TimingCurve(points=(), t0=0.02, per_example=1e-4, r2=1.0, source="measured")
    return advise(AdvisorInputs(
        b_n=2000.0, b_n_ci=Interval(800.0, 1152.0), baseline_batch=64, baseline_lr=0.1,
        optimizer_family="sgd", dataset_size=10**6, timing=curve if timed else None,
    )).candidates


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<svg")])
def test_writes_png_and_svg(tmp_path: Path, suffix: str, magic: bytes) -> None:
    pytest.importorskip("matplotlib")
    out = plot_candidates(_candidates(), tmp_path / f"plot{suffix}", title="digits-mlp")
    data = out.read_bytes()
    assert out == tmp_path / f"plot{suffix}" and len(data) > 1000
    assert magic in data[:2000]
    assert [p.name for p in tmp_path.iterdir()] == [f"plot{suffix}"]  # no temp left


def test_plots_without_timing(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rows = _candidates(timed=False)
    assert all(math.isnan(c.time_ratio) for c in rows)
    out = plot_candidates(rows, tmp_path / "steps.svg", title="no timing")
    assert out.stat().st_size > 1000


@pytest.mark.parametrize("name", ["plot.jpg", "plot", "plot.pdf"])
def test_bad_suffix(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="unsupported file type"):
        plot_candidates(_candidates(), tmp_path / name, title="x")
    assert list(tmp_path.iterdir()) == []


def test_no_candidates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no candidates"):
        plot_candidates([], tmp_path / "plot.png", title="x")


def test_missing_matplotlib_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: object, **kwargs: object) -> object:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ImportError) as info:
        plot_candidates(_candidates(), tmp_path / "plot.png", title="x")
    assert str(info.value) == MISSING == "--plot needs matplotlib: pip install 'bsfind[plot]'"
