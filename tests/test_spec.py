"""Spec parsing: every problem at once, with dotted paths; overrides; the starter."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bsfind.errors import SpecError, UsageError
from bsfind.spec import SCHEMA, apply_overrides, load_spec, spec_from_dict, starter_spec, validate

GOOD = {
    "model": {"factory": "bsfind.models:mlp", "kwargs": {"hidden": 32}},
    "data": {"factory": "bsfind.data:digits"},
    "optimizer": {"name": "adam", "lr": 1e-3, "batch_size": 64},
}


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    return p


def test_defaults_are_filled() -> None:
    s = spec_from_dict(GOOD)
    assert s.loss == "cross_entropy"
    assert s.probe.max_seconds == 60 and s.probe.target_rel_error == 0.1
    assert s.hardware.device == "auto" and s.optimizer.lr_rule == "auto"
    assert s.document["probe"]["seed"] == 0


def test_all_problems_reported_at_once_with_dotted_paths() -> None:
    bad = {
        "model": {"factory": "no_colon", "extra": 1},
        "data": {"factory": "bsfind.data:digits"},
        "optimizer": {"lr": "fast", "batch_size": 0},
        "probe": {"target_rel_error": 2, "method": "magic"},
        "wat": {},
    }
    with pytest.raises(SpecError) as info:
        spec_from_dict(bad)
    problems = "\n".join(info.value.problems)
    assert "optimizer.lr: expected a number, got a string 'fast'" in problems
    assert "optimizer.batch_size: must be > 0" in problems
    assert "model.factory: expected 'module:attr'" in problems
    assert "model.extra: unknown key" in problems
    assert "probe.target_rel_error: must be between 0 and 1" in problems
    assert "probe.method: expected one of auto, per-example, microbatch" in problems
    assert "wat: unknown section" in problems
    assert len(info.value.problems) == 7


def test_yaml_exponent_without_dot_is_a_number(tmp_path: Path) -> None:
    # YAML 1.1 reads 1e-3 as a string; users write it that way all the time.
    p = write(tmp_path, yaml.safe_dump(GOOD).replace("0.001", "1e-3"))
    assert "1e-3" in p.read_text()
    assert load_spec(p).optimizer.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "the spec is empty"),
        ("- a\n- b\n", "must be a mapping"),
        ("model: [unclosed\n", "invalid YAML at line"),
        ("model: {factory: a:b}\n", "data: missing required section"),
    ],
)
def test_malformed_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text))
    assert message in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    p = write(tmp_path, yaml.safe_dump(GOOD))
    s = load_spec(p, ["probe.seed=3", "probe.at_steps=[0,200]", "optimizer.lr=0.01"])
    assert s.probe.seed == 3 and s.probe.at_steps == (0, 200) and s.optimizer.lr == 0.01
    assert s.probe_steps() == (0, 200)


def test_override_errors() -> None:
    with pytest.raises(UsageError, match="expected key.path=value"):
        apply_overrides(GOOD, ["probe.seed"])
    with pytest.raises(UsageError, match="optimizer.lr is not a mapping \\(the spec file "
                                         "has it as 0.001"):
        apply_overrides({**GOOD, "optimizer": {**GOOD["optimizer"], "lr": 0.001}},
                        ["optimizer.lr.x=1"])
    # the --set to blame is the one that made the section a value (new-user trial: the
    # error named the later, innocent one alone)
    with pytest.raises(UsageError, match="probe is not a mapping \\(--set 'probe=3' made "
                                         "it 3\\)"):
        apply_overrides(GOOD, ["probe=3", "probe.max_seconds=5"])
    with pytest.raises(UsageError, match="probe.seed is not a mapping \\(--set 'probe="
                                         "{seed: 5}' made it 5\\)"):
        apply_overrides(GOOD, ["probe={seed: 5}", "probe.seed.x=1"])
    # a value PyYAML cannot read: one line (PyYAML's own message spans about seven)
    with pytest.raises(UsageError) as info:
        apply_overrides(GOOD, ["probe.at_steps=[0,200"])
    assert "\n" not in info.value.message and "not valid YAML (expected ',' or ']'" in (
        info.value.message)


def test_a_spec_problem_names_the_set_that_wrote_the_value(tmp_path: Path) -> None:
    p = write(tmp_path, yaml.safe_dump(GOOD))
    with pytest.raises(SpecError) as info:
        load_spec(p, ["probe.max_seconds=5", "probe=3"])
    assert info.value.problems[0].endswith("(from --set probe=3)")


def test_override_of_unknown_key_is_a_spec_error(tmp_path: Path) -> None:
    p = write(tmp_path, yaml.safe_dump(GOOD))
    with pytest.raises(SpecError, match="probe.sed: unknown key") as info:
        load_spec(p, ["probe.sed=3", "probe.max_seconds=-1"])
    # each problem names the --set it came from: the file is not to blame
    assert info.value.problems[0].endswith("(from --set probe.sed=3)")
    assert info.value.problems[1].endswith("(from --set probe.max_seconds=-1)")
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, yaml.safe_dump({**GOOD, "probe": {"method": "magic"}})),
                  ["probe.seed=3"])
    assert "from --set" not in info.value.problems[0]  # the file's own problem


def test_misspelt_keys_and_sections_get_a_suggestion() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict({**GOOD, "probe": {"max_secnds": 10, "zzz": 1}})
    first, second = info.value.problems
    assert "probe.max_secnds: unknown key (did you mean 'max_seconds'?" in first
    assert "did you mean" not in second  # nothing close to zzz
    bad = {k: v for k, v in GOOD.items() if k != "optimizer"}
    bad["optimiser"] = GOOD["optimizer"]
    with pytest.raises(SpecError) as info:
        spec_from_dict(bad)
    # one problem, the misspelling: not also a missing section and its missing keys
    assert info.value.problems == [
        "optimiser: unknown section (did you mean 'optimizer'? expected one of model, "
        "data, loss, optimizer, probe, hardware, training)"]


def test_starter_spec_is_valid_and_documents_every_field(tmp_path: Path) -> None:
    text = starter_spec()
    for section, fields in SCHEMA.items():
        for name in fields:
            if name:
                assert f"  {name}:" in text, f"{section}.{name} missing from starter"
    validate(yaml.safe_load(text), tmp_path)


def test_at_steps_must_increase() -> None:
    with pytest.raises(SpecError, match="probe.at_steps: steps must be increasing"):
        spec_from_dict({**GOOD, "probe": {"at_steps": [200, 0]}})


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                     st.text(max_size=5))
_values = st.recursive(_scalars, lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), c,
                                                                      max_size=3)), max_leaves=8)


@settings(max_examples=200, deadline=None)
@given(doc=st.one_of(_values, st.dictionaries(st.sampled_from(list(SCHEMA) + ["x"]), _values,
                                              max_size=6)))
def test_generated_malformed_specs_never_traceback(doc: object, tmp_path_factory) -> None:
    """Any YAML-shaped value either validates or raises SpecError, nothing else."""
    try:
        validate(doc, Path("."))
    except SpecError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


def test_conflicting_keys_are_errors() -> None:
    with pytest.raises(SpecError) as info:
        spec_from_dict({**GOOD, "probe": {"at_steps": [0, 10], "warmup_steps": 30},
                        "training": {"examples": 100, "epochs": 2}})
    text = str(info.value)
    assert "probe.at_steps: set either at_steps or warmup_steps" in text
    assert "training.epochs: set either training.examples or training.epochs" in text


def test_checkpoints_mixing_steps_and_examples_are_checked_in_steps() -> None:
    """examples ÷ optimizer.batch_size is a step: out of order, or the same point twice,
    is refused; in order is accepted."""
    def spec(entries: list[dict[str, object]]) -> object:
        model = {**GOOD["model"], "checkpoints": entries}
        return spec_from_dict({**GOOD, "model": model,
                               "optimizer": {**GOOD["optimizer"], "batch_size": 16}})

    with pytest.raises(SpecError, match=r"training order, without repeats \(examples count "
                       r"in steps of optimizer.batch_size = 16: 0, 200, 50\)"):
        spec([{"path": "a.pt", "step": 0}, {"path": "b.pt", "examples": 3200},
              {"path": "c.pt", "step": 50}])
    with pytest.raises(SpecError, match="50, 50"):
        spec([{"path": "a.pt", "examples": 800}, {"path": "b.pt", "step": 50}])
    # examples land on the nearest step: 660 / 16 -> 41, the same point as step 41
    with pytest.raises(SpecError, match="41, 41"):
        spec([{"path": "a.pt", "step": 41}, {"path": "b.pt", "examples": 660}])
    with pytest.raises(SpecError, match="40, 40"):
        spec([{"path": "a.pt", "examples": 640}, {"path": "b.pt", "examples": 645}])
    ok = spec([{"path": "a.pt", "step": 0}, {"path": "b.pt", "examples": 800},
               {"path": "c.pt", "step": 200}])
    assert [c.path for c in ok.model.checkpoints] == ["a.pt", "b.pt", "c.pt"]  # type: ignore[attr-defined]
