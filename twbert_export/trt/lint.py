"""Stage 4: TensorRT-compatibility lint of an exported ONNX graph.

Fails with the node name and the reason for every op, attribute or dtype that TensorRT's ONNX
parser rejects, before anyone spends minutes building an engine on the target. The rules are data:
the parser's operator table (`OPERATORS`), the versions that added ops (`OP_ADDED_IN`), the element
types TensorRT has (`DTYPE_SINCE`) and a few ops with rules of their own (Random*, TopK, Einsum,
control flow). Each check is a small function over `ModelFacts`; `CHECKS` lists them.

    findings = lint_model("model.onnx", trt_major=8)   # every finding, errors first
    warnings = check_model("model.onnx")               # raises LintError if any error
    findings = lint_model("model.onnx", parser="8.5")  # one parser release: minor rules too

    python -m twbert_export.trt.lint model.fp16.trt8.onnx --parser 8.5   # exit 2, one line, on error

The parser releases we deploy to have rules of their own, read in github.com/onnx/onnx-tensorrt
per release branch: 8.5-GA has no LayerNormalization importer; in 8.5-GA, 8.6-GA and 9.x the
ReduceMean / ReduceMax / ReduceL2 / ReduceSumSquare ... importers ignore an `axes` INPUT (the
opset-18 form) and reduce over every axis, silently (only ReduceSum reads it); 10.0-GA reads it.

Torch-free; onnx is imported lazily, where a model is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Literal, NamedTuple

from ..util import infer_shapes, require

if TYPE_CHECKING:
    import numpy as np
    import onnx

Severity = Literal["error", "warning"]


class OpSupport(NamedTuple):
    supported: bool
    types: frozenset[str] = frozenset()  # TensorRT type names of the op's data tensor
    note: str = ""  # restriction from the table that matters when it fails


def _y(types: str, note: str = "") -> OpSupport:
    return OpSupport(True, frozenset(types.replace(",", " ").split()), note)


NO = OpSupport(False)

# -- The parser's operator table -------------------------------------------------------------------
# Source: "Supported ONNX Operators", docs/operators.md in github.com/onnx/onnx-tensorrt, the
# revision that describes TensorRT 10.15 (opset 9 to 24). "Supported Types" is the op's data
# tensor; restrictions are kept where a graph can break them. Random* ops are listed as the table
# has them; `check_random_ops` rejects them in an inference graph whatever the table says.
# fmt: off
OPERATORS: dict[str, OpSupport] = {
    "Abs": _y("FP32 FP16 BF16 INT32 INT64"),
    "Acos": _y("FP32 FP16 BF16"),
    "Acosh": _y("FP32 FP16 BF16"),
    "Add": _y("FP32 FP16 BF16 INT32 INT64"),
    "AffineGrid": NO,
    "And": _y("BOOL"),
    "ArgMax": _y("FP32 FP16 BF16 INT32 INT64"),
    "ArgMin": _y("FP32 FP16 BF16 INT32 INT64"),
    "Asin": _y("FP32 FP16 BF16"),
    "Asinh": _y("FP32 FP16 BF16"),
    "Atan": _y("FP32 FP16 BF16"),
    "Atanh": _y("FP32 FP16 BF16"),
    "Attention": _y("FP32 FP16 BF16 INT8 FP8", "Q, K, V and attn_mask must be 4D; no KV-cache "
                    "inputs/outputs, qk_matmul_output or softcap"),
    "AveragePool": _y("FP32 FP16 BF16", "2D or 3D pooling only; dilations must be all ones"),
    "BatchNormalization": _y("FP32 FP16 BF16"),
    "Bernoulli": NO,
    "BitShift": NO,
    "BitwiseAnd": NO,
    "BitwiseNot": NO,
    "BitwiseOr": NO,
    "BitwiseXor": NO,
    "BlackmanWindow": _y("FP32 FP16"),
    "Cast": _y("FP32 FP16 BF16 INT32 INT64 UINT8 BOOL"),
    "CastLike": _y("FP32 FP16 BF16 INT32 INT64 UINT8 BOOL"),
    "Ceil": _y("FP32 FP16 BF16"),
    "Celu": _y("FP32 FP16 BF16"),
    "CenterCropPad": NO,
    "Clip": _y("FP32 FP16 BF16"),
    "Col2Im": NO,
    "Compress": NO,
    "Concat": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "ConcatFromSequence": NO,
    "Constant": _y("FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL",
                   "sparse_value, value_string and value_strings are unsupported"),
    "ConstantOfShape": _y("FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL"),
    "Conv": _y("FP32 FP16 BF16"),
    "ConvInteger": NO,
    "ConvTranspose": _y("FP32 FP16 BF16"),
    "Cos": _y("FP32 FP16 BF16"),
    "Cosh": _y("FP32 FP16 BF16"),
    "CumSum": _y("FP32 FP16 BF16", "axis must be a build-time constant"),
    "DFT": NO,
    "DeformConv": _y("FP32 FP16", "1D or 2D spatial input; symmetric pads"),
    "DepthToSpace": _y("FP32 FP16 BF16 INT32 INT64"),
    "DequantizeLinear": _y("INT8 FP8 FP4 INT4", "x_zero_point must be zero"),
    "Det": NO,
    "Div": _y("FP32 FP16 BF16 INT32 INT64"),
    "Dropout": _y("FP32 FP16 BF16", "is_training must be an initializer that is False"),
    "DynamicQuantizeLinear": NO,
    "Einsum": _y("FP32 FP16 BF16"),
    "Elu": _y("FP32 FP16 BF16"),
    "Equal": _y("FP32 FP16 BF16 INT32 INT64"),
    "Erf": _y("FP32 FP16 BF16"),
    "Exp": _y("FP32 FP16 BF16"),
    "Expand": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "EyeLike": _y("FP32 FP16 BF16 INT32 INT64 BOOL", "input must have static dimensions"),
    "Flatten": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Floor": _y("FP32 FP16 BF16"),
    "Gather": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "GatherElements": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "GatherND": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Gelu": _y("FP32 FP16 BF16 INT8 INT32 INT64"),
    "Gemm": _y("FP32 FP16 BF16"),
    "GlobalAveragePool": _y("FP32 FP16 BF16"),
    "GlobalLpPool": _y("FP32 FP16 BF16"),
    "GlobalMaxPool": _y("FP32 FP16 BF16"),
    "Greater": _y("FP32 FP16 BF16 INT32 INT64"),
    "GreaterOrEqual": _y("FP32 FP16 BF16 INT32 INT64"),
    "GridSample": _y("FP32 FP16", "input must be 4D"),
    "GroupNormalization": _y("FP32 FP16 BF16"),
    "GRU": _y("FP32 FP16 BF16", "bidirectional: same activations both ways"),
    "HammingWindow": _y("FP32 FP16"),
    "HannWindow": _y("FP32 FP16"),
    "HardSigmoid": _y("FP32 FP16 BF16"),
    "HardSwish": _y("FP32 FP16 BF16"),
    "Hardmax": _y("FP32 FP16 BF16", "the axis dimension must be a build-time constant"),
    "Identity": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "If": _y("FP32 FP16 BF16 INT32 INT64 BOOL", "branch outputs must have the same rank and "
             "different names"),
    "ImageDecoder": NO,
    "ImageScaler": _y("FP32 FP16 BF16"),
    "InstanceNormalization": _y("FP32 FP16 BF16"),
    "IsInf": _y("FP32 FP16 BF16"),
    "IsNaN": _y("FP32 FP16 BF16 INT32 INT64"),
    "LayerNormalization": _y("FP32 FP16 BF16", "only the first output Y is supported"),
    "LeakyRelu": _y("FP32 FP16 BF16"),
    "Less": _y("FP32 FP16 BF16 INT32 INT64"),
    "LessOrEqual": _y("FP32 FP16 BF16 INT32 INT64"),
    "Log": _y("FP32 FP16 BF16"),
    "LogSoftmax": _y("FP32 FP16 BF16"),
    "Loop": _y("FP32 FP16 BF16 INT32 INT64 BOOL", "scan outputs cannot have a dynamic length; "
               "carried values keep their shape across iterations"),
    "LRN": _y("FP32 FP16 BF16"),
    "LSTM": _y("FP32 FP16 BF16", "bidirectional: same activations both ways; input_forget=0, "
               "layout=0"),
    "LpNormalization": _y("FP32 FP16 BF16"),
    "LpPool": _y("FP32 FP16 BF16", "dilations must be all ones"),
    "MatMul": _y("FP32 FP16 BF16"),
    "MatMulInteger": NO,
    "Max": _y("FP32 FP16 BF16 INT32 INT64"),
    "MaxPool": _y("FP32 FP16 BF16", "2D or 3D pooling only; no Indices output; dilations must "
                  "be all ones"),
    "MaxRoiPool": NO,
    "MaxUnpool": NO,
    "Mean": _y("FP32 FP16 BF16 FP8 INT32 INT64"),
    "MeanVarianceNormalization": _y("FP32 FP16 BF16"),
    "MelWeightMatrix": NO,
    "Min": _y("FP32 FP16 BF16 INT32 INT64"),
    "Mish": _y("FP32 FP16"),
    "Mod": _y("FP32 FP16 BF16 INT32 INT64"),
    "Mul": _y("FP32 FP16 BF16 INT32 INT64"),
    "Multinomial": NO,
    "Neg": _y("FP32 FP16 BF16 INT32 INT64"),
    "NegativeLogLikelihoodLoss": NO,
    "NonMaxSuppression": _y("FP32 FP16"),
    "NonZero": _y("FP32 FP16"),
    "Not": _y("BOOL"),
    "OneHot": _y("FP32 FP16 BF16 INT32 INT64 BOOL", "depth must be a build-time constant"),
    "Optional": NO,
    "OptionalGetElement": NO,
    "OptionalHasElement": NO,
    "Or": _y("BOOL"),
    "Pad": _y("FP32 FP16 BF16 INT32 INT64"),
    "ParametricSoftplus": _y("FP32 FP16 BF16"),
    "Pow": _y("FP32 FP16 BF16 INT32 INT64"),
    "PRelu": _y("FP32 FP16 BF16"),
    "QLinearConv": NO,
    "QLinearMatMul": NO,
    "QuantizeLinear": _y("FP32 FP16 BF16", "y_zero_point must be 0"),
    "RandomNormal": _y("FP32 FP16 BF16", "seed is ignored"),
    "RandomNormalLike": _y("FP32 FP16 BF16", "seed is ignored"),
    "RandomUniform": _y("FP32 FP16 BF16", "seed is ignored"),
    "RandomUniformLike": _y("FP32 FP16 BF16", "seed is ignored"),
    "Range": _y("FP32 FP16 BF16 INT32 INT64"),
    "Reciprocal": _y("FP32 FP16 BF16"),
    "ReduceL1": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceL2": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceLogSum": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceLogSumExp": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceMax": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceMean": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceMin": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceProd": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceSum": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "ReduceSumSquare": _y("FP32 FP16 BF16 INT32 INT64", "axes must be an initializer"),
    "RegexFullMatch": NO,
    "Relu": _y("FP32 FP16 BF16 INT32 INT64"),
    "Reshape": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Resize": _y("FP32 FP16 BF16", "modes nearest/linear only; no antialiasing; aspect ratio "
                 "policy stretch"),
    "ReverseSequence": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "RMSNormalization": _y("FP32 FP16 BF16"),
    "RNN": _y("FP32 FP16 BF16", "bidirectional: same activations both ways"),
    "RoiAlign": _y("FP32 FP16"),
    "RotaryEmbedding": _y("FP32 FP16 BF16", "position_ids must be INT64"),
    "Round": _y("FP32 FP16 BF16"),
    "STFT": _y("FP32", "frame_step and window must be initializers; real input only"),
    "ScaledTanh": _y("FP32 FP16 BF16"),
    "Scan": _y("FP32 FP16 BF16"),
    "Scatter": _y("FP32 FP16 BF16 INT32 INT64"),
    "ScatterElements": _y("FP32 FP16 BF16 INT32 INT64"),
    "ScatterND": _y("FP32 FP16 BF16 INT32 INT64", "reduction must be none"),
    "Selu": _y("FP32 FP16 BF16"),
    "SequenceAt": NO,
    "SequenceConstruct": NO,
    "SequenceEmpty": NO,
    "SequenceErase": NO,
    "SequenceInsert": NO,
    "SequenceLength": NO,
    "SequenceMap": NO,
    "Shape": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Shrink": _y("FP32 FP16 BF16 INT32 INT64"),
    "Sigmoid": _y("FP32 FP16 BF16"),
    "Sign": _y("FP32 FP16 BF16 INT32 INT64"),
    "Sin": _y("FP32 FP16 BF16"),
    "Sinh": _y("FP32 FP16 BF16"),
    "Size": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Slice": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Softmax": _y("FP32 FP16 BF16"),
    "SoftmaxCrossEntropyLoss": NO,
    "Softplus": _y("FP32 FP16 BF16"),
    "Softsign": _y("FP32 FP16 BF16"),
    "SpaceToDepth": _y("FP32 FP16 BF16 INT32 INT64"),
    "Split": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "SplitToSequence": NO,
    "Sqrt": _y("FP32 FP16 BF16"),
    "Squeeze": _y("FP32 FP16 BF16 INT32 INT64 BOOL", "axes must resolve to a constant"),
    "StringConcat": NO,
    "StringNormalizer": NO,
    "StringSplit": NO,
    "Sub": _y("FP32 FP16 BF16 INT32 INT64"),
    "Sum": _y("FP32 FP16 BF16 INT32 INT64"),
    "Tan": _y("FP32 FP16 BF16"),
    "Tanh": _y("FP32 FP16 BF16"),
    "TensorScatter": _y("FP32 FP16 BF16 INT32", "past_cache and update must be 4D; axis -2"),
    "TfIdfVectorizer": NO,
    "ThresholdedRelu": _y("FP32 FP16 BF16"),
    "Tile": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "TopK": _y("FP32 FP16 BF16 INT32 INT64", "sorted must be 1; K < 3840"),
    "Transpose": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Trilu": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Unique": NO,
    "Unsqueeze": _y("FP32 FP16 BF16 INT32 INT64 BOOL", "axes must resolve to a constant"),
    "Upsample": _y("FP32 FP16 BF16"),
    "Where": _y("FP32 FP16 BF16 INT32 INT64 BOOL"),
    "Xor": _y("BOOL"),
}
# fmt: on
TABLE_SOURCE = "onnx-tensorrt docs/operators.md, TensorRT 10.15"

# TensorRT version that first parses an op the table above marks supported. Source: onnx-tensorrt
# docs/Changelog.md (8.6 EA: LayerNormalization, GroupNormalization, IsInf; 9.2: Hardmax; 10.1:
# DeformConv; 10.4: *Window; 10.5: STFT; 10.14: Attention; 10.15: RotaryEmbedding,
# RMSNormalization, TensorScatter). None: not in the TensorRT 8.5 table and the changelog gives no
# version. An op added in a later minor of the target's major is a warning (depends on the minor:
# JetPack 5.1 ships 8.5.2, JetPack 6.1 ships 10.3); one added in a later major is an error.
OP_ADDED_IN: dict[str, tuple[int, int] | None] = {
    "LayerNormalization": (8, 6), "GroupNormalization": (8, 6), "IsInf": (8, 6),
    "Hardmax": (9, 2),
    "DeformConv": (10, 1),
    "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RotaryEmbedding": (10, 15), "RMSNormalization": (10, 15), "TensorScatter": (10, 15),
    "CastLike": None, "Gelu": None, "Mish": None,
}

# -- Element types ---------------------------------------------------------------------------------
# TensorRT name (as in the table) -> ONNX TensorProto name.
TRT_TYPE_NAMES = {"FP32": "FLOAT", "FP16": "FLOAT16", "BF16": "BFLOAT16", "FP8": "FLOAT8E4M3FN",
                  "FP4": "FLOAT4E2M1", "INT4": "INT4", "INT8": "INT8", "INT32": "INT32",
                  "INT64": "INT64", "UINT8": "UINT8", "BOOL": "BOOL"}
# ONNX element type -> first TensorRT major whose parser takes it (operators.md of 8.5, 9.2, 10.15;
# Changelog: 8.5 UINT8 I/O, 9.0 INT64 native, BF16 and FP8, 10.0 INT4, 10.8 FP4). Every other type
# (DOUBLE, COMPLEX*, STRING, INT16, UINT16/32/64, other FP8 variants...) is an error: TensorRT has
# no such type (for DOUBLE the parser at best clamps weights to float32).
DTYPE_SINCE = {"FLOAT": 8, "FLOAT16": 8, "BOOL": 8, "INT8": 8, "INT32": 8, "INT64": 8, "UINT8": 8,
               "BFLOAT16": 9, "FLOAT8E4M3FN": 9, "INT4": 10, "FLOAT4E2M1": 10}
INT64_NATIVE_SINCE = 9  # before: the parser casts INT64 to INT32 (values clamp to +-2^31)
UINT8_NOTE = "UINT8 is only supported as a network input or output"

# Reduce ops whose `axes` input the importers before 10.0 ignore (they read the attribute only:
# onnx2trt_utils.cpp `reduceTensor` in 8.5-GA / 8.6-GA; ReduceSum passes its input, the others
# do not), reducing over every axis instead. Opset 18 moved these ops' axes to an input.
REDUCE_AXES_INPUT_IGNORED = frozenset({
    "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
REDUCE_AXES_INPUT_READ_SINCE = 10
# Parser releases a graph can be linted for (`--parser`); a bare major means its newest minor.
PARSER_CHOICES = ("8.5", "8.6", "10", "11")

# Highest default-domain opset each major's parser documents (8.5/8.6: 17, 9.2: 19, 10.0: 20).
# 10.15 documents 24; the 10.0 figure is kept because Jetson targets ship older 10.x (10.3).
MAX_OPSET = {8: 17, 9: 19, 10: 20}

# -- Ops with rules of their own -------------------------------------------------------------------
RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                        "Multinomial", "Bernoulli"})
TOPK_MAX_K = 3840  # K must be < 3840 (operators.md, TopK)
TOPK_INT_SINCE = 9  # 8.5 rejects integer TopK (8.6 added INT32 only); INT64 is native from 9.0
TOPK_LAST_AXES = 4  # TopK only over one of the last four axes (operators.md, TopK)
WARN_OPS = {
    "Loop": "control flow: supported but slow and limited (scan outputs of static length only)",
    "If": "control flow: supported but limited and slow; branch outputs need the same rank",
    "Scan": "control flow: supported but slow and limited",
    "NonZero": "data-dependent output shape: blocks shape specialisation and fusion",
    "NonMaxSuppression": "data-dependent output shape: blocks shape specialisation and fusion",
}
# Element types for which an op the table does not list them for is an error, not a warning:
# TensorRT-RTX's parser refused every such INT32 / BOOL case tried (25 unary ops each), while
# for INT8 it built some and refused others (docs/rtx.md, "The lint against NVIDIA's parser").
STRICT_OP_DTYPES = frozenset({"INT32", "BOOL"})
# Inputs the table requires to be initializers (Constant-node outputs count: the parser folds them).
CONST_INPUTS = {op: (1, "axes") for op in OPERATORS if op.startswith("Reduce")}
# Outputs past the first that the parser cannot produce.
FIRST_OUTPUT_ONLY = {"LayerNormalization": "only output Y is supported (Mean/InvStdDev are not)",
                     "MaxPool": "the Indices output is unsupported"}
# Which tensor carries the type the table lists: the first input unless named here.
TYPED_TENSOR: dict[str, tuple[str, int] | None] = {
    "Cast": ("out", 0), "CastLike": ("out", 0), "Constant": ("out", 0),
    "ConstantOfShape": ("out", 0), "EyeLike": ("out", 0), "Where": ("in", 1),
    **{op: ("out", 0) for op in RANDOM_OPS}, "Shape": None, "Size": None,
}
DEFAULT_DOMAINS = ("", "ai.onnx")
GRAPH = "<graph>"  # the node name of findings about the whole model


@dataclass(frozen=True)
class LintFinding:
    node: str
    op_type: str
    reason: str
    severity: Severity = "error"

    def __str__(self) -> str:
        return f"node {self.node} ({self.op_type}): {self.reason}"


class LintError(ValueError):
    """The graph has ops or dtypes TensorRT's ONNX parser rejects; `findings` lists the errors."""

    def __init__(self, findings: list[LintFinding], trt_major: int, parser: str | None = None):
        self.findings = [f for f in findings if f.severity == "error"]
        self.warnings = [f for f in findings if f.severity == "warning"]
        self.target = parser if parser and "." in parser else f"{trt_major}.x"
        lines = "\n".join(f"  {f}" for f in self.findings)
        super().__init__(f"{len(self.findings)} TensorRT {self.target} incompatibilities "
                         f"({TABLE_SOURCE}):\n{lines}")


