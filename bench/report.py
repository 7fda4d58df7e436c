"""From per-user rows to the three claims beside the paper's figures: a summary dict, Markdown
tables and plots. Spread is over users (headline) and over seeds within a scenario (per scenario):
sample standard deviations, 95 % bootstrap intervals of the mean (of the geometric mean for ratios),
medians and worst cases; a verdict only where the interval clears the target."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

PAPER = {"accuracy_gain_points": 15.9, "training_ratio": 2.2, "latency_ratio": (2.2, 3.2)}


def _values(rows: list[dict], pick: Callable[[dict], float | None]) -> np.ndarray:
    found = []
    for row in rows:
        try:
            value = pick(row)
        except (KeyError, TypeError):
            value = None
        if value is not None:
            found.append(value)
    return np.array(found, float)


BOOTSTRAP_RESAMPLES = 10_000


def stats(values: np.ndarray, ratio: bool = False) -> dict[str, float] | None:
    """Over users: mean, sample std, median, worst, best and a 95 % bootstrap interval of the centre.
    For ratios the centre is the geometric mean (a 2x and a 0.5x average to 1x, not 1.25x)."""
    if not len(values):
        return None
    values = np.asarray(values, float)
    found = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "median": float(np.median(values)),
             "worst": float(values.min()), "best": float(values.max()), "users": len(values)}
    if ratio:
        found["geomean"] = float(np.exp(np.log(values).mean()))
    found["ci95"] = bootstrap_interval(np.log(values) if ratio else values, transform=np.exp if ratio else None)
    return found


def bootstrap_interval(values: np.ndarray, transform=None, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the mean of `values` (seeded: the same rows, the same interval)."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, (BOOTSTRAP_RESAMPLES, len(values)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    if transform is not None:
        low, high = transform(low), transform(high)
    return float(low), float(high)


def figures(rows: list[dict], labels: tuple[int, ...], modes: tuple[str, ...], points: tuple[str, ...]) -> dict[str, Any]:
    """Every figure the tables show, as {name: stats}."""
    found: dict[str, Any] = {}
    for label in labels:
        key = f"labels_{label}"
        found[f"gain_over_generic_L{label}"] = stats(_values(rows, lambda r: 100 * (r[key]["accuracy"]["final"] - r["generic"])))
        found[f"gain_over_restricted_L{label}"] = stats(_values(rows, lambda r: 100 * (r[key]["accuracy"]["final"] - r["restricted"])))
        found[f"ee_final_L{label}"] = stats(_values(rows, lambda r: 100 * r[key]["accuracy"]["final"]))
    found["generic"] = stats(_values(rows, lambda r: 100 * r["generic"]))
    found["restricted"] = stats(_values(rows, lambda r: 100 * r["restricted"]))
    found["bn_only"] = stats(_values(rows, lambda r: 100 * r["bn_only"]["accuracy"]))
    found["whole_network"] = stats(_values(rows, lambda r: 100 * r["labels_0"]["whole_network"]["accuracy"]))
    found["training_ratio"] = stats(_values(rows, lambda r: r["labels_0"]["whole_network"]["seconds"] / r["labels_0"]["seconds"]["train"]), ratio=True)
    timed = {"train": lambda r: r["labels_0"]["seconds"]["train"], "command": lambda r: r["labels_0"]["seconds"]["command"],
             "whole_network": lambda r: r["labels_0"]["whole_network"]["seconds"]}
    for name, seconds in timed.items():  # each against one plain batched pass per photo per view
        found[f"{name}_over_bound"] = stats(_values(rows, lambda r: seconds(r) / r["labels_0"]["seconds"]["forward_pass_bound"]), ratio=True)
    found["command_over_method_bound"] = stats(_values(rows, lambda r: r["labels_0"]["seconds"]["command"] / r["labels_0"]["seconds"]["method_bound"]), ratio=True)
    for phase in PHASES:  # arithmetic means: a phase can take no time (no BN layer adapted)
        found[f"phase_{phase}_over_bound"] = stats(_values(rows, lambda r: r["labels_0"]["seconds"]["phases"][phase] / r["labels_0"]["seconds"]["forward_pass_bound"]))
    found["training_ratio_command"] = stats(_values(rows, lambda r: r["labels_0"]["whole_network"]["seconds"] / r["labels_0"]["seconds"]["command"]), ratio=True)
    for point in points:
        found[f"mflops_ratio_{point}"] = stats(_values(rows, lambda r: _point(r, point)["plain_mflops"] / _point(r, point)["mean_mflops"]), ratio=True)
        found[f"accuracy_{point}"] = stats(_values(rows, lambda r: 100 * _point(r, point)["accuracy"]))
        found[f"below_generic_{point}"] = below_generic(rows, point)
        found[f"cascade_gain_over_restricted_{point}"] = stats(_values(rows, lambda r: 100 * (_point(r, point)["accuracy"] - _point(r, point)["restricted_accuracy_report"])))
        for mode in modes:
            found[f"latency_ratio_{point}_{mode}"] = stats(_values(rows, lambda r: _point(r, point)["litert"][mode]["speedup"]), ratio=True)
    return found


def _point(row: dict, point: str) -> dict:
    return row["labels_0"]["operating_points"][point]


def _cell(value: dict | None, unit: str = "", digits: int = 1, signed: bool = False) -> str:
    """Ratios: geometric mean [95 % interval] (median; worst … best). Others: mean ± sample std [95 % interval] (median; worst … best)."""
    if value is None:
        return "—"
    sign = "+" if signed else ""
    low, high = value["ci95"]
    interval = f"[{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"
    if "geomean" in value:
        return f"{value['geomean']:.{digits}f}{unit} {interval} (median {value['median']:.{digits}f}; {value['worst']:.{digits}f} … {value['best']:.{digits}f})"
    return (f"{value['mean']:{sign}.{digits}f}{unit} ± {value['std']:.{digits}f} {interval} "
            f"(median {value['median']:{sign}.{digits}f}; {value['worst']:{sign}.{digits}f} … {value['best']:{sign}.{digits}f})")


def _verdict(value: dict | None, target: float, worst_case: bool = False) -> str:
    """Judged on the 95 % interval (or on the worst user): no verdict where the interval spans the target."""
    if value is None:
        return "not measured"
    if worst_case:
        return "meets or beats in the worst case" if value["worst"] >= target else "falls short in the worst case"
    low, high = value["ci95"]
    if low >= target:
        return "meets or beats"
    return "falls short" if high < target else "undecided: the interval spans the target"


def _claim(found: dict, key: str, claim: str, paper: str, unit: str, digits: int = 1, signed: bool = False,
           judged: tuple[float, bool] | None = None) -> str:
    """One table row; `judged` = (target, worst_case) compares the interval (or the worst user) with the target."""
    value = found.get(key)
    verdict = "" if judged is None else _verdict(value, *judged)
    return f"| {claim} | {paper} | {_cell(value, unit, digits, signed)} |" + (f" {verdict} |" if verdict else " |")


PHASES = {"batchnorm": "BN adaptation", "classes": "class-mix passes", "cache": "feature cache", "heads": "head training", "holdout": "hold-out scoring"}


def _phases_row(found: dict) -> str:
    """Where the command's time goes, each phase ÷ the bound (mean over users); the rest is loading and saving."""
    parts = [f"{title} {found[f'phase_{phase}_over_bound']['mean']:.2f}×" for phase, title in PHASES.items() if found.get(f"phase_{phase}_over_bound")]
    return f"| of which, each phase ÷ the same bound (mean; the rest is loading and saving) | — | {', '.join(parts) or '—'} |"


