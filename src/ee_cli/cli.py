"""The `ee` command line: thin Typer commands that build a config, call a pipeline, render its result.

Nothing here imports TensorFlow; pipelines are imported inside commands so `ee --help` is instant.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from ee_cli.errors import UserError

app = typer.Typer(
    name="ee",
    help=(
        "Personalise an image classifier on one person's photos with early exits (PersEPhonEE).\n\n"
        "The usual flow, each step defaulting to the bundle the previous one wrote:\n\n"
        "  ee attach --backbone resnet50\n\n"
        "  ee personalise --data ./user_photos\n\n"
        "  ee export --tflite"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

CONFIG_OPTION = typer.Option("--config", help="TOML file with a table per command (\\[attach], ...); flags override it.", rich_help_panel="Run")
SEED_OPTION = typer.Option("--seed", help="Random seed (default 0).", rich_help_panel="Run")
JSON_OPTION = typer.Option("--json", help="Print the result as JSON instead of a table.", rich_help_panel="Run")
OUT_OPTION = typer.Option("--out", help="Output bundle folder (default: bundles/<name>, numbered if taken).", rich_help_panel="Output")
EXIST_OK_OPTION = typer.Option("--exist-ok", help="Replace the output bundle if it exists.", rich_help_panel="Output")
TRUST_OPTION = typer.Option(
    "--trust-model-code",
    help="Load a model file even if it carries code: Lambda layers (Python bytecode), custom layers, TF calls other than tensor maths, SavedModel folders. Only for files whose author you trust; without it such a file is refused before anything in it is read as code.",
    rich_help_panel="Run",
)


def main() -> None:
    app()


def _version(value: bool) -> None:
    if value:
        from ee_cli import __version__

        typer.echo(f"ee {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = False,
) -> None:
    """Personalise an image classifier on one person's photos with early exits (PersEPhonEE)."""


@contextmanager
def user_errors():
    """Every user mistake ends as one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except UserError as error:
        message = " ".join(str(error).split())
        typer.echo(f"error: {message}", err=True)
        raise typer.Exit(2) from None


def _floats(text: Optional[str], option: str) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"{option} expects comma-separated numbers such as 0.25,0.5,0.75, not {text!r}") from None


def _flags(given: dict, *, leave_out: tuple[str, ...] = ()) -> dict:
    """A command's parameters as config flags: an unset switch (False) overrides nothing."""
    skip = {"config", "as_json", *leave_out}
    return {name: None if value is False else value for name, value in given.items() if name not in skip}


def _names(text: Optional[str]) -> Optional[tuple[str, ...]]:
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


def _echo_json(result) -> None:
    typer.echo(json.dumps({"bundle": str(result.bundle_path), "run": str(result.run_dir), "metrics": result.metrics}, indent=2))


def _source_line(verb: str, result) -> str:
    taken = " (the latest bundle written here; --bundle chooses another)" if result.source_implicit else ""
    return f"{verb} [bold]{result.source}[/]{taken}"


def _console():
    from rich.console import Console

    return Console()


