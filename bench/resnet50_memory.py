"""`ee personalise` on a ResNet50@224 bundle as the photo count grows: peak memory and time per phase,
beside the forward-pass bound measured in the same run (issue 22).

    PYTHONPATH=. .venv/bin/python -m bench.resnet50_memory [--photos 500,2000] [--epochs 30]

Per photo count, each in its own fresh process: `ee personalise` with its defaults (its peak RSS is
the process's VmHWM), then the bound: one plain batched pass of the same photos through the whole
network, timed through the same decoding pipeline. The bound is what the method needs at the
least: a whole pass per photo per view (weak and strong), one per held-out photo, and the passes of
exact BatchNorm adaptation and of the class mix at each depth `--adapt-bn auto` tried, as personalise
counted them (each its share of the whole pass's compute, from its stepping stone on).
Writes bench/results/resnet50-scaling-<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import date
from pathlib import Path

from bench.bound import method_passes
from datasets import cifar10

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parent.parent

PERSONALISE = textwrap.dedent(
    """
    import json, sys
    from ee_cli.base.config import PersonaliseConfig
    from ee_cli.runtime.litert_trainer import peak_rss_mb
    from ee_cli.commands.personalise import personalise
    result = personalise(PersonaliseConfig(data=sys.argv[1], bundle="R50", out=sys.argv[2], epochs=int(sys.argv[3]), quiet=True))
    print(json.dumps({"metrics": result.metrics, "peak_rss_mb": peak_rss_mb()}))
    """
)

BOUND = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from ee_cli.base import photos
    from ee_cli.graph import inference
    from ee_cli.files import bundle
    from ee_cli.runtime.litert_trainer import peak_rss_mb
    paths = photos.scan_unlabelled(Path(sys.argv[1])).paths
    model = bundle.read_bundle(Path("R50")).load_model()
    inference.outputs_of(model, ["final"], paths[:16], 224)  # trace once, untimed
    started = time.perf_counter()
    inference.outputs_of(model, ["final"], paths, 224)
    print(json.dumps({"whole_pass_s": time.perf_counter() - started, "peak_rss_mb": peak_rss_mb()}))
    """
)


def _python(code: str, *args, cwd: Path) -> dict:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # bench.bound, from a scratch folder
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=7200, env=env)
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(root: Path, data: dict, count: int, epochs: int) -> dict:
    from PIL import Image

    folder = root / f"photos-{count}"
    folder.mkdir()
    for index in range(count):
        Image.fromarray(data["x_train"][index * 7]).save(folder / f"{index:04d}.png")
    started = time.perf_counter()
    run = _python(PERSONALISE, folder, f"P{count}", epochs, cwd=root)
    wall = time.perf_counter() - started
    bound = _python(BOUND, folder, cwd=root)
    metrics, views, holdout_share = run["metrics"], run["metrics"]["cache"]["views"], 0.2
    # Two passes per view for the feature cache, one per held-out photo, and BatchNorm adaptation's
    # and the class mix's passes as personalise counted them (each its share of a whole pass's MACs).
    whole_passes = method_passes(metrics["adapted_bn"]["passes"], views, holdout_share)
    bound_seconds = bound["whole_pass_s"] * whole_passes
    return {
        "photos": count, "epochs": epochs, "peak_rss_mb": run["peak_rss_mb"], "wall_seconds": round(wall, 1),
        "phases_seconds": metrics["phases_seconds"], "cache": metrics["cache"], "adapted_bn": metrics["adapted_bn"],
        "bound": {"seconds": round(bound_seconds, 1), "whole_pass_s": round(bound["whole_pass_s"], 2), "whole_passes": whole_passes,
                  "bound_process_peak_rss_mb": bound["peak_rss_mb"]},
        "personalise_over_bound": round(sum(metrics["phases_seconds"].values()) / bound_seconds, 2),
        "command_wall_over_bound": round(wall / bound_seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default="500,2000")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / f"resnet50-scaling-{date.today()}.json")
    args = parser.parse_args()
    data = cifar10.load()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        attached = subprocess.run([sys.executable, "-m", "ee_cli", "attach", "--backbone", "resnet50", "--weights", "none", "--out", "R50", "--json"],
                                  capture_output=True, text=True, cwd=root)
        if attached.returncode != 0:
            sys.exit(attached.stderr[-3000:])
        for count in (int(n) for n in args.photos.split(",")):
            rows.append(measure(root, data, count, args.epochs))
            print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    args.out.write_text(json.dumps({"date": str(date.today()), "commit": commit, "command": f"PYTHONPATH=. .venv/bin/python -m bench.resnet50_memory --photos {args.photos} --epochs {args.epochs}",
                                    "model": "resnet50 @224, random init, default exits", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
