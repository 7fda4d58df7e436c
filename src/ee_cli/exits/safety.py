"""Do no harm, label-free: before `ee personalise` writes a bundle, its personalised final exit is
checked on the held-out photos against the model it started from (the generic classifier with the
person's BatchNorm statistics, restricted to their classes and shifted by their class prior); where
it collapsed or drifted away from it, the bundle keeps that starting model instead and says why.

Pure numpy: predictions in, a reason (or None) out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLLAPSED_SHARE = 0.9  # the final exit puts this much of the held-out photos in one class, where its start did not
MIN_AGREEMENT = 0.6  # the final exit agrees with its start on fewer held-out photos than this: it learned something else
MIN_PHOTOS = 30  # fewer held-out photos than this: too few to judge, the personalised exit is kept


@dataclass(frozen=True)
class Verdict:
    """The held-out figures the check read, and why the personalised exit must not ship (or None)."""

    photos: int
    agreement: float  # share of held-out photos where the personalised final exit and its start agree
    largest_share: float  # of the personalised final exit's predictions, the largest class's share
    start_largest_share: float
    harm: str | None


def largest_share(predictions: np.ndarray) -> float:
    return float(np.bincount(predictions).max() / len(predictions)) if len(predictions) else 0.0


def judge(personalised: np.ndarray, start: np.ndarray) -> Verdict:
    """Compare the personalised final exit's held-out predictions (class indices) with those of the
    model it started from; too few photos to judge keep the personalised exit."""
    collapsed, before = largest_share(personalised), largest_share(start)
    agreement = float(np.mean(personalised == start)) if len(start) else 1.0
    harm = _harm(collapsed, before, agreement) if len(personalised) >= MIN_PHOTOS else None
    return Verdict(len(personalised), agreement, collapsed, before, harm)


def _harm(collapsed: float, before: float, agreement: float) -> str | None:
    if collapsed >= COLLAPSED_SHARE > before:
        return f"the personalised final exit put {collapsed:.0%} of the held-out photos in one class (its start: {before:.0%})"
    if agreement < MIN_AGREEMENT:
        return f"the personalised final exit agrees with the model it started from on {agreement:.0%} of the held-out photos (under {MIN_AGREEMENT:.0%})"
    return None