POINT_TITLES = {  # (row title, an "equal accuracy" point: shown beside the paper's latency claim and judged against it)
    "label-free": ("latency with the exits `ee personalise` chose label-free (0 labels anywhere)", False),
    "match-restricted": ("latency at the free baseline's accuracy (the generic model restricted to the user's classes)", True),
    "match-generic": ("latency at the generic model's accuracy", True),
    "keep": ("latency within 0.5 pt of the personalised accuracy", False),
}


def headline_table(found: dict, labels: tuple[int, ...], modes: tuple[str, ...], points: tuple[str, ...]) -> str:
    low, high = PAPER["latency_ratio"]
    gain, training = PAPER["accuracy_gain_points"], PAPER["training_ratio"]
    lines = ["| claim | paper | measured here over users: mean ± sample std, or for ratios the geometric mean; [95 % bootstrap interval]; (median; worst … best) | |",
             "|---|---|---|---|"]
    lines += [_claim(found, f"gain_over_restricted_L{label}", f"accuracy gain over the generic model restricted to the user's classes (free baseline), {label} labels/class",
                     "—", " pts", signed=True, judged=(0.0, True)) for label in labels]
    lines.append(_claim(found, "cascade_gain_over_restricted_label-free", "same at 0 labels for the cascade with the exits `ee personalise` chose label-free "
                        "(the default path; on the half of the test photos not used to calibrate)", "—", " pts", signed=True, judged=(0.0, True)))
    lines += [_claim(found, f"gain_over_generic_L{label}", f"accuracy gain over the generic model, {label} labels/class", f"+{gain} pts", " pts",
                     signed=True, judged=(gain, False)) for label in labels]
    lines.append(_claim(found, "training_ratio", "training time, whole-network FixMatch ÷ exits only (feature cache + heads)", f"{training}×", "×", 2,
                        judged=(training, False)))
    lines.append(_claim(found, "training_ratio_command", "same, ÷ the whole `ee personalise` command (BN adaptation, class inference, hold-out scoring, saving)",
                        f"{training}×", "×", 2, judged=(training, False)))
    lines.append(_claim(found, "train_over_bound", "`ee personalise`'s training (cache + heads) ÷ the forward-pass bound (one plain batched pass per photo per view)",
                        "—", "×", 2))
    lines.append(_claim(found, "command_over_bound", "the whole `ee personalise` command ÷ the same bound", "—", "×", 2))
    lines.append(_phases_row(found))
    lines.append(_claim(found, "command_over_method_bound", "the whole command ÷ the method bound, BN adaptation included (`bench/bound.py`: the cache's two views "
                        "of every photo, the hold-out pass, the exact BN and class-mix passes from their stepping stones)", "—", "×", 2))
    lines.append(_claim(found, "whole_network_over_bound", "whole-network fine-tuning ÷ the same bound", "—", "×", 2))
    for point in points:
        title, equal_accuracy = POINT_TITLES[point]
        flagged = found.get(f"below_generic_{point}")
        title += f" ({BELOW_GENERIC}: {flagged} users)" if flagged else ""
        lines += [_claim(found, f"latency_ratio_{point}_{mode}", f"{title}, LiteRT {mode} cascade vs plain model", f"{low}–{high}×" if equal_accuracy else "—",
                         "×", 2, judged=(low, False) if equal_accuracy else None) for mode in modes]
    return "\n".join(lines)


