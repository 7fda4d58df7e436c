"""Rich renderings of pipeline results (the CLI's only view code)."""

from __future__ import annotations

from typing import Any


def attach_table(meta: dict[str, Any]):
    from rich.table import Table

    backbone = meta["backbone"]
    shape = "×".join(str(d) for d in meta["input"]["shape"])
    table = Table(title=f"{backbone['name']} @ {shape}, {len(meta['classes'])} classes, weights: {backbone['weights']}")
    for column in ("exit", "graft layer", "feature map", "depth %", "cum. MFLOPs", "head params"):
        table.add_column(column, justify="left" if column in ("exit", "graft layer") else "right", no_wrap=column == "graft layer")
    for exit_ in meta["exits"]:
        table.add_row(
            exit_["name"],
            exit_["graft_layer"],
            "×".join(str(d) for d in exit_["feature_shape"]),
            f"{100 * exit_['relative_depth']:.1f}",
            f"{exit_['cumulative_mflops']:,.1f}",
            f"{exit_['head_params']:,}",
        )
    final = meta["final"]
    table.add_row("final", "(classifier)", "", "100.0", f"{final['cumulative_mflops']:,.1f}", "frozen", style="dim")
    table.caption = "depth %: share of the backbone's MFLOPs before the exit · cum. MFLOPs: a photo leaving at this exit (backbone prefix + its head)"
    return table


def graft_points_table(survey: dict[str, Any]):
    """`ee attach --list-graft-points`: every candidate with its cumulative compute and chosen exit."""
    from rich.table import Table

    shape = "×".join(str(d) for d in survey["input_shape"])
    table = Table(title=f"Graft points of {survey['backbone']} @ {shape}", caption="depth %: share of the backbone's MFLOPs before the layer · cum. MFLOPs: the backbone up to it")
    for column in ("layer", "kind", "feature map", "depth %", "cum. MFLOPs", "exit"):
        table.add_column(column, justify="right" if column in ("depth %", "cum. MFLOPs") else "left", no_wrap=column == "layer")
    for row in survey["graft_points"]:
        table.add_row(
            row["layer"] + (f" (+ {row['carries']})" if row["carries"] else ""),
            row["kind"],
            "×".join(str(d) for d in row["feature_shape"]),
            f"{100 * row['relative_depth']:.1f}",
            f"{row['cumulative_mflops']:,.1f}",
            row["exit"] or "",
        )
    return table


