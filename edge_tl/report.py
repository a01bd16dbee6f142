"""The run report: ``RUN_DIR/report.md``, ``RUN_DIR/report.html`` and PNG figures in ``RUN_DIR/plots/``.

``write_report(run_dir)`` is a pure consumer of what the stages left in the run directory:
run.json (required), metrics.json, pruned/metrics.json, quantized/<stage>/metrics.json, the
export manifests, verify/*.json, bench.json and recipe.yaml. Whatever is missing is said so in
its section, with the command that produces it. The report is built once as a small document
tree (:mod:`edge_tl.report_render`: sections of paragraphs, bullets, tables, figures) and rendered
twice, so Markdown and HTML say the same thing and text from the run (class names, paths) is
escaped in one place. Figures are written first (:mod:`edge_tl.plots`), then report.html, then
report.md, each atomically.
"""
from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from edge_tl import plots
from edge_tl.artifacts import atomic_write_text, read_json
from edge_tl.errors import ArtifactError
from edge_tl.report_render import (Block, Bullets, Code, Figure, Inline, Paragraph, Parts, Preformatted, Section,
                                   Strong, Table, render_html, render_markdown)

logger = logging.getLogger(__name__)

PLOTS_DIR = "plots"
_STAGE_ORDER = {"float": 0, "pruned": 1}
_PRECISION_ORDER = {"fp32": 0, "fp16": 1, "int8": 2}
_NONE = "—"


@dataclass(frozen=True)
class ReportResult:
    markdown_path: Path
    html_path: Path
    plot_paths: tuple[Path, ...]


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report reads from a run directory; absent optional files are None or empty."""

    run_dir: Path
    run_info: dict
    finetune_metrics: dict | None
    pruned_metrics: dict | None
    quantized: dict[str, dict]
    exports: tuple[dict, ...]
    verifications: tuple[dict, ...]
    bench: dict | None
    recipe_text: str | None


# --- reading the run ----------------------------------------------------------------------------
def _optional_json(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _artifact_key(record: dict) -> tuple:
    return (_STAGE_ORDER.get(record.get("stage"), 9), _PRECISION_ORDER.get(record.get("precision"), 9),
            _name(record).endswith(".engine"), _name(record))


def load_report_inputs(run_dir: str | os.PathLike) -> ReportInputs:
    """Read every file the report uses; a directory without run.json is an ArtifactError."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise ArtifactError(f"{run_dir} is not a run directory (no run.json); pass a directory made by "
                            f"`edge-tl finetune DATA_DIR --out {run_dir}` or `edge-tl run`")
    run_info = read_json(run_dir / "run.json")
    if not isinstance(run_info, dict) or not isinstance(run_info.get("classes"), list):
        raise ArtifactError(f"{run_dir / 'run.json'} lists no classes; rerun `edge-tl finetune` for this run")
    quantized = {path.parent.name: read_json(path) for path in (run_dir / "quantized").glob("*/metrics.json")}
    exports = [read_json(path) for pattern in ("*.onnx.json", "*.engine.manifest.json")
               for path in (run_dir / "export").glob(pattern)]
    verifications = [read_json(path) for path in (run_dir / "verify").glob("*.json")]
    recipe = run_dir / "recipe.yaml"
    return ReportInputs(
        run_dir=run_dir, run_info=run_info, finetune_metrics=_optional_json(run_dir / "metrics.json"),
        pruned_metrics=_optional_json(run_dir / "pruned" / "metrics.json"),
        quantized=dict(sorted(quantized.items(), key=lambda item: (_STAGE_ORDER.get(item[0], 9), item[0]))),
        exports=tuple(sorted((m for m in exports if isinstance(m, dict)), key=_artifact_key)),
        verifications=tuple(sorted((v for v in verifications if isinstance(v, dict)), key=_artifact_key)),
        bench=_optional_json(run_dir / "bench.json"),
        recipe_text=recipe.read_text(encoding="utf-8") if recipe.is_file() else None,
    )


