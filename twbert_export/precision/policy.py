"""The precision policy: which nodes each precision converts and which it keeps FP32.

One place for the decisions the FP16, INT8 and range modules share (the measurements behind
them: docs/benchmarks.md, "Precision choices").
"""

from __future__ import annotations

# The selection path stays FP32 in every precision (its node names: artifact/contract.py, which
# TensorRT-RTX's type audit reads too).
from ..artifact.contract import SELECTION_NODES  # noqa: F401  (re-exported)
# Quantize only the matrix products: residual Adds and LayerNorms in INT8 cost accuracy for
# little speed (docs/benchmarks.md, "Export-time measurements behind the code").
INT8_OP_TYPES = ["MatMul", "Gemm", "Conv"]
# Activations beyond this stay FP32. Our attention mask adds -1e4 (finite in FP16); ModelOpt's
# default of 512 would keep every masked softmax in FP32 for no reason. Half of FP16's maximum
# leaves headroom for clips brighter than the calibration set.
FP16_DATA_MAX = 32768.0
CALIB_METHODS = ("max", "entropy")
# Q/DQ nodes (and their scales) stay FP32 when the rest of an INT8 graph goes to FP16.
QDQ_OPS = ["QuantizeLinear", "DequantizeLinear"]
# Precisions whose activation scales come from calibration clips (W8A8 Q/DQ). int8w quantizes
# weights only: its scales come from the weights, and its clips are the FP16 range check's.
CALIBRATED_PRECISIONS = ("int8",)
# Weight-only INT8: symmetric per output channel, narrow range [-127, 127] (TensorRT's INT8
# weight range); scales in the matrix product's type (FP16), so DequantizeLinear feeds it directly.
WEIGHT_ONLY_QMAX = 127
