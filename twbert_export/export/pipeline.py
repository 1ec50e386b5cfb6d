"""The export job: checkpoint -> ONNX -> rewrite -> lint -> precision -> validate -> artifacts.

`run_export` calls one function per stage (`load_stage`, `export_stage`, ...), each printing one
line (artifact, size, time) and handing small dataclasses to the next. Files are kept by
(graph, precision) so that an artifact can hold more graphs than the whole-model one.
Artifacts are assembled in a scratch directory beside the target (`outdir.claim`) and moved
into place at the end (`outdir.move_into_place`): what --out may replace, and how, is
`twbert_export/artifact/outdir.py`.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import legacy
from ..trt import lint
from ..artifact import outdir
from .. import precision
from ..validation import parity as validate
from ..artifact.manifest import (DEFAULT_FLAVOUR, FLAVOURS, MANIFEST_FILE, MODEL_GRAPH, PRECISIONS,
                                 REPORT_FILE, SPLIT_GRAPHS, TRT8_FLAVOUR, CheckpointInfo,
                                 FileEntry, Manifest, PrecisionResult, Report)
from ..data.assets import resolve_checkpoint, resolve_data
from ..data.calibration import FeedSet, check_calibration_count, check_data, load_feeds
from ..artifact.contract import BatchRange, IOContract
from ..artifact.input_checks import check_onnx_file
from .onnx_export import export_onnx
from ..data.preprocess import Tokenizer
from ..validation.reference import save_polygraphy_reference, save_validation_reference
from .rewrite import rewrite
from ..validation.runners import batched, make_torch_runner, ort_runner
from ..trt.commands import polygraphy_command, write_device_kit
from ..trt.rtx import RtxCheck, report_md as rtx_report_md, rtx_stage
from ..util import (Stopwatch, current_rss_gb, file_sha256, human_size, map_large_allocations,
                    removed_if_stopped, require, signals_deferred, stage_peak_rss_gb, write_json,
                    write_text)

# Rows of validation data shipped as Polygraphy reference data (inputs + outputs) for devices.
REFERENCE_ROWS = 8
# Which graphs an artifact holds (--graphs): the whole model, and beside it the four split graphs
# (`split.py`, docs/split.md) unless asked for the whole model alone.
GRAPH_SETS = ("both", "monolithic")
# The split graphs composed at FP32 must give the monolithic FP32 graph's itm logits within this.
SPLIT_FP32_ATOL = 1e-5


class UserError(ValueError):
    """Bad input from the user: one clear line, exit code 2."""


@dataclass
class ExportOptions:
    ckpt: str = "demo"
    precisions: tuple[str, ...] = ("fp16",)
    task: str = "retrieval"
    schedule: str | None = None
    batch: str = "1:1:8"
    max_text_len: int | None = None
    calib_data: str = "demo:calib"
    calib_method: str = "max"
    val_data: str = "demo"
    out: str | None = None
    force: bool = False
    tokenizer: str | None = None
    trust_checkpoint: bool = False
    on_error: str = "fail"
    gates: dict[str, Any] = field(default_factory=dict)
    val_limit: int | None = None
    calib_cache: bool = True
    graphs: str = "both"
    rtx_engines: bool = False  # keep the TensorRT-RTX engines of the rtx stage (trt/rtx.py)


class StageLog:
    """One line per stage: number, name, artifact, size, seconds."""

    def __init__(self, total: int, stream=sys.stdout):
        self.total, self.done, self.stream = total, 0, stream
        self.rows: list[dict[str, Any]] = []

    def line(self, name: str, seconds: float, path: Path | None = None, note: str = "",
             written: Path | None = None) -> None:
        """`path` is where the file will be; `written` where it is now, if elsewhere (the
        artifact is assembled aside), for its size."""
        self.done += 1
        written = written or path
        size = human_size(written.stat().st_size) if written and written.is_file() else ""
        shown = _relative(path) if path else ""
        print(f"[{self.done}/{self.total}] {name:<10} {shown:<44} {size:>9} {seconds:7.1f}s"
              f"{'  ' + note if note else ''}", file=self.stream, flush=True)
        self.rows.append({"stage": name, "path": shown, "size": size, "seconds": seconds,
                          "note": note, "peak_rss_gb": stage_peak_rss_gb(),
                          "rss_after_gb": current_rss_gb()})


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def default_name(ckpt: str, task: str, schedule: str) -> str:
    stem = "demo" if ckpt == "demo" else Path(ckpt).stem
    return f"{stem}-{task}-{schedule}"


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


def tensorrt_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "TensorRT is not installed"
    try:
        cuda = require("torch", "to look for a GPU").cuda.is_available()
    except ImportError:
        cuda = False
    return (True, "") if cuda else (False, "no CUDA GPU is visible")


# -- the job: one function per stage --------------------------------------------------------------
@dataclass
class Inputs:
    """The options resolved and checked before anything runs."""
    precisions: list[str]  # in PRECISIONS order, fp32 first
    ckpt_path: Path
    val_dir: Path
    calib_dir: Path | None
    batch: BatchRange
    tokenizer: Tokenizer


@dataclass
class Loaded:
    """The checkpoint, parsed once, and the I/O contract the export follows."""
    ckpt_path: Path
    model: Any  # model.TWBert; its weights are moved to `meta` after the export stage
    config: Any  # model.TWBertConfig
    load_report: Any  # model.LoadReport
    contract: IOContract
    ckpt_stat: tuple[int, int]  # (size, mtime_ns) of the file as loaded
    graph_contracts: dict[str, IOContract] = field(default_factory=dict)  # split graphs, if any

    @property
    def answers(self) -> list[str] | None:
        return self.load_report.metadata.get("answers") if self.contract.task == "qa" else None


@dataclass
class Conversion:
    """The ONNX files of an artifact, by (graph, precision), and the precision steps' reports.
    `files` are the default flavour's; `twins` the other flavours' (flavour -> (graph,
    precision) -> file), converted from them."""
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> step report
    twins: dict[str, dict[tuple[str, str], Path]] = field(default_factory=dict)
    # (graph, precision) -> step report of each split graph
    graph_reports: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # Calibration rows of each split graph (split.graph_feeds), made once from the FP32 graphs.
    split_feeds: dict[str, Any] | None = None

    def of(self, graph: str, flavour: str = DEFAULT_FLAVOUR) -> dict[str, Path]:
        """precision -> file of one graph in one flavour."""
        files = self.files if flavour == DEFAULT_FLAVOUR else self.twins.get(flavour, {})
        return {p: f for (g, p), f in files.items() if g == graph}

    def entries(self) -> list[tuple[str, str, str, Path]]:
        """(graph, precision, flavour, file) of every file, the default flavour first."""
        return ([(g, p, DEFAULT_FLAVOUR, f) for (g, p), f in self.files.items()]
                + [(g, p, fl, f) for fl, files in self.twins.items()
                   for (g, p), f in files.items()])

    def split_files(self, precision: str, flavour: str = DEFAULT_FLAVOUR
                    ) -> dict[str, Path] | None:
        """graph -> file of the split graphs at one precision in one flavour, None without
        split graphs."""
        files = self.files if flavour == DEFAULT_FLAVOUR else self.twins.get(flavour, {})
        files = {g: files[(g, precision)] for g in SPLIT_GRAPHS if (g, precision) in files}
        return files if len(files) == len(SPLIT_GRAPHS) else None


@dataclass
class Validation:
    # (precision, flavour) -> validate.compare_precision's result
    results: dict[tuple[str, str], dict[str, Any]]
    metrics: dict[str, Any]
    # (precision, flavour) -> the split graphs' result, composed
    split: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # runner -> runs, seconds

    def of(self, flavour: str) -> dict[str, dict[str, Any]]:
        """precision -> result, one flavour."""
        return {p: r for (p, fl), r in self.results.items() if fl == flavour}


def run_export(opts: ExportOptions) -> ExportResult:
    """Run every stage and return the artifact's manifest and report (its gate verdicts
    included: the caller decides the exit code). Raises UserError for bad input."""
    inputs = resolve_inputs(opts)
    stages = StageLog(total=7 + len(inputs.precisions) + (opts.graphs == "both"))
    t_start = time.perf_counter()
    map_large_allocations()  # stages load and free whole models: return them to the system
    loaded = load_stage(inputs, opts, stages)
    out = Path(opts.out or Path("engines") / default_name(opts.ckpt, opts.task,
                                                            loaded.contract.schedule))
    work = outdir.claim(out, opts.force)
    with removed_if_stopped(work):  # a Ctrl-C or SIGTERM removes the scratch directory
        try:
            conversion = Conversion()
            export_stage(loaded, work, out, stages, conversion)
            lint_warnings = lint_stage(conversion, stages)
            val, calib = data_stage(inputs, opts, loaded.contract, stages)
            seen: dict[str, precision.RangesSeen] = {}
            for p in inputs.precisions[1:]:
                precision_stage(p, loaded, conversion, calib, opts, work, out, stages, seen)
            trt8_stage(conversion, work, out, stages)
            # NVIDIA's parser and CPU builder on every file; a refused graph raises RtxGraphError
            rtx_check = rtx_stage(conversion.entries(),
                                  {MODEL_GRAPH: loaded.contract, **loaded.graph_contracts},
                                  precision.SELECTION_NODES, stages,
                                  work if opts.rtx_engines else None)
            validation = validate_stage(loaded, conversion, val, opts, work, out, stages)
            manifest, report = write_artifacts_stage(inputs, loaded, conversion, validation, val,
                                                     calib, lint_warnings, opts, work, stages,
                                                     rtx_check)
            report.total_seconds = time.perf_counter() - t_start
            report.write(work)
            with signals_deferred():  # not stopped half-way
                outdir.move_into_place(work, out, opts.force)
        finally:
            outdir.discard_partial(work)
    return ExportResult(out, manifest, report)


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    report: Report

    @property
    def next_onnx(self) -> Path:
        """The file the next command (an engine build) starts from: the last precision."""
        last = self.manifest.file(self.manifest.precisions[-1])
        assert last is not None
        return self.out / last.path


def resolve_inputs(opts: ExportOptions) -> Inputs:
    """The options checked, the data sets included (`calibration.check_data`), before any
    expensive work."""
    unknown = [p for p in opts.precisions if p not in PRECISIONS]
    if unknown:
        raise UserError(f"unknown precision {unknown}; choose from {', '.join(PRECISIONS)}")
    precisions = [p for p in PRECISIONS if p == "fp32" or p in opts.precisions]
    if opts.graphs not in GRAPH_SETS:
        raise UserError(f"--graphs must be one of {', '.join(GRAPH_SETS)}, got {opts.graphs!r}")
    if opts.val_limit is not None and opts.val_limit < 1:
        raise UserError(f"--val-clips must be >= 1, got {opts.val_limit}")
    try:
        inputs = Inputs(
            precisions=precisions, ckpt_path=resolve_checkpoint(opts.ckpt),
            val_dir=resolve_data(opts.val_data),
            calib_dir=(resolve_data(opts.calib_data) if set(precisions) - {"fp32"} else None),
            batch=BatchRange.parse(opts.batch),
            tokenizer=(Tokenizer.from_file(opts.tokenizer) if opts.tokenizer
                       else Tokenizer.default()))
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    # The data sets are read before the export, which takes minutes at the base preset: a bad
    # annotation line or video fails here, not after it.
    check_data(inputs.val_dir, opts.task, opts.on_error, opts.val_limit)
    if inputs.calib_dir:
        usable = check_data(inputs.calib_dir, opts.task, opts.on_error)
        if "int8" in precisions:
            check_calibration_count(usable)
    return inputs


def load_stage(inputs: Inputs, opts: ExportOptions, stages: StageLog) -> Loaded:
    from model import CheckpointError, load_checkpoint

    with Stopwatch() as sw:
        stat = inputs.ckpt_path.stat()
        try:
            model, load_report = load_checkpoint(inputs.ckpt_path, schedule=opts.schedule,
                                                 trust_pickle=opts.trust_checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        model.eval()
        try:
            contract = IOContract.for_model(model.cfg, opts.task, inputs.batch, opts.max_text_len)
        except ValueError as e:
            raise UserError(str(e)) from None
        if contract.task == "qa" and not load_report.metadata.get("answers"):
            raise UserError(f"{inputs.ckpt_path}: the checkpoint's metadata has no answer list, "
                            "which a QA export needs")
        graph_contracts = {}
        if opts.graphs == "both":
            from .split import split_contracts

            graph_contracts = split_contracts(contract, model.cfg)
    stages.line("load", sw.seconds, inputs.ckpt_path,
                f"{load_report.format}, {load_report.schedule_reason or 'F@' + contract.schedule}")
    return Loaded(inputs.ckpt_path, model, model.cfg, load_report, contract,
                  (stat.st_size, stat.st_mtime_ns), graph_contracts)


def export_stage(loaded: Loaded, work: Path, out: Path, stages: StageLog,
                 conversion: Conversion) -> None:
    """The checkpoint's graph to ONNX, then rewritten for TensorRT (the fp32 file); then the
    split graphs, if asked for, each exported and rewritten the same way."""
    with Stopwatch() as sw:
        raw = work / "model.raw.onnx"
        export_onnx(loaded.model, loaded.contract, raw)
    stages.line("export", sw.seconds, out / raw.name, f"opset {loaded.contract.opset}, dynamo",
                raw)
    with Stopwatch() as sw:
        fp32 = conversion.files[(MODEL_GRAPH, "fp32")] = work / "model.fp32.onnx"
        histogram = rewrite(raw, fp32, loaded.contract)
        raw.unlink()
    top = ", ".join(f"{k} {v}" for k, v in list(histogram.items())[:8])
    stages.line("rewrite", sw.seconds, out / fp32.name,
                f"{sum(histogram.values())} nodes: {top}, ...", fp32)
    if loaded.graph_contracts:
        split_export_stage(loaded, work, stages, conversion)
    # The weights wait idle until validation: free them for the precision steps (1 GB at the
    # base preset); validate_stage reads them back from the checkpoint file.
    loaded.model.to("meta")


def split_export_stage(loaded: Loaded, work: Path, stages: StageLog,
                       conversion: Conversion) -> None:
    """The four split graphs (`split.export_split`: export and rewrite, as the whole model) to
    <graph>.fp32.onnx. After the whole model's export, which it leaves untouched."""
    from .split import export_split

    with Stopwatch() as sw:
        files = export_split(loaded.model, loaded.graph_contracts, work)
        for graph, path in files.items():
            conversion.files[(graph, "fp32")] = path
    sizes = ", ".join(f"{path.name} {human_size(path.stat().st_size)}"
                      for path in files.values())
    stages.line("split", sw.seconds, None, sizes)


