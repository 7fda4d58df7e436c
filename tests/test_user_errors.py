"""A user mistake, in a real process, prints exactly one line on stderr and exits with code 2,
whatever TensorFlow writes to file descriptor 2 (which Typer's in-process CliRunner cannot see)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import prepared_workspace, run_ee
from ee_cli.commands.attach import attach
from ee_cli.base.config import AttachConfig


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An attached bundle B (TensorFlow must load it), an empty photo folder and a file that is no model."""
    with prepared_workspace(tmp_path_factory, "user-errors") as root:
        attach(AttachConfig(backbone="cifar_resnet9", out="B", classes="r,g,b"))
        (root / "empty").mkdir()
        (root / "not_a_model.h5").write_bytes(b"these bytes are no HDF5 file")
        return root


@pytest.mark.parametrize(
    "args, expected",
    [
        (["attach", "--backbone", "not_a_model.h5"], "cannot be opened as a tf_keras model file"),
        (["personalise", "--bundle", "B", "--data", "empty"], "holds no readable"),
        (["evaluate", "--bundle", "B", "--data", "empty"], "holds no readable"),
        (["export", "--tflite", "--bundle", "B"], "int8 export needs calibration photos"),
        (["run", "--export", "B", "--data", "empty"], "is not an `ee export` folder"),
    ],
    ids=["attach", "personalise", "evaluate", "export", "run"],
)
def test_a_mistake_is_one_line_on_stderr_in_a_real_process(folder, args, expected):
    result = run_ee(*args, cwd=folder)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert result.stdout.strip() == ""