def personalise_report(meta: dict[str, Any], metrics: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table

    photos = metrics["photos"]
    skipped = ", ".join(f"{n} {why}" for why, n in photos["skipped"].items()) or "none"
    shares = ", ".join(f"{name} {100 * share:.0f}%" for name, share in metrics["class_shares"].items() if share >= 0.01)
    adapted = metrics["adapted_bn"]
    lines = [
        f"Photos: {photos['unlabelled']} unlabelled, {photos['labelled']} labelled; skipped: {skipped}",
        f"BatchNorm statistics re-estimated on {adapted['photos']} photos: {len(adapted['layers'])} of {adapted['of']} layers",
        f"Predicted class shares: {shares}",
        f"Personal classes: {', '.join(metrics['personal_classes'])}" + (" (outputs shifted by the estimated mix)" if meta.get("class_prior") else ""),
    ]
    if adapted.get("note"):
        lines.insert(2, f"Note: {adapted['note']}")
    kept_start = (metrics["holdout"].get("do_no_harm") or {}).get("harm")
    if kept_start:
        lines.append(f"Do no harm: {kept_start}; the bundle keeps the generic classifier with these statistics and classes, every exit off")
    if metrics["cache"]:
        lines.append(f"Feature cache: {metrics['cache']['bytes'] / 1e6:.1f} MB, built in {metrics['cache']['build_seconds']:.1f} s; heads trained in {metrics['train_seconds']:.1f} s")
    holdout = metrics["holdout"]
    score_name = "accuracy" if "accuracy" in holdout["kind"] else "agreement"
    table = Table(title=f"Exits, scored on {holdout['photos']} held-out photos the heads never trained on",
                  caption=f"MFLOPs: a photo leaving here, the backbone up to the exit and its head (the heads of earlier exits add to it when on) · "
                          f"{score_name}: {holdout['kind']} · confident: share of training photos confident enough (≥ --pseudo-label-confidence) "
                          "to be a FixMatch target in the last epoch · threshold: a photo leaves at the first exit whose top probability reaches it · "
                          "leaves here: predicted share of photos")
    for column in ("exit", "depth %", "MFLOPs", score_name, "confident", "threshold", "leaves here"):
        table.add_column(column, justify="left" if column == "exit" else "right")
    last = metrics["last_epoch"] or {}
    chosen = metrics["policy"]
    shares = (chosen.get("predicted") or {}).get("shares") or []
    for index, exit_ in enumerate([*meta["exits"], meta["final"] | {"threshold": "—"}]):
        score = holdout["scores"].get(exit_["name"])
        mask = last.get(f"{exit_['name']}/mask_rate")
        threshold = exit_["threshold"]
        table.add_row(
            exit_["name"],
            f"{100 * exit_['relative_depth']:.0f}",
            f"{exit_['cumulative_mflops']:,.1f}",
            "—" if score is None else f"{100 * score:.1f}%",
            "—" if mask is None else f"{100 * mask:.0f}%",
            "off" if threshold is None else (threshold if isinstance(threshold, str) else f"{threshold:.3f}"),
            f"{100 * shares[index]:.0f}%" if index < len(shares) else "—",
        )
    return Group(*lines, table, f"Exit policy ({chosen['operating_point']}): {chosen['reason']}")


def baseline_report(metrics: dict[str, Any]):
    """`ee personalise --method NAME` for a label-free baseline: what it changed, at what cost."""
    from rich.console import Group

    lines = [f"Method: {metrics['method']} (a label-free baseline; the backbone {'changed' if metrics['changes_backbone'] else 'unchanged'})",
             f"Photos: {metrics['photos']['unlabelled']} unlabelled; BatchNorm statistics re-estimated in {len(metrics['adapted_bn']['layers'])} of {metrics['adapted_bn']['of']} layers"]
    steps = metrics.get("entropy_steps")
    if steps:
        lines.append(f"Entropy minimisation: {steps['steps']} steps on {steps['photos_used']} photos ({steps['backward_passes']} backward passes through the backbone); "
                     f"mean entropy {steps['mean_entropy_first']:.3f} -> {steps['mean_entropy_last']:.3f} nats")
    lines.append(f"Took {metrics['seconds']:.1f} s; the exits are the input bundle's, off (ee evaluate can set thresholds)")
    return Group(*lines)


def evaluate_report(metrics: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table

    measure = metrics["measure"]
    exits = Table(title=f"Exits on {metrics['photos']['report']} report photos ({measure})",
                  caption="MFLOPs: a photo leaving at this exit, with the heads of the exits it passed · Keras/LiteRT: median/p90 latency of the network up to the exit, batch 1 · "
                          "leaves here: share of report photos at the chosen thresholds")
    lite = any("litert_p50_ms" in row for row in metrics["exits"])
    columns = ["exit", "depth %", "MFLOPs", measure.split(" ")[0], "Keras p50/p90 ms", *(["LiteRT p50/p90 ms"] if lite else []), "threshold", "leaves here"]
    for column in columns:
        exits.add_column(column, justify="left" if column == "exit" else "right")
    for row in metrics["exits"]:
        threshold = row["threshold"]
        lite_cell = [f"{row['litert_p50_ms']:.3f}/{row['litert_p90_ms']:.3f}" if "litert_p50_ms" in row else "—"] if lite else []
        exits.add_row(
            row["exit"], f"{100 * row['relative_depth']:.0f}", f"{row['cumulative_mflops']:,.1f}", f"{100 * row['accuracy']:.1f}%",
            f"{row['latency_p50_ms']:.2f}/{row['latency_p90_ms']:.2f}", *lite_cell,
            "—" if threshold is None else ("off" if threshold > 1 else f"{threshold:.3f}"), f"{100 * row['share_leaving']:.0f}%",
        )
    points = Table(title="Operating points (thresholds chosen on one split, reported on the other)",
                   caption="vs: what the policy is held to · change: points against it, negative is a loss (95 % bootstrap interval) · "
                           "predicted speed-up: the plain model's MFLOPs over the mean MFLOPs per photo · oracle: every photo at its earliest right exit")
    for column in ("policy", "vs", measure.split(" ")[0], "change (95% CI), pts", "mean MFLOPs", "predicted speed-up"):
        points.add_column(column, justify="left" if column in ("policy", "vs") else "right")
    for name, point in metrics["operating_points"].items():
        low, high = point["drop_ci95_points"]
        marker = " ←" if name == metrics["used"] else ""
        points.add_row(f"{name}{marker}", f"{point['reference']} {100 * point['reference_accuracy']:.1f}%", f"{100 * point['accuracy']:.1f}%",
                       f"{-point['drop_points']:+.2f} ({-high:+.2f}, {-low:+.2f})", f"{point['mean_mflops']:,.1f}", f"{point['cut']:.2f}×")
    stored = metrics.get("as_stored")
    if stored:
        points.add_row(f"as stored ({stored['set_by']}: {stored['operating_point']})", "—", f"{100 * stored['accuracy']:.1f}%", "",
                       f"{stored['mean_mflops']:,.1f}", f"{stored['cut']:.2f}×")
    oracle = metrics["oracle"]
    points.add_row("oracle", "—", f"{100 * oracle['accuracy']:.1f}%", "", f"{oracle['mean_mflops']:,.1f}", f"{oracle['cut']:.2f}×", style="dim")
    lines = [f"{name} model: {100 * b['accuracy']:.1f}%" for name, b in metrics["baselines"].items()]
    return Group(exits, points, *lines)


def export_report(manifest: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table

    files = Table(title=f"TFLite files ({manifest['quant']}; input {manifest['input']['dtype']}, scale {manifest['input']['scale']:.4g}, zero point {manifest['input']['zero_point']})")
    files.add_column("file")
    files.add_column("size", justify="right")
    for name, size in manifest["files"].items():
        files.add_row(name, f"{size / 1024:,.1f} kB")
    files.add_row("total", f"{manifest['total_bytes'] / 1024:,.1f} kB", style="bold")
    validation = manifest["validation"]
    cascade = manifest["cascade"]
    labelled = any(entry.get("accuracy_delta_points") is not None for entry in validation["exits"].values())
    checks = Table(title=f"Validation against float Keras on {validation['on']}",
                   caption="agreement: same top class as float Keras · max |Δp|: largest probability difference"
                           + (" · accuracy change: points against float Keras" if labelled else "") + " · in cascade: whether the exported cascade stops there")
    for column in ("exit", "top-1 agreement", "max |Δp|", *(["accuracy change, pts"] if labelled else []), "in cascade"):
        checks.add_column(column, justify="left" if column in ("exit", "in cascade") else "right")
    for name, entry in validation["exits"].items():
        delta = entry.get("accuracy_delta_points")
        used = "yes" if name in cascade["stops_after"] else "dropped"
        checks.add_row(name, f"{100 * entry['top1_agreement']:.1f}%", f"{entry['max_probability_difference']:.4f}",
                       *([("—" if delta is None else f"{delta:+.2f}")] if labelled else []), used)
    recorded = (cascade["policy"].get("from_bundle") or {}).get("thresholds") or []
    off_here = [e["name"] for e, t in zip(manifest["exits"], recorded) if t is not None and e["name"] not in cascade["stops_after"]]
    lines = [f"Cascade: {len(cascade['signatures'])} stages, stopping after {', '.join(cascade['stops_after'])}; weights {cascade['weights']}",
             *([f"Dropped here, though on in the bundle: {', '.join(off_here)} (in measured LiteRT time each costs more than it saves; --policy recorded keeps the bundle's exits)"] if off_here else []),
             f"Exit policy: {cascade['policy']['reason']}",
             "Validation: passed" if validation["passed"] else f"Validation FAILED: {validation['failure']}"]
    return Group(files, checks, *lines)


def run_report(report: dict[str, Any]):
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"Early-exit cascade in LiteRT ({report['threads']} thread(s), {report['photos']} photos, {report['quant']})",
                  caption="photos leaving: photos whose first confident exit this is (the rest run on)")
    for column in ("exit", "photos leaving", "share"):
        table.add_column(column, justify="left" if column == "exit" else "right")
    for name, count in report["histogram"].items():
        table.add_row(name, str(count), f"{100 * count / report['photos']:.0f}%")
    lines = [
        f"Cascade latency per photo: mean {report['cascade_ms']['mean']:.3f} ms, p90 {report['cascade_ms']['p90']:.3f} ms",
        f"Plain model (final.tflite), same photos, in turns: mean {report['full_ms']['mean']:.3f} ms, p90 {report['full_ms']['p90']:.3f} ms",
        f"Measured speed-up: {report['speedup']:.2f}× (LiteRT wall time, mean over these {report['photos']} photos, {report['threads']} thread(s))",
    ]
    if report.get("accuracy") is not None:
        lines.append(f"Accuracy: cascade {100 * report['accuracy']:.2f}%, full model {100 * report['full_accuracy']:.2f}%")
        outside = report.get("photos_of_classes_outside_the_export") or {}
        if outside:
            lines.append(f"Note: {sum(outside.values())} photos of {', '.join(outside)} (not among the export's classes) count as wrong")
    profile = report["profile"]
    stages = Table(title=f"Latency profile on one photo (medians of {report['timed_runs']} timed calls)",
                   caption=f"stage ms: that stage's signature call alone · to this exit: the engine run until a photo leaves there · "
                           f"share: of the plain model's {profile['plain_ms']:.3f} ms (over 100 % at an exit: stopping there costs more than the plain model) · "
                           "MFLOPs share: of the plain model's compute")
    for column in ("exit", "stage ms", "to this exit ms", "latency share", "MFLOPs share"):
        stages.add_column(column, justify="left" if column == "exit" else "right")
    for index, (name, cumulative) in enumerate(profile["cumulative_ms"].items()):
        stages.add_row(name, f"{profile['stage_ms'][index]:.3f}", f"{cumulative:.3f}", f"{100 * profile['latency_share'][name]:.0f}%", f"{100 * profile['mflops_share'][name]:.0f}%")
    lines.append(f"Predicted speed-up from this profile and the exits taken: {profile['predicted_speedup']:.2f}× (measured above: {report['speedup']:.2f}×); "
                 f"running the cascade to the final exit costs {100 * (profile['cascade_to_final_vs_plain'] - 1):+.1f}% against the plain model")
    return Group(table, stages, *lines)