@dataclass
class ModelFacts:
    """What every check reads: all nodes (subgraphs and local functions included, each with a
    printable name), inferred dtypes and ranks, constant values, and the target."""
    model: "onnx.ModelProto"
    trt_major: int
    plugins: frozenset[str]
    trt_minor: int | None = None  # None: any minor of trt_major (minor-dependent rules warn)
    nodes: list[tuple[str, "onnx.NodeProto"]] = field(default_factory=list)
    dtypes: dict[str, str] = field(default_factory=dict)  # tensor -> ONNX type name
    ranks: dict[str, int] = field(default_factory=dict)
    constants: dict[str, "onnx.TensorProto"] = field(default_factory=dict)
    initializers: list["onnx.TensorProto"] = field(default_factory=list)
    graph_io: set[str] = field(default_factory=set)
    functions: set[tuple[str, str]] = field(default_factory=set)
    notes: list[LintFinding] = field(default_factory=list)  # problems met while reading

    def constant_value(self, name: str) -> "np.ndarray | None":
        from onnx import numpy_helper

        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)


# -- Checks: each yields findings for one rule -----------------------------------------------------

def _is_default_domain(node: "onnx.NodeProto") -> bool:
    return node.domain in DEFAULT_DOMAINS


def check_operators(facts: ModelFacts) -> Iterator[LintFinding]:
    """Ops missing from the table or marked unsupported; custom ops unless allowed as plugins;
    ops that need a newer minor or major than the target."""
    for label, node in facts.nodes:
        op = node.op_type
        if (node.domain, op) in facts.functions:
            if facts.trt_major < 9:
                yield LintFinding(label, op, "call of an ONNX local function: parsers before "
                                  "TensorRT 9.0 do not inline them")
            continue
        if op in facts.plugins or op in RANDOM_OPS:  # plugins: the user's; random: own check
            continue
        if not _is_default_domain(node):
            yield LintFinding(label, op, f"custom op in domain {node.domain!r}: TensorRT needs a "
                              "plugin of that name (pass it in plugins= if the target has one)")
            continue
        support = OPERATORS.get(op)
        if support is None:
            yield LintFinding(label, op, f"op not in the TensorRT operator table ({TABLE_SOURCE})")
        elif not support.supported:
            yield LintFinding(label, op, f"op not supported by the TensorRT ONNX parser "
                              f"({TABLE_SOURCE})")
        elif op in OP_ADDED_IN:
            yield from _newer_op(label, op, OP_ADDED_IN[op], facts.trt_major, facts.trt_minor)


