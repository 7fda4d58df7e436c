"""`make bench`: the paper's three claims measured on CIFAR-10 users, in one run.

    python -m bench.run [--models resnet9,lite1] [--users dev,test] [--costs test] [--per-scenario 1 | --grid] [--workers N | --ray-address ADDR] [--smoke]

Writes bench/results/<date>/results.json (every user's figures, the summary, the settings, the
code and generic models), the plot beside it, a line in bench/results/INDEX.md, and the tables into bench/README.md between its markers: per generic model, test users
first (run only to report), then dev users (the ones defaults and designs are tuned on: their accuracy only, unless
`--costs dev,test` asks for their latency and training cost too). `--smoke` is the two-minute
version on generated photos and an untrained model: it checks the pipeline, not the claims.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import date
from pathlib import Path

from bench import index
from ee_cli.base import atomic

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet9,lite1", help="generic models whose users run: resnet9 (32 px), lite1 (240 px), or both")
    parser.add_argument("--generic", type=Path, default=None, help="the resnet9 model file (default ~/.cache/ee/models/cifar_resnet9.h5)")
    parser.add_argument("--lite1", type=Path, default=None, help="the lite1 model file (default ~/.cache/ee/models/cifar_lite1.h5)")
    parser.add_argument("--users", default="dev,test", help="which users: dev (tune on these), test (report only), or both")
    parser.add_argument("--per-scenario", type=int, default=1, help="users per scenario, each with its own seed and photos")
    parser.add_argument("--grid", action="store_true", help="every corruption at both severities (30 k-class users and 15 all-class ones per split: make bench-full) "
                        "instead of a sample of them")
    parser.add_argument("--scenarios", default="all", help="comma-separated names like k2-fog-3 (k classes, corruption, severity), or all")
    parser.add_argument("--unlabelled", type=int, default=500)
    parser.add_argument("--labels", default="0,10", help="labelled photos per class, per setting")
    parser.add_argument("--test-per-class", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--quant", default="none,int8_full", help="export modes timed in LiteRT")
    parser.add_argument("--points", default="label-free,match-restricted,keep",
                        help="operating points exported and timed in LiteRT: label-free (as `ee personalise` chose them), or calibrated by `ee evaluate` on labels")
    parser.add_argument("--no-whole-network", action="store_true", help="skip whole-network FixMatch fine-tuning")
    parser.add_argument("--costs", default="test", help="whose costs are measured (LiteRT latency, whole-network fine-tuning, the bounds): "
                        "test (the default: dev users tune accuracy defaults), or dev,test")
    parser.add_argument("--workers", type=int, default=1, help="users at once, as Ray tasks on a local Ray (1: serial, in this process)")
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster to fan users out to")
    parser.add_argument("--threads", type=int, default=None, help="TensorFlow threads per user (default: 2 serial, 1 per Ray worker)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/<date>.json)")
    parser.add_argument("--readme", type=Path, default=None, help="Markdown file whose bench markers get the tables (default: bench/README.md; none for --smoke)")
    parser.add_argument("--no-readme", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for users' photos and bundles (default: a temporary one)")
    parser.add_argument("--smoke", action="store_true", help="generated photos, an untrained model, a handful of photos and epochs")
    return parser.parse_args(argv)


def jobs_for(args, work: Path, generic: dict[str, str]) -> list:
    """Per generic model (`generic`: name -> model file), its chosen users, with that model's settings."""
    from bench.protocol import GENERIC_MODELS, SPLITS, Settings, UserJob, settings_for, users

    splits = args.users.split(",")
    if not splits or not set(splits) <= set(SPLITS):
        _user_error(f"--users takes dev, test or dev,test, not {args.users!r}")
    chosen = [user for split in splits for user in users(split, args.per_scenario, grid=args.grid)]
    wanted = chosen if args.scenarios == "all" else [user for user in chosen if user.scenario.name in args.scenarios.split(",")]
    if not wanted:
        names = sorted({user.scenario.name for user in chosen})
        _user_error(f"no {args.users} user has a scenario among {args.scenarios}; choose from {', '.join(names)}")
    settings = Settings(unlabelled=args.unlabelled, labels=tuple(int(x) for x in args.labels.split(",")), test_per_class=args.test_per_class,
                        epochs=args.epochs, whole_network=not args.no_whole_network, quant=tuple(args.quant.split(",")),
                        points=tuple(args.points.split(",")))
    data = "synthetic" if args.smoke else "cifar10"
    costs = args.costs.split(",")
    if not set(costs) <= set(SPLITS):
        _user_error(f"--costs takes test, dev or dev,test, not {args.costs!r}")
    position = {user: [u for u in chosen if u.split == user.split].index(user) for user in wanted}
    jobs = [UserJob(path, data, user, replace(settings_for(GENERIC_MODELS[name], settings), costs=user.split in costs),
                    str(work / f"{name}-{user.split}-{user.scenario.name}-seed{user.seed}"), name)
            for name, path in generic.items() for user in wanted if GENERIC_MODELS[name].runs(position[user], args.grid or args.scenarios != "all")]
    return sorted(jobs, key=lambda job: (job.model != "lite1", not job.settings.costs))  # the longest first: workers end together


