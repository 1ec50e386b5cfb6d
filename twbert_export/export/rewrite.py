"""Stage 3: graph rewrites with onnx-graphsurgeon. Each is a small named function on a
`gs.Graph` that ends in `cleanup().toposort()`; `rewrite` chains them and re-checks the model."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..artifact.contract import IOContract
from ..util import atomic_path, infer_shapes, require

if TYPE_CHECKING:
    import onnx
    import onnx_graphsurgeon as gs


def fold_constants(graph: "gs.Graph") -> "gs.Graph":
    """Evaluate every subgraph that depends only on constants (shape arithmetic, weight casts)."""
    return graph.fold_constants().cleanup().toposort()


def remove_dead_nodes(graph: "gs.Graph") -> "gs.Graph":
    """Drop nodes and initializers that no graph output depends on."""
    return graph.cleanup(remove_unused_graph_inputs=False).toposort()


def stable_io(contract: IOContract) -> Callable[["gs.Graph"], "gs.Graph"]:
    """Inputs and outputs named and ordered as the contract says, the batch axis named 'batch'."""
    def apply(graph: "gs.Graph") -> "gs.Graph":
        for tensors, specs, kind in ((graph.inputs, contract.inputs, "input"),
                                     (graph.outputs, contract.outputs, "output")):
            names = [t.name for t in tensors]
            if names != [s.name for s in specs]:
                raise ValueError(f"graph {kind}s {names} differ from the I/O contract "
                                 f"{[s.name for s in specs]}")
            for tensor, spec in zip(tensors, specs):
                tensor.shape = list(spec.shape)
        return graph.cleanup().toposort()
    return apply


def node_histogram(model: "onnx.ModelProto") -> dict[str, int]:
    counts = collections.Counter(n.op_type for n in model.graph.node)
    return dict(counts.most_common())


def rewrite(src: str | Path, dst: str | Path, contract: IOContract) -> dict[str, int]:
    """fold constants -> remove dead nodes -> stable I/O; returns the node-type histogram."""
    onnx = require("onnx", "to rewrite the ONNX graph")
    gs = require("onnx_graphsurgeon", "to rewrite the ONNX graph")
    ort = require("onnxruntime", "to fold constants")
    ort.set_default_logger_severity(3)  # folding logs an optimizer warning per Unsqueeze
    graph = gs.import_onnx(onnx.load(str(src)))
    for step in (fold_constants, remove_dead_nodes, stable_io(contract)):
        graph = step(graph)
    model = infer_shapes(gs.export_onnx(graph), strict_mode=True, data_prop=True)
    with atomic_path(dst) as tmp:
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
    return node_histogram(model)

