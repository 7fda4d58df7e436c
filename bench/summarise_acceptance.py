"""Summarise bench/acceptance_cifar.sh and bench/acceptance_resnet50.sh outputs into one JSON for
bench/results/ (the figures the evaluate and export issues ask for).

    python -m bench.summarise_acceptance /tmp/ee-acceptance-cifar /tmp/ee-acceptance-resnet50
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def cifar(work: Path) -> dict:
    out = {}
    for point in ("match-generic", "keep", "label-free"):
        metrics = load(work / f"evaluate-{point}.json")["metrics"]
        out[f"evaluate_{point}"] = {
            "final_accuracy": metrics["final_accuracy"],
            "baselines": metrics["baselines"],
            "operating_points": metrics["operating_points"],
            "oracle": metrics["oracle"],
            "plain_mflops": metrics["plain_mflops"],
            "exits": metrics["exits"],
        }
    for quant in ("none", "fp16", "dynamic", "int8", "int8_full"):
        manifest = load(work / f"export-{quant}.json")["manifest"]
        out[f"export_{quant}"] = {"total_bytes": manifest["total_bytes"], "files": manifest["files"], "weights": manifest["cascade"]["weights"],
                                  "validation": manifest["validation"]}
    for point in ("match-generic", "keep"):
        for quant in ("none", "int8_full"):
            run = load(work / f"run-{point}-{quant}.json")
            out[f"run_{point}_{quant}"] = run
    return out


def resnet50(work: Path) -> dict:
    out = {}
    for quant in ("none", "fp16", "dynamic", "int8", "int8_full"):
        manifest = load(work / f"export-{quant}.json")
        if manifest:
            manifest = manifest["manifest"]
            out[f"export_{quant}"] = {"total_bytes": manifest["total_bytes"], "validation": manifest["validation"]}
    out["run_int8_full"] = load(work / "run-int8_full.json")
    return out


def main() -> None:
    summary = {"cifar": cifar(Path(sys.argv[1]))}
    if len(sys.argv) > 2 and Path(sys.argv[2]).is_dir():
        summary["resnet50"] = resnet50(Path(sys.argv[2]))
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"evaluate-export-{date.today().isoformat()}.json"
    target.write_text(json.dumps(summary, indent=2) + "\n")
    print(target)


if __name__ == "__main__":
    main()
