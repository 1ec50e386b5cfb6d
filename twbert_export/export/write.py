"""The last stage: tokenizer, answers, manifest, device kit and report.md of the artifact
(report.json is written last, with the total time, by `pipeline.run_export`)."""

from __future__ import annotations

import platform
import shutil
import time
from pathlib import Path
from typing import Any

from ..artifact.manifest import (DEFAULT_FLAVOUR, MODEL_GRAPH, SPLIT_GRAPHS, TRT8_FLAVOUR,
                                 CheckpointInfo, FileEntry, Manifest, PlanEntry, PrecisionResult,
                                 Report, RtxCheck, label)
from ..artifact.render import render_report_md
from ..data.calibration import FeedSet
from ..trt.commands import polygraphy_command, write_device_kit
from ..util import file_sha256, write_json, write_text
from .job import Conversion, ExportOptions, Inputs, Loaded, StageLog, Validation


def tool_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "nvidia-modelopt",
                 "onnx-graphsurgeon", "polygraphy", "twbert-export"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_artifacts_stage(inputs: Inputs, loaded: Loaded, conversion: Conversion,
                          validation: Validation, val: FeedSet, calib: FeedSet | None,
                          lint_warnings: list[Any], opts: ExportOptions, work: Path,
                          stages: StageLog, rtx: RtxCheck | None = None
                          ) -> tuple[Manifest, Report]:
    """Tokenizer, answers, manifest, device kit and report.md (report.json is written last,
    with the total time, by run_export)."""
    tokenizer_name = "tokenizer.json" if inputs.tokenizer.source.endswith(".json") else "vocab.txt"
    shutil.copyfile(inputs.tokenizer.source, work / tokenizer_name)
    answers = loaded.answers
    if answers:
        write_json(work / "answers.json", answers)
    # The whole model's last precision (a per-graph plan may give it fewer than the graphs)
    last = [p for p in inputs.precisions if (MODEL_GRAPH, p) in conversion.files][-1]
    onnx = conversion.files[(MODEL_GRAPH, last)]
    trt8 = conversion.of(MODEL_GRAPH, TRT8_FLAVOUR).get(last)  # None: no 8.x form (int8w)
    results, trt8_results = validation.of(DEFAULT_FLAVOUR), validation.of(TRT8_FLAVOUR)
    next_commands = [
        f"./build_on_device.sh {last}   # the file and flags for the TensorRT version it finds",
        f"python3 -m twbert_export.trt.cli --onnx {onnx.name} --target auto",
        f"python3 -m twbert_export.validation.reference --engine {onnx.with_suffix('.engine').name}"
        "   # the host's gates",
        polygraphy_command(onnx.with_suffix(".engine").name, last, results[last]["outputs"])]
    if trt8 is not None and last in trt8_results:
        next_commands.append(polygraphy_command(
            trt8.with_suffix(".engine").name, last, trt8_results[last]["outputs"], trt_major=8)
            + "   # TensorRT 8.5 / 8.6")
    report = Report(
        precisions={p: PrecisionResult.from_comparison(r, conversion.reports.get(p))
                    for p, r in results.items()},
        flavours={fl: {p: PrecisionResult.from_comparison(r) for p, r in validation.of(fl).items()}
                  for fl in conversion.twins},
        task_metrics=validation.metrics, validation_data=val.identity,
        next_commands=next_commands, stages=stages.rows,
        lint_warnings=[str(w) for w in lint_warnings], skipped_videos=val.skipped_videos,
        split={label(p, fl): PrecisionResult.from_comparison(r, {
            g: conversion.graph_reports[(g, q)] for g, q in _graph_precisions(inputs, p)
            if fl == DEFAULT_FLAVOUR and (g, q) in conversion.graph_reports} or None)
            for (p, fl), r in validation.split.items()},
        validation_runs=validation.runs, rtx=rtx)
    parity = _parity(validation, DEFAULT_FLAVOUR)
    ckpt = loaded.ckpt_path
    manifest = Manifest(
        checkpoint=CheckpointInfo(str(ckpt), file_sha256(ckpt), loaded.load_report.format),
        model_config=loaded.config.to_dict(), schedule=loaded.contract.schedule,
        contract=loaded.contract,
        files=[FileEntry(graph=g, precision=p, flavour=fl, path=f.name, sha256=file_sha256(f),
                         bytes=f.stat().st_size) for g, p, fl, f in conversion.entries()],
        calibration=(calib.identity | {"clips": len(calib.video), "method": opts.calib_method}
                     if calib else None),
        validation_data=val.identity, parity=parity,
        flavour_parity={fl: _parity(validation, fl) for fl in conversion.twins},
        graph_contracts=loaded.graph_contracts, plans=_plans(inputs, validation),
        tools=tool_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        tokenizer=tokenizer_name, answers="answers.json" if answers else None)
    manifest.write(work)
    write_device_kit(work, manifest)
    write_text(work / "report.md", render_report_md(manifest, report))
    return manifest, report


def _graph_precisions(inputs: Inputs, name: str) -> list[tuple[str, str]]:
    """(graph, precision) of the split graphs validated as `name`: a precision, or the plan."""
    plan = inputs.plan
    return list(plan.graphs) if plan and name == plan.name else [(g, name) for g in SPLIT_GRAPHS]


def _plans(inputs: Inputs, validation: Validation) -> dict[str, PlanEntry]:
    """The per-graph plan the export was given, with its verdict per flavour."""
    plan = inputs.plan
    if plan is None:
        return {}
    return {plan.name: PlanEntry(plan.by_graph, plan.model, {fl: r["passed"] for (name, fl), r
                                                 in validation.split.items() if name == plan.name})}


def _parity(validation: Validation, flavour: str) -> dict[str, bool]:
    """precision -> verdict of one flavour: a precision passes when each of its layouts (the
    whole-model file, the split graphs composed) passed its gates."""
    return {p: r["passed"] and validation.split.get((p, flavour), {}).get("passed", True)
            for p, r in validation.of(flavour).items()}