def _newer_op(label: str, op: str, added: tuple[int, int] | None, trt_major: int,
              trt_minor: int | None = None) -> Iterator[LintFinding]:
    if added is None:
        if trt_major < 10:
            yield LintFinding(label, op, "not in the TensorRT 8.5 operator table and the "
                              "changelog gives no version: check the target's parser", "warning")
    elif trt_major < added[0]:
        yield LintFinding(label, op, f"needs TensorRT >= {added[0]}.{added[1]}")
    elif trt_major == added[0] and trt_minor is not None:
        if trt_minor < added[1]:
            yield LintFinding(label, op, f"needs TensorRT >= {added[0]}.{added[1]}: the "
                              f"{trt_major}.{trt_minor} parser has no importer for it")
    elif trt_major == added[0] and added[1] > 0:
        yield LintFinding(label, op, f"needs TensorRT >= {added[0]}.{added[1]}: earlier "
                          f"{trt_major}.x parsers reject it", "warning")


def check_random_ops(facts: ModelFacts) -> Iterator[LintFinding]:
    for label, node in facts.nodes:
        if node.op_type in RANDOM_OPS and _is_default_domain(node):
            yield LintFinding(label, node.op_type, "random op in an inference graph (results "
                              "change per run; TensorRT ignores the seed or rejects the op)")


