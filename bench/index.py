"""bench/results/INDEX.md: every benchmark run the folder holds, with the code and generic models
that produced it. A run is a folder `bench/results/<date>-<name>/` holding `results.json` (and its
plot); results files from before that layout sit at the top of the folder and are listed too.

    python -m bench.index        # rewrite the index (bench.run does after every run)
"""

from __future__ import annotations

import json
from pathlib import Path

from ee_cli.base import atomic

RESULTS = Path(__file__).resolve().parent / "results"


def runs(root: Path = RESULTS) -> list[tuple[Path, dict]]:
    """(results file, its contents) for every `make bench` run under `root`, newest first."""
    found = []
    for path in [*root.glob("*/results.json"), *root.glob("*.json")]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "summary" in data and "users" in data:
            found.append((path, data))
    return sorted(found, key=lambda item: (item[1].get("date", ""), str(item[0])), reverse=True)


def _models(data: dict) -> str:
    models = data.get("generic_models") or {}
    parts = []
    for name, found in models.items():
        if isinstance(found, dict):  # path, sha256, clean accuracy (results since 2026-12-08)
            accuracy = found.get("clean_test_accuracy")
            parts.append(f"{name} `{found['sha256'][:12]}`" + (f" {100 * accuracy:.2f} %" if accuracy is not None else ""))
        else:
            parts.append(f"{name} (path only)")
    return ", ".join(parts) or "—"


def table(root: Path = RESULTS) -> str:
    lines = ["# Benchmark runs", "", "Written by `python -m bench.index` (and by every `python -m bench.run`). Newest first.", "",
             "| results | date | commit | generic models (sha256, clean test accuracy) | users | minutes | smoke |", "|---|---|---|---|---|---|---|"]
    for path, data in runs(root):
        minutes = f"{data['seconds'] / 60:.1f}" if isinstance(data.get("seconds"), (int, float)) else "—"
        lines.append(f"| `{path.relative_to(root)}` | {data.get('date', '—')} | {data.get('commit') or '—'} | {_models(data)} | "
                     f"{len(data['users'])} ({data.get('users_chosen', '—')}) | {minutes} | {'yes' if data.get('smoke') else 'no'} |")
    return "\n".join(lines) + "\n"


def write(root: Path = RESULTS) -> Path:
    index = root / "INDEX.md"
    atomic.write_text(index, table(root))
    return index


if __name__ == "__main__":
    print(write())
