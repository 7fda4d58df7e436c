"""`ee personalise` as a user types it, in a process of its own: its result read back from what it
wrote, beside its wall time and peak resident memory (the kernel's figure for that process alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Measured:
    result: Any  # ee_cli.commands.personalise.PersonaliseResult
    seconds: float
    peak_rss_mib: float | None  # None: run in the benchmark's own process, where it cannot be told apart


def flags(options: dict[str, Any]) -> list[str]:
    """{"data": "photos", "quiet": True, "labelled": None} -> ["--data", "photos", "--quiet"]."""
    found: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            found.append(flag)
        elif value not in (None, False):
            found += [flag, str(value)]
    return found


def personalise(options: dict[str, Any], own_process: bool) -> Measured:
    """`ee personalise` with `options` (PersonaliseConfig fields) in the working folder: in a child
    process (`own_process`: its peak RSS measured) or in this one."""
    from ee_cli.base.config import PersonaliseConfig
    from ee_cli.commands.personalise import personalise as run

    started = time.perf_counter()
    if not own_process:
        result = run(PersonaliseConfig(**options))
        return Measured(result, time.perf_counter() - started, None)
    printed, peak = _child(["personalise", *flags(options | {"quiet": True}), "--json"])
    return Measured(_read_back(printed), time.perf_counter() - started, peak)


def _child(arguments: list[str]) -> tuple[dict, float]:
    """Run `python -m ee_cli ARGUMENTS`; its JSON output and peak RSS in MiB (os.wait4: this child only)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-m", "ee_cli", *arguments], stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0), err.seek(0)
        if child.returncode != 0:
            raise RuntimeError(f"ee {' '.join(arguments)} exited {child.returncode}: {err.read()[-2000:]}")
        return json.loads(out.read()), usage.ru_maxrss / 1024  # Linux reports KiB


def _read_back(printed: dict):
    from ee_cli.files import bundle
    from ee_cli.commands.personalise import PersonaliseResult

    path = Path(printed["bundle"])
    return PersonaliseResult(path, Path(printed["run"]), bundle.read_bundle(path).meta, printed["metrics"], path, False)