def split_class_counts(run_info: dict) -> dict[str, dict[str, int]]:
    """Images per class in each split (``train``, ``val``) from run.json's file lists (``class/file``)."""
    counts = {}
    for name in ("train", "val"):
        files = (run_info.get("split") or {}).get(f"{name}_files")
        if isinstance(files, list):
            found = Counter(re.split(r"[\\/]", str(file), maxsplit=1)[0] for file in files)
            counts[name] = {cls: found.get(cls, 0) for cls in run_info["classes"]}
    return counts


def latency_speedups(rows: Sequence[dict]) -> list[float | None]:
    """Each bench row's ``latency_ratio`` (the float FP32 ONNX Runtime row's median latency over this
    row's, at the same batch size), computed from the rows where bench.json lacks it."""
    reference: dict[Any, float] = {}
    for row in rows:
        if (row.get("stage"), row.get("precision"), row.get("backend")) == ("float", "fp32", "onnxruntime") \
                and _name(row).endswith(".onnx") and _p50(row):
            reference.setdefault(row.get("batch_size"), _p50(row))
    return [row["latency_ratio"] if _num(row.get("latency_ratio")) else reference[row.get("batch_size")] / _p50(row)
            if reference.get(row.get("batch_size")) and _p50(row) else None for row in rows]


# --- number formats -----------------------------------------------------------------------------
_p50 = plots.median_latency_ms


def _num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pct(value: Any) -> str:
    return f"{100 * value:.2f} %" if _num(value) else _NONE


def _pts(value: Any) -> str:
    return f"{value:+.2f}" if _num(value) else _NONE


def _ms(value: Any) -> str:
    if not _num(value):
        return _NONE
    return f"{value:.3f}" if value < 10 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def _sci(value: Any) -> str:
    return f"{value:.2e}" if _num(value) else _NONE


def _si(value: Any) -> str:
    if not _num(value):
        return _NONE
    for scale, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:g}"


def _mb(value: Any) -> str:
    return f"{value / 1e6:.2f} MB" if _num(value) else _NONE


def _listed(value: Any) -> str:
    return ", ".join(map(str, value)) if isinstance(value, list) else _NONE if value is None else str(value)


def _verdict(record: Any) -> Inline:
    """PASS / FAIL / INCONCLUSIVE of a verify record (records before the three verdicts: its ``passed``)."""
    if not isinstance(record, dict):
        return _NONE
    verdict = record.get("verdict") or ("PASS" if record.get("passed") else "FAIL")
    return Strong(verdict, verdict.lower())


def _bound(record: dict, quantity: str) -> str:
    """The upper bound (points) the gate judged ``quantity`` on, from the record's statistics."""
    for interval in (record.get("statistics") or {}).get("intervals", []):
        if interval.get("quantity") == quantity:
            return f"{interval['upper_points']:.2f}"
    return _NONE


def _name(record: dict) -> str:
    return Path(str(record.get("artifact", "?"))).name


# --- sections -----------------------------------------------------------------------------------
def _recommended_section(inputs: ReportInputs) -> Section:
    title, bench = "Recommended artifact", inputs.bench
    if bench is None:
        return Section(title, (Paragraph(("None recommended yet: the run is not benchmarked; run ",
                                          Code(f"edge-tl bench {inputs.run_dir}"), " and then ",
                                          Code(f"edge-tl report {inputs.run_dir}"), ".")),))
    recommended = bench.get("recommended") or {}
    rejected = recommended.get("rejected") if isinstance(recommended.get("rejected"), dict) else {}
    not_chosen = tuple((Code(str(name)), f": {why}") for name, why in sorted(rejected.items()))
    others = (Paragraph("Not candidates:"), Bullets(not_chosen)) if rejected else ()
    if not recommended.get("artifact"):
        reason = recommended.get("reason") or "no benchmarked artifact passed verification"
        return Section(title, (Paragraph(f"No artifact recommended: {reason}."), *others))
    name, backend = Path(str(recommended["artifact"])).name, recommended.get("backend")
    batch_size = recommended.get("batch_size", 1)
    facts: list[Parts] = []
    rows = list(bench.get("rows") or [])
    for row, speedup in zip(rows, latency_speedups(rows)):
        if _name(row) == name and row.get("backend") == backend and row.get("batch_size") == batch_size:
            facts.append(f"batch-{batch_size} latency {_ms(_p50(row))} ms (median)"
                         + (f", {speedup:.2f}x the speed of the float FP32 ONNX model" if speedup else "")
                         + f", balanced accuracy {_pct(row.get('balanced_accuracy'))}")
    facts += [("verification against the float model of its stage: ", _verdict(record),
               f" (balanced accuracy {_pts(record.get('balanced_accuracy_delta'))} points, escape rate "
               f"{_pts(record.get('escape_rate_delta'))} points, top-1 agreement {_pct(record.get('top1_agreement'))})")
              for record in inputs.verifications if _name(record) == name]
    why = recommended.get("reason") or "no reason recorded in bench.json"
    lead = (Strong(name), *((" on ", Code(str(backend))) if backend else ()), f". Why: {why}.")
    return Section(title, (Paragraph(lead), Bullets(tuple(facts)), *others))


