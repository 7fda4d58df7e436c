"""The exit policy: confidence thresholds per exit, searched over cached probabilities.

MSDNet's pattern: run the model once, keep every exit's probabilities, then sweep. A photo leaves
at the first exit whose confidence reaches that exit's threshold, else at the final exit.
Thresholds are chosen one exit at a time, earliest first; for each exit every distinct threshold is
scored at once from cumulative sums over photos sorted by confidence, so the search is exact and
costs a sort per exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

NEVER = 1.01  # a threshold no confidence reaches: the exit is off


def confidence(probabilities: np.ndarray, criterion: str = "maxprob") -> np.ndarray:
    """Per photo: the top probability, or 1 - entropy / log(classes)."""
    if criterion == "maxprob":
        return probabilities.max(axis=1)
    if criterion == "entropy":
        p = np.clip(probabilities, 1e-12, 1.0)
        return 1.0 - (-(p * np.log(p)).sum(axis=1)) / np.log(p.shape[1])
    raise ValueError(f"unknown criterion {criterion!r}")


def exit_taken(confidences: np.ndarray, thresholds) -> np.ndarray:
    """Index of the exit each photo leaves at; len(thresholds) means the final exit.

    `confidences` is (exits, photos) for the early exits only."""
    taken = np.full(confidences.shape[1], len(thresholds))
    for index in reversed(range(len(thresholds))):
        taken = np.where(confidences[index] >= thresholds[index], index, taken)
    return taken


@dataclass(frozen=True)
class Outcome:
    correct: np.ndarray  # per photo
    accuracy: float
    mean_cost: float
    shares: np.ndarray  # share of photos leaving at each exit, then the final one


def outcome(taken: np.ndarray, correct: np.ndarray, costs: np.ndarray) -> Outcome:
    """`correct` is (exits + 1, photos); `costs` the cost of leaving at each exit and at the final."""
    per_photo = correct[taken, np.arange(correct.shape[1])]
    shares = np.bincount(taken, minlength=correct.shape[0]) / max(1, correct.shape[1])
    return Outcome(per_photo, float(per_photo.mean()), float(costs[taken].mean()), shares)


# A constraint sees, for every candidate, the mean and standard error of (policy - reference)
# correctness over photos, and says which candidates are acceptable.
Constraint = Callable[[np.ndarray, np.ndarray], np.ndarray]


def max_drop(drop: float, z: float) -> Constraint:
    """Accuracy at most `drop` below the reference, with a one-sided margin of z standard errors."""
    return lambda mean, se: -mean + z * se <= drop + 1e-12


def at_least(z: float) -> Constraint:
    """Accuracy at least the reference's, with a one-sided margin of z standard errors."""
    return lambda mean, se: mean - z * se >= -1e-12


def constraint_from(spec: dict) -> Constraint:
    """The constraint a recorded spec names: {"kind": "max_drop", "drop", "z"} or {"kind": "at_least", "z"}."""
    if spec["kind"] == "at_least":
        return at_least(float(spec["z"]))
    return max_drop(float(spec["drop"]), float(spec["z"]))


