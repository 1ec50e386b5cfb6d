"""Reference data shipped in every artifact's `reference/`, and validation against it on a device.

Written at export time from the validation that just ran on the host:
- `inputs.json` / `outputs.json`: the first rows in Polygraphy's RunResults JSON formats, for
  `polygraphy run model.fp16.onnx --trt --load-inputs ... --load-outputs ...`;
- `validation.npz` / `validation.json`: the WHOLE validation set as the model saw it (the clips'
  preprocessed frames, token ids and masks, which clip each text shows), the PyTorch-hard
  outputs on the paired rows, and the PyTorch task metrics. With them
  `python export.py validate --engine model.fp16.engine` re-runs the host's validation on the
  device, with the same comparisons and gates, and needs neither PyTorch nor the clips.

Torch-free and polygraphy-free on the validation path: a Jetson with TensorRT and numpy runs it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from . import parity as validate
from ..artifact.manifest import PRECISIONS
from ..data.calibration import FeedSet
from ..artifact.contract import IOContract
from ..util import atomic_path, require, write_json

VALIDATION_ARRAYS, VALIDATION_META = "validation.npz", "validation.json"
OUTPUT_PREFIX = "reference."  # npz keys of the reference outputs: reference.itm_logits, ...


class ReferenceError(ValueError):
    """Reference data that is missing or does not fit the model being validated."""


# -- writing (host) -------------------------------------------------------------------------------
def save_polygraphy_reference(directory: Path, feeds: list[dict[str, np.ndarray]],
                              outputs: list[dict[str, np.ndarray]], runner_name: str
                              ) -> tuple[Path, Path]:
    """Inputs and outputs in Polygraphy's JSON formats (for `polygraphy run --load-inputs
    ... --load-outputs ...`)."""
    comparator = require("polygraphy.comparator", "to save reference data")
    pjson = require("polygraphy.json", "to save reference data")
    G_LOGGER = require("polygraphy.logger", "to save reference data").G_LOGGER
    directory.mkdir(parents=True, exist_ok=True)
    inputs_path, outputs_path = directory / "inputs.json", directory / "outputs.json"
    results = comparator.RunResults()
    results.append((runner_name, [comparator.IterationResult(outputs=OrderedDict(o),
                                                             runner_name=runner_name)
                                  for o in outputs]))
    severity, G_LOGGER.module_severity = G_LOGGER.module_severity, G_LOGGER.WARNING
    try:  # Polygraphy announces each save; our stage line says it once
        pjson.save_json([OrderedDict(f) for f in feeds], str(inputs_path), description="inputs")
        # TensorRT 8.x binds INT64 inputs as INT32 (its parser narrows them) and Polygraphy
        # feeds what the file holds: the same rows with INT32 token ids for those engines.
        pjson.save_json([OrderedDict((k, v.astype(np.int32) if v.dtype == np.int64 else v)
                                     for k, v in f.items()) for f in feeds],
                        str(directory / "inputs.int32.json"), description="inputs")
        results.save(str(outputs_path))
    finally:
        G_LOGGER.module_severity = severity
    return inputs_path, outputs_path


def save_validation_reference(directory: Path, val: FeedSet, outputs: dict[str, np.ndarray],
                              metrics: dict[str, Any], contract: IOContract) -> Path:
    """The validation set and the reference results on it. `outputs`: the reference runner's
    outputs on the paired rows; `metrics`: task metrics per host run (torch-hard is the one
    the gates compare against)."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"video": val.video, "input_ids": val.input_ids,
              "attention_mask": val.attention_mask, "video_index": val.video_index}
    arrays |= {OUTPUT_PREFIX + name: value for name, value in outputs.items()}
    path = directory / VALIDATION_ARRAYS
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # uncompressed: frames barely compress, and it loads fast
    write_json(directory / VALIDATION_META, {
        "format": "twbert-validation-reference", "format_version": 1,
        "task": contract.task, "schedule": contract.schedule, "rows": len(val),
        "clips": len(val.video), "texts": val.texts, "answers": val.answers,
        "video_paths": val.video_paths, "reference_runner": "torch-hard",
        "task_metrics": metrics, "validation_data": val.identity})
    return path


# -- reading and validating (device) --------------------------------------------------------------
def load_validation_reference(directory: str | Path, contract: IOContract
                              ) -> tuple[FeedSet, dict[str, np.ndarray], dict[str, Any]]:
    """The validation set as a FeedSet, the reference outputs on its paired rows, and the
    metadata. Raises ReferenceError when the files are missing or were made for another
    export."""
    directory = Path(directory)
    arrays_path, meta_path = directory / VALIDATION_ARRAYS, directory / VALIDATION_META
    if not arrays_path.is_file() or not meta_path.is_file():
        raise ReferenceError(f"{directory} has no {VALIDATION_ARRAYS} / {VALIDATION_META}: "
                             "re-export the artifact with this version of export.py (older "
                             "artifacts ship only the Polygraphy rows)")
    try:
        meta = json.loads(meta_path.read_text())
        with np.load(arrays_path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ReferenceError(f"{directory}: unreadable reference data ({e}); copy the "
                             "artifact's reference/ directory again") from None
    if meta.get("task") != contract.task or meta.get("schedule") != contract.schedule:
        raise ReferenceError(f"{directory} holds reference data for task {meta.get('task')}, "
                             f"F@{meta.get('schedule')}; the model is task {contract.task}, "
                             f"F@{contract.schedule}")
    video_spec = contract.inputs[0]
    if arrays["video"].shape[1:] != video_spec.concrete(1)[1:]:
        raise ReferenceError(f"{directory}: clips of shape {arrays['video'].shape[1:]}, the "
                             f"model takes {video_spec.concrete(1)[1:]}")
    missing = [n for n in contract.output_names if OUTPUT_PREFIX + n not in arrays]
    if missing:
        raise ReferenceError(f"{directory}: no reference values for outputs {missing}")
    feeds = FeedSet(video=arrays["video"], input_ids=arrays["input_ids"],
                    attention_mask=arrays["attention_mask"], video_index=arrays["video_index"],
                    texts=meta["texts"], answers=meta["answers"],
                    video_paths=meta["video_paths"], identity=meta["validation_data"])
    outputs = {n: arrays[OUTPUT_PREFIX + n] for n in contract.output_names}
    return feeds, outputs, meta


def validate_against_reference(runner: Any, precision: str, contract: IOContract,
                               reference_dir: str | Path, gate: validate.Gate,
                               answers: list[str] | None = None) -> dict[str, Any]:
    """Run `runner` (TensorRT, ONNX Runtime: any runner with the common interface) over the
    shipped validation set and judge it as the host judged the ONNX files: per-output errors and
    selection agreement against the PyTorch-hard outputs, task-metric drops against PyTorch-hard
    metrics, the precision's gates. Same report layout as `export.py validate`."""
    feeds, reference, meta = load_validation_reference(reference_dir, contract)
    with runner:
        test, test_metrics = validate.run_validation(runner, feeds, contract, answers=answers)
    host_metrics = meta["task_metrics"]
    result = validate.compare_precision(precision, test, reference, contract, gate,
                                        test_metrics, host_metrics.get("torch-hard"))
    name = f"{getattr(runner, 'name', precision)} (this run)"
    return {"precisions": {precision: result},
            "task_metrics": {**host_metrics, name: test_metrics},
            "validation_data": meta["validation_data"], "reference": str(reference_dir)}


# -- command line ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """`python export.py validate --engine model.fp16.engine` (also `python3 -m
    twbert_export.validation.reference ...` on a device without export.py). Exit 0 pass, 1 a gate failed,
    2 bad input or a missing runtime."""
    import argparse
    import sys

    from .artifact_runner import Artifact
    from ..trt.engine_manifest import EngineMismatch
    from ..util import MissingDependency

    ap = argparse.ArgumentParser(
        prog="python export.py validate --engine",
        description="Validate a built engine (or an ONNX file) from an artifact directory "
        "against the reference data the export shipped in reference/: the host's comparisons "
        "and gates, no PyTorch. Exit 1 if a gate fails.")
    ap.add_argument("--engine", "--model", dest="model", required=True,
                    help="model.PRECISION.engine built by `export.py build`, or an .onnx file "
                         "(ONNX Runtime) from the same artifact directory")
    ap.add_argument("--reference", help="reference directory (default: reference/ beside it)")
    ap.add_argument("--precision", choices=PRECISIONS,
                    help="gates to apply (default: the artifact's precision of the file)")
    ap.add_argument("--gate", action="append", default=[], metavar="PRECISION.FIELD=VALUE")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)

    def bad_input(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        print("hint: python export.py validate --engine FILE --help", file=sys.stderr)
        return 2

    try:
        gates = validate.parse_gate_overrides(args.gate)
        artifact = Artifact(args.model)
        precision = args.precision or (artifact.entry.precision if artifact.entry else None)
        if precision is None:
            return bad_input(f"{artifact.model_path.name} does not match a file listed in "
                             f"{artifact.dir / 'manifest.json'}: pass --precision")
        reference_dir = Path(args.reference or artifact.dir / "reference")
        report = validate_against_reference(artifact.runner(), precision, artifact.contract,
                                            reference_dir, gates[precision], artifact.answers)
    except (ValueError, FileNotFoundError, MissingDependency, EngineMismatch) as e:
        return bad_input(str(e))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    result = report["precisions"][precision]
    for g in result["gates"]:
        print(f"{precision:<5} {'PASS' if g['passed'] else 'FAIL'}  {g['name']}: {g['detail']}")
    print(metrics_line(report["task_metrics"]))
    return 0 if result["passed"] else 1


def metrics_line(metrics: dict[str, Any]) -> str:
    """One line comparing the headline metric of every run, host and device."""
    if any("accuracy" in m for m in metrics.values()):
        return "QA accuracy: " + ", ".join(f"{n} {100 * m['accuracy']:.1f}%"
                                           for n, m in metrics.items())
    return "t2v R@1: " + ", ".join(f"{n} {100 * m['t2v']['R@1']:.1f}%" for n, m in metrics.items())


if __name__ == "__main__":
    raise SystemExit(main())
