"""The export job: checkpoint -> ONNX -> rewrite -> lint -> precision -> validate -> artifacts.

Each stage prints one line (artifact, size, time). Artifacts are assembled in a scratch
directory beside the target and moved into place at the end, so an existing artifact directory
is never half-overwritten (and never overwritten at all without --force).
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import legacy, lint, precision, validate
from .assets import resolve_checkpoint, resolve_data
from .calibration import load_feeds
from .contract import BatchRange, IOContract
from .onnx_export import export_onnx
from .preprocess import Tokenizer
from .reference import save_polygraphy_reference, save_validation_reference
from .rewrite import rewrite
from .runners import batched, make_torch_runner, ort_runner
from .trt.commands import polygraphy_command, write_device_kit
from .util import (Stopwatch, current_rss_gb, file_sha256, human_size, map_large_allocations,
                   require, stage_peak_rss_gb, write_json, write_text)

PRECISION_ORDER = ("fp32", "fp16", "int8")
# Rows of validation data shipped as Polygraphy reference data (inputs + outputs) for devices.
REFERENCE_ROWS = 8


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


# -- the job --------------------------------------------------------------------------------------
def run_export(opts: ExportOptions) -> dict[str, Any]:
    """Run every stage and return the report (its gate verdicts included: the caller decides the
    exit code). Raises UserError for bad input."""
    from model import CheckpointError, load_checkpoint

    unknown = [p for p in opts.precisions if p not in PRECISION_ORDER]
    if unknown:
        raise UserError(f"unknown precision {unknown}; choose from {', '.join(PRECISION_ORDER)}")
    precisions = [p for p in PRECISION_ORDER if p == "fp32" or p in opts.precisions]
    if opts.val_limit is not None and opts.val_limit < 1:
        raise UserError(f"--val-clips must be >= 1, got {opts.val_limit}")
    try:
        ckpt_path = resolve_checkpoint(opts.ckpt)
        val_dir = resolve_data(opts.val_data)
        calib_dir = resolve_data(opts.calib_data) if set(precisions) - {"fp32"} else None
        batch = BatchRange.parse(opts.batch)
        tokenizer = Tokenizer.from_file(opts.tokenizer) if opts.tokenizer else Tokenizer.default()
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None

    stages = StageLog(total=6 + len(precisions))
    t_start = time.perf_counter()
    map_large_allocations()  # stages load and free whole models: return them to the system
    with Stopwatch() as sw:
        try:
            model, load_report = load_checkpoint(ckpt_path, schedule=opts.schedule,
                                                 trust_pickle=opts.trust_checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        model.eval()
        try:
            contract = IOContract.for_model(model.cfg, opts.task, batch, opts.max_text_len)
        except ValueError as e:
            raise UserError(str(e)) from None
        if contract.task == "qa" and not load_report.metadata.get("answers"):
            raise UserError(f"{ckpt_path}: the checkpoint's metadata has no answer list, "
                            "which a QA export needs")
    stages.line("load", sw.seconds, ckpt_path, f"{load_report.format}, F@{contract.schedule}")

    out = Path(opts.out or Path("engines") / default_name(opts.ckpt, opts.task, contract.schedule))
    if out.exists() and not opts.force:
        raise UserError(f"{out} exists; pass --force to replace it, or --out another directory")
    work = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        report = _export_into(work, out, opts, precisions, model, load_report, contract,
                              tokenizer, ckpt_path, val_dir, calib_dir, stages)
        report["total_seconds"] = time.perf_counter() - t_start
        write_json(work / "report.json", report)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(work, out)
            shutil.rmtree(old)
        else:
            os.replace(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["out"] = str(out)
    report["next_onnx"] = str(out / f"model.{precisions[-1]}.onnx")
    return report


def _export_into(work: Path, out: Path, opts: ExportOptions, precisions: list[str], model,
                 load_report, contract: IOContract, tokenizer: Tokenizer, ckpt_path: Path,
                 val_dir: Path, calib_dir: Path | None, stages: StageLog) -> dict[str, Any]:
    files: dict[str, Path] = {}
    with Stopwatch() as sw:
        raw = work / "model.raw.onnx"
        export_onnx(model, contract, raw)
        # The weights wait idle until validation: free them for the precision steps (1 GB at
        # the base preset) and load the checkpoint again then.
        config = model.cfg
        model.to("meta")
    stages.line("export", sw.seconds, out / raw.name, f"opset {contract.opset}, dynamo", raw)
    with Stopwatch() as sw:
        files["fp32"] = work / "model.fp32.onnx"
        histogram = rewrite(raw, files["fp32"], contract)
        raw.unlink()
    top = ", ".join(f"{k} {v}" for k, v in list(histogram.items())[:8])
    stages.line("rewrite", sw.seconds, out / files["fp32"].name,
                f"{sum(histogram.values())} nodes: {top}, ...", files["fp32"])
    with Stopwatch() as sw:
        lint_warnings = lint.check_model(files["fp32"])
    stages.line("lint", sw.seconds, None,
                f"TensorRT 10 parser: no errors, {len(lint_warnings)} warnings")

    with Stopwatch() as sw:
        val = load_feeds(val_dir, contract, tokenizer, opts.on_error, limit=opts.val_limit)
        calib = (load_feeds(calib_dir, contract, tokenizer, opts.on_error, texts_per_video=1)
                 if calib_dir else None)
    stages.line("data", sw.seconds, None,
                f"val {len(val.video)} clips / {len(val)} texts"
                + (f", calib {len(calib.video)} clips" if calib else "")
                + (f", {val.truncated_texts} texts truncated to {contract.text_len}"
                   if val.truncated_texts else ""))

    precision_reports: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        ranges = (stack.enter_context(precision.ActivationRanges(files["fp32"], calib))
                  if calib else None)
        for p in precisions[1:]:
            with Stopwatch() as sw:
                files[p] = work / f"model.{p}.onnx"
                if p == "fp16":
                    rep = precision.to_fp16(files["fp32"], files[p], ranges)
                else:
                    rep = precision.to_int8(files["fp32"], files[p], calib, opts.calib_method,
                                            use_cache=opts.calib_cache, ranges=ranges)
            rep.seconds = sw.seconds
            precision_reports[p] = rep.to_dict()
            kept = len(rep.kept_fp32_range)
            int8 = rep.calibration.get("int8_nodes")
            stages.line(p, sw.seconds, out / files[p].name,
                        (f"{int8} INT8 layers, " if int8 else "")
                        + f"{len(rep.kept_fp32_selection)} selection nodes FP32, {kept} other "
                        "nodes kept FP32 by AutoCast"
                        + (f" ({rep.cache.split()[0]} calibration cache)" if rep.cache else "")
                        + "".join(f"; {step} {sec:.1f}s" for step, sec in rep.steps.items()),
                        files[p])

    # TensorRT 8.5 / 8.6 (JetPack 5.1 / 6.0) graphs, validated below with the same gates.
    with Stopwatch() as sw:
        trt8 = legacy.write_legacy_graphs(files, work)
        files.update(trt8)
    stages.line("trt8", sw.seconds, out / trt8[legacy.legacy_key(precisions[-1])].name,
                legacy.describe(trt8), trt8[legacy.legacy_key(precisions[-1])])

    # -- validation ------------------------------------------------------------------------------
    with Stopwatch() as sw:
        answers = load_report.metadata.get("answers") if contract.task == "qa" else None
        model = _reload(ckpt_path, config, opts.trust_checkpoint)
        results, metrics, reference = validate_files(model, contract, files, val, answers,
                                                     {**validate.DEFAULT_GATES, **opts.gates})
        ref_rows = min(REFERENCE_ROWS, len(val))
        ref_feeds = batched(val.feed(slice(0, ref_rows)), contract.batch.max)
        ref_outputs = [{k: v[i * contract.batch.max:(i + 1) * contract.batch.max]
                        for k, v in reference.items()} for i in range(len(ref_feeds))]
        save_polygraphy_reference(work / "reference", ref_feeds, ref_outputs, "torch-hard")
        save_validation_reference(work / "reference", val, reference, metrics, contract)
    verdicts = ", ".join(f"{p} {'PASS' if r['passed'] else 'FAIL'}" for p, r in results.items())
    stages.line("validate", sw.seconds, out / "report.json", verdicts, work / "report.json")

    # -- artifacts ------------------------------------------------------------------------------
    shutil.copyfile(tokenizer.source, work / "tokenizer.json") if tokenizer.source.endswith(
        ".json") else shutil.copyfile(tokenizer.source, work / "vocab.txt")
    if answers:
        write_json(work / "answers.json", answers)
    last = precisions[-1]
    next_commands = [
        f"./build_on_device.sh {last}   # the file and flags for the TensorRT version it finds",
        f"python3 -m twbert_export.trt.cli --onnx model.{last}.onnx --target auto",
        f"python3 -m twbert_export.reference --engine model.{last}.engine   # the host's gates",
        polygraphy_command(f"model.{last}.engine", last, results[last]["outputs"]),
        polygraphy_command(f"model.{last}.trt8.engine", last,
                           results[legacy.legacy_key(last)]["outputs"], trt_major=8)
        + "   # TensorRT 8.5 / 8.6"]
    report = {"precisions": results, "task_metrics": metrics, "precision": precision_reports,
              "next_commands": next_commands,
              "stages": stages.rows, "lint_warnings": [str(w) for w in lint_warnings],
              "validation_data": val.identity, "skipped_videos": val.skipped_videos}
    manifest = {
        "format": "twbert-export-artifact", "format_version": 1,
        "checkpoint": {"path": str(ckpt_path), "sha256": file_sha256(ckpt_path),
                       "format": load_report.format},
        "model_config": model.cfg.to_dict(), "schedule": contract.schedule,
        "contract": contract.to_dict(),
        "files": {p: {"path": f.name, "sha256": file_sha256(f), "bytes": f.stat().st_size}
                  for p, f in files.items()},
        "calibration": (calib.identity | {"clips": len(calib.video), "method": opts.calib_method}
                        if calib else None),
        "validation_data": val.identity,
        "parity": {p: {"passed": r["passed"]} for p, r in results.items()},
        "tools": tool_versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": "tokenizer.json" if tokenizer.source.endswith(".json") else "vocab.txt",
        "answers": "answers.json" if answers else None,
    }
    write_json(work / "manifest.json", manifest)
    write_device_kit(work, manifest)
    write_text(work / "report.md", render_report_md(manifest, report))
    return report


def _reload(ckpt_path: Path, config, trust_checkpoint: bool):
    """The checkpoint's model again, with the configuration the export used (its schedule)."""
    from model import load_checkpoint

    model, _ = load_checkpoint(ckpt_path, schedule=config.selector.schedule,
                               trust_pickle=trust_checkpoint)
    if model.cfg != config:
        raise RuntimeError(f"{ckpt_path} changed during the export")
    return model.eval()


