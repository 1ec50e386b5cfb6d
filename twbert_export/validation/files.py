"""PyTorch against ONNX Runtime on a set of ONNX files over the validation rows: the export's
validate stage and the `validate` subcommand. Each file is judged with its precision's gates;
the split graphs, composed, against the same reference and gates, and at FP32 against the
whole-model file (itm_logits within SPLIT_FP32_ATOL on every row)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.contract import IOContract
from ..artifact.input_checks import UserError, check_onnx_file
from ..artifact.manifest import DEFAULT_FLAVOUR, MANIFEST_FILE, MODEL_GRAPH, PRECISIONS, Manifest, label
from ..data.assets import resolve_checkpoint, resolve_data
from ..data.calibration import FeedSet, load_feeds
from ..data.preprocess import Tokenizer
from ..util import Stopwatch
from . import parity as validate
from .runners import make_torch_runner, ort_runner

# The split graphs composed at FP32 must give the monolithic FP32 graph's itm logits within this.
SPLIT_FP32_ATOL = 1e-5


@dataclass
class SplitFiles:
    """The split graphs of one precision (or of a per-graph plan: artifact/plan.py) and their
    contracts; `gate`: the precision whose gates judge them (default: the one they are keyed by)."""
    files: dict[str, Path]
    contracts: dict[str, IOContract]
    gate: str | None = None


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
        run = f"onnx-{label(p, fl)}"
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
    # The per-graph plans (and a precision whose whole-model file a plan left out): composed
    # only, with the gates of their least accurate precision.
    for (name, fl), files in (split or {}).items():
        if (name, fl) not in checks.split:
            checks.split[(name, fl)] = _validate_split_files(
                name, fl, files, contract, val, reference, metrics, gates[files.gate or name],
                answers, None, checks)
    return results, metrics, reference, checks


def _validate_split_files(p: str, flavour: str, split: SplitFiles, contract: IOContract,
                          val: FeedSet, reference: dict[str, np.ndarray], metrics: dict[str, Any],
                          gate: "validate.Gate", answers: list[str] | None,
                          whole_model: dict[str, np.ndarray] | None, checks: SplitChecks
                          ) -> dict[str, Any]:
    """One precision's split graphs of one flavour composed against the reference; at FP32 also
    against that flavour's whole-model file's outputs on every row (a gate: SPLIT_FP32_ATOL on
    itm_logits)."""
    from ..validation.composed import validate_split

    result = validate_split(split.files, split.contracts, contract, p, val, reference,
                            metrics["torch-hard"], gate, answers)
    every = result.pop("every")
    run = f"split-{label(p, flavour)}"
    metrics[run] = result.pop("task_metrics")
    checks.runs[run] = {key: result.pop(key)
                        for key in ("graph_runs", "graph_rows", "seconds", "select")}
    if p == "fp32" and whole_model is not None:
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
            model = with_schedule(model, contract.schedule)
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


def with_schedule(model, schedule: str):
    from model import TWBert

    other = TWBert(model.cfg.with_schedule(schedule)).eval()
    other.load_state_dict(model.state_dict())
    return other
