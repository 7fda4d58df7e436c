"""Run directories: one per command run, holding its resolved config and its metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def write_json(path: Path, data: Any) -> None:
    """Write JSON so that a reader never sees half a file."""
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(data, indent=2, default=str) + "\n")
    temporary.replace(path)