def _dataset_section(inputs: ReportInputs) -> Section:
    info = inputs.run_info
    classes, ok_class, split = info["classes"], info.get("ok_class"), info.get("split") or {}
    counts = split_class_counts(info)
    totals = info.get("class_counts") or {}
    splits = [name for name in ("train", "val") if name in counts]
    rows = []
    for cls in classes:
        per_split = [counts[name][cls] for name in splits]
        total = totals.get(cls, sum(per_split) if per_split else None)
        rows.append((cls + (" (ok class)" if cls == ok_class else ""), *map(str, per_split), _listed(total)))
    split_totals = [sum(counts[name].values()) for name in splits]
    rows.append(tuple(Strong(text) for text in ("all", *map(str, split_totals),
                                                 str(sum(totals.values()) if totals else sum(split_totals)))))
    lines: list[Parts] = [(f"{len(classes)} classes; ok (good part) class: ", Code(str(ok_class)) if ok_class
                           else "none", ".")]
    lines += [("images from ", Code(str(info["data_dir"])), ".")] if info.get("data_dir") else []
    lines += [f"stratified split, validation fraction {split.get('val_fraction', _NONE)}, seed "
              f"{split.get('seed', _NONE)}."] if split else []
    lines += [f"{len(info['skipped_files'])} unreadable files skipped."] if info.get("skipped_files") else []
    columns = ("class", *({"train": "train", "val": "validation"}[name] for name in splits), "total")
    return Section("Dataset", (Bullets(tuple(lines)), Table(columns, tuple(rows))))


def _stage_details(inputs: ReportInputs) -> tuple[str, ...]:
    info, tuned, pruned = inputs.run_info, inputs.finetune_metrics, inputs.pruned_metrics
    details = []
    if tuned:
        config = info.get("config") or {}
        details.append(f"fine-tuned: {info.get('backbone')} at {info.get('img_size')} px, "
                       f"{len(info.get('history') or [])} epochs run (at most {config.get('epochs', _NONE)}), "
                       f"{config.get('unfreeze') or 0} trunk blocks unfrozen; {tuned.get('num_samples')} "
                       "validation images.")
        if float(info.get("crop", 1.0)) < 1.0:
            details.append(f"inputs: the centre {info['crop']:g} of each squashed image (--crop).")
        point = info.get("operating_point")
        if point:
            details.append(f"escape budget {point['max_escape']:.1%}: the {info.get('ok_class')} logit is lowered by "
                           f"{point['ok_logit_shift']:.3f} in every artifact (chosen out of fold on the training "
                           f"split: escape {point['escape_rate']:.2%}, false reject {point['false_reject_rate']:.2%}).")
    if pruned:
        config, recovery = pruned.get("config") or {}, pruned.get("recovery") or {}
        details.append(f"pruned ({config.get('method', _NONE)}, sparsity {config.get('sparsity', _NONE)}): params "
                       f"{_si(pruned.get('parent_params'))} -> {_si(pruned.get('params'))}, MACs "
                       f"{_si(pruned.get('parent_macs'))} -> {_si(pruned.get('macs'))}, ONNX Runtime latency "
                       f"{_ms(pruned.get('parent_ort_latency_ms'))} -> {_ms(pruned.get('ort_latency_ms'))} ms; "
                       f"recovery kept epoch {recovery.get('best_epoch', _NONE)} of "
                       f"{max(len(recovery.get('history') or [1]) - 1, 0)}.")
    details += [f"quantized {stage}: {str(metrics.get('mode', _NONE)).upper()}, {metrics.get('method', _NONE)} "
                f"ranges from {metrics.get('calib_images', _NONE)} calibration images."
                for stage, metrics in inputs.quantized.items()]
    return tuple(details)


