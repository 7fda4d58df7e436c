"""Each decision tested where a command uses it, not only as pure maths: the measured policy really
drops an exit that does not pay, the cascade engine really lets a photo out at its threshold and
really clamps a threshold an int8 exit cannot reach, `ee personalise` really passes --max-drop and
its default class share on, and every config-file error really ends in one line. Each test here
fails on one deliberate break of that wiring (named in its docstring)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import one_line_error
from ee_cli.exits import policy
from ee_cli.files import bundle
from ee_cli.adaptation import adapt
from ee_cli.runtime import deploy, litert
from ee_cli.base.config import PersonaliseConfig
from ee_cli.commands.personalise import _label_free_policy, _personal_classes


# --- the measured exit policy of `ee export` ------------------------------------------------------

def test_the_measured_policy_drops_an_exit_whose_head_costs_more_than_it_saves(monkeypatch):
    """Break: `deploy._rechoose` keeps every exit (`kept = list(exits)`)."""
    # Every photo is right everywhere, so accuracy binds nothing and only cost decides. Exit 1's head
    # alone costs twice the plain model: any cascade using it is slower than one without it.
    evidence = policy.Evidence(
        confidences=np.array([[0.99] * 60 + [0.3] * 40, [0.99] * 10 + [0.3] * 90]),
        correct=np.ones((3, 100), bool),
        reference=np.ones(100, bool),
    )
    recorded = bundle.ExitPolicy((0.9, 0.9), "evaluate", "keep", 100, {"kind": "max_drop", "drop": 0.005, "z": 1.645})
    profiles = {  # per set of exits in the cascade: each stage's LiteRT ms (head included), each head's, the plain model's
        (0, 1): deploy.Profile(np.array([2.0, 23.0, 6.0]), np.array([0.5, 20.0]), 10.0),
        (0,): deploy.Profile(np.array([2.0, 8.5]), np.array([0.5]), 10.0),
    }
    measured = []
    monkeypatch.setattr(deploy, "measure", lambda cascade, heads, runtime: measured.append(tuple(cascade)) or profiles[tuple(cascade)])
    runtime = deploy.Runtime(convert_cascade=bytes, convert_heads=lambda exits: b"", plain=Path("unused"), pixels=np.zeros(1), threads=1, scratch=Path("."))

    chosen = deploy._rechoose(recorded, evidence, [0, 1], runtime)

    assert chosen.exits == [0] and measured == [(0, 1), (0,)]
    assert chosen.record["measured"][0]["kept"] == [0]
    assert chosen.record["predicted"]["speedup"] > 1


# --- the cascade engine of `ee run` ---------------------------------------------------------------

class _FakeSignature:
    """One stage of a cascade as LiteRT's signature runner shows it: fixed outputs, any input."""

    def __init__(self, outputs: dict[str, tuple[np.ndarray, dict]]):
        self.outputs = outputs

    def get_input_details(self):
        return {"pixels": {"dtype": np.float32, "quantization": (0.0, 0), "shape": np.array([1, 4, 4, 3])}}

    def get_output_details(self):
        return {name: detail for name, (_, detail) in self.outputs.items()}

    def __call__(self, **inputs):
        return {name: value for name, (value, _) in self.outputs.items()}


class _FakeCascade:
    """A two-stage cascade: stage_0 gives `first` (encoded as `detail`) and features, stage_1 the final exit."""

    def __init__(self, first: np.ndarray, detail: dict):
        features = (np.zeros((1, 4), np.float32), {"dtype": np.float32, "quantization": (0.0, 0)})
        final = (np.array([[0.0, 1.0]], np.float32), {"dtype": np.float32, "quantization": (0.0, 0)})
        self.signatures = {"stage_0": _FakeSignature({"probabilities": (first, detail), "features": features}),
                           "stage_1": _FakeSignature({"probabilities": final})}

    def get_signature_list(self):
        return {key: {"outputs": list(signature.outputs)} for key, signature in self.signatures.items()}

    def get_signature_runner(self, key):
        return self.signatures[key]


FLOAT = {"dtype": np.float32, "quantization": (0.0, 0)}
UINT8 = {"dtype": np.uint8, "quantization": (1 / 256, 0)}


def test_a_photo_exactly_at_its_exits_threshold_leaves_there():
    """Break: `CascadeEngine.classify` compares with `>` instead of `>=`."""
    probability = np.float32(0.8125)
    engine = litert.CascadeEngine(_FakeCascade(np.array([[probability, 1 - probability]], np.float32), FLOAT), [float(probability)])
    index, probabilities = engine.classify(np.zeros((4, 4, 3), np.float32))
    assert index == 0 and probabilities.max() == probability


