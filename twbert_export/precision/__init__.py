"""Stage 5: make the precision explicit in the ONNX file, so that ONNX Runtime on the CPU runs
the numerics TensorRT will build strongly typed.

- fp32: the rewritten graph as it is.
- fp16 (`fp16.to_fp16`): ModelOpt AutoCast, FP32 inputs and outputs; the frame selection and
  out-of-range nodes stay FP32 (`policy`).
- int8w (`weight_only.to_int8_weights`): the FP16 graph with its matrix-product weights stored
  as INT8 + per-channel scales behind DequantizeLinear; no activation calibration.
- int8 (`int8.to_int8`): ModelOpt Q/DQ on the weight matrix products, calibrated on real clips,
  then the same AutoCast for the rest; weights stored as INT8 (DQ-only weights).

Both read the activation ranges from forward passes of `ranges.ActivationRanges`. Every patch
of ModelOpt's internals these steps use lives in `twbert_export.precision.modelopt_compat`.
"""

from .fp16 import PrecisionReport, to_fp16
from .int8 import calibration_key, check_scales, to_int8, write_scale_cache
from .policy import (CALIB_METHODS, CALIBRATED_PRECISIONS, FP16_DATA_MAX, INT8_OP_TYPES, QDQ_OPS,
                     SELECTION_NODES)
from .ranges import ActivationRanges, RangesSeen
from .weight_only import quantize_weights, to_int8_weights

__all__ = ["ActivationRanges", "CALIB_METHODS", "CALIBRATED_PRECISIONS", "FP16_DATA_MAX",
           "INT8_OP_TYPES", "PrecisionReport", "QDQ_OPS", "RangesSeen", "SELECTION_NODES",
           "calibration_key", "check_scales", "quantize_weights", "to_fp16", "to_int8",
           "to_int8_weights", "write_scale_cache"]
