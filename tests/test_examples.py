"""The examples the README shows: a Hugging Face causal LM through its own loss.

    .venv/bin/python -m pytest tests/test_examples.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bsfind.cli import app
from tests.conftest import ROOT

pytest.importorskip("transformers")
SPEC = str(ROOT / "examples" / "hf-causal-lm.yaml")
runner = CliRunner()


def test_validate_the_hf_example() -> None:
    r = runner.invoke(app, ["validate", SPEC, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["loss"] == "model" and doc["method"] == "per-example"
    assert "'transformer.wte.weight' tied across 'transformer.wte', 'lm_head'" in (
        doc["method_reason"])


def test_the_models_own_loss_is_the_logits_loss() -> None:
    """``loss: model`` reads the loss the model returns for labels=targets: for GPT-2 the
    mean next-token cross-entropy of the shifted logits, computed here independently."""
    from bsfind.spec import load_spec
    from bsfind.workload import build

    job = build(load_spec(SPEC, ["model.kwargs.dropout=0.0"]))
    x, y = job.batch(torch.arange(8))
    logits = job.model(x).logits
    by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128),
                                                y[:, 1:].reshape(-1))
    torch.testing.assert_close(job.loss(torch.arange(8)), by_hand)


def test_noise_on_the_hf_example_is_per_example_and_exact() -> None:
    """B_simple of the HF model through its own loss, per example (tied embeddings,
    position ids of shape (1, T) and Conv1D all covered), within 10% of the exact value
    from every example's gradient of the same loss."""
    from bsfind.api import noise_scale_at
    from bsfind.noise.probe import ProbeOptions
    from bsfind.spec import load_spec
    from bsfind.workload import build

    spec = load_spec(SPEC, ["model.kwargs.dropout=0.0", "data.kwargs.max_chars=8000"])
    job = build(spec)
    est = noise_scale_at(job, ProbeOptions(method="per-example", batch_size=32,
                                           target_rel_error=0.05), max_seconds=120)
    assert est.method == "per-example"
    # exact: every example's own gradient of the model's loss, one by one
    n = len(job)
    params = [p for p in job.model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    sq = 0.0
    for i in range(n):
        grads = torch.autograd.grad(job.loss(torch.tensor([i])), params)
        sq += float(sum(g.double().pow(2).sum() for g in grads))
        for t, g in zip(total, grads, strict=True):
            t += g.double()
    g2 = float(sum((t / n).pow(2).sum() for t in total))
    exact = (sq / n - g2) / g2
    assert est.b_simple == pytest.approx(exact, rel=0.10), (est.b_simple, exact)


def test_the_readme_shows_the_example_spec() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    spec = (ROOT / "examples" / "hf-causal-lm.yaml").read_text(encoding="utf-8")
    factories = (ROOT / "examples" / "hf_causal_lm.py").read_text(encoding="utf-8")
    body = "\n".join(line for line in spec.splitlines() if not line.startswith("#"))
    assert body.strip() in readme
    assert "def gpt2(" in factories and "def windows(" in factories
