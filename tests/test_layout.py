"""The package's layout is its architecture: each stage's subpackage imports only its own stage and
the stages below it (lazy imports inside functions included), and no two modules import each other,
directly or round a loop. README's "Layout" section says what each holds."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ee_cli"
LAYERS = ("base", "graph", "exits", "files", "adaptation", "runtime", "commands")  # lowest first


def _imports() -> dict[str, set[str]]:
    """Module (dotted, under ee_cli) -> the ee_cli modules it imports anywhere in its body."""
    found: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(path.relative_to(SRC).with_suffix("").parts)
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ee_cli":
                parts = node.module.split(".")[1:]
                if len(parts) == 1 and parts[0] in LAYERS:  # from ee_cli.graph import graft, heads
                    targets |= {f"{parts[0]}.{alias.name}" for alias in node.names}
                elif parts:
                    targets.add(".".join(parts))
        found[name] = targets
    return found


def test_every_module_sits_in_a_stage_and_imports_nothing_above_its_own():
    imports = _imports()
    loose = sorted(name for name in imports if "." not in name and name not in ("__init__", "__main__", "cli"))
    assert not loose, f"modules outside the stage packages: {loose}"
    upward = [(name, target) for name, targets in imports.items() if "." in name for target in targets
              if target.split(".")[0] in LAYERS and LAYERS.index(target.split(".")[0]) > LAYERS.index(name.split(".")[0])]
    assert not upward, f"imports running back up: {upward}"


def test_no_import_cycle():
    imports = {name: {t for t in targets if t in _imports()} for name, targets in _imports().items()}
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for target in sorted(imports[name]):
            if state.get(target) == 1:
                pytest.fail(f"import cycle: {' -> '.join(trail[trail.index(target):] + [target])}")
            if target not in state:
                visit(target, trail + [target])
        state[name] = 2

    for name in sorted(imports):
        if name not in state:
            visit(name, [name])


def test_every_import_of_the_repositorys_own_modules_resolves():
    """Lazy imports inside functions included: a module moved without its importers (bench.tta_check
    once imported write_json from where it no longer lived) fails here, not when the script runs."""
    import importlib.util

    root = SRC.parents[1]
    missing = []
    for folder in ("src/ee_cli", "bench", "models", "datasets", "scripts"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                        and node.module.split(".")[0] in ("ee_cli", "bench", "models", "datasets")):
                    continue
                module = importlib.import_module(node.module)
                missing += [f"{path.relative_to(root)}: {node.module}.{alias.name}" for alias in node.names
                            if not hasattr(module, alias.name) and importlib.util.find_spec(f"{node.module}.{alias.name}") is None]
    assert not missing, missing
