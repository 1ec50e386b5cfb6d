"""The TensorRT runner's buffer sizing and checks, from an engine description (no TensorRT)."""

import sys
import types

import numpy as np
import pytest
from trtdata import tiny_contract

from twbert_export.trt import runtime, targets
from twbert_export.trt.engine_manifest import (EngineManifest, EngineMismatch, MachineInfo,
                                               write_manifest)
from twbert_export.trt.runtime import (EngineDescription, TensorDesc, check_description,
                                       engine_batches, plan_buffers, profile_batch_range,
                                       to_engine_dtype, trt_runner)
from twbert_export.trt.targets import Platform


def engine_desc(max_batch=4, ids_dtype="int64") -> EngineDescription:
    prof = lambda *rest: ((1, *rest), (2, *rest), (max_batch, *rest))  # noqa: E731
    return EngineDescription((
        TensorDesc("video", True, "float32", (-1, 4, 3, 32, 32), prof(4, 3, 32, 32)),
        TensorDesc("input_ids", True, ids_dtype, (-1, 8), prof(8)),
        TensorDesc("attention_mask", True, ids_dtype, (-1, 8), prof(8)),
        TensorDesc("itm_logits", False, "float32", (-1, 2)),
        TensorDesc("itc_sim", False, "float32", (-1,)),
        TensorDesc("frame_scores_1", False, "float32", (-1, 4)),
        TensorDesc("frame_indices_1", False, ids_dtype, (-1, 2)),
    ))


def test_buffers_are_sized_for_the_profile_max_batch():
    plan = plan_buffers(engine_desc(), max_batch=4)
    assert plan["video"].max_shape == (4, 4, 3, 32, 32)
    assert plan["video"].nbytes == 4 * 4 * 3 * 32 * 32 * 4
    assert plan["input_ids"].nbytes == 4 * 8 * 8  # int64
    assert plan["itc_sim"].max_shape == (4,) and plan["itc_sim"].nbytes == 16
    assert plan["frame_indices_1"].max_shape == (4, 2)
    assert [n for n, s in plan.items() if s.is_input] == ["video", "input_ids", "attention_mask"]


def test_int32_engine_io_halves_the_integer_buffers():
    plan = plan_buffers(engine_desc(ids_dtype="int32"), max_batch=4)
    assert plan["input_ids"].nbytes == 4 * 8 * 4 and plan["frame_indices_1"].nbytes == 4 * 2 * 4


def test_data_dependent_output_shape_is_refused():
    desc = EngineDescription((TensorDesc("boxes", False, "float32", (-1, -1, 4)),))
    with pytest.raises(ValueError, match="data-dependent"):
        plan_buffers(desc, 4)


def test_engine_must_match_the_contract():
    check_description(engine_desc(), tiny_contract())
    check_description(engine_desc(max_batch=2), tiny_contract())  # served in slices
    renamed = EngineDescription(engine_desc().tensors[:-1]
                                + (TensorDesc("indices", False, "int64", (-1, 2)),))
    with pytest.raises(ValueError, match="does not match"):
        check_description(renamed, tiny_contract())


def test_a_static_dla_engine_serves_every_batch_of_the_contract_in_slices():
    """A DLA engine is built at the contract's OPT batch only: other batches run in slices of
    that size, a short slice padded by repeating its last row."""
    static = EngineDescription(tuple(
        TensorDesc(t.name, t.is_input, t.dtype, t.shape,
                   ((2, *t.profile[0][1:]),) * 3 if t.profile else None)
        for t in engine_desc().tensors))
    assert profile_batch_range(static) == (2, 2)
    assert profile_batch_range(engine_desc()) == (1, 4)
    assert engine_batches(4, 2, 2) == [(0, 2, 2), (2, 4, 2)]
    assert engine_batches(3, 2, 2) == [(0, 2, 2), (2, 3, 2)]  # last row run twice, cut back
    assert engine_batches(1, 2, 2) == [(0, 1, 2)]
    assert engine_batches(3, 1, 4) == [(0, 3, 3)]


def test_int64_feeds_narrow_to_int32_only_when_they_fit():
    ids = np.array([[101, 2023, 102]], dtype=np.int64)
    out = to_engine_dtype("input_ids", ids, "int32")
    assert out.dtype == np.int32 and (out == ids).all()
    with pytest.raises(ValueError, match="do not fit"):
        to_engine_dtype("input_ids", np.array([2 ** 40]), "int32")


def test_runner_refuses_a_mismatched_engine_before_deserialising(tmp_path, monkeypatch):
    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"PLAN")
    write_manifest(EngineManifest(
        engine=engine.name, onnx="model.fp16.onnx", onnx_sha256="a" * 64, precision="fp16",
        build_path="strongly-typed", machine=MachineInfo("10.3.0", "Orin", "8.7", "36.4.3", "6.2"),
        profile_shapes={}, rebuild_command="./build_on_device.sh fp16"), engine)

    class NoRuntime:
        def __init__(self, *a):
            raise AssertionError("the engine must not be deserialised after a failed preflight")

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.13.0.35"
    fake.Runtime = NoRuntime
    fake.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(targets, "query_cuda_device", lambda: ("NVIDIA H100 80GB HBM3", "9.0"))
    monkeypatch.setattr(targets, "detect_platform", lambda: Platform(jetson=False))
    monkeypatch.setattr(runtime, "cuda_backend", lambda prefer=None: pytest.fail("no CUDA yet"))
    runner = trt_runner(engine, contract=tiny_contract())
    with pytest.raises(EngineMismatch) as info:
        runner.activate()
    msg = str(info.value)
    assert "built for TensorRT 10.3.0 on Orin" in msg and "./build_on_device.sh fp16" in msg
    assert "TensorRT 10.13.0.35 here" in msg and "compute capability 9.0 here" in msg
