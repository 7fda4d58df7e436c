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

from ee_cli.base.config import AttachConfig, EvaluateConfig, ExportConfig, PersonaliseConfig, RunConfig
from ee_cli.base.errors import UserError
from ee_cli.commands.options import option


class _HelpFlag:
    """--help is an on/off flag: show no `<bool>` after it."""

    def get_help_option(self, ctx):
        found = super().get_help_option(ctx)
        if found is not None:
            found.metavar = ""
        return found


class _Group(_HelpFlag, typer.core.TyperGroup):
    pass


class _Command(_HelpFlag, typer.core.TyperCommand):
    pass


app = typer.Typer(
    name="ee",
    cls=_Group,
    help=(
        "Personalise an image classifier on one person's photos with early exits (PersEPhonEE).\n\n"
        "The flow; each step reads the bundle the one before it wrote:\n\n"
        "\b\n"
        "  1. ee attach --backbone resnet50        graft early exits onto a generic CNN\n"
        "  2. ee personalise --data ./photos       the person's BatchNorm statistics, classes and exits, label-free\n"
        "  3. ee evaluate --data ./labelled        optional, with labels: profile every exit, re-choose the thresholds\n"
        "  4. ee export --tflite                   the LiteRT cascade; keeps only exits that pay in measured LiteRT time\n"
        "  5. ee run --export exports/NAME --data ./photos   the cascade photo by photo: accuracy, exits taken, measured speed-up"
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.", metavar="")] = False,
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
    cls=_Command,
    rich_help_panel="Pipeline",
    epilog="Examples:  ee attach --backbone resnet50   ·   ee attach --backbone cifar_resnet9 --exits 0.2,0.4,0.8 --head conv   ·   ee attach --backbone my_model.h5 --classes cat,dog",
)
def attach(
    backbone: Annotated[Optional[str], option("backbone", AttachConfig, panel="Backbone")] = None,
    weights: Annotated[Optional[str], option("weights", AttachConfig, panel="Backbone")] = None,
    input_size: Annotated[Optional[int], option("input_size", AttachConfig, panel="Backbone")] = None,
    num_classes: Annotated[Optional[int], option("num_classes", AttachConfig, panel="Backbone")] = None,
    classes: Annotated[Optional[str], option("classes", AttachConfig, panel="Backbone")] = None,
    exits: Annotated[Optional[str], option("exits", AttachConfig, panel="Exits")] = None,
    exit_layers: Annotated[Optional[str], option("exit_layers", AttachConfig, panel="Exits")] = None,
    list_graft_points: Annotated[bool, option("list_graft_points", AttachConfig, panel="Exits")] = False,
    head: Annotated[Optional[str], option("head", AttachConfig, panel="Exits")] = None,
    out: Annotated[Optional[str], option("out", AttachConfig)] = None,
    exist_ok: Annotated[bool, option("exist_ok", AttachConfig)] = False,
    trust_model_code: Annotated[bool, option("trust_model_code", AttachConfig)] = False,
    quiet: Annotated[bool, option("quiet", AttachConfig)] = False,
    seed: Annotated[Optional[int], option("seed", AttachConfig)] = None,
    config: Annotated[Optional[Path], option("config", AttachConfig)] = None,
    as_json: Annotated[bool, option("as_json", AttachConfig)] = False,
) -> None:
    """Step 1: graft early exits onto a pretrained CNN and write a multi-exit bundle."""
    flags = _flags(locals(), leave_out=("list_graft_points",))
    with user_errors():
        from ee_cli.commands.attach import attach as run_attach, survey
        from ee_cli.base.config import resolve

        flags |= {"exits": _floats(exits, "--exits"), "exit_layers": _names(exit_layers)}
        settings = resolve(AttachConfig, "attach", config, flags)
        with _status(f"Building {settings.backbone}" + ("" if list_graft_points else " and grafting exits"), quiet=settings.quiet or as_json):
            result = survey(settings) if list_graft_points else run_attach(settings)
    if as_json:
        typer.echo(json.dumps(result.as_json(), indent=2))
        return
    from ee_cli.commands.render import attach_table, graft_points_table

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
    cls=_Command,
    rich_help_panel="Pipeline",
    epilog="Examples:  ee personalise --data ./user_photos   ·   ee personalise --data ./photos --labelled ./labelled --epochs 50   ·   ee personalise --data ./photos --resume",
)
def personalise(
    data: Annotated[Optional[str], option("data", PersonaliseConfig)] = None,
    labelled: Annotated[Optional[str], option("labelled", PersonaliseConfig)] = None,
    bundle: Annotated[Optional[str], option("bundle", PersonaliseConfig)] = None,
    method: Annotated[Optional[str], option("method", PersonaliseConfig, panel="Personalisation")] = None,
    adapt_bn: Annotated[Optional[str], option("adapt_bn", PersonaliseConfig, panel="Personalisation")] = None,
    personal_classes: Annotated[Optional[str], option("personal_classes", PersonaliseConfig, panel="Personalisation")] = None,
    class_share: Annotated[Optional[float], option("class_share", PersonaliseConfig, panel="Personalisation")] = None,
    no_class_prior: Annotated[bool, option("no_class_prior", PersonaliseConfig, panel="Personalisation")] = False,
    prior_temperature: Annotated[Optional[float], option("prior_temperature", PersonaliseConfig, panel="Personalisation")] = None,
    views: Annotated[Optional[int], option("views", PersonaliseConfig, panel="Training")] = None,
    epochs: Annotated[Optional[int], option("epochs", PersonaliseConfig, panel="Training")] = None,
    batch: Annotated[Optional[int], option("batch", PersonaliseConfig, panel="Training")] = None,
    learning_rate: Annotated[Optional[float], option("learning_rate", PersonaliseConfig, panel="Training")] = None,
    pseudo_label_confidence: Annotated[Optional[float], option("pseudo_label_confidence", PersonaliseConfig, panel="Training")] = None,
    temperature: Annotated[Optional[float], option("temperature", PersonaliseConfig, panel="Training")] = None,
    distill_weight: Annotated[Optional[float], option("distill_weight", PersonaliseConfig, panel="Training")] = None,
    pseudo_weight: Annotated[Optional[float], option("pseudo_weight", PersonaliseConfig, panel="Training")] = None,
    fixmatch_weight: Annotated[Optional[float], option("fixmatch_weight", PersonaliseConfig, panel="Training")] = None,
    supervised_weight: Annotated[Optional[float], option("supervised_weight", PersonaliseConfig, panel="Training")] = None,
    exit_teacher: Annotated[Optional[str], option("exit_teacher", PersonaliseConfig, panel="Training")] = None,
    holdout: Annotated[Optional[float], option("holdout", PersonaliseConfig, panel="Exits")] = None,
    max_drop: Annotated[Optional[float], option("max_drop", PersonaliseConfig, panel="Exits")] = None,
    margin_z: Annotated[Optional[float], option("margin_z", PersonaliseConfig, panel="Exits")] = None,
    no_cache: Annotated[bool, option("no_cache", PersonaliseConfig, panel="Training")] = False,
    engine: Annotated[Optional[str], option("engine", PersonaliseConfig, panel="Training")] = None,
    resume: Annotated[bool, option("resume", PersonaliseConfig)] = False,
    quiet: Annotated[bool, option("quiet", PersonaliseConfig)] = False,
    out: Annotated[Optional[str], option("out", PersonaliseConfig)] = None,
    exist_ok: Annotated[bool, option("exist_ok", PersonaliseConfig)] = False,
    trust_model_code: Annotated[bool, option("trust_model_code", PersonaliseConfig)] = False,
    seed: Annotated[Optional[int], option("seed", PersonaliseConfig)] = None,
    config: Annotated[Optional[Path], option("config", PersonaliseConfig)] = None,
    as_json: Annotated[bool, option("as_json", PersonaliseConfig)] = False,
) -> None:
    """Step 2: adapt a bundle to one person's photos, mostly unlabelled: BatchNorm statistics, classes, exit heads and their thresholds (backbone frozen)."""
    flags = _flags(locals(), leave_out=("no_cache", "no_class_prior")) | {"cache": False if no_cache else None, "class_prior": False if no_class_prior else None}
    with user_errors():
        from ee_cli.commands.personalise import personalise as run_personalise

        result = _with_progress(run_personalise, PersonaliseConfig, "personalise", config, flags, as_json)
    if as_json:
        return _echo_json(result)
    from ee_cli.commands.render import baseline_report, personalise_report

    console = _console()
    console.print(_source_line("Personalised", result))
    console.print(personalise_report(result.meta, result.metrics) if result.metrics.get("method", "ee") == "ee" else baseline_report(result.metrics))
    console.print(f"Bundle written to [bold]{result.bundle_path}[/]; run details in {result.run_dir}")
    console.print("Next: [bold cyan]ee export --tflite[/]  (or first, with labelled photos: [bold cyan]ee evaluate --data ./labelled_photos[/] to re-choose the thresholds)")