def scenario_table(rows: list[dict], labels: tuple[int, ...], modes: tuple[str, ...], points: tuple[str, ...]) -> str:
    header = ["scenario", "users", *[f"gain over restricted, {label} labels" for label in labels], "generic", "restricted", "BN only",
              "BN layers adapted (auto, per user)",
              *[f"ee final, {label} labels" for label in labels], "whole network", "train ratio",
              *[f"latency ratio {point}, {mode}" for point in points for mode in modes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scenario in sorted({r["scenario"] for r in rows}, key=[r["scenario"] for r in rows].index):
        group = [r for r in rows if r["scenario"] == scenario]
        found = figures(group, labels, modes, points)

        def short(name, unit="", digits=1, signed=False):
            value = found.get(name)
            if value is None:
                return "—"
            if "geomean" in value:  # ratios: geometric mean and range
                return f"{value['geomean']:.{digits}f}{unit} ({value['worst']:.{digits}f} … {value['best']:.{digits}f})"
            return f"{value['mean']:{'+' if signed else ''}.{digits}f}{unit} ± {value['std']:.{digits}f}"

        cells = [scenario, str(len(group)), *[short(f"gain_over_restricted_L{label}", signed=True) for label in labels],
                 short("generic"), short("restricted"), short("bn_only"), _depths(group), *[short(f"ee_final_L{label}") for label in labels],
                 short("whole_network"), short("training_ratio", "×", 2), *[short(f"latency_ratio_{point}_{mode}", "×", 2) for point in points for mode in modes]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


METHODS = ("source", "bn", "tent", "eata", "lame")
EE_FINAL = "ee (0 labels, final exit)"


def _method_picks(rows: list[dict]) -> list[tuple[str, Callable[[dict], float]]]:
    """(name, accuracy of a row) for each baseline the rows ran, then ee's final exit at 0 labels."""
    methods = [m for m in METHODS if any(m in r.get("methods", {}) for r in rows)]
    return [(m, lambda r, m=m: r["methods"][m]["accuracy"]) for m in methods] + [(EE_FINAL, lambda r: r["labels_0"]["accuracy"]["final"])]


def _method_costs(rows: list[dict], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per user: backward passes, the command's wall seconds and its peak RSS (MiB) where measured."""
    if name == EE_FINAL:
        return (np.array([]), _values(rows, lambda r: r["labels_0"]["seconds"]["command"]), _values(rows, lambda r: r["labels_0"].get("peak_rss_mib")))
    return (_values(rows, lambda r: r["methods"][name]["backward_passes"]), _values(rows, lambda r: r["methods"][name]["seconds"]),
            _values(rows, lambda r: r["methods"][name].get("peak_rss_mib")))


def methods_table(rows: list[dict]) -> str:
    """The label-free baselines beside ee on the same users: accuracy over every class (as the TTA
    papers score it) and the gain over the free baseline (the generic model restricted to the true
    classes: it needs them), median beside mean and interval, and what each cost; then each user's row."""
    picks = _method_picks(rows)
    if len(picks) == 1:
        return ""
    lines = ["| method | accuracy, % (median) | gain over the free baseline, pts: mean [95 % CI] (median; worst … best) | users below the generic model "
             "| backward passes per user | command wall time, s (median) | command peak RSS, MiB (median) |", "|---|---|---|---|---|---|---|"]
    for name, pick in picks:
        accuracy = stats(_values(rows, lambda r, pick=pick: 100 * pick(r)))
        gain = stats(_values(rows, lambda r, pick=pick: 100 * (pick(r) - r["restricted"])))
        if accuracy is None or gain is None:
            continue
        below = int(np.sum(_values(rows, lambda r, pick=pick: pick(r) < r["generic"] - 0.01)))
        passes, seconds, rss = _method_costs(rows, name)
        lines.append(f"| {name} | {accuracy['mean']:.1f} ({accuracy['median']:.1f}) | {gain['mean']:+.1f} [{gain['ci95'][0]:+.1f}, {gain['ci95'][1]:+.1f}] "
                     f"({gain['median']:+.1f}; {gain['worst']:+.1f} … {gain['best']:+.1f}) | {below} of {gain['users']} | "
                     f"{f'{passes.mean():.0f}' if len(passes) else 'see training ratio'} | {_median(seconds, '.1f')} | {_median(rss, '.0f')} |")
    names = [name for name, _ in picks[:-1]]
    users = ["", "| user | generic | free baseline | " + " | ".join(names) + " | ee |", "|" + "---|" * (len(names) + 4)]
    for r in rows:
        cells = [f"{100 * r['methods'][m]['accuracy']:.1f}" if m in r.get("methods", {}) else "—" for m in names]
        ee = r.get("labels_0", {}).get("accuracy", {}).get("final")
        users.append(f"| {r['scenario']} (seed {r['seed']}) | {100 * r['generic']:.1f} | {100 * r['restricted']:.1f} | " + " | ".join(cells)
                     + f" | {'—' if ee is None else f'{100 * ee:.1f}'} |")
    return "\n".join(lines + users)


def _median(values: np.ndarray, spec: str) -> str:
    return f"{np.median(values):{spec}}" if len(values) else "—"


def corruption_table(rows: list[dict]) -> str:
    """The TTA benchmarks' table: mean error (%) per corruption and severity, one row per method,
    over the users with that corruption (their count in the header), and the mean over every user."""
    corrupted = [r for r in rows if r["condition"] != "none"]
    picks = [("free baseline (needs the true classes)", lambda r: r["restricted"]), *_method_picks(corrupted)]
    if not corrupted or len(picks) == 2:
        return ""
    cells = sorted({r["condition"] for r in corrupted}, key=_corruption_order)
    groups = {cell: [r for r in corrupted if r["condition"] == cell] for cell in cells}
    lines = ["| method | " + " | ".join(f"{cell} ({len(group)})" for cell, group in groups.items()) + f" | mean ({len(corrupted)}) |",
             "|" + "---|" * (len(cells) + 2)]
    for name, pick in picks:
        errors = [_values(group, lambda r, pick=pick: 100 * (1 - pick(r))) for group in groups.values()]
        every = _values(corrupted, lambda r, pick=pick: 100 * (1 - pick(r)))
        lines.append(f"| {name} | " + " | ".join(f"{e.mean():.1f}" if len(e) else "—" for e in errors) + f" | {every.mean():.1f} |")
    return "\n".join(lines)


def _corruption_order(condition: str) -> tuple[int, int]:
    """CIFAR-10-C's order (noise, blur, weather, digital), then severity."""
    from datasets.corruptions import CORRUPTIONS

    name, _, severity = condition.rpartition("-")
    return (CORRUPTIONS.index(name) if name in CORRUPTIONS else len(CORRUPTIONS), int(severity) if severity.isdigit() else 0)


BELOW_GENERIC = "⚠ below the generic model"


def points_table(rows: list[dict], points: tuple[str, ...], modes: tuple[str, ...]) -> str:
    """Per user and operating point (the label-free one first): accuracy on the report half of the
    test photos beside the generic and free-baseline models' on the same photos, the MFLOPs cut and
    the LiteRT speed-ups; a user whose cascade is under the generic model is flagged, since a point
    "within 0.5 pt" of a broken personal model is met trivially."""
    lines = ["| user | point | accuracy, % | generic | free baseline | MFLOPs cut | " + " | ".join(f"LiteRT {mode}" for mode in modes) + " | |",
             "|" + "---|" * (len(modes) + 7)]
    for r in rows:
        for point in points:
            try:
                found = _point(r, point)
            except KeyError:
                continue
            speedups = [f"{found['litert'][mode]['speedup']:.2f}×" if mode in found.get("litert", {}) else "—" for mode in modes]
            flag = BELOW_GENERIC if found["accuracy"] < found["generic_accuracy_report"] else ""
            lines.append(f"| {r['scenario']} (seed {r['seed']}) | {point} | {100 * found['accuracy']:.1f} | {100 * found['generic_accuracy_report']:.1f} | "
                         f"{100 * found['restricted_accuracy_report']:.1f} | {found['plain_mflops'] / found['mean_mflops']:.2f}× | " + " | ".join(speedups) + f" | {flag} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def below_generic(rows: list[dict], point: str) -> int:
    """Users whose cascade at `point` scores under the generic model on the same photos."""
    return int(np.sum(_values(rows, lambda r: _point(r, point)["accuracy"] < _point(r, point)["generic_accuracy_report"])))


def _depths(rows: list[dict]) -> str:
    """Each user's BatchNorm depth as `ee personalise --adapt-bn auto` chose it, of the layers it had."""
    chosen = [f"{r['bn_only']['adapted_layers']}/{r['bn_only']['of']}" for r in rows if "of" in r.get("bn_only", {})]
    return ", ".join(chosen) or "—"


def plot(rows: list[dict], path: Path, modes: tuple[str, ...]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = sorted({r["scenario"] for r in rows}, key=[r["scenario"] for r in rows].index)
    series = [("generic", lambda r: r["generic"]), ("restricted", lambda r: r["restricted"]), ("BN only", lambda r: r["bn_only"]["accuracy"]),
              ("whole network", lambda r: r["labels_0"]["whole_network"]["accuracy"]), ("ee, 0 labels", lambda r: r["labels_0"]["accuracy"]["final"]),
              ("ee, 10 labels", lambda r: r["labels_10"]["accuracy"]["final"])]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(series)
    for number, (name, pick) in enumerate(series):
        means, spreads = [], []
        for scenario in scenarios:
            values = 100 * _values([r for r in rows if r["scenario"] == scenario], pick)
            means.append(values.mean() if len(values) else np.nan)
            spreads.append(values.std(ddof=1) if len(values) > 1 else 0)
        left.bar(np.arange(len(scenarios)) + number * width, means, width, yerr=spreads, label=name, capsize=2)
    left.set_xticks(np.arange(len(scenarios)) + 0.4 - width / 2, scenarios, rotation=20)
    left.set_ylabel("accuracy on the user's test photos (%)")
    left.legend(fontsize=8)
    for mode in modes:
        for point, marker in (("match-restricted", "o"), ("match-generic", "^"), ("keep", "s")):
            values = [_values([r for r in rows if r["scenario"] == s], lambda r: _point(r, point)["litert"][mode]["speedup"]) for s in scenarios]
            right.errorbar(np.arange(len(scenarios)), [v.mean() if len(v) else np.nan for v in values], [v.std() if len(v) else 0 for v in values],
                           marker=marker, capsize=3, label=f"{mode} @ {point}")
    right.axhspan(*PAPER["latency_ratio"], color="grey", alpha=0.2, label="paper: 2.2–3.2×")
    right.axhline(1.0, color="black", lw=0.8)
    right.set_xticks(np.arange(len(scenarios)), scenarios, rotation=20)
    right.set_ylabel("latency ratio: plain model ÷ cascade (LiteRT)")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
