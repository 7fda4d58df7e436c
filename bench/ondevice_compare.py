"""Issue 19's accuracy acceptance: `ee personalise --engine litert` against the TensorFlow engine on
three benchmark dev users (seeds 100-102; 0-2 are the test users), 0 labels, same seeds; per exit
and final accuracy on each user's test photos, mean ± std. Writes bench/results/ondevice-compare-<date>.json/.md.

    PYTHONPATH=. .venv/bin/python -m bench.ondevice_compare --generic ~/.cache/ee/models/cifar_resnet9.h5
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

import numpy as np

from bench.protocol import inside, predict
from datasets import cifar10, scenarios

RESULTS = Path(__file__).parent / "results"
ENGINES = ("tensorflow", "litert")


def user_figures(generic: Path, seed: int, data: dict, unlabelled: int) -> dict:
    from ee_cli.files import bundle
    from ee_cli.commands.attach import attach
    from ee_cli.base.config import AttachConfig, PersonaliseConfig
    from ee_cli.commands.personalise import personalise

    user = scenarios.make_user(data, seed, k=3, unlabelled=unlabelled)
    found = {"seed": seed, "classes": [user.names[c] for c in user.classes], "condition": user.condition}
    with tempfile.TemporaryDirectory(prefix=f"ondevice-user-{seed}-") as folder, inside(Path(folder)):
        folders = scenarios.write_user(user, Path("photos"))
        attach(AttachConfig(backbone=str(generic), classes=",".join(user.names), out="attached", seed=seed))
        for engine in ENGINES:
            result = personalise(PersonaliseConfig(data=str(folders["unlabelled"]), bundle="attached", out=f"personal-{engine}", seed=seed,
                                                   engine=engine, quiet=True))
            personal = np.asarray([user.names.index(name) for name in result.meta["personal_classes"]])
            model = bundle.read_bundle(result.bundle_path).load_model()
            outputs = bundle.head_outputs(result.meta)
            found[engine] = {"accuracy": {name: float(np.mean(personal[predict(model, name, user.test).argmax(1)] == user.test_y)) for name in outputs},
                             "train_seconds": result.metrics["train_seconds"], "personal_classes": result.meta["personal_classes"]}
    return found


def summary(users: list[dict]) -> dict:
    names = list(users[0]["tensorflow"]["accuracy"])
    table = {}
    for name in names:
        per_engine = {engine: np.array([100 * u[engine]["accuracy"][name] for u in users]) for engine in ENGINES}
        gap = per_engine["litert"] - per_engine["tensorflow"]
        table[name] = {engine: {"mean": round(float(v.mean()), 2), "std": round(float(v.std()), 2)} for engine, v in per_engine.items()}
        table[name]["litert_minus_tensorflow"] = {"mean": round(float(gap.mean()), 2), "max_abs": round(float(np.abs(gap).max()), 2)}
    return table


def markdown(table: dict) -> str:
    lines = ["| output | TensorFlow engine | LiteRT engine | LiteRT − TF (mean; max abs) |", "|---|---|---|---|"]
    for name, row in table.items():
        tf, lite, gap = row["tensorflow"], row["litert"], row["litert_minus_tensorflow"]
        lines.append(f"| {name} | {tf['mean']:.1f} ± {tf['std']:.1f} | {lite['mean']:.1f} ± {lite['std']:.1f} | {gap['mean']:+.2f}; {gap['max_abs']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generic", type=Path, required=True)
    parser.add_argument("--seeds", default="100,101,102")
    parser.add_argument("--unlabelled", type=int, default=500)
    args = parser.parse_args()
    data = cifar10.load()
    users = [user_figures(args.generic.expanduser().resolve(), int(seed), data, args.unlabelled) for seed in args.seeds.split(",")]
    table = summary(users)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"ondevice-compare-{date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({"users": users, "summary": table}, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))


if __name__ == "__main__":
    main()