def smoke_defaults(args) -> None:
    """Tiny everything; the generic model is an untrained, narrow cifar_resnet9 written to the work folder."""
    args.unlabelled, args.test_per_class, args.epochs, args.quant = min(args.unlabelled, 40), min(args.test_per_class, 30), min(args.epochs, 1), "none"
    args.points = ",".join(args.points.split(",")[:2])  # the label-free path and one calibrated point
    args.models = args.models.split(",")[0]  # one generic model: the untrained one stands in for it
    if args.labels == "0,10":
        args.labels = "0,2"


def untrained_generic(path: Path) -> Path:
    from datasets.synthetic import CLASSES
    from ee_cli.base import compat
    from ee_cli.graph import backbones

    compat.seed_everything(0)  # the same untrained model in every run, so runs can be compared
    backbones.cifar_resnet9(32, len(CLASSES), width=8).save(path)
    return path


def generic_models(args, work: Path) -> dict[str, str]:
    """Each chosen generic model's file; --smoke writes an untrained stand-in."""
    from bench.protocol import GENERIC_MODELS

    names = args.models.split(",")
    unknown = [name for name in names if name not in GENERIC_MODELS]
    if unknown or not names:
        _user_error(f"--models {args.models}: choose from {', '.join(GENERIC_MODELS)}")
    if args.smoke:
        return {names[0]: str(untrained_generic(work / "generic.h5"))}
    given = {"resnet9": args.generic, "lite1": args.lite1}
    found = {name: str(given.get(name) or GENERIC_MODELS[name].path) for name in names}
    for name, path in found.items():
        if not Path(path).is_file():
            _user_error(f"no {name} generic model at {path}: make it with `PYTHONPATH=. {GENERIC_MODELS[name].made_by}` (or leave it out with --models)")
    return found


def main(argv=None) -> dict:
    args = parse(argv)
    args.commit = _commit()  # before the run: a commit made while it runs must not claim its figures
    args.threads = args.threads or (1 if args.workers > 1 or args.ray_address else 2)
    os.environ["EE_THREADS"] = str(args.threads)  # before TensorFlow is imported, here and in workers
    if args.smoke:
        smoke_defaults(args)
    with tempfile.TemporaryDirectory(prefix="ee-bench-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        generic = generic_models(args, work)
        jobs = jobs_for(args, work, generic)
        started = time.perf_counter()
        rows = _run_with_progress(jobs, args)
        seconds = time.perf_counter() - started
    return write_results(args, jobs, rows, seconds)


def _run_with_progress(jobs, args) -> list[dict]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.fanout import run_users

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} users"), TimeElapsedColumn()) as progress:
        task = progress.add_task("Benchmark users", total=len(jobs))

        def done(index, row):
            final = row.get("labels_0", {}).get("accuracy", {}).get("final")
            progress.console.print(f"{row['split']} {row['scenario']} seed {row['seed']}: generic {100 * row['generic']:.1f}%, restricted {100 * row['restricted']:.1f}%, "
                                   f"ee final {100 * final:.1f}%" if final is not None else f"{row['split']} {row['scenario']} seed {row['seed']} done")
            progress.advance(task)

        return run_users(jobs, args.workers, args.ray_address, args.threads, done)


SPLIT_TITLES = {"test": "Test users: run only to report (seeds never used to tune; two of their conditions no dev user has)",
                "dev": "Dev users: defaults and designs are tuned on these"}