def greedy_thresholds(confidences: np.ndarray, correct: np.ndarray, reference: np.ndarray, constraint: Constraint) -> np.ndarray:
    """For each exit in turn (later ones off), the lowest threshold that keeps `constraint`."""
    exits, photos = confidences.shape
    thresholds = np.full(exits, NEVER)
    final = correct[-1].astype(float)
    reference = reference.astype(float)
    for index in range(exits):
        taken = exit_taken(confidences, thresholds)
        undecided = np.flatnonzero(taken == exits)
        decided_diff = np.where(taken < exits, correct[taken, np.arange(photos)] - reference, 0.0)
        order = undecided[np.argsort(-confidences[index, undecided], kind="stable")]
        # Candidate m: the m most confident undecided photos leave here, the rest at the final exit.
        leave = correct[index, order] - reference[order]
        stay = final[order] - reference[order]
        base_sum, base_sq = decided_diff.sum() + stay.sum(), (decided_diff**2).sum() + (stay**2).sum()
        gained = np.concatenate([[0.0], np.cumsum(leave - stay)])
        gained_sq = np.concatenate([[0.0], np.cumsum(leave**2 - stay**2)])
        mean = (base_sum + gained) / photos
        variance = np.maximum((base_sq + gained_sq) / photos - mean**2, 0.0)
        ok = constraint(mean, np.sqrt(variance / photos))
        sorted_conf = confidences[index, order]
        # A threshold can only cut between distinct confidences (ties leave together).
        valid = np.ones(len(order) + 1, bool)
        valid[1:-1] = sorted_conf[:-1] > sorted_conf[1:]
        valid[1:] &= np.isfinite(sorted_conf)  # -inf marks an exit that is off: no photo leaves there
        feasible = np.flatnonzero(ok & valid)
        best = feasible.max() if len(feasible) else 0
        thresholds[index] = NEVER if best == 0 else sorted_conf[best - 1]
    return thresholds


def oracle(correct: np.ndarray, costs: np.ndarray) -> Outcome:
    """The physical limit: each photo leaves at the earliest exit that is right (else the final)."""
    right = correct.astype(bool)
    first = np.where(right.any(axis=0), right.argmax(axis=0), correct.shape[0] - 1)
    return outcome(first, correct, costs)