def _stages_section(inputs: ReportInputs, figures: dict[str, Figure]) -> Section:
    pruned = inputs.pruned_metrics or {}
    size = {"float": (pruned.get("parent_params"), pruned.get("parent_macs")),
            "pruned": (pruned.get("params"), pruned.get("macs"))}
    # (label, metrics, what the delta is against, the stage whose params and MACs apply)
    stages = [("fine-tuned (float)", inputs.finetune_metrics, "", "float")] if inputs.finetune_metrics else []
    stages += [("pruned", pruned, "vs fine-tuned", "pruned")] if pruned else []
    stages += [(f"quantized {stage} ({str(metrics.get('mode', '')).upper()} INT8, simulated)", metrics, f"vs {stage}",
                stage) for stage, metrics in inputs.quantized.items()]
    rows = tuple((label, _pct(m.get("accuracy")), _pct(m.get("balanced_accuracy")),
                  f"{_pts(m.get('balanced_accuracy_delta'))} ({against})" if against else _NONE,
                  _pct(m.get("escape_rate")), _pct(m.get("false_reject_rate")), *map(_si, size.get(stage, (None,) * 2)))
                 for label, m, against, stage in stages)
    blocks: list[Block] = [
        Table(("model", "accuracy", "balanced accuracy", "delta (points)", "escape rate", "false reject rate",
               "params", "MACs"), rows), Bullets(_stage_details(inputs))] if rows else [
        Paragraph(("No stage metrics found; run ", Code("edge-tl finetune"), " first."))]
    if inputs.exports:
        blocks.append(Paragraph("Exported artifacts (parity: largest logit difference from the PyTorch model on "
                                "random inputs):"))
        blocks.append(Table(("artifact", "stage", "precision", "size", "opset", "parity max abs diff", "sha256"), tuple(
            (Code(_name(m)), _listed(m.get("stage")), _listed(m.get("precision")), _mb(m.get("size_bytes")),
             _listed(m.get("opset")), _sci(m.get("max_abs_diff")), Code(str(m.get("sha256", ""))[:12]))
            for m in inputs.exports)))
    classes = inputs.run_info["classes"]
    series = plots.recall_series(classes, inputs.finetune_metrics, inputs.verifications)
    if series:
        blocks.append(Paragraph("Per-class recall on the validation split:"))
        blocks.append(Table(("class", *(label for label, _ in series)), tuple(
            (cls, *(_pct(recalls[i]) for _, recalls in series)) for i, cls in enumerate(classes))))
    blocks += [figures["recall"]] if "recall" in figures else []
    return Section("Stage metrics", tuple(blocks))


def _flips(flips: Any) -> str:
    ranked = sorted(flips.items(), key=lambda item: (-item[1], item[0])) if isinstance(flips, dict) else []
    shown = ", ".join(f"{pair} x{count}" for pair, count in ranked[:3]) or _NONE
    return shown + (f" (+{len(ranked) - 3} more)" if len(ranked) > 3 else "")


