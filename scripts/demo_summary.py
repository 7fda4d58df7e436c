"""Print the demo's before/after table from `ee evaluate --json` and `ee run --json` outputs."""

from __future__ import annotations

import json
import sys


def main(evaluate_path: str, run_path: str) -> None:
    from rich.console import Console
    from rich.table import Table

    evaluated = json.load(open(evaluate_path))
    metrics, run = evaluated["metrics"], json.load(open(run_path))
    point = metrics["operating_points"][metrics["used"]]
    final_mflops = metrics["plain_mflops"]
    report = metrics["photos"]["report"]
    table = Table(title=f"Demo user: accuracy on {report} report photos (thresholds calibrated on the other {metrics['photos']['calibrate']}); latency in LiteRT, int8, {run['threads']} thread")
    for column in ("", "accuracy", "mean latency", "mean MFLOPs"):
        table.add_column(column, justify="left" if not column else "right")
    generic = metrics["baselines"]["generic"]["accuracy"]
    restricted = metrics["baselines"]["restricted"]["accuracy"]
    table.add_row("generic model (before)", f"{100 * generic:.1f}%", f"{run['full_ms']['mean']:.3f} ms", f"{final_mflops:.1f}")
    table.add_row("generic, restricted to the user's classes", f"{100 * restricted:.1f}%", f"{run['full_ms']['mean']:.3f} ms", f"{final_mflops:.1f}")
    table.add_row("personalised, early-exit cascade (after)", f"{100 * point['accuracy']:.1f}%", f"{run['cascade_ms']['mean']:.3f} ms", f"{point['mean_mflops']:.1f}", style="bold")
    console = Console()
    console.print(table)
    console.print(f"int8 cascade in LiteRT on all {run['photos']} test photos: {100 * run['accuracy']:.1f}% accuracy, "
                  f"{run['speedup']:.2f}× faster than the plain int8 model; photos leaving at each exit: {run['histogram']}")
    console.print(f"Plot: {metrics.get('plot', 'see the evaluate run folder under build/demo/runs/')}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
