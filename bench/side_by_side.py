"""Two `make bench` results files side by side on the users they share: `ee` at 0 labels (final
exit, and the label-free cascade) against the generic model and the free baseline, per user, with
the summary a closing note needs (mean [95 % interval], median, worst, users under the generic model).

    python -m bench.side_by_side OLD.json NEW.json [--model resnet9] [--split test]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from bench.report import stats

FIGURES = {
    "ee final, 0 labels": lambda r: r["labels_0"]["accuracy"]["final"],
    "cascade (label-free)": lambda r: r["labels_0"]["operating_points"]["label-free"]["accuracy"],
    "ee final, 10 labels": lambda r: r["labels_10"]["accuracy"]["final"],
}


def _figure(row: dict, name: str) -> float | None:
    try:
        return FIGURES[name](row)
    except (KeyError, TypeError):
        return None


def _reference(row: dict, name: str, which: str) -> float:
    """The generic or free-baseline accuracy on the photos `name` is scored on (the cascade: the report half)."""
    if name.startswith("cascade"):
        return row["labels_0"]["operating_points"]["label-free"][f"{which}_accuracy_report"]
    return row[which]


def compare(old: dict, new: dict, model: str, split: str) -> list[str]:
    def users(results):
        return {(r["seed"], r["scenario"]): r for r in results["users"] if r["model"] == model and r["split"] == split}

    before, after = users(old), users(new)
    shared = sorted(set(before) & set(after))
    lines = [f"{len(shared)} {split} users of {model} in both files", "",
             "| user | generic | free baseline | " + " | ".join(f"{name}: before → after" for name in FIGURES) + " |",
             "|" + "---|" * (len(FIGURES) + 3)]
    for key in shared:
        cells = []
        for name in FIGURES:
            a, b = _figure(before[key], name), _figure(after[key], name)
            cells.append(f"{'—' if a is None else f'{100 * a:.1f}'} → {'—' if b is None else f'{100 * b:.1f}'}")
        lines.append(f"| {key[1]} (seed {key[0]}) | {100 * after[key]['generic']:.1f} | {100 * after[key]['restricted']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| figure | file | gain over the free baseline, pts: mean [95 % CI], median, worst | users under the generic model by more than 1 pt |",
              "|---|---|---|---|"]
    for name in FIGURES:
        for label, rows in (("before", before), ("after", after)):
            present = [rows[k] for k in shared if _figure(rows[k], name) is not None]
            gains = np.array([100 * (_figure(r, name) - _reference(r, name, "restricted")) for r in present])
            under = sum(100 * (_figure(r, name) - _reference(r, name, "generic")) < -1 for r in present)
            found = stats(gains)
            if found is not None:
                lines.append(f"| {name} | {label} | {found['mean']:+.1f} [{found['ci95'][0]:+.1f}, {found['ci95'][1]:+.1f}], median {found['median']:+.1f}, "
                             f"worst {found['worst']:+.1f} | {under} of {len(present)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--model", default="resnet9")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    print("\n".join(compare(json.loads(args.old.read_text()), json.loads(args.new.read_text()), args.model, args.split)))


if __name__ == "__main__":
    main()
