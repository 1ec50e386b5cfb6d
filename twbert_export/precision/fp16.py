"""FP16: ModelOpt AutoCast with FP32 inputs and outputs; the frame selection and nodes whose
activations on the calibration clips exceed FP16_DATA_MAX stay FP32 (and are reported).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .modelopt_compat import (light_shape_inference, linear_dead_node_cleanup, quiet_modelopt,
                              untested_note)
from ..util import Stopwatch, atomic_path, infer_shapes, require
from .policy import FP16_DATA_MAX, SELECTION_NODES
from .ranges import ActivationRanges


@dataclass
class PrecisionReport:
    precision: str
    kept_fp32_selection: list[str] = field(default_factory=list)
    kept_fp32_range: list[str] = field(default_factory=list)
    low_precision_nodes: int = 0
    total_nodes: int = 0
    calibration: dict[str, Any] = field(default_factory=dict)
    cache: str | None = None
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)  # seconds of each sub-step
    note: str = ""  # e.g. that ModelOpt ran its own path (modelopt_compat.untested_note)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _float_nodes(model) -> dict[str, str]:
    """Node name -> elem type name of its first output, after shape inference."""
    onnx = require("onnx", "to inspect the graph")
    inferred = infer_shapes(model, weights=False)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    return {n.name: names[types[n.output[0]]] for n in inferred.graph.node
            if n.output and types.get(n.output[0]) in names}


def _classify(fp32_model, converted) -> tuple[int, int, list[str], list[str]]:
    return _classified(_float_nodes(fp32_model), _float_nodes(converted))


def _classified(before: dict[str, str], after: dict[str, str]
                ) -> tuple[int, int, list[str], list[str]]:
    fp16 = [n for n, t in after.items() if t == "float16"]
    kept = [n for n in before if after.get(n) == "float32"]
    selection = [n for n in kept if any(re.match(p, n) for p in SELECTION_NODES)]
    by_range = [n for n in kept if n not in selection]
    return len(fp16), len(before), selection, by_range



def to_fp16(src: str | Path, dst: str | Path, ranges: ActivationRanges,
            op_types_to_exclude: list[str] | None = None,
            nodes_kept_fp32: list[str] | tuple[str, ...] = ()) -> PrecisionReport:
    """AutoCast to FP16 with FP32 I/O, selection and out-of-range nodes (and `nodes_kept_fp32`,
    patterns) kept in FP32. `ranges` watches `src`, or the FP32 graph `src` was made from (INT8:
    its Q/DQ graph keeps the node names); rows not yet seen are checked first
    (`ActivationRanges.default_rows`)."""
    require("modelopt.onnx.autocast", "for FP16 AutoCast (pip install nvidia-modelopt)")
    from modelopt.onnx.autocast import convert_to_mixed_precision

    onnx = require("onnx", "to write ONNX files")
    with Stopwatch() as range_check:
        ranges.over(ranges.default_rows())
    ranges.release()  # its ONNX Runtime session, before AutoCast loads the model again
    out_of_range = [f"^{re.escape(name)}$" for name in ranges.nodes_beyond(FP16_DATA_MAX)]
    with (quiet_modelopt(), linear_dead_node_cleanup(),
          light_shape_inference(),
          Stopwatch() as autocast):
        # data_max=inf: the range rule was applied above, and AutoCast skips its own reference
        # run (the memory problem ActivationRanges describes).
        model = convert_to_mixed_precision(
            str(src), low_precision_type="fp16", keep_io_types=True,
            nodes_to_exclude=[*SELECTION_NODES, *nodes_kept_fp32, *out_of_range],
            op_types_to_exclude=op_types_to_exclude, data_max=np.inf, providers=["cpu"])
    # AutoCast reuses one symbolic dim name for different sizes; let inference redo value_info.
    del model.graph.value_info[:]
    model = infer_shapes(model, in_place=True)
    with atomic_path(dst) as tmp_dst:
        onnx.save(model, str(tmp_dst))
        after = _float_nodes(model)
        del model  # before the checker and the FP32 model each load a model of their own
        onnx.checker.check_model(str(tmp_dst), full_check=True)
    low, total, selection, by_range = _classified(_float_nodes(onnx.load(str(src))), after)
    calib = ranges.calib
    return PrecisionReport("fp16", selection, by_range, low, total,
                           calibration={"clips": len(calib.video), "data": calib.identity,
                                        "range_check_clips": ranges.rows_done},
                           steps={"range check": range_check.seconds,
                                  "AutoCast": autocast.seconds}, note=untested_note())
