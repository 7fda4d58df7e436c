"""`ee personalise` as a user types it, in a process of its own: its result read back from what it
wrote, beside its wall time and peak resident memory (the kernel's figure for that process alone,
forked from a small parent so that the benchmark's own memory does not count)."""

from __future__ import annotations

import json
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
    from ee_cli.commands.options import flag_of

    found: list[str] = []
    for name, value in options.items():
        flag = flag_of(name)
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


# Linux counts in a child's peak RSS the memory of the process it was forked from (exec records the
# old address space's high-water mark), so the command is forked from this small Python process, not
# from the benchmark's (1.4 GB with TensorFlow loaded: every command then "peaked" at 1,497 MiB).
_SMALL_PARENT = (
    "import os, resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[2:])\n"
    "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n"
    "sys.exit(code)\n"
)


def measured(argv: list[str]) -> tuple[int, str, str, float]:
    """Run `argv` from a small parent: its exit code, stdout, stderr and peak RSS in MiB."""
    with tempfile.TemporaryDirectory(prefix="ee-command-") as scratch:
        out, err, peak = (Path(scratch) / name for name in ("out", "err", "peak"))
        with out.open("w") as stdout, err.open("w") as stderr:
            code = subprocess.call([sys.executable, "-c", _SMALL_PARENT, str(peak), *argv], stdout=stdout, stderr=stderr)
        return code, out.read_text(), err.read_text(), int(peak.read_text()) / 1024  # Linux reports KiB


def _child(arguments: list[str]) -> tuple[dict, float]:
    """`python -m ee_cli ARGUMENTS`: its JSON output and its own peak RSS in MiB."""
    code, out, err, peak = measured([sys.executable, "-m", "ee_cli", *arguments])
    if code != 0:
        raise RuntimeError(f"ee {' '.join(arguments)} exited {code}: {err[-2000:]}")
    return json.loads(out), peak

def _read_back(printed: dict):
    from ee_cli.files import bundle
    from ee_cli.commands.personalise import PersonaliseResult

    path = Path(printed["bundle"])
    return PersonaliseResult(path, Path(printed["run"]), bundle.read_bundle(path).meta, printed["metrics"], path, False)
