"""Breakdowns of a benchmark run that the summary tables do not show: the gain over the free
baseline on users whose classes were inferred exactly, whole-network vs exits-only accuracy and
time, and latency on users with every exit switched on.

    python -m bench.breakdown bench/results/2026-11-27.json
"""

from __future__ import annotations

import json
import sys

import numpy as np


def main(path: str) -> None:
    users = json.load(open(path))["users"]
    exact = [u for u in users if u["bn_only"]["classes_exact"]]
    gain = np.array([100 * (u["labels_0"]["accuracy"]["final"] - u["restricted"]) for u in exact])
    print(f"classes inferred exactly: {len(exact)} of {len(users)} users; gain over the restricted model at 0 labels "
          f"{gain.mean():+.1f} ± {gain.std():.1f} pts ({gain.min():+.1f} … {gain.max():+.1f})")
    whole = np.array([100 * u["labels_0"]["whole_network"]["accuracy"] for u in users])
    exits = np.array([100 * u["labels_0"]["accuracy"]["final"] for u in users])
    seconds = {kind: np.mean([pick(u) for u in users]) for kind, pick in
               (("exits only", lambda u: u["labels_0"]["seconds"]["train"]), ("whole network", lambda u: u["labels_0"]["whole_network"]["seconds"]))}
    print(f"accuracy at 0 labels: whole network {whole.mean():.1f} ± {whole.std():.1f} %, exits only {exits.mean():.1f} ± {exits.std():.1f} % "
          f"(difference {np.mean(exits - whole):+.1f}, {np.min(exits - whole):+.1f} … {np.max(exits - whole):+.1f}); "
          f"training {seconds['exits only']:.1f} s vs {seconds['whole network']:.1f} s mean")
    print(f"users with at most one exit switched on at 0 labels: {sum(len(u['labels_0']['exits_enabled']) <= 1 for u in users)}")
    on = [u["labels_0"]["operating_points"]["match-generic"] for u in users if len(u["labels_0"]["exits_enabled"]) == len(u["labels_0"]["accuracy"]) - 1]
    if on:
        cut = np.mean([point["plain_mflops"] / point["mean_mflops"] for point in on])
        ratios = {mode: np.array([point["litert"][mode]["speedup"] for point in on]) for mode in on[0]["litert"]}
        print(f"users with every exit on: {len(on)}; at the generic model's accuracy {cut:.2f}x fewer MFLOPs; LiteRT "
              + ", ".join(f"{mode} {r.mean():.2f}x ({r.min():.2f} … {r.max():.2f})" for mode, r in ratios.items()))


if __name__ == "__main__":
    main(sys.argv[1])
