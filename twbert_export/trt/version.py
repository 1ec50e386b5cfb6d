"""The one TensorRT version parser of twbert_export, and the version rules built on it.

Every version string we meet goes through `parse_version`: `tensorrt.__version__` ("10.3.0.30"),
dpkg's `libnvinfer-bin` version ("8.5.2-1+cuda11.4"), a user's `--parser 8.6` or `TRT_VERSION`,
an L4T release ("36.4.3"). Torch-free and tensorrt-free.
"""

from __future__ import annotations

import re

Version = tuple[int, int, int]

# Oldest TensorRT this toolchain builds for: 8.5 (JetPack 5.1). 8.4 (JetPack 5.0.x) has no
# named-tensor I/O API (`execute_async_v3`, `set_input_shape` came with 8.5).
OLDEST_SUPPORTED = (8, 5, 0)
# First TensorRT we build strongly typed (NetworkDefinitionCreationFlag.STRONGLY_TYPED).
STRONG_TYPING_SINCE = (10, 0, 0)
# Weight-only INT8 (int8w: INT8 weight initializers behind DequantizeLinear, FP16 activations):
# TensorRT 10's explicit quantization takes pre-quantized INT8 weights through an
# IDequantizeLayer; 8.5 / 8.6 have no such form (export/legacy.py) and get no twin of the file.
WEIGHT_ONLY_SINCE = (10, 0, 0)
WEIGHT_ONLY_REFUSAL = ("weight-only INT8 (int8w) needs TensorRT 10 or later: TensorRT 8.5 / 8.6 "
                       "have no INT8-weight, FP16-activation form; build fp16 or int8 there")
# DLA on Jetson: TensorRT <= 10.7, and again from 11.4.1 ("Working with DLA", 11.4.1 developer
# guide; deployment-facts.md).
_DLA_LAST_BEFORE_GAP, _DLA_BACK_IN = (10, 7, 99999), (11, 4, 1)

_VERSION_RE = re.compile(r"^\s*(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(text: str) -> Version:
    """'10.3.0.30' -> (10, 3, 0); '8.6' -> (8, 6, 0); '8.5.2-1+cuda11.4' -> (8, 5, 2).
    Anything after major.minor.patch (build number, packaging suffix) is ignored."""
    m = _VERSION_RE.match(str(text or ""))
    if not m:
        raise ValueError(f"cannot read a TensorRT version from {text!r} (expected e.g. 8.6 or "
                         "10.3.0)")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


class UnsupportedTensorRT(ValueError):
    """A TensorRT release this toolchain does not build for (bad input: exit 2, one line)."""


def check_supported(text: str) -> Version:
    """The parsed version of a TensorRT we build for (8.5, 8.6, 10.x, 11.x and later), or
    UnsupportedTensorRT saying why not."""
    v = parse_version(text)
    if v < OLDEST_SUPPORTED:
        raise UnsupportedTensorRT(
            f"TensorRT {text} is too old: this toolchain needs TensorRT 8.5 or newer (JetPack >= "
            "5.1; JetPack 5.0.x ships 8.4, whose runtime lacks the named-tensor API we use)")
    if v[0] == 9:
        raise UnsupportedTensorRT(
            f"TensorRT {text}: 9.x releases are not a target (no JetPack ships them, and their "
            "parser ignores reduce axes given as inputs, like 8.x): use 8.5/8.6 or 10.x+")
    return v


def check_precision(text: str, precision: str) -> None:
    """UnsupportedTensorRT (one line) when TensorRT `text` cannot build `precision`: int8w
    before 10.0."""
    if precision == "int8w" and parse_version(text) < WEIGHT_ONLY_SINCE:
        raise UnsupportedTensorRT(f"TensorRT {text}: {WEIGHT_ONLY_REFUSAL}")


def needs_legacy_graph(text: str) -> bool:
    """8.x parsers need the opset-17 graph `model.PRECISION.trt8.onnx` (twbert_export.export.legacy)."""
    return parse_version(text) < (9, 0, 0)


def dla_available(text: str) -> bool:
    """Whether a TensorRT version can build for the DLA: up to 10.7, and again from 11.4.1
    (AGX Orin on JetPack >= 7.2.2); 10.8 to 11.4.0 have no DLA on Jetson."""
    v = parse_version(text)
    return v <= _DLA_LAST_BEFORE_GAP or v >= _DLA_BACK_IN
