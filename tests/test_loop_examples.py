"""The README's "Use it in your training loop" examples are the files in examples/,
and each of them runs.

    .venv/bin/python -m pytest tests/test_loop_examples.py -q

Each example runs in this process (the frameworks' imports are shared with the
integration tests) in a temporary directory, and must leave a tracker log there.
"""

from __future__ import annotations

import re
import runpy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bsfind.tracker import read_log
from tests.conftest import ROOT

EXAMPLES = ROOT / "examples"
SECTION = "## Use it in your training loop"
# name -> the optional packages it needs
NEEDS = {"train_loop": (), "lightning_callback": ("lightning",),
         "hf_trainer": ("transformers", "accelerate")}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    torch.set_num_threads(1)
    yield


def _section() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(SECTION)
    end = readme.index("\n## ", start + len(SECTION))
    return readme[start:end]


def test_the_section_follows_quick_start_and_shows_every_example() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^## (.+)$", readme, flags=re.M)
    assert headings[headings.index("Quick start") + 1] == SECTION[3:]
    blocks = re.findall(r"```python\n(.*?)```", _section(), flags=re.S)
    # examples/ also holds spec-side files (hf_causal_lm.py, tests/test_examples.py)
    files = {name: (EXAMPLES / f"{name}.py").read_text(encoding="utf-8") for name in NEEDS}
    assert sorted(blocks) == sorted(files.values())  # verbatim: the README runs as shown


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                            "ignore::FutureWarning")
@pytest.mark.parametrize("name", list(NEEDS))
def test_example_runs(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    for module in NEEDS[name]:
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
    records = read_log(tmp_path / "noise.jsonl")
    assert records and records[-1].grad_norm_sq > 0
    assert capsys.readouterr().out.strip()
