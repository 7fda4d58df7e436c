"""The whole-network baseline's learning rate, picked on dev users only: FixMatch fine-tuning of
every layer at each of bench.whole_network.LEARNING_RATES, like for like with `ee personalise` (the
benchmark's own path at 0 labels: the photos and views its heads trained on, personalised once per
user), on every dev user. The highest mean
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
    from bench.protocol import GENERIC_MODELS, Settings, UserJob, attach_generic, inside, personalise_user, trained_photos, user_photos, users, whole_network
    from bench.whole_network import LEARNING_RATES

    parser = argparse.ArgumentParser(prog="python -m bench.whole_network_lr", description=__doc__.splitlines()[0])
    parser.add_argument("--generic", type=Path, default=Path(GENERIC_MODELS["resnet9"].path))
    parser.add_argument("--per-scenario", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / f"whole-network-lr-dev-{date.today().isoformat()}.jsonl")
    args = parser.parse_args(argv)
    accuracy: dict[float, list[float]] = {rate: [] for rate in LEARNING_RATES}
    settings = dataclasses.replace(Settings(), labels=(0,), points=(), quant=())
    with tempfile.TemporaryDirectory(prefix="ee-lr-") as scratch, args.out.open("a") as out:
        for user_spec in users("dev", args.per_scenario):
            job = UserJob(str(args.generic), "cifar10", user_spec, settings, str(Path(scratch) / str(user_spec.seed)))
            user, folders, names = user_photos(job)
            with inside(Path(job.work)):  # run folders are relative to it
                result = personalise_user(job, folders, attach_generic(job, names), 0).result
                trained_on, views = trained_photos(result), result.metrics["cache"]["views"]
            personal = [names.index(name) for name in result.meta["personal_classes"]]
            for rate in LEARNING_RATES:  # one personalisation per user: every rate trains on its photos and views
                rated = dataclasses.replace(job, settings=dataclasses.replace(settings, whole_network_lr=rate))
                whole = whole_network(rated, user, personal, trained_on, views)
                accuracy[rate].append(whole["accuracy"])
                line = {"seed": user_spec.seed, "scenario": user_spec.scenario.name, "learning_rate": rate, "accuracy": whole["accuracy"],
                        "seconds": whole["seconds"], "personal_classes": result.meta["personal_classes"]}
                out.write(json.dumps(line) + "\n")
                out.flush()
                print(json.dumps(line), flush=True)
    means = {rate: float(np.mean(values)) for rate, values in accuracy.items()}
    print("mean whole-network accuracy per learning rate:", json.dumps(means), "best:", max(means, key=means.get))
    return means


if __name__ == "__main__":
    main()