def bootstrap_interval(differences: np.ndarray, seed: int = 0, resamples: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of paired per-photo differences."""
    rng = np.random.default_rng(seed)
    n = len(differences)
    if n == 0:
        return (float("nan"), float("nan"))
    means = differences[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def split(count: int, calibrate_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint calibration and report indices."""
    order = np.random.default_rng([seed, 11]).permutation(count)
    cut = int(round(calibrate_share * count))
    return np.sort(order[:cut]), np.sort(order[cut:])


# --- Which exits to use, and their thresholds, against what each stage really costs -------------

MIN_CALIBRATION_PHOTOS = 30  # fewer photos than this set no threshold: every exit stays off
MAX_SUBSETS_EXITS = 8  # beyond this many candidate exits, only nested subsets are tried


@dataclass(frozen=True)
class Evidence:
    """What thresholds are chosen from: per photo, each exit's confidence (-inf where an exit may
    not be used), whether each exit and the final exit is right (or agrees with the final exit,
    label-free), and the reference the accuracy constraint compares with."""

    confidences: np.ndarray  # (exits, photos)
    correct: np.ndarray  # (exits + 1, photos)
    reference: np.ndarray  # (photos,)

    @property
    def photos(self) -> int:
        return int(self.correct.shape[1])


@dataclass(frozen=True)
class StageCosts:
    """The cost model of a cascade: the backbone segment before each graft point (and the last one,
    to the final classifier), and each exit's head. Units: MACs, or measured milliseconds."""

    segments: np.ndarray  # (exits + 1,)
    heads: np.ndarray  # (exits,)
    unit: str
    plain_cost: float | None = None  # the plain model, where measured apart (a cascade's stages add overhead)

    @property
    def plain(self) -> float:
        return float(self.segments.sum()) if self.plain_cost is None else float(self.plain_cost)

    def leaving(self, used: np.ndarray) -> np.ndarray:
        """Cost of leaving at each exit and at the final exit when only the exits in `used` run a head."""
        heads = np.where(used, self.heads, 0.0)
        return np.cumsum(self.segments) + np.append(np.cumsum(heads), heads.sum())


@dataclass(frozen=True)
class Choice:
    thresholds: np.ndarray  # NEVER where an exit is off
    expected_cost: float  # per photo, on the evidence
    plain_cost: float
    accuracy: float  # on the evidence (agreement with the final exit when label-free)
    shares: np.ndarray
    unit: str

    @property
    def speedup(self) -> float:
        return self.plain_cost / self.expected_cost if self.expected_cost > 0 else 1.0

    def prediction(self) -> dict:
        """What this choice predicts, as bundles and manifests record it."""
        return {"unit": self.unit, "expected": self.expected_cost, "plain": self.plain_cost, "speedup": self.speedup,
                "accuracy_on_evidence": self.accuracy, "shares": [float(s) for s in self.shares]}


def cheapest_cascade(evidence: Evidence, constraint: Constraint, costs: StageCosts) -> Choice:
    """Among subsets of the usable exits, the thresholds (greedy, earliest first) whose expected
    cost under `costs` is lowest while `constraint` holds; an exit whose head costs more than the
    photos it lets out save is dropped, down to none (the plain model)."""
    exits = evidence.confidences.shape[0]
    usable = np.flatnonzero(np.isfinite(evidence.confidences).any(axis=1))
    best = _plain_choice(evidence, costs)
    for subset in _subsets(usable):
        allowed = np.zeros(exits, bool)
        allowed[list(subset)] = True
        confidences = np.where(allowed[:, None], evidence.confidences, -np.inf)
        thresholds = greedy_thresholds(confidences, evidence.correct, evidence.reference, constraint)
        used = thresholds < NEVER
        if not used.any():
            continue
        result = outcome(exit_taken(confidences, thresholds), evidence.correct, costs.leaving(used))
        if result.mean_cost < best.expected_cost - 1e-12:
            best = Choice(thresholds, result.mean_cost, costs.plain, result.accuracy, result.shares, costs.unit)
    return best


def _plain_choice(evidence: Evidence, costs: StageCosts) -> Choice:
    exits = evidence.confidences.shape[0]
    shares = np.zeros(exits + 1)
    shares[-1] = 1.0
    accuracy = float(evidence.correct[-1].mean()) if evidence.photos else 0.0
    return Choice(np.full(exits, NEVER), costs.plain, costs.plain, accuracy, shares, costs.unit)


def _subsets(usable: np.ndarray):
    """Every non-empty subset of the usable exits (nested prefixes only when there are many)."""
    if len(usable) > MAX_SUBSETS_EXITS:
        return [tuple(usable[:count]) for count in range(1, len(usable) + 1)]
    return [tuple(usable[mask]) for mask in (np.arange(1, 2 ** len(usable))[:, None] >> np.arange(len(usable)) & 1).astype(bool)]


def costs_from_macs(graft_macs: list[int], head_macs: list[int], total_macs: int) -> StageCosts:
    """The MACs cost model: what a policy knows before any runtime has been measured."""
    reached = np.array([*graft_macs, total_macs], float)
    return StageCosts(np.diff(reached, prepend=0.0), np.array(head_macs, float), "MACs")


@dataclass(frozen=True)
class Decision:
    """The exit decision every command makes the same way: the cascade chosen (None: every exit off,
    too few photos to choose on) and one line saying why."""

    choice: Choice | None
    reason: str


def decide(evidence: Evidence | None, costs: StageCosts, constraint: dict, exit_names: list[str], photos_are: str, gain: str) -> Decision:
    """The cheapest cascade under `constraint` (a recorded spec, `constraint_from`) and `costs`, on
    `evidence`; under MIN_CALIBRATION_PHOTOS photos every exit stays off. `photos_are` names the
    evidence photos ("held-out photos"), `gain` what the speed-up is in ("fewer MFLOPs than the plain
    model"), both for the reason."""
    photo_count = evidence.photos if evidence is not None else 0
    if evidence is None or photo_count < MIN_CALIBRATION_PHOTOS:
        return Decision(None, f"{photo_count} {photos_are}: thresholds need at least {MIN_CALIBRATION_PHOTOS}, so every exit stays off")
    choice = cheapest_cascade(evidence, constraint_from(constraint), costs)
    used = [name for name, t in zip(exit_names, choice.thresholds) if t < NEVER]
    if not used:
        return Decision(choice, f"no exit lets enough of {photo_count} {photos_are} out early to pay for its head")
    return Decision(choice, f"{', '.join(used)} on: predicted {choice.speedup:.2f}× {gain}, on {photo_count} {photos_are}")