def lint_stage(conversion: Conversion, stages: StageLog) -> list[Any]:
    with Stopwatch() as sw:
        warnings = [w for (_, p), f in conversion.files.items() if p == "fp32"
                    for w in lint.check_model(f)]
    stages.line("lint", sw.seconds, None,
                f"TensorRT 10 parser: no errors, {len(warnings)} warnings")
    return warnings


def data_stage(inputs: Inputs, opts: ExportOptions, contract: IOContract, stages: StageLog
               ) -> tuple[FeedSet, FeedSet | None]:
    """The validation clips and, for FP16/INT8, the calibration clips, preprocessed."""
    with Stopwatch() as sw:
        val = load_feeds(inputs.val_dir, contract, inputs.tokenizer, opts.on_error,
                         limit=opts.val_limit)
        calib = (load_feeds(inputs.calib_dir, contract, inputs.tokenizer, opts.on_error,
                            texts_per_video=1) if inputs.calib_dir else None)
    stages.line("data", sw.seconds, None,
                f"val {len(val.video)} clips / {len(val)} texts"
                + (f", calib {len(calib.video)} clips" if calib else "")
                + (f", {val.truncated_texts} texts truncated to {contract.text_len}"
                   if val.truncated_texts else ""))
    return val, calib


def precision_stage(p: str, loaded: Loaded, conversion: Conversion, calib: FeedSet | None,
                    opts: ExportOptions, work: Path, out: Path, stages: StageLog,
                    seen: dict[str, precision.RangesSeen]) -> None:
    """Every graph's fp32 file to precision `p`. `seen`: per graph, the activation ranges an
    earlier precision step found on the same file and clips (spares their forward passes);
    updated with what this step found. A split graph is calibrated on its own inputs as the
    FP32 split graphs upstream compute them from the calibration clips (`split.graph_feeds`)."""
    assert calib is not None, "resolve_inputs asks for calibration data beyond fp32"
    model_dst, model_rep = None, None
    with Stopwatch() as sw:
        for (graph, q), fp32 in list(conversion.files.items()):
            if q != "fp32":
                continue
            rows = calib if graph == MODEL_GRAPH else _split_feeds(loaded, conversion, calib)[graph]
            dst = conversion.files[(graph, p)] = work / f"{graph}.{p}.onnx"
            if p == "fp16":
                with precision.ActivationRanges(fp32, rows) as ranges:
                    if graph in seen:
                        ranges.resume(seen[graph])
                    rep = precision.to_fp16(fp32, dst, ranges)
                    seen[graph] = ranges.seen()
            else:
                rep = precision.to_int8(fp32, dst, rows, opts.calib_method,
                                        use_cache=opts.calib_cache, seen=seen.get(graph))
            if graph == MODEL_GRAPH:
                model_dst, model_rep = dst, rep
            else:
                conversion.graph_reports[(graph, p)] = rep.to_dict()
    assert model_dst is not None and model_rep is not None
    rep = model_rep
    rep.seconds = sw.seconds
    conversion.reports[p] = rep.to_dict()
    int8 = rep.calibration.get("int8_nodes")
    split = [conversion.graph_reports[(g, p)] for g in SPLIT_GRAPHS
             if (g, p) in conversion.graph_reports]
    stages.line(p, sw.seconds, out / model_dst.name,
                (f"{int8} INT8 layers, " if int8 else "")
                + f"{len(rep.kept_fp32_selection)} selection nodes FP32, "
                f"{len(rep.kept_fp32_range)} other nodes kept FP32 by AutoCast"
                + (f" ({rep.cache.split()[0]} calibration cache)" if rep.cache else "")
                + "".join(f"; {step} {sec:.1f}s" for step, sec in rep.steps.items())
                + (f"; {rep.note}" if rep.note else "")
                + (f"; split graphs: {sum(len(r['kept_fp32_selection']) for r in split)} "
                   f"selection nodes FP32, {sum(len(r['kept_fp32_range']) for r in split)} "
                   "others" if split else ""), model_dst)


