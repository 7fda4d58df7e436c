"""Threshold search speed on cached probabilities (the evaluate issue's acceptance 2):
10,000 photos x 4 exits, greedy search with a margin, timed in one run.

    python -m bench.policy_speed
"""

from __future__ import annotations

import json
import time

import numpy as np

from ee_cli.exits import policy


def main() -> None:
    rng = np.random.default_rng(0)
    photos, exits = 10_000, 4
    probabilities = [rng.dirichlet(np.ones(10) * 0.3, size=photos) for _ in range(exits + 1)]
    labels = rng.integers(10, size=photos)
    started = time.perf_counter()
    confidences = np.stack([policy.confidence(p) for p in probabilities[:-1]])
    correct = np.stack([p.argmax(1) == labels for p in probabilities]).astype(np.int8)
    thresholds = policy.greedy_thresholds(confidences, correct, correct[-1], policy.max_drop(0.005, 1.645))
    seconds = time.perf_counter() - started
    print(json.dumps({"photos": photos, "exits": exits, "seconds": round(seconds, 4), "thresholds": thresholds.round(4).tolist()}))


if __name__ == "__main__":
    main()
