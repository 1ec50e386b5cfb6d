"""Checks of what a user hands over, made before any work starts: an ONNX file said to belong to
an artifact, and the directory an export is to be written to. Each failure is a ValueError
subclass whose message is one line naming the problem (the command line exits 2 on it).

Torch-free; `onnx` is imported only to read an ONNX file's inputs.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .contract import BATCH, BatchRange, IOContract, TensorSpec
from ..util import file_sha256, require


class UserError(ValueError):
    """Bad input from the user: one clear line, exit code 2."""


class ModelFileMismatch(ValueError):
    """An ONNX file that is not the model its artifact describes."""


class OutputDirError(ValueError):
    """An --out directory the export cannot or must not write."""


def check_onnx_file(onnx_path: str | Path, contract: IOContract,
                    expected_sha256: str | None = None) -> None:
    """Raise ModelFileMismatch unless the file takes the contract's inputs (names, dtypes, fixed
    dims, a dynamic batch axis) and has its outputs, and, when `expected_sha256` is given (the
    manifest records each file's), has exactly those bytes. The contract is checked first: its
    mismatch says more than a differing hash."""
    onnx = require("onnx", "to check an ONNX file against its contract")
    path = Path(onnx_path)
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as e:  # onnx's parsers (binary, text, JSON) each raise their own errors
        reason = " ".join(str(e).split())  # one line
        raise ModelFileMismatch(f"{path}: not a readable ONNX file ({type(e).__name__}: "
                                f"{reason})") from None
    initializers = {t.name for t in graph.initializer}
    inputs = {i.name: i.type.tensor_type for i in graph.input if i.name not in initializers}
    problems = []
    if list(inputs) != contract.input_names:
        problems.append(f"inputs {list(inputs)}, the contract's are {contract.input_names}")
    for spec in contract.inputs:
        if spec.name in inputs:
            problems += _input_problems(onnx, spec, inputs[spec.name], contract.batch)
    outputs = {o.name for o in graph.output}
    missing = [n for n in contract.output_names if n not in outputs]
    if missing:
        problems.append(f"no outputs {missing}")
    if problems:
        raise ModelFileMismatch(f"{path} does not fit the artifact's contract (task "
                                f"{contract.task}, F@{contract.schedule}): "
                                f"{'; '.join(problems)}; it was exported for another model")
    if expected_sha256:
        actual_sha256 = file_sha256(path)
        if actual_sha256 != expected_sha256:
            raise ModelFileMismatch(f"{path} is not the file the artifact's manifest.json lists "
                                    f"(sha256 {actual_sha256[:12]}, listed "
                                    f"{expected_sha256[:12]}): copy the artifact directory "
                                    "again or re-export")


def _input_problems(onnx, spec: TensorSpec, tensor_type, batch: BatchRange) -> list[str]:
    """How one graph input (an onnx TypeProto.Tensor) differs from its spec."""
    problems = []
    file_dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    if file_dtype != spec.np_dtype:
        problems.append(f"{spec.name} is {file_dtype}, the contract's {spec.dtype}")
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor_type.shape.dim]
    if len(dims) != len(spec.shape):
        return problems + [f"{spec.name} has {len(dims)} dims, the contract's {len(spec.shape)}"]
    for axis, (got, want) in enumerate(zip(dims, spec.shape)):
        if want == BATCH:
            if isinstance(got, int) and not batch.min == got == batch.max:
                problems.append(f"{spec.name} has a fixed batch of {got}, the contract's is "
                                f"{batch.min}..{batch.max}")
        elif got != int(want):
            problems.append(f"{spec.name} dim {axis} is {got}, the contract's {want}")
    return problems


def check_out_dir(out: str | Path) -> None:
    """Refuse an --out the export cannot write (nothing writable where it would be created) or
    must not replace (the current directory, or one above it)."""
    out = Path(out)
    resolved = out.resolve()
    if resolved == Path.cwd() or resolved in Path.cwd().parents:
        raise OutputDirError(f"--out {out} is the current directory or one above it: name a new "
                             "directory for the artifact, e.g. --out engines/NAME")
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} is a file, not a directory")
    # The artifact is assembled beside --out and moved into place: its parent (or the first part
    # of that path which exists) must be writable.
    existing = next(p for p in (resolved.parent, *resolved.parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"--out {out}: cannot write in {existing} (read-only or not "
                             "permitted): choose a directory you can write")