def _verification_section(inputs: ReportInputs, figures: dict[str, Figure]) -> Section:
    records = inputs.verifications
    if not records:
        return Section("Verification", (Paragraph(("No artifact verified yet; run ", Code(
            f"edge-tl verify {inputs.run_dir} ARTIFACT"), " for each exported artifact.")),))
    from edge_tl.gate import settle_text

    passed, first = sum(bool(r.get("passed")) for r in records), records[0]
    data = ", ".join(sorted({f"{r.get('data', 'validation split')} ({r.get('num_samples', '?')} images)"
                             for r in records}))
    unlabelled = sorted({f"{u.get('source')} ({u.get('num_images')} images)" for r in records
                         if isinstance(u := r.get("unlabelled"), dict)})
    confidence = first.get("confidence")
    intro = (f"Each artifact against the float PyTorch model of its stage on the {data}, paired image by image. "
             f"PASS: the {100 * confidence:g}% upper bounds of the balanced-accuracy drop and of the escape-rate rise "
             f"(defects passed as ok) are within {first.get('max_drop', _NONE)} and "
             f"{first.get('max_escape_rise', _NONE)} points; FAIL: the data show it is worse; INCONCLUSIVE: too few "
             "images to tell. " if isinstance(confidence, (int, float)) else
             f"Each artifact against the float PyTorch model of its stage on the {data}. ")
    if unlabelled:
        intro += (f"Label-free evidence (the float model's calls as reference): {', '.join(unlabelled)}"
                  + ("; the training split was also fitted and calibrated on, so it can read optimistic"
                     if any(u.startswith("train ") for u in unlabelled) else "") + ". ")
    rows = tuple((Code(_name(r)), _listed(r.get("backend")), _pct(r.get("top1_agreement")), _sci(r.get("max_abs_diff")),
                  _pct(r.get("float_balanced_accuracy")), _pct(r.get("balanced_accuracy")),
                  _pts(r.get("balanced_accuracy_delta")), _pts(r.get("escape_rate_delta")),
                  _bound(r, "balanced_accuracy_drop"), _bound(r, "escape_rate_rise"),
                  _bound(r, "label_free_new_escape"), _flips(r.get("flips")), _verdict(r)) for r in records)
    columns = ("artifact", "backend", "top-1 agreement", "max abs logit diff", "float balanced acc.",
               "balanced acc.", "delta (points)", "escape delta (points)", "drop bound (points)",
               "escape-rise bound (points)", "label-free new-escape bound (points)", "class flips", "verdict")
    summary = Strong(f"{passed} of {len(records)} passed", "pass" if passed == len(records) else "fail")
    settle = tuple((Code(_name(r)), f": {settle_text(r)}") for r in records if r.get("verdict") == "INCONCLUSIVE")
    extra = (Paragraph("What would settle the INCONCLUSIVE ones:"), Bullets(settle)) if settle else ()
    return Section("Verification", (Paragraph((intro, summary, ".")), Table(columns, rows), *extra,
                                    *(figure for key, figure in figures.items() if key.startswith("confusion"))))


def resolution_line(record: dict) -> str:
    """The sentence for bench.json's ``resolution`` record (:mod:`edge_tl.resolution_cost`)."""
    return (f"input size: {record['img_size']} px costs {record['latency_ratio']:.2f}x the latency of the backbone's "
            f"default {record['default_img_size']} px ({record['latency_ms_p50']:.2f} against "
            f"{record['default_latency_ms_p50']:.2f} ms, float model, ONNX Runtime FP32, batch 1, "
            f"{record['threads']} thread(s)) and {record['macs_ratio']:.2f}x its MACs.")