def write_results(args, jobs, rows, seconds) -> dict:
    from bench import report
    from bench.protocol import GENERIC_MODELS

    settings = {job.model: job.settings for job in jobs}
    groups = {(model, split): [row for row in rows if (row["model"], row["split"]) == (model, split)]
              for model in settings for split in SPLIT_TITLES if any((row["model"], row["split"]) == (model, split) for row in rows)}
    summary: dict[str, dict] = {}
    for (model, split), group in groups.items():
        summary.setdefault(model, {})[split] = report.figures(group, settings[model].labels, settings[model].quant, settings[model].points)
    stem = args.out or HERE / "results" / f"{date.today().isoformat()}{'-smoke' if args.smoke else ''}" / "results.json"
    stem.parent.mkdir(parents=True, exist_ok=True)
    plot = report.plot(next(iter(groups.values())), stem.with_name(f"{stem.stem}.png"), jobs[0].settings.quant)
    parts: list[str] = []
    for (model, split), group in groups.items():  # each model's title once, above its first split's tables
        title = f"### {GENERIC_MODELS[model].title}"
        if title not in parts:
            parts.append(title)
        parts.append(_split_tables(split, group, summary[model][split], settings[model]))
    tables = "\n\n".join(parts)
    results = {
        "date": date.today().isoformat(), "commit": args.commit, "smoke": args.smoke, "seconds": seconds, "generic_models": {job.model: identity(job.generic) for job in jobs},
        "data": jobs[0].data, "settings": {model: {k: v for k, v in asdict(found).items() if k != "costs"} for model, found in settings.items()},
        "costs_measured_on": args.costs, "users_chosen": args.users, "per_scenario": args.per_scenario, "workers": args.workers,
        "ray_address": args.ray_address, "threads": args.threads, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "summary": summary, "users": rows, "plot": str(plot),
    }
    atomic.write_json(stem, results, indent=1)
    if args.out is None:
        index.write()
    readme = args.readme or (None if args.smoke else HERE / "README.md")
    if readme and not args.no_readme:
        _update_readme(readme, results, tables, stem, plot)
    print(tables + f"\n\nresults: {stem}\nplot: {plot}\n{len(rows)} users in {seconds / 60:.1f} min")
    return results


def identity(model_file: str) -> dict:
    """Which generic model the figures came from: its path, sha256 and clean test accuracy (from the
    report its maker wrote beside it, `models.train_cifar` / `models.train_lite`)."""
    import hashlib

    path = Path(model_file)
    beside = path.with_suffix(".json")
    made = json.loads(beside.read_text()) if beside.is_file() else {}
    return {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "clean_test_accuracy": made.get("test_accuracy"),
            "accuracy_from": str(beside) if made else None}


def _commit() -> str | None:
    """The tree the figures came from (`-dirty` when it had uncommitted changes)."""
    import subprocess

    try:
        found = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=HERE)
    except FileNotFoundError:  # no git on this machine: the figures still stand, unattributed
        return None
    return found.stdout.strip() or None


def _split_tables(split: str, rows: list[dict], found: dict, settings) -> str:
    from bench import report

    methods, corruptions = report.methods_table(rows), report.corruption_table(rows)
    points = report.points_table(rows, settings.points, settings.quant)
    return "\n".join([f"**{SPLIT_TITLES[split]}.** {len(rows)} users.", "", report.headline_table(found, settings.labels, settings.quant, settings.points), "",
                      "Per scenario, mean ± std over its users (accuracy in %):", "", report.scenario_table(rows, settings.labels, settings.quant, settings.points),
                      *(["", "The label-free baselines beside `ee`, on the same users and photos (accuracy over every class, as the TTA papers score it; "
                         "the free baseline needs the true classes; wall time and peak RSS of the command as typed, in a process of its own, where costs "
                         "are measured):", "", methods] if methods else []),
                      *(["", "Mean error (%) per corruption and severity, over the corrupted users with it (their count in brackets), as the TTA "
                         "benchmarks tabulate it; `ee` scores over the classes it inferred:", "", corruptions] if corruptions else []),
                      *(["", "Each user at each operating point, on the half of the test photos `ee evaluate` did not calibrate on "
                         f"(label-free first: it is what the three lines deploy); `{report.BELOW_GENERIC}` marks a cascade under the generic model:", "",
                         points] if points else [])])


def _update_readme(readme: Path, results: dict, tables: str, stem: Path, plot: Path) -> None:
    per_model = "; ".join(
        f"{model}: {found['unlabelled']} unlabelled photos per user, {found['test_per_class']} test photos per class, labels/class "
        f"{', '.join(map(str, found['labels']))}, {found['epochs']} epochs"
        + (f" (whole network timed on {found['whole_network_epochs']} and scaled)" if found.get("whole_network_epochs") else "")
        for model, found in results["settings"].items())
    threads = next(iter(results["settings"].values()))["latency_threads"]
    models = "; ".join(f"{model}: `{Path(found['path']).name}`, sha256 `{found['sha256'][:12]}…`"
                       + (f", {100 * found['clean_test_accuracy']:.2f} % on the clean test split" if found["clean_test_accuracy"] is not None else "")
                       for model, found in results["generic_models"].items())
    body = "\n".join([
        BEGIN,
        f"Measured {results['date']} on this machine ({results['machine']['cpus']} CPUs), {len(results['users'])} users in {results['seconds'] / 60:.1f} min "
        f"(`{_shown(stem)}`), users {results['users_chosen']} ({results['per_scenario']} per scenario), {results['threads']} TensorFlow "
        f"thread(s) per user, LiteRT latency on {threads} thread. {per_model}. Generic models: {models}.",
        "", tables, "", f"![accuracy and latency]({_shown(plot, readme.parent)})", END,
    ])
    text = readme.read_text() if readme.exists() else f"# Benchmark\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    readme.write_text(head + body + tail)


def _user_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _shown(path: Path, base: Path = HERE.parent) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