def validate_files(model, contract: IOContract, files: dict[str, Path], val,
                   answers: list[str] | None, gates: dict[str, "validate.Gate"]
                   ) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """PyTorch (hard and perturbed selection) and ONNX Runtime on each file over the validation
    rows: per-precision comparisons with gate verdicts, task metrics per run, and the reference
    outputs on the paired rows."""
    hard = make_torch_runner(model, contract, "hard", "torch-hard")
    perturbed = make_torch_runner(model, contract, "perturbed", "torch-perturbed")
    metrics: dict[str, Any] = {}
    with hard:
        reference, metrics["torch-hard"] = validate.run_validation(hard, val, contract,
                                                                   answers=answers)
    with perturbed:
        _, metrics["torch-perturbed"] = validate.run_validation(perturbed, val, contract,
                                                                answers=answers)
    results: dict[str, Any] = {}
    for p, path in files.items():
        runner = ort_runner(path, name=f"onnx-{p}")
        with runner:
            test, metrics[f"onnx-{p}"] = validate.run_validation(runner, val, contract,
                                                                 answers=answers)
        results[p] = validate.compare_precision(p, test, reference, contract,
                                                gates[legacy.base_precision(p)],
                                                metrics[f"onnx-{p}"], metrics["torch-hard"])
    return results, metrics, reference


