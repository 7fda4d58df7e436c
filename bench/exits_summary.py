"""A Markdown summary of `bench.exits_acceptance` results: one row per user, then mean ± sample std
(geometric mean for ratios) and the worst user.

    PYTHONPATH=. .venv/bin/python -m bench.exits_summary bench/results/exits-test.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _cells(user: dict) -> dict[str, float]:
    accuracy = user["exit_accuracy"]
    cells = {f"{name} %": 100 * value for name, value in accuracy.items()}
    cells |= {"restricted %": 100 * user["restricted"], "label-free %": 100 * user["label_free"]["accuracy"],
              "drop pts": user["label_free"]["drop_points"], "MACs cut ×": user["label_free"]["cut"], "oracle cut ×": user["oracle_cut"]}
    for mode, label in (("none", "float32"), ("int8_full", "int8")):
        if mode in user:
            cells[f"{label} speed-up ×"] = user[mode]["speedup"]
            cells[f"{label} drop pts"] = 100 * (user[mode]["full_accuracy"] - user[mode]["accuracy"])
    if "evaluate" in user:  # labelled calibration on half the test photos, reported on the other half
        cells["cut at restricted acc. ×"] = user["evaluate"]["match-restricted"]["cut"]
        cells["keep (labelled) cut ×"] = user["evaluate"]["keep"]["cut"]
    return cells


def table(users: list[dict]) -> str:
    cells = [_cells(user) for user in users]
    columns = list(cells[0])
    lines = ["| user | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for user, row in zip(users, cells):
        lines.append(f"| {user['scenario']}:{user['seed']} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    lines.append("| mean ± std (geo. mean for ×) | " + " | ".join(_aggregate([row[c] for row in cells], c) for c in columns) + " |")
    lines.append("| worst | " + " | ".join(f"{(max if 'drop' in c else min)(row[c] for row in cells):.2f}" for c in columns) + " |")
    return "\n".join(lines)


def _aggregate(values: list[float], column: str) -> str:
    values = np.asarray(values, float)
    spread = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    if column.endswith("×"):
        return f"{float(np.exp(np.log(values).mean())):.2f} (mean {values.mean():.2f} ± {spread:.2f})"
    return f"{values.mean():.2f} ± {spread:.2f}"


def main() -> None:
    for name in sys.argv[1:]:
        users = rows(Path(name))
        print(f"### {name} ({len(users)} users)\n\n{table(users)}\n")


if __name__ == "__main__":
    main()