@app.command(
    rich_help_panel="Pipeline",
    epilog="Examples:  ee attach --backbone resnet50   ·   ee attach --backbone cifar_resnet9 --exits 0.2,0.4,0.8 --head conv   ·   ee attach --backbone my_model.h5 --classes cat,dog",
)
def attach(
    backbone: Annotated[Optional[str], typer.Option(help="resnet50 | mobilenet_v2 | efficientnet_b0 | cifar_resnet9, or a tf_keras model file (.h5, .keras, SavedModel folder) taking RGB 0..255 (default resnet50).", rich_help_panel="Backbone")] = None,
    weights: Annotated[Optional[str], typer.Option(help="imagenet | none | PATH to a weights file (default imagenet; none for cifar_resnet9).", rich_help_panel="Backbone")] = None,
    input_size: Annotated[Optional[int], typer.Option(help="Square input size in pixels (default: the backbone's, 224 or 32).", rich_help_panel="Backbone")] = None,
    num_classes: Annotated[Optional[int], typer.Option(help="Classifier size of a backbone built without ImageNet weights.", rich_help_panel="Backbone")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Class names: a,b,c or a file with one per line (default: ImageNet's names, else 0..N-1).", rich_help_panel="Backbone")] = None,
    exits: Annotated[Optional[str], typer.Option(help="Exit positions as fractions of the backbone's FLOPs, each taken to the nearest block output (default 0.25,0.5,0.75).", rich_help_panel="Exits")] = None,
    exit_layers: Annotated[Optional[str], typer.Option(help="Graft onto these block-output layers instead (comma-separated names; see --list-graft-points).", rich_help_panel="Exits")] = None,
    list_graft_points: Annotated[bool, typer.Option("--list-graft-points", help="List every graft point with its share of the compute, mark where --exits would go, and write nothing.", rich_help_panel="Exits")] = False,
    head: Annotated[Optional[str], typer.Option(help="Exit head: light (average-pool to a 4x4 grid -> dense -> dense; cheap to cache and train) or conv (2 convs -> pool -> dense, as drawn in the paper) (default light).", rich_help_panel="Exits")] = None,
    out: Annotated[Optional[str], OUT_OPTION] = None,
    exist_ok: Annotated[bool, EXIST_OK_OPTION] = False,
    trust_model_code: Annotated[bool, TRUST_OPTION] = False,
    seed: Annotated[Optional[int], SEED_OPTION] = None,
    config: Annotated[Optional[Path], CONFIG_OPTION] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Graft early exits onto a pretrained CNN and write a multi-exit bundle."""
    flags = _flags(locals(), leave_out=("list_graft_points",))
    with user_errors():
        from ee_cli.attach import attach as run_attach, survey
        from ee_cli.config import AttachConfig, resolve

        flags |= {"exits": _floats(exits, "--exits"), "exit_layers": _names(exit_layers)}
        settings = resolve(AttachConfig, "attach", config, flags)
        with _status(f"Building {settings.backbone}" + ("" if list_graft_points else " and grafting exits"), quiet=as_json):
            result = survey(settings) if list_graft_points else run_attach(settings)
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2))
        return
    from ee_cli.render import attach_table, graft_points_table

    console = _console()
    console.print(graft_points_table(result.as_json()) if list_graft_points else attach_table(result.meta))
    for note in result.placement.notes:
        console.print(f"Note: {note}")
    if list_graft_points:
        return
    console.print(f"Bundle written to [bold]{result.bundle_path}[/] ({result.meta['backbone']['name']}, {len(result.meta['exits'])} exits, untrained)")
    console.print("Next: [bold cyan]ee personalise --data ./user_photos[/]")


@contextmanager
def _status(message: str, quiet: bool):
    if quiet or not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message):
        yield


@app.command(
    rich_help_panel="Pipeline",
    epilog="Examples:  ee personalise --data ./user_photos   ·   ee personalise --data ./photos --labelled ./labelled --epochs 50   ·   ee personalise --data ./photos --resume",
)
def personalise(
    data: Annotated[Optional[str], typer.Option(help="Folder of the person's photos (any nesting; JPEG, PNG, ...; unreadable files are skipped and counted).", rich_help_panel="Photos")] = None,
    labelled: Annotated[Optional[str], typer.Option(help="Optional folder of labelled photos, one sub-folder per class.", rich_help_panel="Photos")] = None,
    bundle: Annotated[Optional[str], typer.Option("--bundle", "--from", help="Bundle to personalise: an attached one, or a personalised one as more photos arrive (default: the latest written here).", rich_help_panel="Photos")] = None,
    adapt_bn: Annotated[Optional[str], typer.Option(help="Re-estimate the first N BatchNorm layers' statistics on the photos: N, auto (as deep as the generic model's confident predictions hold, at most half) or 0 (default auto).", rich_help_panel="Personalisation")] = None,
    personal_classes: Annotated[Optional[str], typer.Option(help="auto (labelled classes, else those with >= --class-share of the class mix estimated from the photos), all, or a,b,c (default auto).", rich_help_panel="Personalisation")] = None,
    class_share: Annotated[Optional[float], typer.Option(help="Share of the class mix (estimated by EM from the adapted model's probabilities) a class needs to count as personal (default 0.10).", rich_help_panel="Personalisation")] = None,
    views: Annotated[Optional[int], typer.Option(help="Weak/strong view pairs cached per photo (default 1).", rich_help_panel="Training")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs over the cached features (default 30).", rich_help_panel="Training")] = None,
    batch: Annotated[Optional[int], typer.Option(help="Batch size (default 64).", rich_help_panel="Training")] = None,
    learning_rate: Annotated[Optional[float], typer.Option(help="Adam learning rate (default 1e-3).", rich_help_panel="Training")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="Confidence for pseudo-labels and FixMatch targets (default 0.9).", rich_help_panel="Training")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="Distillation temperature (default 2).", rich_help_panel="Training")] = None,
    distill_weight: Annotated[Optional[float], typer.Option(help="Weight of distillation from the teacher (default 1).", rich_help_panel="Training")] = None,
    pseudo_weight: Annotated[Optional[float], typer.Option(help="Weight of the teacher's confident hard labels on strong views (default 1).", rich_help_panel="Training")] = None,
    fixmatch_weight: Annotated[Optional[float], typer.Option(help="Weight of FixMatch consistency (default 1).", rich_help_panel="Training")] = None,
    supervised_weight: Annotated[Optional[float], typer.Option(help="Weight of cross-entropy on labelled photos (default 1).", rich_help_panel="Training")] = None,
    exit_teacher: Annotated[Optional[str], typer.Option(help="What the early exits learn from: generic (the frozen generic classifier, restricted to the personal classes) or final (the personalised final exit as it trains) (default generic).", rich_help_panel="Training")] = None,
    holdout: Annotated[Optional[float], typer.Option(help="Share of photos held out of training; exit thresholds are chosen on them, label-free (default 0.2; at least 30 photos set thresholds).", rich_help_panel="Exits")] = None,
    max_drop: Annotated[Optional[float], typer.Option(help="Points of held-out agreement with the final exit the early exits may cost (default 0.5).", rich_help_panel="Exits")] = None,
    margin_z: Annotated[Optional[float], typer.Option(help="Threshold margin: standard errors of the paired difference to clear (default 1.645, one-sided 95%).", rich_help_panel="Exits")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Push photos through the backbone every step instead of caching features (for comparison).", rich_help_panel="Training")] = False,
    engine: Annotated[Optional[str], typer.Option(help="tensorflow, or litert: train through personalise.tflite in the LiteRT interpreter (builtin ops only, a process without TensorFlow), as a phone would (default tensorflow).", rich_help_panel="Training")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the latest unfinished run with the same settings.", rich_help_panel="Run")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel="Run")] = False,
    out: Annotated[Optional[str], OUT_OPTION] = None,
    exist_ok: Annotated[bool, EXIST_OK_OPTION] = False,
    trust_model_code: Annotated[bool, TRUST_OPTION] = False,
    seed: Annotated[Optional[int], SEED_OPTION] = None,
    config: Annotated[Optional[Path], CONFIG_OPTION] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Train the exits of a bundle on one person's photos, mostly unlabelled (backbone frozen)."""
    flags = _flags(locals(), leave_out=("no_cache",)) | {"cache": False if no_cache else None}
    with user_errors():
        from ee_cli.config import PersonaliseConfig
        from ee_cli.personalise import personalise as run_personalise

        result = _with_progress(run_personalise, PersonaliseConfig, "personalise", config, flags, as_json)
    if as_json:
        return _echo_json(result)
    from ee_cli.render import personalise_report

    console = _console()
    console.print(_source_line("Personalised", result))
    console.print(personalise_report(result.meta, result.metrics))
    console.print(f"Bundle written to [bold]{result.bundle_path}[/]; run details in {result.run_dir}")
    console.print("Next: [bold cyan]ee evaluate --data ./labelled_test_photos[/]  or  [bold cyan]ee export --tflite[/]")


def _with_progress(pipeline, config_class, section: str, toml: Optional[Path], flags: dict, as_json: bool):
    """Resolve the command's config (defaults < TOML < flags) and run its pipeline under a progress bar."""
    from ee_cli.config import resolve

    settings = resolve(config_class, section, toml, flags)
    with _progress(quiet=settings.quiet or as_json) as progress:
        return pipeline(settings, progress)


@contextmanager
def _progress(quiet: bool):
    """A Rich progress bar per stage on stderr (stage, share done, loss and mask rate, time left)."""
    if quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    bars = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=Console(stderr=True))
    tasks: dict[str, int] = {}

    def update(stage: str, fraction: float, info: str) -> None:
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=1.0, info="")
        bars.update(tasks[stage], completed=min(1.0, fraction), info=info)

    with bars:
        yield update


@app.command(
    rich_help_panel="Pipeline",
    epilog="Examples:  ee evaluate --data ./test_photos   ·   ee evaluate --data ./test_photos --use match-generic   ·   ee evaluate --data ./test_photos --calibrate-on ./more_unlabelled --use label-free",
)
def evaluate(
    data: Annotated[Optional[str], typer.Option(help="Labelled photos, one sub-folder per class (an unlabelled folder gives agreement with the final exit instead of accuracy).", rich_help_panel="Photos")] = None,
    bundle: Annotated[Optional[str], typer.Option(help="Bundle to profile (default: the latest written here).", rich_help_panel="Photos")] = None,
    calibrate_split: Annotated[Optional[float], typer.Option(help="Share of the photos that calibrates thresholds; the rest reports (default 0.5).", rich_help_panel="Policy")] = None,
    max_drop: Annotated[Optional[float], typer.Option(help="Points of accuracy the 'keep' policy may lose against the final exit (default 0.5).", rich_help_panel="Policy")] = None,
    use: Annotated[Optional[str], typer.Option(help="Thresholds to put in the bundle: keep | match-generic | match-restricted | label-free (default keep).", rich_help_panel="Policy")] = None,
    margin_z: Annotated[Optional[float], typer.Option(help="Calibration margin: standard errors of the paired difference the policy must clear (default 1.645, one-sided 95%).", rich_help_panel="Policy")] = None,
    criterion: Annotated[Optional[str], typer.Option(help="Exit confidence: maxprob or entropy (default maxprob).", rich_help_panel="Policy")] = None,
    calibrate_on: Annotated[Optional[str], typer.Option(help="Held-out unlabelled photos to calibrate without labels (agreement with the final exit).", rich_help_panel="Policy")] = None,
    generic_bundle: Annotated[Optional[str], typer.Option(help="The generic model's bundle for the baselines (default: from provenance).", rich_help_panel="Policy")] = None,
    latency_runs: Annotated[Optional[int], typer.Option(help="Timed runs per exit after warm-up runs (default 30).", rich_help_panel="Run")] = None,
    tflite: Annotated[Optional[str], typer.Option("--tflite", help="An `ee export` folder: also time each exit's .tflite in LiteRT.", rich_help_panel="Run")] = None,
    threads: Annotated[Optional[int], typer.Option(help="LiteRT threads for --tflite (default 1).", rich_help_panel="Run")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.", rich_help_panel="Run")] = False,
    out: Annotated[Optional[str], OUT_OPTION] = None,
    exist_ok: Annotated[bool, EXIST_OK_OPTION] = False,
    trust_model_code: Annotated[bool, TRUST_OPTION] = False,
    seed: Annotated[Optional[int], SEED_OPTION] = None,
    config: Annotated[Optional[Path], CONFIG_OPTION] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Profile every exit on labelled photos and calibrate the exit thresholds."""
    flags = _flags(locals())
    with user_errors():
        from ee_cli.config import EvaluateConfig
        from ee_cli.evaluate import evaluate as run_evaluate

        result = _with_progress(run_evaluate, EvaluateConfig, "evaluate", config, flags, as_json)
    if as_json:
        return _echo_json(result)
    from ee_cli.render import evaluate_report

    console = _console()
    console.print(_source_line("Profiled", result))
    console.print(evaluate_report(result.metrics))
    console.print(f"Plot: {result.plot}   Details: {result.run_dir}")
    console.print(f"Bundle with the '{result.metrics['used']}' thresholds written to [bold]{result.bundle_path}[/]")
    console.print("Next: [bold cyan]ee export --tflite[/]")


@app.command(
    name="export",
    rich_help_panel="Pipeline",
    epilog="Examples:  ee export --tflite   ·   ee export --tflite --quant none   ·   ee export --tflite --quant int8_full --calibration ./photos --validate ./test_photos",
)
def export_command(
    tflite: Annotated[bool, typer.Option("--tflite", help="Export TFLite files (the only format so far; required).", rich_help_panel="Format")] = False,
    quant: Annotated[Optional[str], typer.Option(help="none | fp16 | dynamic | int8 (float fallback) | int8_full (integer only) (default int8_full: smallest and fastest on phone CPUs, raw uint8 pixels in).", rich_help_panel="Format")] = None,
    input_type: Annotated[Optional[str], typer.Option(help="int8_full input and output type: uint8 or int8 (default uint8).", rich_help_panel="Format")] = None,
    bundle: Annotated[Optional[str], typer.Option(help="Bundle to export (default: the latest written here).", rich_help_panel="Format")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="Photos for int8 calibration (default: the person's photos recorded in the bundle; at least 100).", rich_help_panel="Photos")] = None,
    validate: Annotated[Optional[str], typer.Option(help="Held-out photos to validate against Keras (labelled adds accuracy; default: calibration-folder photos not used to calibrate).", rich_help_panel="Photos")] = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option(help="Fail (exit 1) if an exit loses more points than this against float Keras (default 1).", rich_help_panel="Photos")] = None,
    calibration_photos: Annotated[Optional[int], typer.Option(help="Photos used to calibrate int8 (default 200).", rich_help_panel="Photos")] = None,
    validation_photos: Annotated[Optional[int], typer.Option(help="Photos used to validate (default 300).", rich_help_panel="Photos")] = None,
    qat: Annotated[bool, typer.Option("--qat", help="Quantisation-aware training of the exit heads (tfmot) before an int8 export.", rich_help_panel="Format")] = False,
    qat_steps: Annotated[Optional[int], typer.Option(help="QAT steps (default 200).", rich_help_panel="Format")] = None,
    policy: Annotated[Optional[str], typer.Option(help="measured: time every stage and head in LiteRT (this mode, --threads) and re-choose the exits and thresholds on the bundle's evidence, dropping exits that cost more than they save, down to the plain model | recorded: the bundle's thresholds as they are (default measured).", rich_help_panel="Format")] = None,
    trainable: Annotated[bool, typer.Option("--trainable", help="Also write personalise.tflite: features, bn_stats, train, infer, get_weights and set_weights signatures, builtin ops only, so a phone trains its exits in LiteRT.", rich_help_panel="Format")] = False,
    threads: Annotated[Optional[int], typer.Option(help="LiteRT threads for the cost profile and validation (default 1).", rich_help_panel="Run")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.", rich_help_panel="Run")] = False,
    out: Annotated[Optional[str], typer.Option("--out", help="Output folder (default: exports/<bundle>-<mode>, numbered if taken).", rich_help_panel="Output")] = None,
    exist_ok: Annotated[bool, EXIST_OK_OPTION] = False,
    trust_model_code: Annotated[bool, TRUST_OPTION] = False,
    seed: Annotated[Optional[int], SEED_OPTION] = None,
    config: Annotated[Optional[Path], CONFIG_OPTION] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Export a bundle as quantised multi-exit TFLite files with a staged early-exit cascade."""
    flags = _flags(locals(), leave_out=("tflite",))
    with user_errors():
        if not tflite:
            raise UserError("say which format: --tflite (the only one so far)")
        from ee_cli.config import ExportConfig
        from ee_cli.export import ValidationFailed
        from ee_cli.export import export as run_export

        failure = None
        try:
            result = _with_progress(run_export, ExportConfig, "export", config, flags, as_json)
        except ValidationFailed as failed:
            failure, result = failed, failed.result
    _print_export(result, failed=failure is not None, as_json=as_json)
    if failure is not None:
        typer.echo(f"validation failed: {failure}", err=True)
        raise typer.Exit(1)


def _print_export(result, failed: bool, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps({"out": str(result.out), "manifest": result.manifest}, indent=2))
        return
    from ee_cli.render import export_report

    console = _console()
    console.print(_source_line("Exported", result))
    console.print(export_report(result.manifest))
    console.print(f"Files in [bold]{result.out}[/]")
    if not failed:
        console.print(f"Next: [bold cyan]ee run --tflite {result.out} --data ./test_photos[/]")


@app.command(
    name="run",
    rich_help_panel="On device",
    epilog="Examples:  ee run --tflite exports/my-int8_full --data ./test_photos   ·   ee run --tflite exports/my-none --data ./test_photos --threads 4 --limit 500",
)
def run_command(
    tflite: Annotated[Optional[str], typer.Option("--tflite", help="An `ee export` folder.", rich_help_panel="Photos")] = None,
    data: Annotated[Optional[str], typer.Option(help="Photos: labelled (one sub-folder per class) for accuracy, or unlabelled.", rich_help_panel="Photos")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use at most this many photos, drawn with --seed (default all).", rich_help_panel="Photos")] = None,
    threads: Annotated[Optional[int], typer.Option(help="LiteRT threads (default 1).", rich_help_panel="Run")] = None,
    profile_runs: Annotated[Optional[int], typer.Option(help="Timed calls per stage and per exit path in the latency profile (default 200).", rich_help_panel="Run")] = None,
    seed: Annotated[Optional[int], SEED_OPTION] = None,
    config: Annotated[Optional[Path], CONFIG_OPTION] = None,
    as_json: Annotated[bool, JSON_OPTION] = False,
) -> None:
    """Run the exported early-exit cascade in LiteRT photo by photo: accuracy, exit histogram, real latency."""
    flags = _flags(locals())
    with user_errors():
        from ee_cli.config import RunConfig, resolve
        from ee_cli.run import run_cascade

        report = run_cascade(resolve(RunConfig, "run", config, flags))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from ee_cli.render import run_report

    _console().print(run_report(report))
