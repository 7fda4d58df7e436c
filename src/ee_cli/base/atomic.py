"""Writing so that a reader never sees half of anything: every file and folder the repository
writes (bundles, exports, run folders, models, caches, results) goes through here."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ee_cli.base.errors import UserError


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, with the same suffix (savers that choose a format by it, or
    add one, agree), that replaces `path` in one rename when the block ends; on an error it is removed
    and `path` is untouched."""
    path = Path(path)
    temporary = path.with_name(f"{path.stem}.partial{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes(path: Path, data: bytes) -> None:
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text)


def write_json(path: Path, data: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


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
