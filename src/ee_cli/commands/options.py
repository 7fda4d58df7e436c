"""Every command-line option's meaning, said once: one help text per name, whichever command takes
it, with its default read from that command's config dataclass (so help and behaviour cannot
disagree). The CLI builds its options here; a test checks that no two names share a meaning and no
name has two.

Units: compute is counted in MFLOPs everywhere (a multiply-add counts as 2 FLOPs); a speed-up is
either *predicted* (from compute or measured stage costs and the photos' evidence) or *measured*
(LiteRT, wall time) and is always called one of the two.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import typer

PATH_OPTIONS = {"data", "labelled", "bundle", "out", "export", "config", "calibration", "validate", "unlabelled", "generic_bundle"}

HELP: dict[str, str] = {
    # Photos and files
    "data": "Folder of the person's photos (any nesting; JPEG, PNG, ...; unreadable files are skipped and counted). Labelled where a command reports accuracy: one sub-folder per class.",
    "labelled": "Optional folder of labelled photos, one sub-folder per class.",
    "bundle": "The bundle to read (default: the latest written here).",
    "out": "Where to write the output folder (default: bundles/<name> or exports/<name>-<mode>, numbered if taken).",
    "exist_ok": "Replace the --out folder if it exists.",
    "export": "An `ee export` folder (its manifest.json and .tflite files).",
    "unlabelled": "Held-out unlabelled photos: choose the exit thresholds on them without labels (agreement with the final exit).",
    "generic_bundle": "The generic model's bundle, for the baselines (default: the first bundle in this one's provenance).",
    "calibration": "Photos for int8 calibration (default: the person's photos recorded in the bundle; at least 100).",
    "validate": "Held-out photos to check the .tflite files against float Keras (labelled adds accuracy; default: calibration photos not used to calibrate).",
    "trust_model_code": "Load a model file even if it carries code: Lambda layers (Python bytecode), custom layers, TF calls other than tensor maths, SavedModel folders. Only for files whose author you trust.",
    # Backbone and exits (attach)
    "backbone": "resnet50 | mobilenet_v2 | efficientnet_b0 | cifar_resnet9, or a tf_keras model file (.h5, .keras) taking RGB 0..255.",
    "weights": "imagenet | none | PATH to a weights file (default: imagenet; none for cifar_resnet9).",
    "input_size": "Square input size in pixels (default: the backbone's, 224 or 32).",
    "num_classes": "Classifier size of a backbone built without ImageNet weights.",
    "classes": "Class names: a,b,c or a file with one per line (default: ImageNet's names, else 0..N-1).",
    "exits": "Exit positions as fractions of the backbone's MFLOPs, each taken to the nearest block output.",
    "exit_layers": "Graft onto these block-output layers instead (comma-separated names; see --list-graft-points).",
    "list_graft_points": "List every graft point with its share of the MFLOPs, mark where --exits would go, and write nothing.",
    "head": "Exit head: light (average-pool to a 4x4 grid -> dense -> dense; cheap to cache and train) or conv (2 convs -> pool -> dense, as drawn in the paper).",
    # Personalisation
    "method": "ee (early BatchNorm statistics, classes and exits on a frozen backbone), or a label-free baseline to compare against: source (the generic model), bn (every BatchNorm layer's statistics), tent, eata (entropy minimisation of the BatchNorm scales and offsets). lame corrects each test batch's outputs and writes no model: the benchmark runs it.",
    "adapt_bn": "Re-estimate the first N BatchNorm layers' statistics on the photos: N, auto (as deep as the generic model's confident predictions hold, at most half) or 0.",
    "personal_classes": "auto (labelled classes, else every class the photos' estimated class mix does not rule out: see --class-share), all, or a,b,c.",
    "class_share": "auto: a class stays in the person's set when its share of the class mix (estimated by EM from the adapted model's probabilities) is at least this fraction of an even share (1/classes), so the cut scales from 10 to 1,000 classes.",
    "no_class_prior": "Restrict the outputs to the inferred classes only, without shifting them by the estimated class mix (EM's label-shift correction, on by default: a class kept wrongly then draws few photos).",
    "prior_temperature": "Divide the generic model's logits by this before the class mix is estimated (calibrates an over-confident model).",
    "views": "Weak/strong view pairs cached per photo.",
    "epochs": "Epochs over the cached features.",
    "batch": "Batch size.",
    "learning_rate": "Adam learning rate.",
    "pseudo_label_confidence": "Teacher confidence a photo needs to give a pseudo-label or a FixMatch target (not an exit threshold).",
    "temperature": "Distillation temperature.",
    "distill_weight": "Weight of distillation from the teacher.",
    "pseudo_weight": "Weight of the teacher's confident hard labels on strong views.",
    "fixmatch_weight": "Weight of FixMatch consistency.",
    "supervised_weight": "Weight of cross-entropy on labelled photos.",
    "exit_teacher": "What the early exits learn from: generic (the frozen generic classifier, restricted to the personal classes) or final (the personalised final exit as it trains).",
    "holdout": "Share of photos held out of training; the exit thresholds are chosen on them, label-free (at least 30 photos set thresholds).",
    "no_cache": "Push photos through the backbone every step instead of caching features (for comparison).",
    "engine": "tensorflow, or litert: train through personalise.tflite in the LiteRT interpreter (builtin ops only, a process without TensorFlow), as a phone would.",
    "resume": "Continue the latest unfinished run with the same settings.",
    # Exit policy
    "max_drop": "Points the early exits may cost against the final exit: of accuracy on labelled photos, of agreement with the final exit on unlabelled ones.",
    "margin_z": "Threshold margin: standard errors of the paired difference the exits must clear (1.645: one-sided 95 %).",
    "threshold_share": "Share of the labelled photos that chooses the thresholds; the rest reports.",
    "use": "Thresholds to put in the bundle: keep | match-generic | match-restricted | label-free.",
    "criterion": "Exit confidence: maxprob or entropy.",
    # Export
    "tflite": "Export TFLite files (the only format so far; required).",
    "quant": "none | fp16 | dynamic | int8 (float fallback) | int8_full (integer only: smallest and fastest on phone CPUs, raw uint8 pixels in).",
    "input_type": "int8_full input and output type: uint8 or int8.",
    "calibration_photos": "Photos used to calibrate int8.",
    "validation_photos": "Photos used to validate.",
    "max_accuracy_drop": "Fail (exit 1) if an exit loses more points than this against float Keras.",
    "qat": "Quantisation-aware training of the exit heads (tfmot) before an int8 export.",
    "qat_steps": "QAT steps.",
    "policy": "measured: time every stage and head in LiteRT (this mode, --threads) and re-choose the exits and thresholds on the bundle's evidence, dropping exits that cost more than they save | recorded: the bundle's thresholds as they are.",
    "trainable": "Also write personalise.tflite: features, bn_stats, train, infer, get_weights and set_weights signatures, builtin ops only, so a phone trains its exits in LiteRT.",
    # Running and timing
    "limit": "Use at most this many photos, drawn with --seed (default: all).",
    "threads": "LiteRT threads.",
    "timed_runs": "Timed calls per exit (and per cascade stage) after warm-up calls, for the latency figures.",
    "quiet": "No progress display.",
    "seed": "Random seed.",
    "config": "TOML file with a table per command ([attach], ...); flags override it.",
    "as_json": "Print the result as JSON instead of tables.",
}

FLAGS = {"exist_ok", "trust_model_code", "list_graft_points", "no_cache", "no_class_prior", "resume", "qat", "trainable", "quiet", "as_json", "tflite"}
SHORT = {"quiet": "-q"}
PANELS = {
    "Photos": {"data", "labelled", "bundle", "export", "unlabelled", "generic_bundle", "calibration", "validate", "calibration_photos", "validation_photos", "limit"},
    "Output": {"out", "exist_ok"},
    "Run": {"threads", "timed_runs", "quiet", "seed", "config", "as_json", "resume", "trust_model_code"},
}


def option(name: str, config_class: type | None = None, panel: str | None = None, **extra: Any):
    """The typer.Option for config field `name`: its one help text, the default the command's
    config dataclass holds (when it says more than 'not set'), `<path>` for folders and files, and
    no type label on on/off flags."""
    text = _with_default(HELP[name], _default_clause(name, config_class))
    names = (flag_of(name), *([SHORT[name]] if name in SHORT else []))
    metavar = "" if name in FLAGS else ("<path>" if name in PATH_OPTIONS else None)
    return typer.Option(*names, help=text.replace("[", "\\["), rich_help_panel=panel or _panel(name), metavar=metavar, **extra)


def flag_of(name: str) -> str:
    """The command-line spelling of config field `name`."""
    return "--json" if name == "as_json" else "--" + name.replace("_", "-")


def _panel(name: str) -> str:
    return next((panel for panel, names in PANELS.items() if name in names), "Options")


def _default_clause(name: str, config_class: type | None) -> str:
    if config_class is None or name in FLAGS:
        return ""
    fields = {field.name: field for field in dataclasses.fields(config_class)}
    if name not in fields:
        return ""
    default = fields[name].default
    if default is None or default is False or default == ():
        return ""
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
    return f" (default {shown})"


def _with_default(text: str, clause: str) -> str:
    """`clause` inside the sentence: 'LiteRT threads (default 1).'"""
    return text[:-1] + clause + "." if clause and text.endswith(".") else text + clause


COMMAND_CONFIGS = {"attach": "AttachConfig", "personalise": "PersonaliseConfig", "evaluate": "EvaluateConfig", "export": "ExportConfig", "run": "RunConfig"}
CLI_ONLY = {"list_graft_points": "attach", "no_cache": "personalise", "no_class_prior": "personalise", "tflite": "export", "config": "*", "as_json": "*"}  # flags no config field holds


def reference_table() -> str:
    """README's option reference: every option once, the commands that take it and each one's default."""
    from ee_cli.base import config

    rows = []
    for name, text in HELP.items():
        takes = []
        for command, class_name in COMMAND_CONFIGS.items():
            fields = {field.name: field for field in dataclasses.fields(getattr(config, class_name))}
            if name in fields or CLI_ONLY.get(name) in (command, "*"):
                clause = _default_clause(name, getattr(config, class_name)).strip(" ()").removeprefix("default ")
                takes.append(f"{command}" + (f" ({clause})" if clause else ""))
        if takes:
            rows.append(f"| `{flag_of(name)}` | {', '.join(takes)} | {text.replace('|', '&#124;')} |")
    return "\n".join(["| option | commands (default) | meaning |", "|---|---|---|", *rows])
