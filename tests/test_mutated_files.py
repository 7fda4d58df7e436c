"""Property: whatever one edit does to a bundle's `ee.json` or an export's `manifest.json`, ee
answers with one line and exit 2, or reads the file as it says: never a traceback, never a
silently different model. 30 edits per file kind in `make test`, 200 in the nightly run."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import exported_user, prepared_workspace
from ee_cli.files import bundle
from ee_cli.base.errors import UserError

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
EDITS = st.sampled_from(["replace", "delete", "replace"])


def paths(document, prefix=()):
    """Every place in a JSON document, as the keys and indices that lead there."""
    yield prefix
    if isinstance(document, dict):
        for key, value in document.items():
            yield from paths(value, (*prefix, key))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            yield from paths(value, (*prefix, index))


def mutated(document, path, edit: str, value):
    """A deep copy of `document` with the value at `path` replaced or deleted."""
    copy = json.loads(json.dumps(document))
    if not path:
        return value
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    if edit == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


def each_edit_of(document, examples: int):
    """A decorator: run the check on `examples` single edits of `document` (a place, delete or replace, a value)."""
    places = list(paths(document))

    def decorate(check):
        drawn = given(place=st.sampled_from(places), edit=EDITS, value=JSON_VALUES)(check)
        return settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))(drawn)

    return decorate


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A calibrated bundle (exits on) and its float cascade export."""
    with prepared_workspace(tmp_path_factory, "mutations") as root:
        exported_user(root)
    return root


def _bundle_property(files: Path, tmp_path_factory, examples: int):
    original = json.loads((files / "C" / "ee.json").read_text())

    @each_edit_of(original, examples)
    def check(place, edit, value):
        folder = tmp_path_factory.mktemp("bundle")
        os.link(files / "C" / "model.h5", folder / "model.h5")
        document = mutated(original, place, edit, value)
        (folder / "ee.json").write_text(json.dumps(document))
        try:
            found = bundle.read_bundle(folder)
        except UserError as error:
            assert "\n" not in str(error).strip() and str(folder) in str(error)
            return
        # Accepted: what every command derives from it is what the file says.
        meta = found.meta
        assert meta == document
        assert bundle.head_outputs(meta) == [e["name"] for e in document["exits"]] + ["final"]
        stored = (document.get("policy") or {}).get("thresholds")
        assert bundle.thresholds(meta) == (list(stored) if stored is not None else [None] * len(document["exits"]))
        bundle.stage_costs(meta)

    check()


def _manifest_property(files: Path, tmp_path_factory, cli, examples: int):
    original = json.loads((files / "E" / "manifest.json").read_text())

    @each_edit_of(original, examples)
    def check(place, edit, value):
        folder = tmp_path_factory.mktemp("export")
        for path in (files / "E").glob("*.tflite"):
            os.link(path, folder / path.name)
        document = mutated(original, place, edit, value)
        (folder / "manifest.json").write_text(json.dumps(document))
        result = cli("run", "--export", folder, "--data", files / "test", "--limit", "3", "--timed-runs", "1", "--json")
        assert result.exit_code in (0, 2), (result.exit_code, result.output, result.exception)
        if result.exit_code == 2:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
            return
        report = json.loads(result.stdout)
        assert list(report["histogram"]) == document["cascade"]["stops_after"]
        assert all(not isinstance(t, float) or math.isfinite(t) for t in document["cascade"]["thresholds"])

    check()


def test_a_mutated_ee_json_is_refused_or_read_as_written(files, tmp_path_factory):
    _bundle_property(files, tmp_path_factory, examples=30)


def test_a_mutated_manifest_is_refused_or_run_as_written(files, tmp_path_factory, cli):
    _manifest_property(files, tmp_path_factory, cli, examples=30)


@pytest.mark.nightly
def test_two_hundred_mutations_of_each_file_kind(files, tmp_path_factory, cli):
    _bundle_property(files, tmp_path_factory, examples=200)
    _manifest_property(files, tmp_path_factory, cli, examples=200)
