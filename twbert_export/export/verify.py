"""The validate stage: PyTorch against ONNX Runtime on every precision and flavour of the
whole-model graph and of the split graphs composed (`validation.files`), and the reference data
a device validates its engines against."""

from __future__ import annotations

from pathlib import Path

from ..artifact.manifest import FLAVOURS, MODEL_GRAPH, REPORT_FILE, label
from ..data.calibration import FeedSet
from ..util import Stopwatch
from ..validation import parity as validate
from ..validation.files import SplitFiles, validate_files
from ..validation.reference import save_polygraphy_reference, save_validation_reference
from ..validation.runners import batched
from .job import Conversion, ExportOptions, Loaded, StageLog, Validation
from .load import reload_model

# Rows of validation data shipped as Polygraphy reference data (inputs + outputs) for devices.
REFERENCE_ROWS = 8


def validate_stage(loaded: Loaded, conversion: Conversion, val: FeedSet, opts: ExportOptions,
                   work: Path, out: Path, stages: StageLog) -> Validation:
    """PyTorch against ONNX Runtime on every precision and flavour of the whole-model graph
    and of the split graphs composed; the reference data a device validates against."""
    with Stopwatch() as sw:
        model = reload_model(loaded, opts.trust_checkpoint)
        contract = loaded.contract
        files = {(p, fl): f for fl in FLAVOURS for p, f in conversion.of(MODEL_GRAPH, fl).items()}
        split = {(p, fl): SplitFiles(graph_files, loaded.graph_contracts)
                 for (p, fl) in files if (graph_files := conversion.split_files(p, fl))}
        plan = conversion.plan
        if plan is not None:  # the per-graph plan, each flavour it has files in, its own gates
            split |= {(plan.name, fl): SplitFiles(plan_files, loaded.graph_contracts,
                                                  plan.gate_precision)
                      for fl in FLAVOURS
                      if (plan_files := conversion.plan_files(plan, fl)) is not None}
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
    verdicts = ", ".join(f"{label(p, fl)} {'PASS' if r['passed'] else 'FAIL'}"
                         for (p, fl), r in results.items())
    if checked.split:
        labels = [label(p, fl) for p, fl in checked.split]
        verdicts += "; split " + ", ".join(
            f"{label} {'PASS' if r['passed'] else 'FAIL'}"
            for label, r in zip(labels, checked.split.values()))
        whole = sum(checked.runs[f"onnx-{label}"]["seconds"] for label in labels
                    if f"onnx-{label}" in checked.runs)  # a plan has no whole-model file
        composed = sum(checked.runs[f"split-{label}"]["seconds"] for label in labels)
        verdicts += f"; ONNX Runtime {whole:.1f}s whole model, {composed:.1f}s split"
    stages.line("validate", sw.seconds, out / REPORT_FILE, verdicts, work / REPORT_FILE)
    return Validation(results, metrics, checked.split, checked.runs)
