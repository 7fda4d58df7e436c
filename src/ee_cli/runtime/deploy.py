"""Which exits an exported cascade uses, chosen against the runtime's own measured costs.

A bundle's thresholds were chosen on MACs (by `ee personalise`, label-free, or `ee evaluate`) from
per-photo evidence stored beside them. Compute is not latency: in int8 at 32x32 an exit at 81 % of
the MACs cost 105 % of the plain model's latency. So export converts the cascade, times each stage
and each head alone in LiteRT (its own mode and thread count), and chooses again on the same
evidence with those costs. An exit whose head and stage boundary cost more than the photos it lets
out save is dropped, down to none: then the export is the plain model, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ee_cli.exits import policy
from ee_cli.files import bundle
from ee_cli.runtime import litert

PROFILE_RUNS = 100  # timed calls per stage and head (medians)


@dataclass(frozen=True)
class Deployment:
    exits: list[int]  # indices into the bundle's exits, in order
    thresholds: list[float]  # one per exit used
    cascade: bytes
    record: dict[str, Any]  # what the manifest says about the choice


@dataclass(frozen=True)
class Runtime:
    """How to build and time the runtime's files for a given set of exits."""

    convert_cascade: Callable[[list[int]], bytes]  # exit indices -> cascade.tflite bytes
    convert_heads: Callable[[list[int]], bytes]  # exit indices -> each head alone, one signature each
    plain: Path  # the plain model (final.tflite), already written
    pixels: np.ndarray  # one photo to time on
    threads: int
    scratch: Path  # where candidate files are written while they are timed


@dataclass(frozen=True)
class Profile:
    stage_ms: np.ndarray  # each cascade stage's signature call (with its head)
    head_ms: np.ndarray  # each head alone, from the graft point's activations
    plain_ms: float  # the plain model (final.tflite)

    def costs(self) -> policy.StageCosts:
        segments = self.stage_ms - np.append(self.head_ms, 0.0)
        return policy.StageCosts(np.maximum(segments, 0.0), self.head_ms, "LiteRT ms", plain_cost=self.plain_ms)


def choose(source: bundle.Bundle, runtime: Runtime, measured: bool = True) -> Deployment:
    """The cascade to deploy: the bundle's exits with thresholds, re-chosen on measured costs
    (`measured`), or as recorded."""
    recorded = bundle.exit_policy(source.meta)
    recorded_thresholds = bundle.thresholds(source.meta)
    candidates = [i for i, t in enumerate(recorded_thresholds) if t is not None]
    if not candidates:
        why = recorded.reason if recorded and recorded.reason else "the bundle has no exit thresholds"
        return Deployment([], [], runtime.convert_cascade([]), {"reason": f"plain model: {why}", "from_bundle": _summary(recorded)})
    evidence = source.evidence()
    if evidence is None or not measured:
        why = "--policy recorded" if not measured else "the bundle holds no per-photo evidence to re-choose them"
        thresholds = [recorded_thresholds[i] for i in candidates]
        return Deployment(candidates, thresholds, runtime.convert_cascade(candidates), {"reason": f"thresholds as recorded ({why})", "from_bundle": _summary(recorded)})
    return _rechoose(recorded, evidence, candidates, runtime)