def check_topk(facts: ModelFacts) -> Iterator[LintFinding]:
    for label, node in _default_ops(facts, "TopK"):
        attrs = _attrs(node)
        data = node.input[0]
        if attrs.get("sorted", 1) != 1:  # allowed: ONNX leaves the order open (docs/rtx.md)
            yield LintFinding(label, "TopK", "sorted=0: TensorRT ignores it and returns sorted "
                              "results (an order ONNX allows)", "warning")
        k = facts.constant_value(node.input[1]) if len(node.input) > 1 else None
        if k is None:  # 8.5 needed an initializer; 8.6 added dynamic K
            yield LintFinding(label, "TopK", f"K is computed at run time: K < {TOPK_MAX_K} "
                              "cannot be checked (and TensorRT 8.5 rejects it)", "warning")
        elif int(k.reshape(-1)[0]) >= TOPK_MAX_K:
            yield LintFinding(label, "TopK", f"K={int(k.reshape(-1)[0])}: TensorRT needs "
                              f"K < {TOPK_MAX_K}")
        dtype = facts.dtypes.get(data, "")
        if dtype.startswith(("INT", "UINT")) and facts.trt_major < TOPK_INT_SINCE:
            yield LintFinding(label, "TopK", f"TopK on {dtype} input {data!r}: TensorRT "
                              f"{facts.trt_major}.x parsers reject integer TopK; keep it on float")
        rank = facts.ranks.get(data)
        if rank is not None:
            axis = attrs.get("axis", -1)
            axis = axis + rank if axis < 0 else axis
            if axis < rank - TOPK_LAST_AXES:
                yield LintFinding(label, "TopK", f"axis {axis} of a rank-{rank} input: TensorRT "
                                  f"takes TopK only over one of the last {TOPK_LAST_AXES} axes")