def _split_feeds(loaded: Loaded, conversion: Conversion, calib: FeedSet) -> dict[str, Any]:
    """Each split graph's calibration rows, computed once by the FP32 split graphs."""
    if conversion.split_feeds is None:
        from .split import ComposedSplit, graph_feeds

        fp32 = conversion.split_files("fp32")
        assert fp32 is not None
        # Runs of the validation batch: at the base preset (32 frames) runs of 8 took more
        # than this machine's 24 GB.
        with ComposedSplit(fp32, loaded.graph_contracts, loaded.contract,
                           max_batch=validate.validation_batch(loaded.contract)) as pipeline:
            conversion.split_feeds = dict(graph_feeds(pipeline, calib))
    return conversion.split_feeds


def trt8_stage(conversion: Conversion, work: Path, out: Path, stages: StageLog) -> None:
    """Every default-flavour file (each graph, each precision) to its TensorRT 8.5 / 8.6 twin of
    flavour trt8 (legacy.py), linted for both parsers; validate_stage judges them with the
    same gates as the files they came from."""
    twins = conversion.twins.setdefault(TRT8_FLAVOUR, {})
    with Stopwatch() as sw:
        for key, src in conversion.files.items():
            twins[key] = legacy.write_trt8_twin(src, work)
    shown = list(conversion.of(MODEL_GRAPH, TRT8_FLAVOUR).values())[-1]  # the last precision's
    stages.line(TRT8_FLAVOUR, sw.seconds, out / shown.name, legacy.describe(len(twins)), shown)