def _bench_section(inputs: ReportInputs, figures: dict[str, Figure]) -> Section:
    bench = inputs.bench
    if bench is None:
        return Section("Benchmark", (Paragraph(("Not benchmarked; run ", Code(f"edge-tl bench {inputs.run_dir}"),
                                                ".")),))
    lines = [f"{key}: {_listed(value)}" for key, value in (bench.get("machine") or {}).items()]
    if bench.get("settings"):
        lines.append("settings: " + "; ".join(f"{key} {_listed(value)}" for key, value in bench["settings"].items()))
    lines += [resolution_line(bench["resolution"])] if bench.get("resolution") else []
    lines += [f"skipped {skip.get('artifact') or 'every artifact'} on {skip.get('backend', '?')}"
              + (f" at batch {skip['batch_size']}" if skip.get("batch_size") else "") + f": {skip.get('reason')}"
              for skip in bench.get("skipped") or [] if isinstance(skip, dict)]
    rows = list(bench.get("rows") or [])
    speedups = latency_speedups(rows)
    verdicts = {_name(record): record for record in inputs.verifications}
    points = plots.latency_points(rows, inputs.verifications)
    front = {points[i].label for i in plots.pareto_front([(p.latency_ms, p.balanced_accuracy) for p in points])}
    table_rows = []
    for i in sorted(range(len(rows)), key=lambda i: (rows[i].get("batch_size") or 0, _p50(rows[i]) or math.inf)):
        row, latency = rows[i], rows[i].get("latency_ms") or {}
        on_front = row.get("batch_size") == 1 and plots.point_label(row) in front
        notes = [text for text, flag in (("Pareto front", on_front), ("unstable", row.get("stable") is False)) if flag]
        table_rows.append((Code(_name(row)), _listed(row.get("backend")), _listed(row.get("precision")),
                           _listed(row.get("batch_size")), _ms(latency.get("p50")), _ms(latency.get("p99")),
                           f"{row['cv']:.3f}" if _num(row.get("cv")) else _NONE,
                           f"{row['throughput_ips']:.1f}" if _num(row.get("throughput_ips")) else _NONE,
                           f"{speedups[i]:.2f}x" if speedups[i] else _NONE, _pct(row.get("balanced_accuracy")),
                           _mb(row.get("size_bytes")), _si(row.get("params")), _si(row.get("macs")),
                           _mb(row.get("peak_memory_bytes")), _verdict(verdicts.get(_name(row))),
                           ", ".join(notes) or _NONE))
    columns = ("artifact", "backend", "precision", "batch", "p50 ms", "p99 ms", "cv", "images/s",
               "speed-up vs float FP32 ONNX", "balanced acc.", "size", "params", "MACs", "peak memory",
               "verification", "notes")
    table = Table(columns, tuple(table_rows)) if table_rows else Paragraph("bench.json has no rows.")
    return Section("Benchmark", (Bullets(tuple(lines)), table, *([figures["pareto"]] if "pareto" in figures else [])))


def build_sections(inputs: ReportInputs, figures: dict[str, Figure]) -> list[Section]:
    """The report's sections in order; ``figures`` maps :func:`edge_tl.plots.write_run_plots` keys to figures."""
    sections = [_recommended_section(inputs), _dataset_section(inputs), _stages_section(inputs, figures),
                _verification_section(inputs, figures), _bench_section(inputs, figures)]
    if inputs.recipe_text is not None:
        sections.append(Section("Recipe", (Paragraph(("The recipe this run used (", Code("recipe.yaml"), "):")),
                                           Preformatted(inputs.recipe_text))))
    return sections


# --- entry point --------------------------------------------------------------------------------
def write_report(run_dir: str | os.PathLike) -> ReportResult:
    """Write the figures, then report.html, then report.md into ``run_dir``; returns their paths.

    Last, figures an earlier report drew under its own names in ``run_dir/plots`` and this one no longer
    shows are deleted; other files there are left alone."""
    from edge_tl.run_lock import run_lock

    with run_lock(run_dir):
        return _write_report(run_dir)


def _write_report(run_dir: str | os.PathLike) -> ReportResult:
    inputs = load_report_inputs(run_dir)
    run_dir, info = inputs.run_dir, inputs.run_info
    plots_dir = run_dir / PLOTS_DIR
    written = plots.write_run_plots(plots_dir, info["classes"], inputs.finetune_metrics, inputs.verifications,
                                    inputs.bench)
    figures = {key: Figure(path.relative_to(run_dir).as_posix(), caption) for key, (path, caption) in written.items()}
    title = f"edge-tl report: {run_dir.resolve().name} ({info.get('backbone', '?')}, {info.get('img_size', '?')} px)"
    sections = build_sections(inputs, figures)
    html_path = atomic_write_text(run_dir / "report.html", render_html(title, sections))
    markdown_path = atomic_write_text(run_dir / "report.md", render_markdown(title, sections))
    plot_paths = tuple(path for path, _ in written.values())
    stale = plots.remove_stale_run_plots(plots_dir, plot_paths)
    logger.info("wrote %s, %s and %d figures; removed %d stale figures", markdown_path, html_path, len(written),
                len(stale))
    return ReportResult(markdown_path, html_path, plot_paths)
