"""Run directories: one per command run, holding its resolved config and its metrics."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ee_cli.errors import UserError

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


@contextlib.contextmanager
def staged_folder(out: Path, exist_ok: bool) -> Iterator[Path]:
    """Fill a temporary folder beside `out`, then move it into place in one rename (replacing an
    old `out` only with `exist_ok`); on any failure nothing is left behind and an old `out` is
    untouched. Another command that wrote `out` meanwhile wins: without `exist_ok` this one then
    ends in a UserError."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; outputs are ordinary folders
        yield staging
        _move_into_place(staging, out, exist_ok)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _move_into_place(staging: Path, out: Path, exist_ok: bool) -> None:
    if not exist_ok or not out.exists():
        try:
            staging.rename(out)  # refuses a non-empty folder: no check-then-rename race
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise
            raise UserError(f"{out} was written by another command meanwhile: choose another --out, or pass --exist-ok to replace it") from None
        return
    retired = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    out.rename(retired)
    staging.rename(out)
    shutil.rmtree(retired, ignore_errors=True)
