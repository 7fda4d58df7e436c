"""The one atomic writer: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import numpy as np
import pytest

from ee_cli.base import atomic


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "state.npz"
    atomic.write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic.replacing(target) as partial:
            partial.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["state.npz"]


def test_savers_that_add_a_suffix_write_where_they_are_told(tmp_path):
    target = tmp_path / "weights.npz"
    with atomic.replacing(target) as partial:
        assert partial.suffix == ".npz" and partial.parent == tmp_path
        np.savez(partial, a=np.arange(3))
    with np.load(target) as saved:
        assert saved["a"].tolist() == [0, 1, 2]
    atomic.write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "a": 1\n}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "weights.npz"]
