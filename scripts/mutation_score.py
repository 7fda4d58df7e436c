"""The mutation score of `make mutation`, per module, from mutmut's own records (mutants/**/*.meta).

    python scripts/mutation_score.py [--json]

Two scores: killed / every mutant in scope (the headline), and killed / the mutants some selected
test reaches (killed + survived + timeout). Mutants no selected test reaches ("no tests": mostly
code behind TensorFlow, which the mutation run leaves to `make test`) count against the first only. personalise.py is scored
on its exit-policy, class-set and --resume functions only (the issue's scope); its other mutants
are listed as out of scope.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from mutmut.stats import status_by_exit_code

SCOPED = {"personalise": ("_label_free_policy", "_run_dir", "_run_file", "_planned_output", "_personal_classes", "_check_numbers")}


def in_scope(key: str) -> bool:
    module, function = key.split(".")[1], key.split(".")[2].removeprefix("x_").split("__mutmut_")[0]
    function = function.split("ǁ")[-1]  # methods are recorded as xǁClassǁmethod
    return module not in SCOPED or function in SCOPED[module]


def scores(root: Path) -> dict[str, dict[str, int | float]]:
    found: dict[str, Counter] = {}
    for meta in sorted(root.glob("mutants/src/**/*.py.meta")):
        module = meta.name.removesuffix(".py.meta")
        counts = found.setdefault(module, Counter())
        for key, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            counts[status_by_exit_code[code] if in_scope(key) else "out of scope"] += 1
    found["all"] = sum(found.values(), Counter())
    return {module: dict(counts) | _scores(counts) for module, counts in found.items()}


def _scores(counts: Counter) -> dict[str, float]:
    reached = counts["killed"] + counts["survived"] + counts["timeout"]
    return {"score": counts["killed"] / max(1, reached + counts["no tests"]), "score_reached": counts["killed"] / reached if reached else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args()
    table = scores(args.root)
    if args.json:
        print(json.dumps(table, indent=2))
        return
    print(f"{'module':<12} {'score':>6} {'of reached':>11} {'killed':>7} {'survived':>9} {'timeout':>8} {'no tests':>9} {'out of scope':>13}")
    for module, row in table.items():
        print(f"{module:<12} {100 * row['score']:>5.1f}% {100 * row['score_reached']:>10.1f}% {row.get('killed', 0):>7} "
              f"{row.get('survived', 0):>9} {row.get('timeout', 0):>8} {row.get('no tests', 0):>9} {row.get('out of scope', 0):>13}")


if __name__ == "__main__":
    main()
