"""The typed report as people read it: `report.md` and the summary table the export prints."""

from __future__ import annotations

from ..util import human_size
from .manifest import Manifest, PrecisionResult, Report, RtxCheck, label


def render_report_md(manifest: Manifest, report: Report) -> str:
    lines = [f"# Parity report: F@{manifest.schedule}, task {manifest.contract.task}", "",
             f"Checkpoint `{manifest.checkpoint.path}` "
             f"(sha256 {manifest.checkpoint.sha256[:12]}), validation data "
             f"`{report.validation_data['data_dir']}` "
             f"({report.validation_data['num_videos']} clips). Reference: PyTorch, hard "
             "selection.", "", "## Gates", "", "| precision | gate | result | detail |",
             "| --- | --- | --- | --- |"]
    for p, r in _labelled(report):
        for g in r.gates:
            lines.append(f"| {p} | {g['name']} | {'pass' if g['passed'] else '**FAIL**'} | "
                         f"{g['detail']} |")
    lines += ["", "## Output errors (paired rows)", "",
              "| precision | output | max abs | max rel | cosine |", "| --- | --- | --- | --- | --- |"]
    for p, r in _labelled(report):
        for name, e in r.outputs.items():
            if "max_abs" in e:
                lines.append(f"| {p} | {name} | {e['max_abs']:.3g} | {e['max_rel']:.3g} | "
                             f"{e['cosine']:.6f} |")
            else:
                lines.append(f"| {p} | {name} | {e['mismatched']} of {e['total']} rows differ "
                             "| | |")
    lines += ["", "## Frame selection agreement", "",
              "| precision | selector | identical | near-tie | divergent |",
              "| --- | --- | --- | --- | --- |"]
    for p, r in _labelled(report):
        for s, c in r.selection.items():
            lines.append(f"| {p} | {s} | {c['identical']} | {c['near_tie']} | {c['divergent']} |")
    lines += ["", "## Task metrics", ""]
    metrics = report.task_metrics
    if any("accuracy" in m for m in metrics.values()):
        lines += ["| run | QA accuracy |", "| --- | --- |"]
        lines += [f"| {n} | {100 * m['accuracy']:.1f}% |" for n, m in metrics.items()]
    else:
        lines += ["| run | t2v R@1 | R@5 | R@10 | MedR | v2t R@1 | R@5 | R@10 | MedR |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for n, m in metrics.items():
            t, v = m["t2v"], m["v2t"]
            lines.append(f"| {n} | {100 * t['R@1']:.1f} | {100 * t['R@5']:.1f} | "
                         f"{100 * t['R@10']:.1f} | {t['MedR']:.1f} | {100 * v['R@1']:.1f} | "
                         f"{100 * v['R@5']:.1f} | {100 * v['R@10']:.1f} | {v['MedR']:.1f} |")
    if report.split:
        lines += _split_report_md(report)
    if report.rtx:
        lines += _rtx_report_md(report.rtx)
    return "\n".join(lines) + "\n"


def _labelled(report: Report) -> list[tuple[str, PrecisionResult]]:
    """(label, result) of every file judged: the rows of report.md's tables."""
    return [(label(p, fl), r) for p, fl, r in report.results()]


def _split_report_md(report: Report) -> list[str]:
    """The split graphs' gates and output errors, and what each validation runner cost."""
    lines = ["", "## Split graphs, composed (text, video_stem, select, fuse)", "",
             "Same reference, rows and gates as above; at FP32 also against the whole-model "
             "graph on every row both ran.", "", "| precision | gate | result | detail |",
             "| --- | --- | --- | --- |"]
    for p, r in report.split.items():
        lines += [f"| {p} | {g['name']} | {'pass' if g['passed'] else '**FAIL**'} | "
                  f"{g['detail']} |" for g in r.gates]
    lines += ["", "| precision | output | max abs | max rel | cosine |",
              "| --- | --- | --- | --- | --- |"]
    for p, r in report.split.items():
        lines += [f"| {p} | {name} | {e['max_abs']:.3g} | {e['max_rel']:.3g} | "
                  f"{e['cosine']:.6f} |" for name, e in r.outputs.items() if "max_abs" in e]
    lines += ["", "## Validation cost per runner (ONNX Runtime, CPU)", "",
              "| runner | graph executions | rows | seconds | split / whole model |",
              "| --- | --- | --- | --- | --- |"]
    for name, run in report.validation_runs.items():
        whole = report.validation_runs.get(name.replace("split-", "onnx-"))
        ratio = (f"{run['seconds'] / whole['seconds']:.2f}"
                 if name.startswith("split-") and whole and whole["seconds"] else "")
        lines.append(f"| {name} | {', '.join(f'{g} {n}' for g, n in run['graph_runs'].items())} "
                     f"| {', '.join(f'{g} {n}' for g, n in run['graph_rows'].items())} "
                     f"| {run['seconds']:.1f} | {ratio} |")
    lines += [""] + [f"- {name}: {run['select']}" for name, run in
                     report.validation_runs.items() if run.get("select")]
    return lines


def summary_table(manifest: Manifest, report: Report) -> str:
    """The verdict table the export prints: one row per file judged, then the split graphs."""
    # a per-graph plan's label (fp16+video_stem-int8.trt8) is wider than a precision's
    w = max([10] + [len(p) + 1 for p in report.split])
    rows = [f"{'precision':<{w}}{'file':<22}{'gates':<8}{'max |itm| err':>14}{'selection':>22}"]
    for p, flavour, r in report.results():
        entry = manifest.file(p, flavour=flavour)
        name = entry.path if entry else ""
        itm = r.outputs.get("itm_logits", {}).get("max_abs", float("nan"))
        sel = " ".join(f"{s}:{c['identical']}/{c['samples']}" for s, c in r.selection.items())
        rows.append(f"{label(p, flavour):<{w}}{name:<22}{'PASS' if r.passed else 'FAIL':<8}"
                    f"{itm:>14.2e}{sel:>22}")
    for p, r in report.split.items():
        itm = r.outputs.get("itm_logits", {}).get("max_abs", float("nan"))
        sel = " ".join(f"{s}:{c['identical']}/{c['samples']}" for s, c in r.selection.items())
        shown = f"split ({p}) x4" if len(p) < 10 else "split x4"  # a plan's label is in column 1
        rows.append(f"{p:<{w}}{shown:<22}{'PASS' if r.passed else 'FAIL':<8}"
                    f"{itm:>14.2e}{sel:>22}")
    return "\n".join(rows)


def _rtx_report_md(check: RtxCheck) -> list[str]:
    """The TensorRT-RTX check (trt/rtx.py): its section of report.md."""
    lines = ["", "## TensorRT-RTX: NVIDIA's parser and CPU build of every graph", ""]
    if not check.ran:
        return lines + [f"Not run: {check.reason}."]
    lines += [f"TensorRT-RTX {check.version}, ahead-of-time build on the CPU (no GPU), one "
              "profile per graph from its contract's batch range. Types are TensorRT's own, "
              "read from the parsed network.", "",
              "| file | built | parse s | build s | engine | MatMul types | Normalization types "
              "| Q/DQ layers | selection layers | not FP32 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in check.graphs:
        hist = lambda h: ", ".join(f"{t} {n}" for t, n in sorted(h.items())) or "-"  # noqa: E731
        lines.append(f"| {r.onnx} | {'yes' if r.built else 'no: ' + r.note} | "
                     f"{r.parse_seconds:.1f} | {r.build_seconds:.1f} | "
                     f"{human_size(r.engine_bytes) if r.built else ''} | {hist(r.matmul)} | "
                     f"{hist(r.normalization)} | {r.qdq_layers} | {r.selection_layers} | "
                     f"{', '.join(r.selection_not_fp32) or 'none'} |")
    if check.warnings:
        lines += ["", "| parser / builder warning | what it means |", "| --- | --- |"]
        lines += [f"| {w} | {n} |" for w, n in check.warnings.items()]
    return lines
