"""The `personalise` issue's acceptance on CIFAR-10 users, in one run.

    python -m bench.personalise_acceptance --generic ~/.cache/ee/models/cifar_resnet9.h5 [--seeds 0,1,2]

Users: 3 classes, 1,500 unlabelled train photos, a colour cast the generic model never saw, tested
on all their test photos (1,000 per class). Compared at 0 and 10 labels per class: the generic
model; the generic model restricted to the true classes (free); BN statistics only with inferred
classes (no training); `ee personalise` (final exit and every early exit); and, once, whole-network
FixMatch fine-tuning over the same photos and epochs. Writes bench/results/personalise-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench.protocol import predict, restricted_accuracy
from bench.whole_network import Photos, Recipe, finetune_whole_network
from datasets import cifar10, scenarios
from ee_cli.files import bundle
from ee_cli.adaptation import adapt, stepping
from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig, PersonaliseConfig
from ee_cli.commands.personalise import personalise

RESULTS = Path(__file__).parent / "results"


def bn_sweep(attached: Path, user: scenarios.User) -> list[dict]:
    """BN statistics only, no training: for N adapted layers, accuracy with inferred and true classes."""
    rows = []
    available = len(adapt.backbone_batchnorms(bundle.read_bundle(attached).load_model()))
    for count in range(0, available + 1):
        model = bundle.read_bundle(attached).load_model()
        stepping.adapt_batchnorm(model, lambda: [user.unlabelled[i : i + 500] for i in range(0, len(user.unlabelled), 500)], count)
        inferred = adapt.infer_classes(adapt.class_shares(predict(model, "final", user.unlabelled)), PersonaliseConfig.class_share)
        logits = predict(model, "final", user.test)
        rows.append({
            "adapted": count,
            "inferred_classes": inferred,
            "inferred_exactly": inferred == list(user.classes),
            "accuracy_inferred": restricted_accuracy(logits, inferred, user.test_y),
            "accuracy_true_classes": restricted_accuracy(logits, user.classes, user.test_y),
        })
    return rows


def sweep_only(generic: Path, data: dict, seeds: list[int], conditions: list[str], ks: list[int], work: Path) -> list[dict]:
    """BN statistics only on users the default (adapt the first half) was not tuned on."""
    rows = []
    for condition in conditions:
        for k in ks:
            for seed in seeds:
                user = scenarios.make_user(data, seed, k=k, condition=condition, unlabelled=1500)
                attached = work / f"sweep-{condition}-{k}-{seed}"
                attach(AttachConfig(backbone=str(generic), classes=",".join(cifar10.CLASSES), exits=(0.2, 0.4, 0.8), out=str(attached)))
                logits = predict(bundle.read_bundle(attached).load_model(), "final", user.test)
                rows.append({"condition": condition, "k": k, "seed": seed, "classes": list(user.classes),
                             "restricted_true_classes": restricted_accuracy(logits, user.classes, user.test_y), "bn_sweep": bn_sweep(attached, user)})
                best = max(rows[-1]["bn_sweep"], key=lambda r: r["accuracy_inferred"])
                auto = rows[-1]["bn_sweep"][4]
                print(json.dumps({"condition": condition, "k": k, "seed": seed, "restricted": rows[-1]["restricted_true_classes"],
                                  "auto_4": auto["accuracy_inferred"], "auto_exact": auto["inferred_exactly"], "best_n": best["adapted"],
                                  "best": best["accuracy_inferred"], "all_8": rows[-1]["bn_sweep"][8]["accuracy_inferred"],
                                  "all_8_exact": rows[-1]["bn_sweep"][8]["inferred_exactly"]}), flush=True)
    return rows


def run_user(generic: Path, data: dict, seed: int, labels: int, epochs: int, work: Path, whole_network: bool) -> dict:
    user = scenarios.make_user(data, seed, k=3, condition="colour_cast", unlabelled=1500, labelled_per_class=labels)
    folders = scenarios.write_user(user, work / f"user{seed}-L{labels}")
    attached = work / f"attached{seed}-L{labels}"
    attach(AttachConfig(backbone=str(generic), classes=",".join(cifar10.CLASSES), exits=(0.2, 0.4, 0.8), out=str(attached), seed=seed))
    generic_model = bundle.read_bundle(attached).load_model()
    generic_logits = predict(generic_model, "final", user.test)
    row = {
        "seed": seed, "labels_per_class": labels, "classes": list(user.classes), "condition": user.condition,
        "generic": float(np.mean(generic_logits.argmax(1) == user.test_y)),
        "restricted_true_classes": restricted_accuracy(generic_logits, user.classes, user.test_y),
    }
    if labels == 0:
        row["bn_sweep"] = bn_sweep(attached, user)
    started = time.perf_counter()
    result = personalise(PersonaliseConfig(
        data=str(folders["unlabelled"]), labelled=str(folders["labelled"]) if labels else None, bundle=str(attached),
        out=str(work / f"personal{seed}-L{labels}"), epochs=epochs, seed=seed, quiet=True,
    ))
    row["personalise_seconds"] = time.perf_counter() - started
    if labels == 0:  # the BN-only baseline at the depth personalise's --adapt-bn auto chose for these photos
        chosen = len(result.metrics["adapted_bn"]["layers"])
        row["bn_only_inferred"] = next(r for r in row["bn_sweep"] if r["adapted"] == chosen)["accuracy_inferred"]
    row["personalise_train_seconds"] = result.metrics["train_seconds"]
    row["cache"] = result.metrics["cache"]
    personal = [cifar10.CLASSES.index(name) for name in result.meta["personal_classes"]]
    row["personal_classes"] = personal
    model = bundle.read_bundle(result.bundle_path).load_model()
    for output in bundle.head_outputs(result.meta):
        predictions = np.asarray(personal)[predict(model, output, user.test).argmax(1)]
        row[f"ee_{output}"] = float(np.mean(predictions == user.test_y))
    row["exits_enabled"] = [e["name"] for e in result.meta["exits"] if e["enabled"]]
    if labels == 0 and whole_network:
        ablation = personalise(PersonaliseConfig(
            data=str(folders["unlabelled"]), bundle=str(attached), out=str(work / f"all{seed}"), epochs=epochs, seed=seed, quiet=True, personal_classes="all",
        ))
        model_all = bundle.read_bundle(ablation.bundle_path).load_model()
        row["ablation_all_classes"] = {output: float(np.mean(predict(model_all, output, user.test).argmax(1) == user.test_y)) for output in ["exit_0", "exit_1", "exit_2", "final"]}
    if whole_network:
        labelled_y = np.array([personal.index(c) for c in user.labelled_y], np.int32)
        every = Photos(user.unlabelled, np.arange(len(user.unlabelled)), user.labelled, labelled_y)  # every photo, fresh views: the first protocol
        model, seconds, _ = finetune_whole_network(str(generic), every, personal, Recipe(epochs, seed=seed))
        logits = predict(model, model.layers[-1].name, user.test)
        row["whole_network"] = {"seconds": seconds, "accuracy": float(np.mean(np.asarray(personal)[logits[:, personal].argmax(1)] == user.test_y)),
                                "exits_only_seconds_same_photos_epochs": row["personalise_train_seconds"]}
    return row


def summarise(rows: list[dict]) -> str:
    lines = ["| labels/class | generic | restricted (true classes) | BN only, inferred classes | ee final exit | exit_0 | exit_1 | exit_2 |", "|---|---|---|---|---|---|---|---|"]
    for labels in sorted({r["labels_per_class"] for r in rows}):
        group = [r for r in rows if r["labels_per_class"] == labels]

        def cell(key):
            values = [100 * r[key] for r in group if key in r]
            return f"{np.mean(values):.1f} ± {np.std(values):.1f}" if values else "—"

        lines.append(f"| {labels} | {cell('generic')} | {cell('restricted_true_classes')} | {cell('bn_only_inferred')} | {cell('ee_final')} | {cell('ee_exit_0')} | {cell('ee_exit_1')} | {cell('ee_exit_2')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generic", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--labels", default="0,10")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--whole-network", action="store_true", help="also fine-tune the whole network once (seed 0, 0 labels)")
    parser.add_argument("--bn-sweep-only", default="", help="conditions to sweep BN-only adaptation on (no training), e.g. low_light,blur")
    args = parser.parse_args()
    data = cifar10.load()
    if args.bn_sweep_only:
        with tempfile.TemporaryDirectory() as scratch:
            rows = sweep_only(args.generic, data, [int(x) for x in args.seeds.split(",")], args.bn_sweep_only.split(","), [2, 3], Path(scratch))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"bn-sweep-{date.today().isoformat()}.json").write_text(json.dumps(rows, indent=2) + "\n")
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for labels in [int(x) for x in args.labels.split(",")]:
            for seed in [int(x) for x in args.seeds.split(",")]:
                rows.append(run_user(args.generic, data, seed, labels, args.epochs, Path(scratch), args.whole_network and seed == 0))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "bn_sweep"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"personalise-{date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps({"generic_model": str(args.generic), "epochs": args.epochs, "rows": rows}, indent=2) + "\n")
    table = summarise(rows)
    stem.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
