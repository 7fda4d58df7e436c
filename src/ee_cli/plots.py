"""Plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_operating_curve(path: Path, sweep: list[dict], metrics: dict[str, Any]) -> None:
    """Accuracy against mean latency and against mean MFLOPs: one point per shared threshold,
    the operating points, the oracle and the baselines marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measure = metrics["measure"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for axis, key, label in ((axes[0], "latency_ms", "mean latency per photo (ms, Keras, batch 1)"), (axes[1], "mean_mflops", "mean MFLOPs per photo")):
        axis.plot([p[key] for p in sweep], [100 * p["accuracy"] for p in sweep], ".-", color="tab:blue", label="one shared threshold (0..1)")
        final = metrics["exits"][-1]
        final_x = final["latency_p50_ms"] if key == "latency_ms" else final["cumulative_mflops"]
        axis.scatter([final_x], [100 * metrics["final_accuracy"]], marker="s", color="black", zorder=3, label="final exit only")
        for name, point in metrics["operating_points"].items():
            x = _latency_of(point, metrics) if key == "latency_ms" else point["mean_mflops"]
            axis.scatter([x], [100 * point["accuracy"]], marker="*", s=160, zorder=4, label=f"policy: {name}")
        if key == "mean_mflops":
            oracle = metrics["oracle"]
            axis.scatter([oracle["mean_mflops"]], [100 * oracle["accuracy"]], marker="D", color="tab:green", zorder=3, label="oracle (earliest right exit)")
        for name, baseline in metrics["baselines"].items():
            axis.axhline(100 * baseline["accuracy"], linestyle="--", linewidth=1, color="tab:red" if name == "generic" else "tab:orange", label=f"{name} model ({100 * baseline['accuracy']:.1f}%)")
        axis.set_xlabel(label)
        axis.set_ylabel(f"{measure} on the report split (%)")
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.suptitle(f"{Path(metrics['bundle']).name}: {metrics['photos']['report']} report photos")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _latency_of(point: dict, metrics: dict) -> float:
    latencies = [exit_["latency_p50_ms"] for exit_ in metrics["exits"]]
    return sum(share * latency for share, latency in zip(point["shares"], latencies))
