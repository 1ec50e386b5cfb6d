"""The TensorRT Python API names the stand-ins of tests/trt may answer to, and the strictness
that makes a stand-in refuse any other name.

A stand-in that accepts every attribute would let a misspelt or removed TensorRT call pass the
unit tests (e.g. `config.set_flags`, `engine.get_binding_shape`). So each stand-in object names
the TensorRT class it stands for, and reading or setting a public name that class does not have
in `API` raises AttributeError, as the real bindings would. `API` is a curated subset of
NVIDIA's tensorrt-stubs 10.13 (the names our code and the stand-ins use);
`test_stand_in_names_exist_in_tensorrt_stubs` checks every entry against the stub file when the
stub wheel can be fetched (see tests/trt/test_static_types.py). Version differences (8.x's
EXPLICIT_BATCH, 11.x without FP16/INT8 flags) are made by the stand-ins defining fewer names,
never more.
"""

from __future__ import annotations

import types
from typing import Any

API: dict[str, frozenset[str]] = {k: frozenset(v.split()) for k, v in {
    "tensorrt": "__version__ Builder Logger OnnxParser Runtime Dims NetworkDefinitionCreationFlag "
                "BuilderFlag MemoryPoolType DeviceType DataType LayerType TensorIOMode "
                "ProfilingVerbosity LayerInformationFormat nptype",
    "Logger": "WARNING",
    "Builder": "create_network create_builder_config create_optimization_profile "
               "build_serialized_network",
    "OnnxParser": "parse_from_file num_errors get_error",
    "INetworkDefinition": "num_layers get_layer",
    "ILayer": "type precision num_inputs get_input num_outputs get_output set_output_type",
    "ITensor": "dtype name",
    "IBuilderConfig": "set_memory_pool_limit builder_optimization_level clear_flag set_flag "
                      "add_optimization_profile create_timing_cache set_timing_cache "
                      "get_timing_cache default_device_type DLA_core profiling_verbosity",
    "IOptimizationProfile": "set_shape",
    "ITimingCache": "serialize",
    "Runtime": "deserialize_cuda_engine engine_host_code_allowed",
    "ICudaEngine": "num_io_tensors get_tensor_name get_tensor_mode get_tensor_dtype "
                   "get_tensor_shape get_tensor_profile_shape create_execution_context "
                   "create_engine_inspector",
    "IExecutionContext": "set_tensor_address set_input_shape get_tensor_shape execute_async_v3",
    "EngineInspector": "get_engine_information",
    "NetworkDefinitionCreationFlag": "EXPLICIT_BATCH STRONGLY_TYPED",
    "BuilderFlag": "FP16 INT8 DEBUG GPU_FALLBACK TF32 VERSION_COMPATIBLE "
                   "OBEY_PRECISION_CONSTRAINTS",
    "MemoryPoolType": "WORKSPACE",
    "DeviceType": "GPU DLA",
    "DataType": "FLOAT HALF INT8 INT32 INT64 BOOL",
    "LayerType": "CONVOLUTION MATRIX_MULTIPLY QUANTIZE DEQUANTIZE CONSTANT SHAPE",
    "TensorIOMode": "INPUT OUTPUT",
    "ProfilingVerbosity": "DETAILED",
    "LayerInformationFormat": "JSON",
}.items()}


def check_name(api: str, name: str) -> None:
    if not name.startswith("_") and name not in API[api]:
        raise AttributeError(f"tensorrt.{api} has no attribute {name!r} (not in the TensorRT "
                             "API as tensorrt-stubs 10.13 describes it)")


class Strict:
    """Base of a stand-in for TensorRT class `_api`: other public names raise AttributeError."""
    _api = ""

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            check_name(type(self)._api, name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        check_name(type(self)._api, name)
        object.__setattr__(self, name, value)


def strict_class(api: str, base: type = Strict) -> type:
    """A Strict subclass standing for TensorRT class `api` (for stand-ins built inline)."""
    return type(f"Fake{api}", (base,), {"_api": api})


def enum(api: str, *names: str) -> Any:
    """A stand-in enum (BuilderFlag, LayerType...): members are their index; names outside
    `API[api]` are refused at definition and at use."""
    for n in names:
        check_name(api, n)
    namespace = strict_class(api)()
    for i, n in enumerate(names):
        object.__setattr__(namespace, n, i)
    return namespace


class StrictModule(types.ModuleType):
    """The stand-in `tensorrt` module: only names of the real module (API["tensorrt"])."""

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("__") or name == "__version__":
            check_name("tensorrt", name)
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("__") or name == "__version__":
            check_name("tensorrt", name)
        super().__setattr__(name, value)


def stub_members(pyi_text: str) -> dict[str, set[str]]:
    """Class name -> member names (methods, annotated and assigned attributes) of a .pyi."""
    import ast

    members: dict[str, set[str]] = {}
    for node in ast.parse(pyi_text).body:
        if isinstance(node, ast.ClassDef):
            names = members.setdefault(node.name, set())
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return members