def validate_stage(loaded: Loaded, conversion: Conversion, val: FeedSet, opts: ExportOptions,
                   work: Path, out: Path, stages: StageLog) -> Validation:
    """PyTorch against ONNX Runtime on every precision and flavour of the whole-model graph
    and of the split graphs composed; the reference data a device validates against."""
    with Stopwatch() as sw:
        model = _reload(loaded, opts.trust_checkpoint)
        contract = loaded.contract
        files = {(p, fl): f for fl in FLAVOURS for p, f in conversion.of(MODEL_GRAPH, fl).items()}
        split = {(p, fl): SplitFiles(graph_files, loaded.graph_contracts)
                 for (p, fl) in files if (graph_files := conversion.split_files(p, fl))}
        results, metrics, reference, checked = validate_files(
            model, contract, files, val, loaded.answers, {**validate.DEFAULT_GATES, **opts.gates},
            split)
        del model
        ref_rows = min(REFERENCE_ROWS, len(val))
        ref_feeds = batched(val.feed(slice(0, ref_rows)), contract.batch.max)
        ref_outputs = [{k: v[i * contract.batch.max:(i + 1) * contract.batch.max]
                        for k, v in reference.items()} for i in range(len(ref_feeds))]
        save_polygraphy_reference(work / "reference", ref_feeds, ref_outputs, "torch-hard")
        save_validation_reference(work / "reference", val, reference, metrics, contract)
    verdicts = ", ".join(f"{_label(p, fl)} {'PASS' if r['passed'] else 'FAIL'}"
                         for (p, fl), r in results.items())
    if checked.split:
        labels = [_label(p, fl) for p, fl in checked.split]
        verdicts += "; split " + ", ".join(
            f"{label} {'PASS' if r['passed'] else 'FAIL'}"
            for label, r in zip(labels, checked.split.values()))
        whole = sum(checked.runs[f"onnx-{label}"]["seconds"] for label in labels)
        composed = sum(checked.runs[f"split-{label}"]["seconds"] for label in labels)
        verdicts += f"; ONNX Runtime {whole:.1f}s whole model, {composed:.1f}s split"
    stages.line("validate", sw.seconds, out / REPORT_FILE, verdicts, work / REPORT_FILE)
    return Validation(results, metrics, checked.split, checked.runs)


