"""From per-user rows to the three claims beside the paper's figures: a summary dict, Markdown
tables and plots. Spread is over users (headline) and over seeds within a scenario (per scenario)."""

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


def stats(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    return {"mean": float(values.mean()), "std": float(values.std()), "worst": float(values.min()), "best": float(values.max()), "users": len(values)}


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
    found["training_ratio"] = stats(_values(rows, lambda r: r["labels_0"]["whole_network"]["seconds"] / r["labels_0"]["seconds"]["train"]))
    found["training_ratio_command"] = stats(_values(rows, lambda r: r["labels_0"]["whole_network"]["seconds"] / r["labels_0"]["seconds"]["command"]))
    for point in points:
        found[f"mflops_ratio_{point}"] = stats(_values(rows, lambda r: _point(r, point)["plain_mflops"] / _point(r, point)["mean_mflops"]))
        found[f"accuracy_{point}"] = stats(_values(rows, lambda r: 100 * _point(r, point)["accuracy"]))
        for mode in modes:
            found[f"latency_ratio_{point}_{mode}"] = stats(_values(rows, lambda r: _point(r, point)["litert"][mode]["speedup"]))
    return found


def _point(row: dict, point: str) -> dict:
    return row["labels_0"]["operating_points"][point]


def _cell(value: dict | None, unit: str = "", digits: int = 1, signed: bool = False) -> str:
    if value is None:
        return "—"
    sign = "+" if signed else ""
    return f"{value['mean']:{sign}.{digits}f}{unit} ± {value['std']:.{digits}f} ({value['worst']:{sign}.{digits}f} … {value['best']:{sign}.{digits}f})"


def _verdict(value: dict | None, statistic: str, target: float) -> str:
    if value is None:
        return "not measured"
    return "meets or beats" if value[statistic] >= target else "falls short"


def _claim(found: dict, key: str, claim: str, paper: str, unit: str, digits: int = 1, signed: bool = False,
           judged: tuple[str, float, str] | None = None) -> str:
    """One table row; `judged` = (statistic, target, suffix) compares that statistic with the target."""
    value = found.get(key)
    verdict = "" if judged is None else _verdict(value, judged[0], judged[1]) + judged[2]
    return f"| {claim} | {paper} | {_cell(value, unit, digits, signed)} |" + (f" {verdict} |" if verdict else " |")


def headline_table(found: dict, labels: tuple[int, ...], modes: tuple[str, ...]) -> str:
    low, high = PAPER["latency_ratio"]
    gain, training = PAPER["accuracy_gain_points"], PAPER["training_ratio"]
    lines = ["| claim | paper | measured here: mean ± std over users (worst … best) | |", "|---|---|---|---|"]
    lines += [_claim(found, f"gain_over_generic_L{label}", f"accuracy gain over the generic model, {label} labels/class", f"+{gain} pts", " pts",
                     signed=True, judged=("mean", gain, "")) for label in labels]
    lines += [_claim(found, f"gain_over_restricted_L{label}", f"accuracy gain over the generic model restricted to the user's classes (free baseline), {label} labels/class",
                     "—", " pts", signed=True, judged=("worst", 0.0, " in the worst case")) for label in labels]
    lines.append(_claim(found, "training_ratio", "training time, whole-network FixMatch ÷ exits only (feature cache + heads)", f"{training}×", "×", 2,
                        judged=("mean", training, "")))
    lines.append(_claim(found, "training_ratio_command", "same, ÷ the whole `ee personalise` command (BN adaptation, class inference, hold-out scoring, saving)",
                        f"{training}×", "×", 2, judged=("mean", training, "")))
    lines += [_claim(found, f"latency_ratio_match-generic_{mode}", f"latency at the generic model's accuracy, LiteRT {mode} cascade vs plain model", f"{low}–{high}×",
                     "×", 2, judged=("mean", low, "")) for mode in modes]
    lines += [_claim(found, f"latency_ratio_keep_{mode}", f"latency within 0.5 pt of the personalised accuracy, LiteRT {mode}", "—", "×", 2) for mode in modes]
    return "\n".join(lines)


def scenario_table(rows: list[dict], labels: tuple[int, ...], modes: tuple[str, ...]) -> str:
    header = ["scenario", "users", "generic", "restricted", "BN only", *[f"ee final, {label} labels" for label in labels], "whole network",
              "train ratio", *[f"latency ratio @generic, {mode}" for mode in modes], *[f"latency ratio @keep, {mode}" for mode in modes]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for scenario in sorted({r["scenario"] for r in rows}, key=[r["scenario"] for r in rows].index):
        group = [r for r in rows if r["scenario"] == scenario]
        found = figures(group, labels, modes, ("match-generic", "keep"))

        def short(name, unit="", digits=1):
            value = found.get(name)
            return "—" if value is None else f"{value['mean']:.{digits}f}{unit} ± {value['std']:.{digits}f}"

        cells = [scenario, str(len(group)), short("generic"), short("restricted"), short("bn_only"), *[short(f"ee_final_L{label}") for label in labels],
                 short("whole_network"), short("training_ratio", "×", 2), *[short(f"latency_ratio_match-generic_{mode}", "×", 2) for mode in modes],
                 *[short(f"latency_ratio_keep_{mode}", "×", 2) for mode in modes]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
            spreads.append(values.std() if len(values) else 0)
        left.bar(np.arange(len(scenarios)) + number * width, means, width, yerr=spreads, label=name, capsize=2)
    left.set_xticks(np.arange(len(scenarios)) + 0.4 - width / 2, scenarios, rotation=20)
    left.set_ylabel("accuracy on the user's test photos (%)")
    left.legend(fontsize=8)
    for mode in modes:
        for point, marker in (("match-generic", "o"), ("keep", "s")):
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
