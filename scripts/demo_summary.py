"""Print the demo's before/after table from `ee evaluate --json` and two `ee run --json` outputs
(float32 and int8 exports of the same personalised bundle)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(evaluate_path: str, float_path: str, int8_path: str) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = json.load(open(evaluate_path))["metrics"]
    runs = {"float32": json.load(open(float_path)), "int8": json.load(open(int8_path))}
    point = metrics["operating_points"][metrics["used"]]
    report = metrics["photos"]["report"]
    threads = runs["int8"]["threads"]
    table = Table(title=f"Demo user: accuracy on {report} report photos (thresholds calibrated on the other {metrics['photos']['calibrate']}); "
                        f"mean latency per photo in LiteRT, {threads} thread, all {runs['int8']['photos']} test photos")
    for column in ("", "accuracy", "mean MFLOPs", "latency float32", "latency int8"):
        table.add_column(column, justify="left" if not column else "right")
    plain = [f"{runs[mode]['full_ms']['mean']:.3f} ms" for mode in runs]
    table.add_row("generic model (before)", f"{100 * metrics['baselines']['generic']['accuracy']:.1f}%", f"{metrics['plain_mflops']:.1f}", *plain)
    table.add_row("generic, restricted to the user's classes", f"{100 * metrics['baselines']['restricted']['accuracy']:.1f}%", f"{metrics['plain_mflops']:.1f}", *plain)
    table.add_row("personalised, early-exit cascade (after)", f"{100 * point['accuracy']:.1f}%", f"{point['mean_mflops']:.1f}",
                  *[f"{runs[mode]['cascade_ms']['mean']:.3f} ms" for mode in runs], style="bold")
    console = Console()
    console.print(table)
    everything = len(json.loads((Path(metrics["bundle"]) / "ee.json").read_text())["classes"])
    console.print(f"Why the generic row is so low: it picks among all {everything} classes it was trained on, and on this user's "
                  f"colour-cast photos its top class is rarely one of the user's {len(metrics['baselines']['restricted']['classes'])}. "
                  "The restricted row is the free baseline: the same model choosing among the user's classes only.")
    for mode, run in runs.items():
        shares = run["profile"]["latency_share"]
        first = next(iter(shares))
        console.print(f"{mode} cascade in LiteRT: {100 * run['accuracy']:.1f}% on all {run['photos']} test photos, "
                      f"measured speed-up {run['speedup']:.2f}× against the plain model (LiteRT wall time); photos leaving at each exit: {run['histogram']}; "
                      f"{first} costs {100 * shares[first]:.0f}% of the plain model's latency at {100 * run['profile']['mflops_share'][first]:.0f}% of its MFLOPs")
    console.print(f"Plot: {metrics.get('plot', 'see the evaluate run folder under build/demo/runs/')}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