def check_einsum(facts: ModelFacts) -> Iterator[LintFinding]:
    """Ellipsis, diagonals (a label repeated in one operand) and > 2 operands: TensorRT before
    10.12 rejects the first two (Changelog 10.12), and JetPack 6.x ships 10.3; the operand limit
    is this project's rule (TensorRT supports Einsum, but not with ellipsis or more than two
    operands in every version we target). Rewrite such einsums as MatMul/Transpose."""
    for label, node in _default_ops(facts, "Einsum"):
        equation = str(_attrs(node).get("equation", "")).replace(" ", "")
        operands = equation.split("->")[0].split(",")
        if "..." in equation:
            yield LintFinding(label, "Einsum", f"ellipsis in equation {equation!r}: TensorRT "
                              "before 10.12 rejects it; spell out the batch axes")
        if len(node.input) > 2:
            yield LintFinding(label, "Einsum", f"{len(node.input)} operands in {equation!r}: "
                              "keep Einsum to at most 2 (chain MatMuls)")
        for term in operands:
            letters = term.replace("...", "")
            if len(set(letters)) < len(letters):
                yield LintFinding(label, "Einsum", f"diagonal term {term!r} in {equation!r}: "
                                  "TensorRT before 10.12 rejects it")


def check_op_restrictions(facts: ModelFacts) -> Iterator[LintFinding]:
    """Table restrictions a graph can break: constant axes, unsupported extra outputs, and
    the data type the table lists for the op (an error for STRICT_OP_DTYPES, else a warning:
    the table is terse)."""
    for label, node in facts.nodes:
        op = node.op_type
        if not _is_default_domain(node) or op not in OPERATORS or not OPERATORS[op].supported:
            continue
        if op in CONST_INPUTS:
            index, what = CONST_INPUTS[op]
            if len(node.input) > index and node.input[index] and \
                    node.input[index] not in facts.constants:
                yield LintFinding(label, op, f"{what} input {node.input[index]!r} is computed at "
                                  f"run time: TensorRT needs it as an initializer")
        if op in FIRST_OUTPUT_ONLY and any(node.output[1:]):
            yield LintFinding(label, op, FIRST_OUTPUT_ONLY[op])
        yield from _op_dtype(facts, label, node)


