"""`ee personalise --engine litert`: the exits personalised through `personalise.tflite` in LiteRT,
as a phone would, in a child process that never imports TensorFlow.

The parent (which has adapted the BatchNorm statistics and chosen the person's classes, as the
TensorFlow engine does) converts the artefact and writes a job; the child fills the feature cache
through the `features` signature, trains through `train`, saves `get_weights` after every epoch
(atomically: a `kill -9` then a restart ends bit-identical), and reports its peak memory. The
parent then copies the trained weights into the Keras heads, and `ee personalise` chooses the exit
thresholds and writes the bundle as it always does.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ee_cli.base import atomic, compat, photos
from ee_cli.adaptation import augment, cache, ssl
from ee_cli.runtime import litert, ondevice
from ee_cli.base.errors import UserError
from ee_cli.adaptation.training import CachedBatches, epoch_plan

JOB_FILE = "litert_job.json"
STATE_FILE = "litert_state.npz"
REPORT_FILE = "litert.json"
CACHE_FOLDER = "litert_cache"
ARTEFACT = ondevice.FILE


# ---- the parent: TensorFlow is there; it prepares the job and copies the result back ----

def personalise_heads(job, config, run_dir: Path, progress) -> tuple[cache.FeatureCache, list[dict]]:
    """Train the job's heads through LiteRT on the same photos, roles and settings as the TensorFlow
    engine; returns the feature cache and the per-epoch history, as the TensorFlow path has them."""
    personal_model, heads, paths, roles, personal = job.personal_model, job.heads, job.paths, job.roles, job.personal
    trainable = ondevice.trainable_heads(heads)
    artefact = run_dir / ARTEFACT
    if not artefact.is_file():  # a resumed run keeps the artefact it started with
        progress("Converting personalise.tflite", 0.0, "builtin ops only")
        shapes = plan_shapes(roles, config.batch, int(personal_model.input_shape[1]), len(personal))
        data = ondevice.build(personal_model, heads, list(personal), list(job.adapted_layers), shapes, ssl.Objective.of(config), job.teacher_shift)
        atomic.write_bytes(artefact, data)
    atomic.write_json(run_dir / JOB_FILE, _job(paths, roles, config, [h.name for h in trainable], int(personal_model.input_shape[1])))
    run_child(run_dir, progress)
    with np.load(run_dir / STATE_FILE) as state:
        for head in trainable:
            for step in head.steps:
                prefix = f"{head.name}__{step.layer}__"
                personal_model.get_layer(step.layer).set_weights([state[prefix + "kernel"], state[prefix + "bias"]])
        history = json.loads(str(state["history"]))
    return open_cache(run_dir / CACHE_FOLDER, _cache_key(json.loads((run_dir / JOB_FILE).read_text()))), history


def plan_shapes(roles, batch: int, size: int, classes: int):
    """The train signature's static shapes: a step's photos and labelled photos, as train_heads batches them."""
    unlabelled = len(roles.train_unlabelled)
    if unlabelled < 2:
        raise UserError(f"{unlabelled} photo(s) left to train on after the hold-out: add photos or lower --holdout")
    step = min(batch, unlabelled)
    return ondevice.Shapes(step, max(1, min(step, len(roles.train_labelled))), size, classes)


def _job(paths, roles, config, head_names: list[str], size: int) -> dict[str, Any]:
    return {
        "paths": [str(p) for p in paths], "size": size, "heads": head_names, "views": config.views, "seed": config.seed,
        "epochs": config.epochs, "batch": config.batch, "threads": compat.thread_count(),
        "train_unlabelled": roles.train_unlabelled.tolist(), "train_labelled": roles.train_labelled.tolist(),
        "labels": roles.labels.tolist(),
    }


def run_child(run_dir: Path, progress) -> None:
    """Run the LiteRT loop in a fresh interpreter process; relay its progress lines."""
    command = [sys.executable, "-m", "ee_cli.runtime.litert_trainer", str(run_dir)]
    log = run_dir / "litert_stderr.log"  # a file, not a pipe: a chatty child can never block on it
    with open(log, "w") as errors:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True, preexec_fn=_die_with_parent)
        for line in child.stdout:
            if line.startswith("{"):
                update = json.loads(line)
                progress(update["stage"], update["fraction"], update["info"])
    if child.wait() != 0:
        raise RuntimeError(f"the LiteRT trainer failed (exit {child.returncode}): {log.read_text().strip()[-2000:]}")


def _die_with_parent() -> None:
    """A killed `ee personalise` takes its LiteRT child along (Linux), so a --resume never races an
    orphan that is still writing the same state file."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