def _with_progress(pipeline, config_class, section: str, toml: Optional[Path], flags: dict, as_json: bool):
    """Resolve the command's config (defaults < TOML < flags) and run its pipeline under a progress bar."""
    from ee_cli.base.config import resolve

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
    cls=_Command,
    rich_help_panel="Pipeline",
    epilog="Examples:  ee evaluate --data ./test_photos   ·   ee evaluate --data ./test_photos --use match-generic   ·   ee evaluate --data ./test_photos --unlabelled ./more_unlabelled --use label-free",
)
def evaluate(
    data: Annotated[Optional[str], option("data", EvaluateConfig)] = None,
    bundle: Annotated[Optional[str], option("bundle", EvaluateConfig)] = None,
    threshold_share: Annotated[Optional[float], option("threshold_share", EvaluateConfig, panel="Exits")] = None,
    max_drop: Annotated[Optional[float], option("max_drop", EvaluateConfig, panel="Exits")] = None,
    use: Annotated[Optional[str], option("use", EvaluateConfig, panel="Exits")] = None,
    margin_z: Annotated[Optional[float], option("margin_z", EvaluateConfig, panel="Exits")] = None,
    criterion: Annotated[Optional[str], option("criterion", EvaluateConfig, panel="Exits")] = None,
    unlabelled: Annotated[Optional[str], option("unlabelled", EvaluateConfig, panel="Exits")] = None,
    generic_bundle: Annotated[Optional[str], option("generic_bundle", EvaluateConfig)] = None,
    timed_runs: Annotated[Optional[int], option("timed_runs", EvaluateConfig)] = None,
    export: Annotated[Optional[str], option("export", EvaluateConfig)] = None,
    threads: Annotated[Optional[int], option("threads", EvaluateConfig)] = None,
    quiet: Annotated[bool, option("quiet", EvaluateConfig)] = False,
    out: Annotated[Optional[str], option("out", EvaluateConfig)] = None,
    exist_ok: Annotated[bool, option("exist_ok", EvaluateConfig)] = False,
    trust_model_code: Annotated[bool, option("trust_model_code", EvaluateConfig)] = False,
    seed: Annotated[Optional[int], option("seed", EvaluateConfig)] = None,
    config: Annotated[Optional[Path], option("config", EvaluateConfig)] = None,
    as_json: Annotated[bool, option("as_json", EvaluateConfig)] = False,
) -> None:
    """Step 3, optional: profile every exit on labelled photos and re-choose the exit thresholds (export again afterwards)."""
    flags = _flags(locals())
    with user_errors():
        from ee_cli.commands.evaluate import evaluate as run_evaluate

        result = _with_progress(run_evaluate, EvaluateConfig, "evaluate", config, flags, as_json)
    if as_json:
        return _echo_json(result)
    from ee_cli.commands.render import evaluate_report

    console = _console()
    console.print(_source_line("Profiled", result))
    console.print(evaluate_report(result.metrics))
    console.print(f"Plot: {result.plot}   Details: {result.run_dir}")
    console.print(f"Bundle with the '{result.metrics['used']}' thresholds written to [bold]{result.bundle_path}[/]")
    console.print("Next: [bold cyan]ee export --tflite[/]  (an export made before this from the same bundle keeps the old thresholds)")