def _label(precision: str, flavour: str) -> str:
    """'fp16', or 'fp16.trt8' for another flavour: how a result is named in lines and metrics."""
    return precision if flavour == DEFAULT_FLAVOUR else f"{precision}.{flavour}"


def _reload(loaded: Loaded, trust_checkpoint: bool):
    """The checkpoint's model again, with the configuration the export used (its schedule).

    Why a second read rather than keeping the weights: they would sit idle through the
    precision steps, whose peak is the export's (1 GB more at the base preset), and the read
    takes about a second; the file is checked unchanged since the load stage."""
    from model import load_checkpoint

    stat = loaded.ckpt_path.stat()
    if (stat.st_size, stat.st_mtime_ns) != loaded.ckpt_stat:
        raise RuntimeError(f"{loaded.ckpt_path} changed during the export")
    model, _ = load_checkpoint(loaded.ckpt_path, schedule=loaded.config.selector.schedule,
                               trust_pickle=trust_checkpoint)
    if model.cfg != loaded.config:
        raise RuntimeError(f"{loaded.ckpt_path} changed during the export")
    return model.eval()


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
    last = inputs.precisions[-1]
    onnx = conversion.files[(MODEL_GRAPH, last)]
    trt8 = conversion.of(MODEL_GRAPH, TRT8_FLAVOUR)[last]
    results, trt8_results = validation.of(DEFAULT_FLAVOUR), validation.of(TRT8_FLAVOUR)
    next_commands = [
        f"./build_on_device.sh {last}   # the file and flags for the TensorRT version it finds",
        f"python3 -m twbert_export.trt.cli --onnx {onnx.name} --target auto",
        f"python3 -m twbert_export.validation.reference --engine {onnx.with_suffix('.engine').name}"
        "   # the host's gates",
        polygraphy_command(onnx.with_suffix(".engine").name, last, results[last]["outputs"]),
        polygraphy_command(trt8.with_suffix(".engine").name, last, trt8_results[last]["outputs"],
                           trt_major=8) + "   # TensorRT 8.5 / 8.6"]
    report = Report(
        precisions={p: PrecisionResult.from_comparison(r, conversion.reports.get(p))
                    for p, r in results.items()},
        flavours={fl: {p: PrecisionResult.from_comparison(r) for p, r in validation.of(fl).items()}
                  for fl in conversion.twins},
        task_metrics=validation.metrics, validation_data=val.identity,
        next_commands=next_commands, stages=stages.rows,
        lint_warnings=[str(w) for w in lint_warnings], skipped_videos=val.skipped_videos,
        split={_label(p, fl): PrecisionResult.from_comparison(r, {
            g: conversion.graph_reports[(g, p)] for g in SPLIT_GRAPHS
            if fl == DEFAULT_FLAVOUR and (g, p) in conversion.graph_reports} or None)
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
        graph_contracts=loaded.graph_contracts,
        tools=tool_versions(), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        tokenizer=tokenizer_name, answers="answers.json" if answers else None)
    manifest.write(work)
    write_device_kit(work, manifest)
    write_text(work / "report.md", render_report_md(manifest, report))
    return manifest, report


def _parity(validation: Validation, flavour: str) -> dict[str, bool]:
    """precision -> verdict of one flavour: a precision passes when each of its layouts (the
    whole-model file, the split graphs composed) passed its gates."""
    return {p: r["passed"] and validation.split.get((p, flavour), {}).get("passed", True)
            for p, r in validation.of(flavour).items()}


@dataclass
class SplitFiles:
    """The split graphs of one precision and their contracts."""
    files: dict[str, Path]
    contracts: dict[str, IOContract]


@dataclass
class SplitChecks:
    """What validate_files found on the split graphs: (precision, flavour) -> comparison (with
    the split-vs-whole-model gate at FP32), and per runner its graph executions, rows, seconds."""
    split: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)