def validate_onnx(ckpt: str, onnx_path: str | Path, val_data: str = "demo",
                  task: str | None = None, precision_name: str | None = None,
                  gates: dict[str, Any] | None = None, tokenizer: str | None = None,
                  trust_checkpoint: bool = False, on_error: str = "fail") -> dict[str, Any]:
    """Validate one ONNX file against the checkpoint (the `validate` subcommand). The contract
    comes from the artifact's manifest.json when present, else from the checkpoint and task."""
    import json

    from model import CheckpointError, load_checkpoint

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise UserError(f"ONNX file not found: {onnx_path}")
    manifest_path = onnx_path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    try:
        model, load_report = load_checkpoint(resolve_checkpoint(ckpt),
                                             trust_pickle=trust_checkpoint)
        tok = Tokenizer.from_file(tokenizer) if tokenizer else Tokenizer.default()
        val_dir = resolve_data(val_data)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    if manifest:
        contract = IOContract.from_dict(manifest["contract"])
        if task and task != contract.task:
            raise UserError(f"{onnx_path} was exported for {contract.task}, not {task}")
        by_file = {f["path"]: p for p, f in manifest["files"].items()}
        precision_name = precision_name or by_file.get(onnx_path.name)
        if contract.schedule != model.cfg.selector.schedule:
            model = _with_schedule(model, contract.schedule)
    else:
        contract = IOContract.for_model(model.cfg, task or "retrieval")
    name_parts = onnx_path.name.split(".")
    precision_name = precision_name or (name_parts[-2] if len(name_parts) > 2 else None)
    if precision_name not in PRECISION_ORDER:
        raise UserError(f"cannot tell the precision of {onnx_path.name}: pass --precision")
    answers = load_report.metadata.get("answers") if contract.task == "qa" else None
    val = load_feeds(val_dir, contract, tok, on_error)
    results, metrics, _ = validate_files(model, contract, {precision_name: onnx_path}, val,
                                         answers, gates or validate.DEFAULT_GATES)
    return {"precisions": results, "task_metrics": metrics, "validation_data": val.identity,
            "onnx": str(onnx_path), "checkpoint": str(ckpt)}


