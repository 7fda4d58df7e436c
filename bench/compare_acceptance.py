"""Two bench/acceptance_cifar.sh work folders side by side (e.g. two commits on one generic model):
the figures the evaluate and export issues ask for, one line per codebase.

    python -m bench.compare_acceptance BEFORE_DIR AFTER_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(path):
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def figures(work) -> dict:
    w, out = Path(work), {}
    pers = load(w/"personalise.json")["metrics"]
    out["personal_classes"] = pers.get("personal_classes")
    out["holdout"] = (pers.get("holdout") or {}).get("scores")
    for point in ("match-generic", "keep", "label-free"):
        m = load(w/f"evaluate-{point}.json")["metrics"]
        op = m["operating_points"].get(point) or {}
        out[f"eval {point}"] = {"final": round(100*m["final_accuracy"],2), "point acc": round(100*op.get("accuracy", float("nan")),2),
            "cut": round(m["plain_mflops"]/op["mean_mflops"],2) if op.get("mean_mflops") else None,
            "generic": round(100*m["baselines"]["generic"]["accuracy"],2) if "generic" in m["baselines"] else None,
            "restricted": round(100*m["baselines"]["restricted"]["accuracy"],2) if "restricted" in m["baselines"] else None}
    for q in ("none","fp16","dynamic","int8","int8_full"):
        man = load(w/f"export-{q}.json")["manifest"]; v = man["validation"]["exits"]
        out[f"export {q}"] = {"bytes": man.get("total_bytes"), "passed": man["validation"]["passed"],
            "final delta pts": round(v["final"].get("accuracy_delta_points", float("nan")),2), "min top1": round(min(e["top1_agreement"] for e in v.values()),4)}
    for point in ("match-generic","keep"):
        for q in ("none","int8_full"):
            r = load(w/f"run-{point}-{q}.json")
            out[f"run {point} {q}"] = {"acc": round(100*r["accuracy"],2), "full acc": round(100*r["full_accuracy"],2), "speedup": round(r["speedup"],2), "hist": r["histogram"]}
    return out


def main() -> None:
    before, after = figures(sys.argv[1]), figures(sys.argv[2])
    for key in before:
        print(f"{key}\n  before: {before[key]}\n  after:  {after.get(key)}")


if __name__ == "__main__":
    main()