def validate_files(model, contract: IOContract, files: dict[tuple[str, str], Path], val,
                   answers: list[str] | None, gates: dict[str, "validate.Gate"],
                   split: dict[tuple[str, str], SplitFiles] | None = None
                   ) -> tuple[dict[tuple[str, str], Any], dict[str, Any], dict[str, np.ndarray],
                              SplitChecks]:
    """PyTorch (hard and perturbed selection) and ONNX Runtime on each file, keyed (precision,
    flavour), over the validation rows: comparisons with the precision's gate verdicts, task
    metrics per run, and the reference outputs on the paired rows. With `split` ((precision,
    flavour) -> its split graphs), the split graphs composed too (`split.validate_split`: each
    stem and text computed once), against the same reference and gates, and at FP32 against the
    whole-model file of the same flavour on every row both ran."""
    hard = make_torch_runner(model, contract, "hard", "torch-hard")
    perturbed = make_torch_runner(model, contract, "perturbed", "torch-perturbed")
    metrics: dict[str, Any] = {}
    with hard:
        reference, metrics["torch-hard"] = validate.run_validation(hard, val, contract,
                                                                   answers=answers)
    with perturbed:
        _, metrics["torch-perturbed"] = validate.run_validation(perturbed, val, contract,
                                                                answers=answers)
    results: dict[tuple[str, str], Any] = {}
    checks = SplitChecks()
    batch = validate.validation_batch(contract)
    for (p, fl), path in files.items():
        run = f"onnx-{_label(p, fl)}"
        runner = ort_runner(path, name=run)
        with runner, Stopwatch() as sw:
            every, test, metrics[run] = validate.run_every_row(runner, val, contract,
                                                               answers=answers)
        rows = len(every[contract.output_names[0]])
        checks.runs[run] = {"graph_runs": {MODEL_GRAPH: -(-rows // batch)},
                            "graph_rows": {MODEL_GRAPH: rows}, "seconds": sw.seconds}
        results[(p, fl)] = validate.compare_precision(p, test, reference, contract, gates[p],
                                                      metrics[run], metrics["torch-hard"])
        if split and (p, fl) in split:
            checks.split[(p, fl)] = _validate_split_files(
                p, fl, split[(p, fl)], contract, val, reference, metrics, gates[p], answers,
                every, checks)
    return results, metrics, reference, checks


def _validate_split_files(p: str, flavour: str, split: SplitFiles, contract: IOContract,
                          val: FeedSet, reference: dict[str, np.ndarray], metrics: dict[str, Any],
                          gate: "validate.Gate", answers: list[str] | None,
                          whole_model: dict[str, np.ndarray], checks: SplitChecks
                          ) -> dict[str, Any]:
    """One precision's split graphs of one flavour composed against the reference; at FP32 also
    against that flavour's whole-model file's outputs on every row (a gate: SPLIT_FP32_ATOL on
    itm_logits)."""
    from .split import validate_split

    result = validate_split(split.files, split.contracts, contract, p, val, reference,
                            metrics["torch-hard"], gate, answers)
    every = result.pop("every")
    run = f"split-{_label(p, flavour)}"
    metrics[run] = result.pop("task_metrics")
    checks.runs[run] = {key: result.pop(key)
                        for key in ("graph_runs", "graph_rows", "seconds", "select")}
    if p == "fp32":
        errors = validate.output_errors({n: every[n] for n in ("itm_logits", "itc_sim")},
                                        {n: whole_model[n] for n in ("itm_logits", "itc_sim")})
        itm, itc = errors["itm_logits"]["max_abs"], errors["itc_sim"]["max_abs"]
        rows = len(every["itm_logits"])
        whole = "the whole-model FP32 ONNX" + (
            "" if flavour == DEFAULT_FLAVOUR else f" of flavour {flavour}")
        result["gates"].append(dataclasses.asdict(validate.GateResult(
            f"itm_logits vs {whole}", itm <= SPLIT_FP32_ATOL,
            f"{itm:.3g} (limit {SPLIT_FP32_ATOL:g}) over all {rows} rows; itc_sim {itc:.3g}")))
        result["passed"] = all(g["passed"] for g in result["gates"])
    return result


def validate_onnx(ckpt: str, onnx_path: str | Path, val_data: str = "demo",
                  task: str | None = None, precision_name: str | None = None,
                  gates: dict[str, Any] | None = None, tokenizer: str | None = None,
                  trust_checkpoint: bool = False, on_error: str = "fail",
                  limit: int | None = None) -> dict[str, Any]:
    """Validate one ONNX file against the checkpoint (the `validate` subcommand). The contract
    comes from the artifact's manifest.json when present, else from the checkpoint and task;
    the precision from --precision, else from the manifest's entry for the file."""
    from model import CheckpointError, load_checkpoint

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    manifest = (Manifest.load(onnx_path.parent)
                if (onnx_path.parent / MANIFEST_FILE).is_file() else None)
    try:
        model, load_report = load_checkpoint(resolve_checkpoint(ckpt),
                                             trust_pickle=trust_checkpoint)
        tok = Tokenizer.from_file(tokenizer) if tokenizer else Tokenizer.default()
        val_dir = resolve_data(val_data)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    if manifest:
        contract = manifest.contract
        if task and task != contract.task:
            raise UserError(f"{onnx_path} was exported for {contract.task}, not {task}")
        entry = manifest.entry_for(onnx_path)
        precision_name = precision_name or (entry.precision if entry else None)
        if contract.schedule != model.cfg.selector.schedule:
            model = _with_schedule(model, contract.schedule)
    else:
        contract, entry = IOContract.for_model(model.cfg, task or "retrieval"), None
    # A file from another export (another model, frame count or edit) is refused up front.
    check_onnx_file(onnx_path, contract, entry.sha256 if entry else None)
    if precision_name not in PRECISIONS:
        raise UserError(f"cannot tell the precision of {onnx_path.name} (not listed in an "
                        "artifact's manifest.json): pass --precision")
    answers = load_report.metadata.get("answers") if contract.task == "qa" else None
    val = load_feeds(val_dir, contract, tok, on_error, limit=limit)
    flavour = entry.flavour if entry else DEFAULT_FLAVOUR
    results, metrics, _, _ = validate_files(model, contract,
                                            {(precision_name, flavour): onnx_path}, val, answers,
                                            gates or validate.DEFAULT_GATES)
    return {"precisions": {precision_name: results[(precision_name, flavour)]},
            "flavour": flavour, "task_metrics": metrics, "validation_data": val.identity,
            "onnx": str(onnx_path), "checkpoint": str(ckpt)}


def _with_schedule(model, schedule: str):
    from model import TWBert

    other = TWBert(model.cfg.with_schedule(schedule)).eval()
    other.load_state_dict(model.state_dict())
    return other


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
        lines += rtx_report_md(report.rtx)
    return "\n".join(lines) + "\n"


def _labelled(report: Report) -> list[tuple[str, PrecisionResult]]:
    """(label, result) of every file judged: the rows of report.md's tables."""
    return [(_label(p, fl), r) for p, fl, r in report.results()]


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


def summary_table(result: ExportResult) -> str:
    rows = [f"{'precision':<10}{'file':<22}{'gates':<8}{'max |itm| err':>14}{'selection':>22}"]
    for p, flavour, r in result.report.results():
        entry = result.manifest.file(p, flavour=flavour)
        name = entry.path if entry else ""
        itm = r.outputs.get("itm_logits", {}).get("max_abs", float("nan"))
        sel = " ".join(f"{s}:{c['identical']}/{c['samples']}" for s, c in r.selection.items())
        rows.append(f"{_label(p, flavour):<10}{name:<22}{'PASS' if r.passed else 'FAIL':<8}"
                    f"{itm:>14.2e}{sel:>22}")
    for p, r in result.report.split.items():
        itm = r.outputs.get("itm_logits", {}).get("max_abs", float("nan"))
        sel = " ".join(f"{s}:{c['identical']}/{c['samples']}" for s, c in r.selection.items())
        rows.append(f"{p:<10}{f'split ({p}) x4':<22}{'PASS' if r.passed else 'FAIL':<8}"
                    f"{itm:>14.2e}{sel:>22}")
    return "\n".join(rows)