@app.command(
    cls=_Command,
    name="export",
    rich_help_panel="Pipeline",
    epilog="Examples:  ee export --tflite   ·   ee export --tflite --quant none   ·   ee export --tflite --quant int8_full --calibration ./photos --validate ./test_photos",
)
def export_command(
    tflite: Annotated[bool, option("tflite", ExportConfig, panel="Format")] = False,
    quant: Annotated[Optional[str], option("quant", ExportConfig, panel="Format")] = None,
    input_type: Annotated[Optional[str], option("input_type", ExportConfig, panel="Format")] = None,
    bundle: Annotated[Optional[str], option("bundle", ExportConfig)] = None,
    calibration: Annotated[Optional[str], option("calibration", ExportConfig)] = None,
    validate: Annotated[Optional[str], option("validate", ExportConfig)] = None,
    max_accuracy_drop: Annotated[Optional[float], option("max_accuracy_drop", ExportConfig)] = None,
    calibration_photos: Annotated[Optional[int], option("calibration_photos", ExportConfig)] = None,
    validation_photos: Annotated[Optional[int], option("validation_photos", ExportConfig)] = None,
    qat: Annotated[bool, option("qat", ExportConfig, panel="Format")] = False,
    qat_steps: Annotated[Optional[int], option("qat_steps", ExportConfig, panel="Format")] = None,
    policy: Annotated[Optional[str], option("policy", ExportConfig, panel="Format")] = None,
    trainable: Annotated[bool, option("trainable", ExportConfig, panel="Format")] = False,
    threads: Annotated[Optional[int], option("threads", ExportConfig)] = None,
    quiet: Annotated[bool, option("quiet", ExportConfig)] = False,
    out: Annotated[Optional[str], option("out", ExportConfig)] = None,
    exist_ok: Annotated[bool, option("exist_ok", ExportConfig)] = False,
    trust_model_code: Annotated[bool, option("trust_model_code", ExportConfig)] = False,
    seed: Annotated[Optional[int], option("seed", ExportConfig)] = None,
    config: Annotated[Optional[Path], option("config", ExportConfig)] = None,
    as_json: Annotated[bool, option("as_json", ExportConfig)] = False,
) -> None:
    """Step 4: export a bundle as TFLite with a staged early-exit cascade, keeping the exits that pay in measured LiteRT time."""
    flags = _flags(locals(), leave_out=("tflite",))
    with user_errors():
        if not tflite:
            raise UserError("say which format: --tflite (the only one so far)")
        from ee_cli.commands.export import ValidationFailed
        from ee_cli.commands.export import export as run_export

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
    from ee_cli.commands.render import export_report

    console = _console()
    console.print(_source_line("Exported", result))
    console.print(export_report(result.manifest))
    console.print(f"Files in [bold]{result.out}[/]")
    if not failed:
        console.print(f"Next: [bold cyan]ee run --export {result.out} --data ./test_photos[/]")