# ---- the child: numpy, Pillow and LiteRT only ----

def main(argv: list[str]) -> int:
    run_dir = Path(argv[1])
    job = json.loads((run_dir / JOB_FILE).read_text())

    def progress(stage: str, fraction: float, info: str) -> None:
        print(json.dumps({"stage": stage, "fraction": fraction, "info": info}), flush=True)

    report = train(run_dir, job, progress)
    atomic.write_json(run_dir / REPORT_FILE, report)
    return 0


def train(run_dir: Path, job: dict[str, Any], progress) -> dict[str, Any]:
    """Cache, then train epoch after epoch from wherever the saved state stands. Returns the bill."""
    interpreter = litert.interpreter(run_dir / ARTEFACT, int(job["threads"]))
    features = fill_cache(interpreter, run_dir / CACHE_FOLDER, job, progress)
    heads = HeadsInLiteRT(interpreter, job["heads"])
    epoch, history = heads.restore(run_dir / STATE_FILE)
    batches = CachedBatches(features, job["heads"], job["views"])
    step_seconds: list[float] = []
    started = time.perf_counter()
    for epoch in range(epoch, job["epochs"]):
        sums = heads.run_epoch(batches, job, epoch, step_seconds)
        history.append(sums | {"epoch": epoch + 1})
        heads.save(run_dir / STATE_FILE, epoch + 1, history)
        progress("Training exit heads in LiteRT", (epoch + 1) / job["epochs"], f"loss {sums.get('loss', 0.0):.3f}")
    return {
        "engine": "litert", "tensorflow_imported": "tensorflow" in sys.modules,
        "peak_rss_mb": peak_rss_mb(),
        "cache_seconds": round(features.seconds, 3), "train_seconds": round(time.perf_counter() - started, 3),
        "batch": int(heads.inputs["teacher"]["shape"][0]), "steps": len(step_seconds), "step_ms_median": round(1000 * float(np.median(step_seconds)), 3) if step_seconds else None,
        "artefact_bytes": (run_dir / ARTEFACT).stat().st_size, "state_bytes": (run_dir / STATE_FILE).stat().st_size,
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory since its exec (VmHWM): getrusage's ru_maxrss would carry
    the high-water mark of the parent it was forked from (1.3 GB after TensorFlow) across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _cache_key(job) -> dict[str, Any]:
    return {"engine": "litert", "photos": len(job["paths"]), "views": job["views"], "seed": job["seed"], "heads": job["heads"], "size": job["size"]}


def open_cache(directory: Path, key: dict[str, Any]) -> cache.FeatureCache | None:
    """The finished cache in `directory` if it was made for `key`, else None."""
    marker = directory / "complete.json"
    if not marker.is_file() or json.loads(marker.read_text())["key"] != key:
        return None
    found = {(name, kind): cache.OnDisk(path) for path in directory.glob("*.npy") for name, kind in [path.stem.rsplit(".", 1)]}
    return cache.FeatureCache(directory, key["views"], found, json.loads(marker.read_text())["seconds"])


def fill_cache(interpreter, directory: Path, job, progress) -> cache.FeatureCache:
    """Every photo's weak and strong views through `features`, once per view: the same views
    (augment.view_table) and the same layout and dtypes as the TensorFlow engine's cache."""
    key = _cache_key(job)
    found = open_cache(directory, key)
    if found is not None:
        return found
    directory.mkdir(parents=True, exist_ok=True)
    runner, started = interpreter.get_signature_runner("features"), time.perf_counter()
    arrays: dict[tuple[str, str], cache.OnDisk] = {}
    size, paths, batch = job["size"], job["paths"], photos.inference_batch(job["size"])  # no TensorFlow here: the rule errs small
    for view in range(job["views"]):
        for start in range(0, len(paths), batch):
            indices = np.arange(start, min(start + batch, len(paths)))
            pixels = photos.load_array([paths[i] for i in indices], size).astype(np.float32)
            tables = {kind: augment.view_table(job["seed"], 2 * view + shift, indices, size, size) for kind, shift in (("weak", 0), ("strong", 1))}
            outputs = runner(pixels=pixels, weak_view=tables["weak"], strong_view=tables["strong"])
            _store(arrays, directory, outputs, job, view, indices)
            progress("Caching features in LiteRT", (view + indices[-1] / len(paths)) / job["views"], "")
    seconds = time.perf_counter() - started
    atomic.write_json(directory / "complete.json", {"key": key, "seconds": seconds})
    return cache.FeatureCache(directory, job["views"], arrays, seconds)


def _store(arrays: dict, directory: Path, outputs: dict[str, np.ndarray], job, view: int, indices: np.ndarray) -> None:
    for output, values in outputs.items():
        name, kind = (cache.TEACHER, "weak") if output == "teacher" else output.rsplit("_", 1)
        if (name, kind) not in arrays:
            dtype = np.float32 if name == cache.TEACHER else np.float16  # as cache.build stores them
            shape = (job["views"], len(job["paths"]), *values.shape[1:])
            arrays[(name, kind)] = cache.OnDisk(directory / f"{name}.{kind}.npy", dtype, shape)
        arrays[(name, kind)].write(view, int(indices[0]), values)


class HeadsInLiteRT:
    """The artefact's train / get_weights / set_weights signatures, fed from the feature cache."""

    def __init__(self, interpreter, head_names: list[str]):
        self.train = interpreter.get_signature_runner("train")
        self.get_weights = interpreter.get_signature_runner("get_weights")
        self.set_weights = interpreter.get_signature_runner("set_weights")
        self.inputs = self.train.get_input_details()
        self.heads = head_names

    def run_epoch(self, batches, job, epoch: int, step_seconds: list[float]) -> dict[str, float]:
        rng = np.random.default_rng([job["seed"], epoch])
        batch = self.inputs["teacher"]["shape"][0]
        sums: dict[str, float] = {}
        steps = 0
        for indices, labelled in epoch_plan(rng, job["train_unlabelled"], job["train_labelled"], batch):
            weak, strong, teacher = batches.batch(indices, epoch, rng)
            feed = {f"{h}_{kind}": values[i] for i, h in enumerate(self.heads) for kind, values in (("weak", weak), ("strong", strong))}
            feed |= self._labelled(batches, labelled, job, epoch, rng) | {"teacher": teacher}
            started = time.perf_counter()
            outputs = self.train(**feed)
            step_seconds.append(time.perf_counter() - started)
            for name, value in outputs.items():
                key = name.replace("__", "/")
                sums[key] = sums.get(key, 0.0) + float(value)
            steps += 1
        return {key: round(value / steps, 5) for key, value in sums.items() if job["train_labelled"] or not key.endswith("/supervised")}

    def _labelled(self, batches, labelled, job, epoch: int, rng) -> dict[str, np.ndarray]:
        """The labelled slots: photos and one-hot labels, or one zero row when there are none."""
        classes = self.inputs["labels"]["shape"][1]
        if labelled is None:
            zeros = {f"{h}_labelled": np.zeros(self.inputs[f"{h}_labelled"]["shape"], np.float32) for h in self.heads}
            return zeros | {"labels": np.zeros((1, classes), np.float32)}
        weak, _, _ = batches.batch(labelled, epoch, rng, with_strong=False)
        labels = np.eye(classes, dtype=np.float32)[np.asarray(job["labels"])[labelled]]
        return {f"{h}_labelled": weak[i] for i, h in enumerate(self.heads)} | {"labels": labels}

    def save(self, path: Path, epochs_done: int, history: list[dict]) -> None:
        """Weights, Adam's state, the epoch count and the history in one file, replaced atomically."""
        with atomic.replacing(path) as partial:
            np.savez(partial, epochs_done=np.array(epochs_done), history=np.array(json.dumps(history)), **self.get_weights())

    def restore(self, path: Path) -> tuple[int, list[dict]]:
        if not path.is_file():
            return 0, []
        with np.load(path) as state:
            names = self.set_weights.get_input_details()
            self.set_weights(**{name: state[name] for name in names})
            return int(state["epochs_done"]), json.loads(str(state["history"]))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
