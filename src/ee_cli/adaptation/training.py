"""Training the exit heads (the personalised final exit's too) on the frozen backbone's features:
the photos' roles, the batches (from the feature cache, or live), the TensorFlow step and its
checkpoints. The LiteRT engine (`--engine litert`, litert_trainer.py) reads its batches from here
too. `ee personalise` (personalise.py) prepares the job, picks the engine and reads the heads back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ee_cli.base import atomic, compat, photos
from ee_cli.files import schemas
from ee_cli.adaptation import cache, ssl
from ee_cli.base.config import PersonaliseConfig
from ee_cli.base.errors import UserError, first_line
from ee_cli.graph.personal_model import GENERIC_OUTPUT, PersonalHead

Progress = Callable[[str, float, str], None]  # (stage, fraction done, detail)
EXIT_TEACHERS = ("final", "generic")


@dataclass(frozen=True)
class Roles:
    """Indices into the photo list (unlabelled photos first, then labelled ones)."""

    train_unlabelled: np.ndarray
    train_labelled: np.ndarray
    holdout_unlabelled: np.ndarray
    holdout_labelled: np.ndarray
    labels: np.ndarray  # personal-class index per photo, -1 when unlabelled


@dataclass(frozen=True)
class Job:
    """What the heads train on: the personal model, its heads, the photos and their roles."""

    personal_model: Any
    heads: list[PersonalHead]
    paths: list[Path]
    roles: Roles
    personal: np.ndarray  # the personal classes, as indices into the bundle's classes
    adapted_layers: tuple[str, ...] = ()  # the BatchNorm layers adapt_step set to the person's statistics
    teacher_shift: np.ndarray | None = None  # added to the generic teacher's logits over `personal` (the class prior)

    @property
    def size(self) -> int:
        return int(self.personal_model.input_shape[1])


@dataclass(frozen=True)
class Trained:
    features: Any  # the feature cache, or None (--no-cache)
    history: list[dict]
    seconds: float


def train(config: PersonaliseConfig, job: Job, run_dir: Path, progress: Progress) -> Trained:
    """The heads (the final exit's too) on the feature cache, or every step live (--no-cache), in TensorFlow."""
    started = time.perf_counter()
    features = None
    if config.cache and config.epochs > 0:  # with no epochs to train, a cache would be built for nothing
        feature_model = compat.keras().Model(job.personal_model.inputs, [h.cache_tensor for h in job.heads] + [job.personal_model.get_layer(GENERIC_OUTPUT).output])
        plan = cache.Plan(job.paths, job.size, config.views, config.seed, photos.inference_batch(job.size, job.personal_model.count_params()))
        features = cache.build(run_dir / "cache", feature_model, [h.name for h in job.heads], plan, lambda f: progress("Caching features", f, ""))
        batches = CachedBatches(features, [h.name for h in job.heads], config.views)
    else:
        batches = LiveBatches(job.personal_model, job.heads, job.paths, job.size, config.seed)
    history = train_heads([head.tail_model() for head in job.heads], batches, job, config, run_dir, progress)
    return Trained(features, history, time.perf_counter() - started)


class CachedBatches:
    """Training batches read from the feature cache (from memory when it is small): one cached
    (weak, strong) pair per photo per epoch."""

    def __init__(self, features: cache.FeatureCache, names: list[str], views: int):
        self.features, self.names, self.views = features.held_if_small(), names, views

    def batch(self, indices: np.ndarray, epoch: int, rng: np.random.Generator, with_strong: bool = True):
        view = rng.integers(self.views, size=len(indices))
        weak = [self.features.get(name, "weak", view, indices) for name in self.names]
        strong = [self.features.get(name, "strong", view, indices) for name in self.names] if with_strong else None
        teacher = self.features.get(cache.TEACHER, "weak", view, indices)
        return weak, strong, teacher


class LiveBatches:
    """The --no-cache comparison: every step pushes fresh views through the frozen backbone."""

    def __init__(self, personal_model, heads: list[PersonalHead], paths, size: int, seed: int):
        keras = compat.keras()
        self.model = keras.Model(personal_model.inputs, [h.cache_tensor for h in heads] + [personal_model.get_layer(GENERIC_OUTPUT).output])
        self.paths, self.size, self.seed = paths, size, seed

    def batch(self, indices: np.ndarray, epoch: int, rng: np.random.Generator, with_strong: bool = True):
        from ee_cli.adaptation import augment

        images = photos.load_array([self.paths[i] for i in indices], self.size).astype(np.float32)
        weak_images = augment.weak(images, self.seed, 2 * epoch, indices)
        weak = [np.asarray(x) for x in self.model(weak_images, training=False)]
        strong = None
        if with_strong:
            strong_images = augment.strong(images, self.seed, 2 * epoch + 1, indices)
            strong = [np.asarray(x) for x in self.model(strong_images, training=False)][:-1]
        return weak[:-1], strong, weak[-1]


# --resume restarts from the last checkpoint, so a kill loses at most this much head training; a save
# every epoch was a quarter of it at 32 px (30 saves: 1.4 of 6.1 s on a ResNet-9 user).
CHECKPOINT_SECONDS = 20.0


def train_heads(tails, batches, job: Job, config: PersonaliseConfig, run_dir: Path, progress: Progress) -> list[dict]:
    """Train every head's tail on its own features; checkpoint after the first epoch, then every
    CHECKPOINT_SECONDS; --resume goes on from the last checkpoint."""
    tf = compat.tf()
    keras = compat.keras()
    optimizer = keras.optimizers.Adam(config.learning_rate)
    variables = [v for tail in tails for v in tail.trainable_variables]
    optimizer.build(variables)
    epoch_done = tf.Variable(0, dtype=tf.int64)
    checkpoint = tf.train.Checkpoint(optimizer=optimizer, epoch=epoch_done, **{f"head_{i}": tail for i, tail in enumerate(tails)})
    manager = tf.train.CheckpointManager(checkpoint, run_dir / "checkpoints", max_to_keep=1)
    history_path = run_dir / "history.json"
    history: list[dict] = []
    if manager.latest_checkpoint:
        try:
            checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        except (tf.errors.OpError, ValueError, AssertionError) as error:
            raise UserError(f"--resume: the checkpoint in {run_dir} cannot be restored ({first_line(error, 160)}); start a new run without --resume") from None
        history = schemas.read_json(history_path) if history_path.is_file() else []
        if not isinstance(history, list):
            raise UserError(f"{history_path} is damaged: start a new run without --resume")
        history = history[: int(epoch_done.numpy())]
    personal_tensor = tf.constant(job.personal, tf.int32)
    roles = job.roles
    step = _make_step(tails, optimizer, personal_tensor, config, job.teacher_shift)
    steps_per_epoch = max(1, len(roles.train_unlabelled) // config.batch)
    log_scalars = _scalar_logger(run_dir / "tensorboard")
    held_out_agreement = _held_out_agreement(tails, batches, roles, config.seed)
    last_saved = None
    for epoch in range(int(epoch_done.numpy()), config.epochs):
        rng = np.random.default_rng([config.seed, epoch])
        sums: dict[str, float] = {}
        for number, (indices, take) in enumerate(epoch_plan(rng, roles.train_unlabelled, roles.train_labelled, config.batch)):
            weak, strong, teacher = batches.batch(indices, epoch, rng)
            inputs = {"weak": weak, "strong": strong, "teacher": teacher}
            if take is not None:
                labelled_weak, _, _ = batches.batch(take, epoch, rng, with_strong=False)
                inputs["labelled"], inputs["labels"] = labelled_weak, roles.labels[take].astype(np.int32)
            for key, value in step(inputs).items():
                sums[key] = sums.get(key, 0.0) + float(value)
            progress("Training exit heads", (epoch + (number + 1) / steps_per_epoch) / config.epochs, _summary(sums, number + 1))
        history.append({key: round(value / steps_per_epoch, 5) for key, value in sums.items()} | {"epoch": epoch + 1})
        log_scalars(history[-1] | held_out_agreement(epoch), epoch + 1)
        epoch_done.assign(epoch + 1)
        atomic.write_json(history_path, history)
        if last_saved is None or time.monotonic() - last_saved >= CHECKPOINT_SECONDS:
            manager.save()
            last_saved = time.monotonic()
    return history


def _held_out_agreement(tails, batches, roles: Roles, seed: int) -> Callable[[int], dict[str, float]]:
    """Per epoch, each exit's top-1 agreement with the final exit on the held-out photos' cached weak
    views: a monitor for TensorBoard (the thresholds are chosen after training, on the photos). One
    traced call per epoch: eager calls of every tail cost a ResNet-9 user 0.6 s of its 30 epochs."""
    if not isinstance(batches, CachedBatches) or len(roles.holdout_unlabelled) == 0:
        return lambda epoch: {}  # --no-cache would push the held-out photos through the backbone every epoch
    tf = compat.tf()
    predicted = tf.function(lambda weak: [tf.argmax(tail(features, training=False), axis=1) for tail, features in zip(tails, weak)], autograph=False)

    def agreement(epoch: int) -> dict[str, float]:
        weak, _, _ = batches.batch(roles.holdout_unlabelled, epoch, np.random.default_rng([seed, epoch, 1]), with_strong=False)
        predictions = [found.numpy() for found in predicted(weak)]
        return {f"{tail.name.removesuffix('_tail')}/holdout_agreement": float(np.mean(found == predictions[-1]))
                for tail, found in zip(tails[:-1], predictions[:-1])}

    return agreement


def _scalar_logger(folder: Path) -> Callable[[dict[str, float], int], None]:
    """Loss terms, mask rates and held-out agreement per epoch, as Keras users open them in TensorBoard:
    one traced write per epoch (eager writes, one per scalar, cost a ResNet-9 user 0.3 s)."""
    tf = compat.tf()
    writer = tf.summary.create_file_writer(str(folder))
    # tf.summary.scalar lives in the tensorboard package; the core op with the scalars plugin's
    # metadata writes the same record without installing it.
    metadata = tf.compat.v1.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    metadata = metadata.SerializeToString()
    traced: dict[tuple[str, ...], Any] = {}

    def write_all(names: tuple[str, ...]):
        def write(values, step):
            with writer.as_default(step=step):
                for index, name in enumerate(names):
                    tf.summary.write(name, values[index], metadata=metadata)
        return tf.function(write, autograph=False)

    def log(values: dict[str, float], step: int) -> None:
        names = tuple(name for name in values if name != "epoch")
        if names not in traced:
            traced[names] = write_all(names)
        traced[names](tf.constant([values[name] for name in names], tf.float32), tf.constant(step, tf.int64))
        writer.flush()

    return log


def epoch_plan(rng: np.random.Generator, unlabelled, labelled, batch: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Each step's unlabelled photos and labelled photos (cycled), drawn from `rng`: one order for
    both engines, so that TensorFlow and LiteRT train on the same batches."""
    order = rng.permutation(np.asarray(unlabelled, int))
    labelled_order = rng.permutation(np.asarray(labelled, int)) if len(labelled) else None
    for start in range(0, max(1, len(order) // batch) * batch, batch):
        take = None if labelled_order is None else np.resize(np.roll(labelled_order, -start), min(batch, len(labelled_order)))
        yield order[start : start + batch], take


def _summary(sums: dict[str, float], steps: int) -> str:
    loss = sums.get("loss", 0.0) / steps
    mask = np.mean([v for k, v in sums.items() if k.endswith("/mask_rate")] or [0.0]) / steps
    return f"loss {loss:.3f} · mask rate {mask:.2f}"


def _make_step(tails, optimizer, personal, config: PersonaliseConfig, teacher_shift: np.ndarray | None):
    tf = compat.tf()
    names = [tail.name.removesuffix("_tail") for tail in tails]
    variables = [v for tail in tails for v in tail.trainable_variables]
    objective = ssl.Objective.of(config)
    shift = 0.0 if teacher_shift is None else tf.constant(teacher_shift, tf.float32)  # the class prior, in the teacher's logits

    def losses(inputs):
        generic = tf.gather(tf.convert_to_tensor(inputs["teacher"]), personal, axis=1) + shift
        teachers = ssl.teachers(generic, lambda: tails[-1](inputs["weak"][-1], training=False), len(tails), objective)
        report, total = {}, 0.0
        for index, (name, tail) in enumerate(zip(names, tails)):
            supervised = ssl.cross_entropy(tail(inputs["labelled"][index], training=True), inputs["labels"]) if "labelled" in inputs else None
            terms, mask_rate = ssl.head_terms(tail(inputs["weak"][index], training=True), tail(inputs["strong"][index], training=True), teachers[index],
                                              objective, supervised)
            total += ssl.weighted_sum(terms, objective)
            report |= {f"{name}/{k}": v for k, v in terms.items()} | {f"{name}/mask_rate": mask_rate}
        report["loss"] = total
        return total, report

    @tf.function(autograph=False)
    def step(inputs):
        with tf.GradientTape() as tape:
            total, report = losses(inputs)
        optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return report

    return step