def _op_dtype(facts: ModelFacts, label: str, node: "onnx.NodeProto") -> Iterator[LintFinding]:
    where = TYPED_TENSOR.get(node.op_type, ("in", 0))
    if where is None or node.op_type in RANDOM_OPS:
        return
    names = node.output if where[0] == "out" else node.input
    tensor = names[where[1]] if len(names) > where[1] else ""
    dtype = facts.dtypes.get(tensor)
    if not dtype or dtype not in DTYPE_SINCE:  # unknown, or reported by check_dtypes
        return
    allowed = {TRT_TYPE_NAMES[t] for t in OPERATORS[node.op_type].types}
    if facts.trt_major < INT64_NATIVE_SINCE and "INT32" in allowed:
        allowed.add("INT64")  # cast to INT32 by the parser
    if dtype not in allowed:
        listed = ", ".join(sorted(OPERATORS[node.op_type].types))
        yield LintFinding(label, node.op_type, f"{dtype} tensor {tensor!r}: the operator table "
                          f"lists {listed} for {node.op_type}",
                          "error" if dtype in STRICT_OP_DTYPES else "warning")


def check_dtypes(facts: ModelFacts) -> Iterator[LintFinding]:
    """Tensors (node inputs/outputs, initializers) of a type TensorRT lacks for the target."""
    seen: set[str] = set()
    used = [(label, node, name) for label, node in facts.nodes
            for name in (*node.input, *node.output) if name]
    for label, node, name in used:
        if name in seen or name not in facts.dtypes:
            continue
        seen.add(name)
        reason = _dtype_problem(facts.dtypes[name], facts.trt_major, name in facts.graph_io)
        if reason:
            yield LintFinding(label, node.op_type, f"tensor {name!r}: {reason}")
    for init in facts.initializers:
        if init.name not in seen:
            seen.add(init.name)
            reason = _dtype_problem(_type_name(init.data_type), facts.trt_major, False)
            if reason:
                yield LintFinding(GRAPH, "initializer", f"tensor {init.name!r}: {reason}")


def _dtype_problem(dtype: str, trt_major: int, is_graph_io: bool) -> str:
    since = DTYPE_SINCE.get(dtype)
    if since is None:
        return f"{dtype} is not a TensorRT type"
    if trt_major < since:
        return f"{dtype} needs TensorRT >= {since}"
    if dtype == "UINT8" and not is_graph_io:
        return UINT8_NOTE
    return ""


def check_int64(facts: ModelFacts) -> Iterator[LintFinding]:
    """One warning per model: 8.x parsers cast INT64 to INT32, so INT64 I/O binds as INT32."""
    if facts.trt_major >= INT64_NATIVE_SINCE:
        return
    int64 = sorted(n for n, t in facts.dtypes.items() if t == "INT64")
    if int64:
        io = [n for n in int64 if n in facts.graph_io]
        yield LintFinding(GRAPH, "Model", f"{len(int64)} INT64 tensors: TensorRT "
                          f"{facts.trt_major}.x casts them to INT32 (values clamp at +-2^31); "
                          f"INT64 graph I/O {io} binds as int32 there", "warning")


