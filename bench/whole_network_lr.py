"""The whole-network baseline's learning rate, picked on dev users only: FixMatch fine-tuning of
every layer at each of bench.whole_network.LEARNING_RATES, like for like with `ee personalise` (the
benchmark's own path, bench.protocol.run_user, at 0 labels), on every dev user. The highest mean
test accuracy wins; bench.protocol.Settings.whole_network_lr records it.

    PYTHONPATH=. python -m bench.whole_network_lr [--per-scenario 1] [--generic PATH]

Writes one JSON line per (user, learning rate) to bench/results/whole-network-lr-dev-<date>.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main(argv=None) -> dict[float, float]:
    from bench.protocol import Settings, UserJob, run_user, users
    from bench.run import DEFAULT_GENERIC
    from bench.whole_network import LEARNING_RATES

    parser = argparse.ArgumentParser(prog="python -m bench.whole_network_lr", description=__doc__.splitlines()[0])
    parser.add_argument("--generic", type=Path, default=DEFAULT_GENERIC)
    parser.add_argument("--per-scenario", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / f"whole-network-lr-dev-{date.today().isoformat()}.jsonl")
    args = parser.parse_args(argv)
    accuracy: dict[float, list[float]] = {rate: [] for rate in LEARNING_RATES}
    with tempfile.TemporaryDirectory(prefix="ee-lr-") as scratch, args.out.open("a") as out:
        for user in users("dev", args.per_scenario):
            for rate in LEARNING_RATES:
                settings = dataclasses.replace(Settings(), labels=(0,), points=(), quant=(), whole_network_lr=rate)
                row = run_user(UserJob(str(args.generic), "cifar10", user, settings, str(Path(scratch) / f"{user.seed}-{rate}")))
                whole = row["labels_0"]["whole_network"]
                accuracy[rate].append(whole["accuracy"])
                line = {"seed": user.seed, "scenario": user.scenario.name, "learning_rate": rate, "accuracy": whole["accuracy"], "seconds": whole["seconds"],
                        "restricted": row["restricted"], "ee_final": row["labels_0"]["accuracy"]["final"]}
                out.write(json.dumps(line) + "\n")
                out.flush()
                print(json.dumps(line), flush=True)
    means = {rate: float(np.mean(values)) for rate, values in accuracy.items()}
    print("mean whole-network accuracy per learning rate:", json.dumps(means), "best:", max(means, key=means.get))
    return means


if __name__ == "__main__":
    main()