def _rechoose(recorded: bundle.ExitPolicy, evidence: policy.Evidence, candidates: list[int], runtime: Runtime) -> Deployment:
    """Measure the cascade of the current exits, choose among their subsets, repeat until stable."""
    exits, rounds = list(candidates), []
    while True:
        cascade = runtime.convert_cascade(exits)
        if not exits:
            rounds.append({"exits": [], "plain_ms": measure_plain(runtime)})
            return Deployment([], [], cascade, _record(recorded, rounds, None, "plain model: no exit is predicted to pay for its cost in LiteRT"))
        profile = measure(cascade, runtime.convert_heads(exits), runtime)
        local = policy.Evidence(evidence.confidences[exits], evidence.correct[[*exits, -1]], evidence.reference)
        decision = policy.decide(local, profile.costs(), recorded.constraint, [f"exit_{i}" for i in exits], "evidence photos (the bundle's)",
                                 "faster than the plain model in LiteRT (stage costs measured here)")
        if decision.choice is None:  # a bundle written before the photo floor held its evidence
            return Deployment([], [], runtime.convert_cascade([]), _record(recorded, rounds, None, f"plain model: {decision.reason}"))
        kept = [exit_ for exit_, t in zip(exits, decision.choice.thresholds) if t < policy.NEVER]
        rounds.append({"exits": exits, "stage_ms": profile.stage_ms.tolist(), "head_ms": profile.head_ms.tolist(), "plain_ms": profile.plain_ms, "kept": kept})
        if kept == exits:
            thresholds = [float(t) for t in decision.choice.thresholds]
            return Deployment(exits, thresholds, cascade, _record(recorded, rounds, decision.choice, decision.reason))
        exits = kept


def measure(cascade: bytes, heads: bytes, runtime: Runtime) -> Profile:
    """Median LiteRT milliseconds of each stage, each head alone and the plain model on one photo,
    timed in turns so that drift in the machine's speed hits them alike."""
    pixels, threads, scratch = runtime.pixels, runtime.threads, runtime.scratch
    cascade_path, heads_path = scratch / "profile-cascade.tflite", scratch / "profile-heads.tflite"
    cascade_path.write_bytes(cascade)
    heads_path.write_bytes(heads)
    try:
        engine = litert.CascadeEngine.from_file(cascade_path, None, threads)
        stage_inputs = engine.stage_inputs(pixels)
        head_interpreter = litert.interpreter(heads_path, threads)
        heads = [litert.Runner(head_interpreter, key) for key in litert.stage_keys(head_interpreter)]
        head_inputs = [litert.hand_on(carried, stage.input_detail, head.input_detail) for head, stage, carried in zip(heads, engine.stages[1:], stage_inputs[1:])]
        calls = {"plain": _plain_call(runtime)}
        calls |= {f"stage_{i}": (lambda s=stage, x=x: s.raw(x)) for i, (stage, x) in enumerate(zip(engine.stages, stage_inputs))}
        calls |= {f"head_{i}": (lambda h=head, x=x: h.raw(x)) for i, (head, x) in enumerate(zip(heads, head_inputs))}
        times = {name: 1000 * float(np.median(found)) for name, found in litert.alternating_wall_times(calls, PROFILE_RUNS).items()}
    finally:
        cascade_path.unlink(missing_ok=True)
        heads_path.unlink(missing_ok=True)
    stage_ms = np.array([times[f"stage_{i}"] for i in range(len(engine.stages))])
    return Profile(stage_ms, np.array([times[f"head_{i}"] for i in range(len(heads))]), times["plain"])


def measure_plain(runtime: Runtime) -> float:
    """Median LiteRT milliseconds of the plain model on one photo."""
    return 1000 * float(np.median(litert.wall_times(_plain_call(runtime), PROFILE_RUNS)))


def _plain_call(runtime: Runtime) -> Callable[[], Any]:
    runner = litert.Runner(litert.interpreter(runtime.plain, runtime.threads), "serving_default")
    return lambda: runner(runtime.pixels[None])


def _summary(recorded: bundle.ExitPolicy | None) -> dict[str, Any] | None:
    if recorded is None:
        return None
    return {"set_by": recorded.set_by, "operating_point": recorded.operating_point, "photos": recorded.photos,
            "thresholds": list(recorded.thresholds), "predicted": recorded.predicted}


def _record(recorded, rounds, choice: policy.Choice | None, reason: str) -> dict[str, Any]:
    predicted = choice.prediction() if choice is not None else None
    return {"reason": reason, "from_bundle": _summary(recorded), "measured": rounds, "predicted": predicted}