def check_reduce_axes_input(facts: ModelFacts) -> Iterator[LintFinding]:
    """A reduce with an axes INPUT on a parser that ignores it: wrong numbers, no error."""
    if facts.trt_major >= REDUCE_AXES_INPUT_READ_SINCE:
        return
    for label, node in facts.nodes:
        if node.op_type in REDUCE_AXES_INPUT_IGNORED and _is_default_domain(node) \
                and len(node.input) > 1 and node.input[1]:
            yield LintFinding(label, node.op_type, f"axes given as an input: TensorRT "
                              f"{facts.trt_major}.x ignores it and reduces over every axis; "
                              "use opset <= 17 with axes as an attribute "
                              "(twbert_export.export.legacy.to_trt8_graph)")


# Pre-quantized weights (an INT8 initializer into DequantizeLinear, the int8 / int8w files'
# form): TensorRT 10's explicit quantization documents them ("Quantized Weights"); the 8.5-GA /
# 8.6-GA importers pass the INT8 initializer to an IConstantLayer, a form TensorRT 8.x documents
# nowhere (8.0 / 8.2 refuse it: "invalid weights type of Int8"), and their DequantizeLinear reads
# FP32 scales only (QuantDequantLinearHelper). export/legacy.py writes the FP32-weight form.
QUANTIZED_WEIGHTS_SINCE = 10


def check_quantized_weights(facts: ModelFacts) -> Iterator[LintFinding]:
    """DequantizeLinear of an INT8 constant, or with non-FP32 scales, before TensorRT 10."""
    if facts.trt_major >= QUANTIZED_WEIGHTS_SINCE:
        return
    for label, node in facts.nodes:
        if node.op_type != "DequantizeLinear" or not _is_default_domain(node):
            continue
        weight = facts.constants.get(node.input[0])
        if weight is not None and _type_name(weight.data_type) == "INT8":
            yield LintFinding(label, node.op_type, f"INT8 weights {node.input[0]!r} "
                              f"(pre-quantized): documented from TensorRT "
                              f"{QUANTIZED_WEIGHTS_SINCE}; the {facts.trt_major}.x twin stores "
                              "FP32 weights with QuantizeLinear (export/legacy.py)")
        scale_type = facts.dtypes.get(node.input[1]) if len(node.input) > 1 else None
        if scale_type not in (None, "FLOAT"):
            yield LintFinding(label, node.op_type, f"{scale_type} scale {node.input[1]!r}: "
                              f"TensorRT {facts.trt_major}.x reads FP32 scales only")


def check_control_flow(facts: ModelFacts) -> Iterator[LintFinding]:
    for label, node in facts.nodes:
        if node.op_type in WARN_OPS and _is_default_domain(node):
            yield LintFinding(label, node.op_type, WARN_OPS[node.op_type], "warning")


def check_opset(facts: ModelFacts) -> Iterator[LintFinding]:
    opset = next((o.version for o in facts.model.opset_import if o.domain in DEFAULT_DOMAINS), 0)
    limit = MAX_OPSET.get(facts.trt_major)
    if limit is not None and opset > limit:
        yield LintFinding(GRAPH, "Model", f"opset {opset}: TensorRT {facts.trt_major}.x parsers "
                          f"document opsets up to {limit}; ops changed since may fail", "warning")


CHECKS: tuple[Callable[[ModelFacts], Iterable[LintFinding]], ...] = (
    check_operators, check_random_ops, check_topk, check_einsum, check_op_restrictions,
    check_dtypes, check_int64, check_reduce_axes_input, check_quantized_weights,
    check_control_flow, check_opset)


# -- Entry points ----------------------------------------------------------------------------------

def parse_parser(parser: str) -> tuple[int, int | None]:
    """'8.5' -> (8, 5); '10' -> (10, None): the major and, when given, the minor of a parser."""
    from .version import parse_version

    major, minor, _ = parse_version(parser)
    return major, (minor if "." in str(parser).strip() else None)


def lint_model(model: "onnx.ModelProto | str | Path", trt_major: int = 10,
               plugins: Iterable[str] = (), parser: str | None = None) -> list[LintFinding]:
    """Every finding for a TensorRT `trt_major`.x target (or the `parser` release, e.g. "8.5",
    with its minor's rules), errors first, in graph order.

    `plugins`: op types the target has TensorRT plugins for (allowed in any domain)."""
    trt_minor = None
    if parser is not None:
        trt_major, trt_minor = parse_parser(parser)
    facts = read_facts(model, trt_major, plugins)
    facts.trt_minor = trt_minor
    findings = list(facts.notes)
    for check in CHECKS:
        findings.extend(check(facts))
    return sorted(findings, key=lambda f: f.severity != "error")


def check_model(model: "onnx.ModelProto | str | Path", trt_major: int = 10,
                plugins: Iterable[str] = (), parser: str | None = None) -> list[LintFinding]:
    """Raise LintError if the graph has anything TensorRT rejects (or, for a `parser` release,
    would mis-import); return the warnings."""
    findings = lint_model(model, trt_major, plugins, parser)
    if any(f.severity == "error" for f in findings):
        raise LintError(findings, parse_parser(parser)[0] if parser else trt_major, parser)
    return findings


