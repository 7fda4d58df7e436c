"""Rich renderings of pipeline results (the CLI's only view code)."""

from __future__ import annotations

from typing import Any


def attach_table(meta: dict[str, Any]):
    from rich.table import Table

    backbone = meta["backbone"]
    shape = "×".join(str(d) for d in meta["input"]["shape"])
    table = Table(title=f"{backbone['name']} @ {shape}, {len(meta['classes'])} classes, weights: {backbone['weights']}")
    for column in ("exit", "graft layer", "feature map", "depth %", "cum. MFLOPs", "head params"):
        table.add_column(column, justify="left" if column in ("exit", "graft layer") else "right", no_wrap=column == "graft layer")
    for exit_ in meta["exits"]:
        table.add_row(
            exit_["name"],
            exit_["graft_layer"],
            "×".join(str(d) for d in exit_["feature_shape"]),
            f"{100 * exit_['relative_depth']:.1f}",
            f"{exit_['cumulative_mflops']:,.1f}",
            f"{exit_['head_params']:,}",
        )
    final = meta["final"]
    table.add_row("final", "(classifier)", "", "100.0", f"{final['cumulative_mflops']:,.1f}", "frozen", style="dim")
    return table
