"""Plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

MARKERS = ("*", "P", "X", "v", "^")  # one per operating point, drawn large to small so none hides another


def plot_operating_curve(path: Path, sweep: list[dict], metrics: dict[str, Any]) -> None:
    """Accuracy against mean latency and against mean MFLOPs: one point per shared threshold,
    the operating points, the oracle and the baselines marked. Latency is LiteRT's where the exits
    were timed in LiteRT (`ee evaluate --export`), else Keras' at batch 1, and the axis says which.
    The y-axis spans the personal band (the curve and the points); a baseline below it is named
    in the legend instead of squashing the plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure, lite = metrics["measure"], all("litert_p50_ms" in row for row in metrics["exits"])
    latency_label = "mean latency per photo (ms, LiteRT, batch 1)" if lite else "mean latency per photo (ms, Keras, batch 1; --export for LiteRT)"
    low, high = _band(sweep, metrics)
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for axis, key, label in ((axes[0], "latency_ms", latency_label), (axes[1], "mean_mflops", "mean MFLOPs per photo")):
        axis.plot([p[key] for p in sweep], [100 * p["accuracy"] for p in sweep], ".-", color="tab:blue", label="one shared threshold (0..1)")
        final = metrics["exits"][-1]
        final_x = _exit_latency(final, lite) if key == "latency_ms" else final["cumulative_mflops"]
        axis.scatter([final_x], [100 * metrics["final_accuracy"]], marker="s", color="black", zorder=3, label="final exit only")
        for index, (name, point) in enumerate(metrics["operating_points"].items()):
            x = _latency_of(point, metrics, lite) if key == "latency_ms" else point["mean_mflops"]
            axis.scatter([x], [100 * point["accuracy"]], marker=MARKERS[index % len(MARKERS)], s=200 - 35 * index, zorder=4 + index,
                         edgecolors="white", linewidths=0.5, label=f"policy: {name}")
        if key == "mean_mflops":
            oracle = metrics["oracle"]
            axis.scatter([oracle["mean_mflops"]], [100 * oracle["accuracy"]], marker="D", color="tab:green", zorder=3, label="oracle (earliest right exit)")
        for name, baseline in metrics["baselines"].items():
            value = 100 * baseline["accuracy"]
            where = "" if low <= value <= high else ", below the plot" if value < low else ", above the plot"
            axis.axhline(min(max(value, low), high) if where else value, linestyle="--", linewidth=1, alpha=0 if where else 1,
                         color="tab:red" if name == "generic" else "tab:orange", label=f"{name} model ({value:.1f}%{where})")
        axis.set_ylim(low, high)
        axis.set_xlabel(label)
        axis.set_ylabel(f"{measure} on the report split (%)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"{Path(metrics['bundle']).name}: {metrics['photos']['report']} report photos")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _band(sweep: list[dict], metrics: dict) -> tuple[float, float]:
    """The y range of the personal band: the sweep, the final exit and every operating point, with a margin."""
    values = [100 * p["accuracy"] for p in sweep] + [100 * metrics["final_accuracy"]]
    values += [100 * point["accuracy"] for point in metrics["operating_points"].values()] + [100 * metrics["oracle"]["accuracy"]]
    values += [100 * b["accuracy"] for b in metrics["baselines"].values() if 100 * b["accuracy"] >= min(values) - 10]
    margin = max(1.0, 0.08 * (max(values) - min(values)))
    return max(0.0, min(values) - margin), min(100.0, max(values) + margin)


def _exit_latency(row: dict, lite: bool) -> float:
    return row["litert_p50_ms"] if lite else row["latency_p50_ms"]


def _latency_of(point: dict, metrics: dict, lite: bool) -> float:
    latencies = [_exit_latency(exit_, lite) for exit_ in metrics["exits"]]
    return sum(share * latency for share, latency in zip(point["shares"], latencies))
