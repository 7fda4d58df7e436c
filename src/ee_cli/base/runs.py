"""Run directories: one per command run, holding its resolved config and its metrics."""

from __future__ import annotations

from pathlib import Path

DEFAULT_ROOT = Path("runs")


def new_run_dir(command: str, root: Path = DEFAULT_ROOT) -> Path:
    """runs/<command>-1, -2, ... : the next free number, created atomically (mkdir fails if taken)."""
    root.mkdir(parents=True, exist_ok=True)
    number = 1 + max((_number(path.name, command) for path in root.glob(f"{command}-*")), default=0)
    while True:
        path = root / f"{command}-{number}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1


def _number(name: str, command: str) -> int:
    suffix = name[len(command) + 1 :]
    return int(suffix) if suffix.isdigit() else 0
