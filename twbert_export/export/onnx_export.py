"""Stage 2: trace the model with hard frame selection and export ONNX.

Exporter: torch.onnx's dynamo exporter (`torch.export` based). On the tiny preset it gives 798
nodes after constant folding against 1,825 for the TorchScript exporter, with almost none of the
Shape/Unsqueeze/Constant arithmetic the tracer emits, and it names every node after the module
that made it, which the precision stage needs to keep the frame selection in FP32. It cannot emit
an opset below 18; we export opset 19, which INT8 Q/DQ requires anyway (TensorRT >= 10 parses it).
"""

from __future__ import annotations

import ast
import collections
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..artifact.contract import BATCH, IOContract
from ..artifact.manifest import MODEL_GRAPH
from ..util import Stopwatch, atomic_path, require
from .job import Conversion, Loaded, StageLog
from .rewrite import rewrite

if TYPE_CHECKING:
    import onnx
    import torch
    from model import TWBert


def example_feed(contract: IOContract, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs that follow the contract; the second sample's text is half padding."""
    rng = np.random.default_rng(seed)
    video = rng.standard_normal(contract.inputs[0].concrete(batch), dtype=np.float32)
    L = contract.text_len
    ids = rng.integers(1000, 2000, (batch, L), dtype=np.int64)
    ids[:, 0] = 101
    mask = np.ones((batch, L), np.int64)
    if batch > 1:
        mask[1, L // 2:] = 0
        ids[1, L // 2:] = 0
    return {"video": video, "input_ids": ids, "attention_mask": mask}


def export_wrapper(model: "TWBert", contract: IOContract) -> "torch.nn.Module":
    """The model as a module with positional inputs and outputs in the contract's order."""
    import torch

    class ContractModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, video, input_ids, attention_mask):
            out = self.model(video, input_ids, attention_mask)
            return tuple(out[name] for name in contract.output_names)

    return ContractModel().eval()


def export_onnx(model: "TWBert", contract: IOContract, path: str | Path,
                wrapper: "torch.nn.Module | None" = None,
                example: dict[str, np.ndarray] | None = None) -> Path:
    """Export with hard selection, nodes named by module scope, then check the file fully.

    By default the whole model (`export_wrapper`) on `example_feed`; a part of it (the split
    graphs, `twbert_export.export.split`) passes its own wrapper, which must hold the model as its
    `model` attribute (node names, hence the FP32 selection, depend on it), and an example
    input of batch 2 for its contract."""
    import torch

    onnx = require("onnx", "to write and check ONNX files")
    path = Path(path)
    feed = {k: torch.from_numpy(v) for k, v in (example or example_feed(contract)).items()}
    # Batch 1 would be specialised by torch.export; the example uses 2 and the axis stays dynamic.
    batch = torch.export.Dim(BATCH, min=1, max=max(64, contract.batch.max))
    if wrapper is None:
        wrapper = export_wrapper(model, contract)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), model.selection("hard"), torch.no_grad():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*axis name.*")
        warnings.filterwarnings("ignore", message=".*torchvision.*")
        program = torch.onnx.export(
            wrapper, tuple(feed[n] for n in contract.input_names), dynamo=True,
            opset_version=contract.opset, input_names=contract.input_names,
            output_names=contract.output_names, optimize=True, verbose=False,
            dynamic_shapes={n: {0: batch} for n in contract.input_names})
    proto = name_nodes_by_scope(program.model_proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return path


SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def name_nodes_by_scope(model: "onnx.ModelProto") -> "onnx.ModelProto":
    """Name nodes '/model/selector1/scorer/MatMul_2' after the module that produced them (the
    dynamo exporter records the module path of each node in its metadata)."""
    seen: collections.Counter[str] = collections.Counter()
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta[SCOPE_KEY])[:-1] if SCOPE_KEY in meta else []
        module = scopes[-1] if scopes and scopes[-1] and not scopes[-1].startswith("_") else ""
        base = f"/{module.replace('.', '/')}/{node.op_type}" if module else f"/{node.op_type}"
        seen[base] += 1
        node.name = base if seen[base] == 1 else f"{base}_{seen[base] - 1}"
    return model


def export_stage(loaded: Loaded, work: Path, out: Path, stages: StageLog,
                 conversion: Conversion) -> None:
    """The checkpoint's graph to ONNX, then rewritten for TensorRT (the fp32 file)."""
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
