"""The first stages: the options checked (data sets included) before anything expensive runs,
the checkpoint loaded with the I/O contract it gives, and the clips preprocessed."""

from __future__ import annotations

from pathlib import Path

from ..artifact.contract import BatchRange, IOContract
from ..artifact.input_checks import UserError
from ..artifact.manifest import PRECISIONS
from ..artifact.plan import Plan, PlanError, parse_plan
from ..data.assets import resolve_checkpoint, resolve_data
from ..data.calibration import (FeedSet, check_calibration_count, check_calibration_set, check_data,
                                load_feeds)
from ..data.preprocess import Tokenizer
from ..precision.policy import CALIBRATED_PRECISIONS
from ..util import Stopwatch
from .job import GRAPH_SETS, ExportOptions, Inputs, Loaded, StageLog


def default_name(ckpt: str, task: str, schedule: str) -> str:
    stem = "demo" if ckpt == "demo" else Path(ckpt).stem
    return f"{stem}-{task}-{schedule}"


def resolve_inputs(opts: ExportOptions) -> Inputs:
    """The options checked, the data sets included (`calibration.check_data`), before any
    expensive work."""
    if opts.graphs not in GRAPH_SETS:
        raise UserError(f"--graphs must be one of {', '.join(GRAPH_SETS)}, got {opts.graphs!r}")
    plan = _plan(opts)
    if plan is None:
        unknown = [p for p in opts.precisions if p not in PRECISIONS]
        if unknown:
            raise UserError(f"unknown precision {unknown}; choose from {', '.join(PRECISIONS)}")
        precisions = [p for p in PRECISIONS if p == "fp32" or p in opts.precisions]
    else:
        precisions = plan.precisions
    if opts.val_limit is not None and opts.val_limit < 1:
        raise UserError(f"--val-clips must be >= 1, got {opts.val_limit}")
    if plan is not None and set(precisions) != {"fp32"}:
        try:
            resolve_data(opts.calib_data)
        except (ValueError, FileNotFoundError) as e:
            raise UserError(f"the plan {plan.name} needs calibration data for its "
                            f"{'/'.join(p for p in precisions if p != 'fp32')} graphs: "
                            f"{e}") from None
    try:
        inputs = Inputs(
            precisions=precisions, plan=plan, ckpt_path=resolve_checkpoint(opts.ckpt),
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
        if set(CALIBRATED_PRECISIONS) & set(precisions):
            check_calibration_count(usable)
    return inputs


def _plan(opts: ExportOptions) -> Plan | None:
    """The per-graph plan of --precision, checked against the graphs the export writes."""
    if opts.plan is None:
        return None
    try:
        plan = parse_plan(opts.plan)
    except PlanError as e:
        raise UserError(str(e)) from None
    if opts.graphs != "both":
        raise UserError(f"--precision {opts.plan} is a plan for the split graphs, and "
                        f"--graphs {opts.graphs} writes the whole model only: give one precision "
                        "(the whole model keeps one), or export with --graphs both")
    return plan


def check_calibration_clips(inputs: Inputs, opts: ExportOptions, contract: IOContract) -> None:
    """For INT8, the calibration clips as the precision step will see them (the contract's
    frames and size: known once the checkpoint is loaded) checked to be real video
    (`calibration.check_calibration_set`: not random noise) before the export starts, not at the
    INT8 stage minutes later. The clips are decoded again by the data stage: not held through
    the export, whose memory peak they would raise."""
    if not set(CALIBRATED_PRECISIONS) & set(inputs.precisions) or inputs.calib_dir is None:
        return
    check_calibration_set(load_feeds(inputs.calib_dir, contract, inputs.tokenizer,
                                     opts.on_error, texts_per_video=1))


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


def reload_model(loaded: Loaded, trust_checkpoint: bool):
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