def test_an_int8_exit_whose_threshold_is_above_its_top_probability_still_fires():
    """Break: `CascadeEngine.__init__` ignores `usable_threshold` (no clamp)."""
    saturated = np.array([[255, 0]], np.uint8)  # uint8 probabilities top out at 255/256
    engine = litert.CascadeEngine(_FakeCascade(saturated, UINT8), [0.9975])  # calibrated in float
    assert engine.thresholds == [pytest.approx(255 / 256)]
    index, _ = engine.classify(np.zeros((4, 4, 3), np.float32))
    assert index == 0
    never = litert.CascadeEngine(_FakeCascade(saturated, UINT8), [None])  # an exit that is off stays off
    assert never.classify(np.zeros((4, 4, 3), np.float32))[0] == 1


# --- `ee personalise`'s label-free policy and class set -------------------------------------------

def _meta(exits: int = 2) -> dict:
    return {
        "exits": [{"name": f"exit_{i}", "cumulative_macs": 100 * (i + 1) + 10, "head_macs": 10} for i in range(exits)],
        "final": {"cumulative_macs": 1000},
    }


def test_max_drop_reaches_the_label_free_thresholds():
    """Break: `_label_free_policy` ignores --max-drop (a fixed constraint)."""
    rng = np.random.default_rng(0)
    photos = 400
    confidences = rng.uniform(0.3, 1.0, (2, photos))
    # The exits agree with the final exit where they are confident, and less and less below that.
    agree = rng.uniform(0, 1, (2, photos)) < np.clip(confidences * 1.4 - 0.35, 0, 1)
    evidence = policy.Evidence(confidences, np.vstack([agree, np.ones((1, photos), bool)]), np.ones(photos, bool))
    strict = _label_free_policy(evidence, _meta(), PersonaliseConfig(max_drop=0.0))
    loose = _label_free_policy(evidence, _meta(), PersonaliseConfig(max_drop=20.0))
    assert strict.constraint["drop"] == 0.0 and loose.constraint["drop"] == pytest.approx(0.2)
    assert strict.thresholds != loose.thresholds
    assert loose.predicted["speedup"] > strict.predicted.get("speedup", 1.0)


def test_the_default_class_share_leaves_out_a_class_just_under_it():
    """Break: `PersonaliseConfig.class_share` default 0.2 -> 0.1 (of an even share: 5 % -> 2.5 % for four classes)."""
    names = ["cat", "dog", "frog", "ship"]
    classes, shift = _personal_classes(PersonaliseConfig(), names, np.array([0.55, 0.36, 0.055, 0.035]), None)
    assert classes == [0, 1, 2] and shift[2] < 0 < shift[0]
    assert _personal_classes(PersonaliseConfig(), names, np.array([0.5, 0.3, 0.12, 0.08]), None)[0] == [0, 1, 2, 3]
    assert _personal_classes(PersonaliseConfig(class_prior=False), names, np.array([0.5, 0.3, 0.12, 0.08]), None)[1] is None


def test_one_class_above_the_share_still_gives_two():
    """Break: `infer_classes` accepts a single class above the cut (`< 2` -> `< 1`)."""
    assert adapt.infer_classes(np.array([0.7, 0.2, 0.1]), 0.5) == [0, 1]
    assert _personal_classes(PersonaliseConfig(), ["a", "b", "c"], np.array([0.985, 0.01, 0.005]), None)[0] == [0, 1]


# --- config files ---------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "write, expected",
    [
        (None, "does not exist"),
        ("[attach\nbackbone = 1", "is not valid TOML"),
        ("attach = 3", "[attach] must be a table"),
        ("[attach]\nwhat = 1", "unknown key(s) in [attach]: what"),
        (b"\xff\xfe[attach]", "is not valid TOML"),
        ("folder", "cannot be read"),
    ],
    ids=["missing", "bad-toml", "not-a-table", "unknown-key", "not-utf8", "a-folder"],
)
def test_every_config_file_error_is_one_line(workspace, cli, write, expected):
    """Break: `config._read_section` raises ValueError (a traceback) for a missing file."""
    path = workspace / "ee.toml"
    if write == "folder":
        path.mkdir()
    elif isinstance(write, bytes):
        path.write_bytes(write)
    elif write is not None:
        path.write_text(write)
    line = one_line_error(cli("attach", "--config", path))
    assert expected in line and "ee.toml" in line
