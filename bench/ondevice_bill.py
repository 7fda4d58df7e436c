"""The phone's bill for on-device personalisation (issue 19): the same photos personalised by the
TensorFlow engine and through `personalise.tflite` in LiteRT, each in its own fresh process.

Per backbone: per-step and per-epoch time of both training loops, the feature-cache fill, the
artefact's conversion, the peak RSS (VmHWM) of the TensorFlow process and of the LiteRT child (which
never imports TensorFlow), and the sizes of the artefact and of the saved state. Random-init
backbones (`--weights none`): cost does not depend on the weights. Writes
bench/results/ondevice-bill-<date>.json and .md.

    PYTHONPATH=. .venv/bin/python -m bench.ondevice_bill [--backbones cifar_resnet9,mobilenet_v2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
SETTINGS = {  # backbone: (input size, photos, epochs, batch)
    "cifar_resnet9": (32, 400, 10, 64),
    "mobilenet_v2": (224, 96, 5, 32),
}

# One personalisation per fresh process; prints its metrics, its run's LiteRT report and its VmHWM.
PERSONALISE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from ee_cli.base.config import PersonaliseConfig
    from ee_cli.commands.personalise import personalise
    from ee_cli.runtime.litert_trainer import REPORT_FILE, peak_rss_mb
    engine, epochs, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    result = personalise(PersonaliseConfig(data="photos", bundle="B", out=f"P-{engine}", epochs=epochs, batch=batch, views=1,
                                           personal_classes="0,1,2", engine=engine, quiet=True))
    report = result.run_dir / REPORT_FILE
    print(json.dumps({"metrics": result.metrics, "litert": json.loads(report.read_text()) if report.is_file() else None,
                      "process_peak_rss_mb": peak_rss_mb()}))
    """
)


# The TensorFlow engine's own step (training._make_step, traced once) timed alone, after warm-up:
# its loop time above also pays the tracing and a tf.train.Checkpoint written every epoch.
TF_STEP = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from pathlib import Path
    from ee_cli.base import compat
    from ee_cli.files import bundle
    from ee_cli.base.config import PersonaliseConfig
    from ee_cli.graph.personal_model import build_personal_model
    from ee_cli.adaptation.training import _make_step
    batch = int(sys.argv[1])
    source = bundle.read_bundle(Path("B"))
    _, heads = build_personal_model(source.load_model(), source.meta["classes"], source.meta["classes"], [0, 1, 2])
    tails = [head.tail_model() for head in heads]
    optimizer = compat.keras().optimizers.Adam(1e-3)
    optimizer.build([v for tail in tails for v in tail.trainable_variables])
    step = _make_step(tails, optimizer, compat.tf().constant([0, 1, 2]), PersonaliseConfig(batch=batch))
    rng = np.random.default_rng(0)
    weak = [rng.normal(0, 1, (batch, *tail.input_shape[1:])).astype(np.float32) for tail in tails]
    inputs = {"weak": weak, "strong": [w[::-1].copy() for w in weak], "teacher": rng.normal(0, 3, (batch, 5)).astype(np.float32)}
    times = []
    for number in range(40):
        started = time.perf_counter()
        step(inputs)
        times.append(time.perf_counter() - started)
    print(json.dumps({"step_ms_median": 1000 * float(np.median(times[10:]))}))
    """
)


def _python(code: str, *args, cwd: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _prepare(workspace: Path, backbone: str, size: int, photos: int) -> None:
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        sys.path.insert(0, "tests")
        from test_personalise import coloured_photos
        from ee_cli.commands.attach import attach
        from ee_cli.base.config import AttachConfig
        backbone, size, photos, workspace = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
        attach(AttachConfig(backbone=backbone, weights="none", input_size=size, num_classes=5, out=str(workspace / "B")))
        coloured_photos(workspace / "photos", photos, size=size)
        print("{}")
        """
    )
    _python(code, backbone, size, photos, workspace, cwd=Path(__file__).parent.parent)


def bill(backbone: str) -> dict:
    size, photos, epochs, batch = SETTINGS[backbone]
    with tempfile.TemporaryDirectory(prefix="ondevice-bill-") as folder:
        workspace = Path(folder)
        _prepare(workspace, backbone, size, photos)
        tf_run = _python(PERSONALISE, "tensorflow", epochs, batch, cwd=workspace)
        lite_run = _python(PERSONALISE, "litert", epochs, batch, cwd=workspace)
        tf_step = _python(TF_STEP, lite_run["litert"]["batch"], cwd=workspace)
    tf_metrics, lite = tf_run["metrics"], lite_run["litert"]
    tf_loop = tf_metrics["train_seconds"] - tf_metrics["cache"]["build_seconds"]
    steps_per_epoch = lite["steps"] / epochs
    return {
        "backbone": backbone, "input_size": size, "photos": photos, "epochs": epochs, "batch": batch,
        "tensorflow": {"cache_seconds": tf_metrics["cache"]["build_seconds"], "loop_seconds": round(tf_loop, 3),
                       "epoch_seconds": round(tf_loop / epochs, 4), "step_ms": round(1000 * tf_loop / lite["steps"], 3),
                       "step_ms_steady": round(tf_step["step_ms_median"], 3),
                       "process_peak_rss_mb": tf_run["process_peak_rss_mb"]},
        "litert": {"cache_seconds": lite["cache_seconds"], "loop_seconds": lite["train_seconds"],
                   "epoch_seconds": round(lite["train_seconds"] / epochs, 4), "step_ms_median": lite["step_ms_median"],
                   "steps_per_epoch": steps_per_epoch, "child_peak_rss_mb": lite["peak_rss_mb"],
                   "child_imported_tensorflow": lite["tensorflow_imported"], "artefact_bytes": lite["artefact_bytes"],
                   "saved_state_bytes": lite["state_bytes"],
                   "parent_seconds_outside_child": round(lite_run["metrics"]["train_seconds"] - lite["cache_seconds"] - lite["train_seconds"], 2)},
        "ratios": {"loop_time_litert_over_tf": round(lite["train_seconds"] / tf_loop, 3),
                   "steady_step_litert_over_tf": round(lite["step_ms_median"] / tf_step["step_ms_median"], 3),
                   "cache_time_litert_over_tf": round(lite["cache_seconds"] / tf_metrics["cache"]["build_seconds"], 3),
                   "peak_rss_litert_child_over_tf_process": round(lite["peak_rss_mb"] / tf_run["process_peak_rss_mb"], 3)},
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| backbone | loop s/epoch TF | LiteRT | step ms TF (loop / steady) | LiteRT | cache s TF | LiteRT | peak RSS MB TF | LiteRT child | artefact MB | saved state MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        tf, lite = row["tensorflow"], row["litert"]
        lines.append(f"| {row['backbone']}@{row['input_size']} | {tf['epoch_seconds']:.3f} | {lite['epoch_seconds']:.3f} | {tf['step_ms']:.1f} / {tf['step_ms_steady']:.1f} | "
                     f"{lite['step_ms_median']:.1f} | {tf['cache_seconds']:.2f} | {lite['cache_seconds']:.2f} | {tf['process_peak_rss_mb']:.0f} | "
                     f"{lite['child_peak_rss_mb']:.0f} | {lite['artefact_bytes'] / 1e6:.1f} | {lite['saved_state_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(SETTINGS))
    args = parser.parse_args()
    rows = [bill(name) for name in args.backbones.split(",")]
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"ondevice-bill-{date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