def _with_schedule(model, schedule: str):
    from model import TWBert

    other = TWBert(model.cfg.with_schedule(schedule)).eval()
    other.load_state_dict(model.state_dict())
    return other


def render_report_md(manifest: dict[str, Any], report: dict[str, Any]) -> str:
    lines = [f"# Parity report: F@{manifest['schedule']}, task {manifest['contract']['task']}", "",
             f"Checkpoint `{manifest['checkpoint']['path']}` "
             f"(sha256 {manifest['checkpoint']['sha256'][:12]}), validation data "
             f"`{report['validation_data']['data_dir']}` "
             f"({report['validation_data']['num_videos']} clips). Reference: PyTorch, hard "
             "selection.", "", "## Gates", "", "| precision | gate | result | detail |",
             "| --- | --- | --- | --- |"]
    for p, r in report["precisions"].items():
        for g in r["gates"]:
            lines.append(f"| {p} | {g['name']} | {'pass' if g['passed'] else '**FAIL**'} | "
                         f"{g['detail']} |")
    lines += ["", "## Output errors (paired rows)", "",
              "| precision | output | max abs | max rel | cosine |", "| --- | --- | --- | --- | --- |"]
    for p, r in report["precisions"].items():
        for name, e in r["outputs"].items():
            if "max_abs" in e:
                lines.append(f"| {p} | {name} | {e['max_abs']:.3g} | {e['max_rel']:.3g} | "
                             f"{e['cosine']:.6f} |")
            else:
                lines.append(f"| {p} | {name} | {e['mismatched']} of {e['total']} rows differ "
                             "| | |")
    lines += ["", "## Frame selection agreement", "",
              "| precision | selector | identical | near-tie | divergent |",
              "| --- | --- | --- | --- | --- |"]
    for p, r in report["precisions"].items():
        for s, c in r["selection"].items():
            lines.append(f"| {p} | {s} | {c['identical']} | {c['near_tie']} | {c['divergent']} |")
    lines += ["", "## Task metrics", ""]
    metrics = report["task_metrics"]
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
    return "\n".join(lines) + "\n"


def summary_table(report: dict[str, Any]) -> str:
    rows = [f"{'precision':<10}{'file':<22}{'gates':<8}{'max |itm| err':>14}{'selection':>22}"]
    for p, r in report["precisions"].items():
        itm = r["outputs"].get("itm_logits", {}).get("max_abs", float("nan"))
        sel = " ".join(f"{s}:{c['identical']}/{c['samples']}" for s, c in r["selection"].items())
        rows.append(f"{p:<10}{'model.' + p + '.onnx':<22}{'PASS' if r['passed'] else 'FAIL':<8}"
                    f"{itm:>14.2e}{sel:>22}")
    return "\n".join(rows)