def one_line(error: "LintError", model_name: str) -> str:
    """The one line a command prints when it refuses a graph (exit 2)."""
    first = error.findings[0]
    more = f" (+{len(error.findings) - 1} more)" if len(error.findings) > 1 else ""
    return f"{model_name}: TensorRT {error.target} would reject or mis-import it: {first}{more}"


def main(argv: list[str] | None = None) -> int:
    """`python -m twbert_export.trt.lint MODEL.onnx [--parser 8.5|8.6|10|11]`: 0 clean (warnings
    printed), 2 with one line when the parser would reject or mis-import the graph."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m twbert_export.trt.lint", description=main.__doc__)
    ap.add_argument("model", help="ONNX file")
    ap.add_argument("--parser", default="10", choices=PARSER_CHOICES,
                    help="TensorRT parser release to check against (default 10)")
    args = ap.parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: ONNX file not found: {args.model}", file=sys.stderr)
        return 2
    try:
        warnings = check_model(args.model, parser=args.parser)
    except LintError as e:
        print(f"error: {one_line(e, Path(args.model).name)}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"warning: {w}")
    print(f"{Path(args.model).name}: TensorRT {args.parser} parser: no errors, "
          f"{len(warnings)} warnings")
    return 0


def format_findings(findings: Iterable[LintFinding]) -> str:
    """One line per finding, errors first: 'error: node /a/MatMul (MatMul): reason'."""
    findings = sorted(findings, key=lambda f: f.severity != "error")
    return "\n".join(f"{f.severity}: {f}" for f in findings) or "no findings"


# -- Reading a model -------------------------------------------------------------------------------

def read_facts(model: "onnx.ModelProto | str | Path", trt_major: int,
               plugins: Iterable[str] = ()) -> ModelFacts:
    onnx_lib = require("onnx", "to lint ONNX graphs for TensorRT")
    proto: "onnx.ModelProto" = (onnx_lib.load(str(model)) if isinstance(model, (str, Path))
                                else model)
    facts = ModelFacts(proto, trt_major, frozenset(plugins))
    try:
        inferred = infer_shapes(proto, check_type=False, strict_mode=False)
    except Exception as e:  # an unreadable graph still gets its op checks
        inferred = proto
        facts.notes.append(LintFinding(GRAPH, "Model", f"shape inference failed ({e}); dtypes "
                                       "of intermediate tensors are unknown", "warning"))
    facts.functions = {(f.domain, f.name) for f in proto.functions}
    graph = inferred.graph
    facts.graph_io = {v.name for v in (*graph.input, *graph.output)}
    _walk(facts, graph)
    for function in inferred.functions:
        for node in function.node:
            facts.nodes.append((_label(node, len(facts.nodes)), node))
    return facts


def _walk(facts: ModelFacts, graph: "onnx.GraphProto") -> None:
    """Collect nodes, types and constants of a graph and of its subgraphs (If/Loop/Scan bodies)."""
    from onnx import AttributeProto

    for value in (*graph.input, *graph.output, *graph.value_info):
        tensor_type = value.type.tensor_type
        if value.type.HasField("tensor_type") and tensor_type.elem_type:
            facts.dtypes[value.name] = _type_name(tensor_type.elem_type)
            if tensor_type.HasField("shape"):
                facts.ranks[value.name] = len(tensor_type.shape.dim)
    for init in graph.initializer:
        facts.initializers.append(init)
        facts.constants[init.name] = init
        facts.dtypes.setdefault(init.name, _type_name(init.data_type))
        facts.ranks.setdefault(init.name, len(init.dims))
    for node in graph.node:
        facts.nodes.append((_label(node, len(facts.nodes)), node))
        if node.op_type == "Constant" and _is_default_domain(node):
            tensor = _constant_tensor(node)
            if tensor is not None:
                facts.constants[node.output[0]] = tensor
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                _walk(facts, attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _walk(facts, sub)


def _constant_tensor(node: "onnx.NodeProto") -> "onnx.TensorProto | None":
    import numpy as np
    from onnx import helper, numpy_helper

    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
            value = helper.get_attribute_value(attr)
            dtype = np.int64 if "int" in attr.name else np.float32
            return numpy_helper.from_array(np.asarray(value, dtype), node.output[0])
    return None


def _default_ops(facts: ModelFacts, op_type: str) -> Iterator[tuple[str, "onnx.NodeProto"]]:
    return ((label, node) for label, node in facts.nodes
            if node.op_type == op_type and _is_default_domain(node))


def _attrs(node: "onnx.NodeProto") -> dict:
    from onnx import helper

    return {a.name: _decode(helper.get_attribute_value(a)) for a in node.attribute}


def _decode(value):
    return value.decode() if isinstance(value, bytes) else value


def _label(node: "onnx.NodeProto", index: int) -> str:
    return node.name or f"<{node.op_type} #{index}>"


def _type_name(elem_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type)


__all__ = ["LintFinding", "LintError", "lint_model", "check_model", "format_findings",
           "OPERATORS", "OpSupport", "CHECKS", "ModelFacts", "read_facts", "PARSER_CHOICES",
           "one_line"]


if __name__ == "__main__":
    raise SystemExit(main())