@app.command(
    cls=_Command,
    name="run",
    rich_help_panel="On device",
    epilog="Examples:  ee run --export exports/my-int8_full --data ./test_photos   ·   ee run --export exports/my-none --data ./test_photos --threads 4 --limit 500",
)
def run_command(
    export: Annotated[Optional[str], option("export", RunConfig)] = None,
    data: Annotated[Optional[str], option("data", RunConfig)] = None,
    limit: Annotated[Optional[int], option("limit", RunConfig)] = None,
    threads: Annotated[Optional[int], option("threads", RunConfig)] = None,
    timed_runs: Annotated[Optional[int], option("timed_runs", RunConfig)] = None,
    quiet: Annotated[bool, option("quiet", RunConfig)] = False,
    seed: Annotated[Optional[int], option("seed", RunConfig)] = None,
    config: Annotated[Optional[Path], option("config", RunConfig)] = None,
    as_json: Annotated[bool, option("as_json", RunConfig)] = False,
) -> None:
    """Step 5: run the exported cascade in LiteRT photo by photo: accuracy, exits taken, measured latency and speed-up."""
    flags = _flags(locals())
    with user_errors():
        from ee_cli.base.config import resolve
        from ee_cli.commands.run import run_cascade

        settings = resolve(RunConfig, "run", config, flags)
        with _status("Running the cascade and the plain model in LiteRT, in turns", quiet=settings.quiet or as_json):
            report = run_cascade(settings)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from ee_cli.commands.render import run_report

    _console().print(run_report(report))
