"""The TensorRT runner's own logic, run against a stand-in TensorRT and CUDA (numpy memory).

The stand-in engine computes each output row from that row's inputs only, so whatever the
runner does (set_input_shape per batch, buffers sized for the profile, INT32 engine I/O on 8.x,
slicing and padding batches a static DLA engine does not take, CUDA-graph replay) must give
the same rows as computing them directly. What TensorRT itself does is for `pytest -m trt`."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from trtdata import tiny_contract
from trtapi import StrictModule, enum, strict_class

from twbert_export.artifact.contract import BatchRange
from twbert_export.trt import runtime, targets
from twbert_export.trt.engine_manifest import (
    EngineManifest,
    MachineInfo,
    write_manifest,
)
from twbert_export.trt.targets import Platform

MACHINE = MachineInfo("10.3.0", "NVIDIA H100 80GB HBM3", "9.0")


def expected_outputs(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the stand-in engine computes, row by row."""
    video, ids = feed["video"].astype(np.float32), feed["input_ids"].astype(np.int64)
    frame_scores = video.mean(axis=(2, 3, 4)) + ids.sum(1, keepdims=True) * 1e-3
    top = np.argsort(-frame_scores, axis=1, kind="stable")[:, :2]
    return {"itm_logits": np.stack([frame_scores.sum(1), -frame_scores.sum(1)], 1),
            "itc_sim": frame_scores.max(1),
            "frame_scores_1": frame_scores, "frame_indices_1": top}


class Memory:
    """Device memory as numpy byte arrays; pointers are keys."""

    def __init__(self):
        self.blocks: dict[int, np.ndarray] = {}

    def malloc(self, nbytes: int) -> int:
        ptr = 0x1000 * (len(self.blocks) + 1)
        self.blocks[ptr] = np.zeros(nbytes, np.uint8)
        return ptr


class FakeCuda:
    name = "fake"

    def __init__(self, memory: Memory):
        self.memory, self.stream = memory, 7
        self.pending: list = []

    def malloc(self, nbytes: int) -> int:
        return self.memory.malloc(nbytes)

    def pinned(self, nbytes: int) -> np.ndarray:
        return np.zeros(max(nbytes, 1), np.uint8)

    def htod(self, dst: int, src: np.ndarray) -> None:
        raw = src.reshape(-1).view(np.uint8)
        self.memory.blocks[dst][:raw.size] = raw

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        raw = dst.reshape(-1).view(np.uint8)
        raw[...] = self.memory.blocks[src][:raw.size]

    def synchronize(self) -> None:
        pass

    def close(self) -> None:
        self.memory.blocks.clear()


class FakeGraphs:
    """Capture records the enqueue; launch replays it (as a CUDA graph replays device work)."""

    def __init__(self, fail: bool = False):
        self.captured: dict[int, object] = {}
        self.launches = 0
        self.fail = fail

    def capture(self, stream, enqueue):
        if self.fail:
            raise RuntimeError("cuStreamBeginCapture failed with CUDA driver error 900")
        handle = len(self.captured) + 1
        self.captured[handle] = enqueue
        return handle

    def launch(self, handle, stream):
        self.launches += 1
        self.captured[handle]()

    def destroy(self, handle):
        self.captured.pop(handle)


def stand_in_tensorrt(open_plan) -> StrictModule:
    """A stand-in `tensorrt` module whose Runtime deserializes a plan with `open_plan(data)`.
    Each object answers only to the names of the TensorRT class it stands for (trtapi)."""
    trt = StrictModule("tensorrt")
    trt.__version__ = MACHINE.tensorrt_version
    trt.TensorIOMode = enum("TensorIOMode", "INPUT", "OUTPUT")
    trt.nptype = lambda dtype: dtype
    trt.Logger = type("Logger", (strict_class("Logger"),),
                      {"WARNING": 2, "__init__": lambda self, level: None})

    class Runtime(strict_class("Runtime")):
        def __init__(self, logger):
            self.engine_host_code_allowed = False

        def deserialize_cuda_engine(self, data):
            return open_plan(data)

    trt.Runtime = Runtime
    return trt


def stand_in_engine(trt, memory: Memory, contract, batch_range: tuple[int, int],
                    int_dtype: str, compute):
    """An engine of `contract` (dynamic batch in `batch_range`) whose contexts compute
    `compute(feed)`, reading inputs from and writing outputs to device memory at the addresses
    they are given; int64 tensors are stored as `int_dtype` (8.x's INT32 I/O)."""
    lo, hi = batch_range
    specs = {s.name: s for s in (*contract.inputs, *contract.outputs)}
    dtypes = {n: (int_dtype if s.dtype == "int64" else s.dtype) for n, s in specs.items()}
    names = list(specs)

    class Context(strict_class("IExecutionContext")):
        def __init__(self):
            self._address: dict[str, int] = {}
            self._shapes: dict[str, tuple[int, ...]] = {}

        def set_tensor_address(self, name, ptr):
            self._address[name] = ptr

        def set_input_shape(self, name, shape):
            if not lo <= shape[0] <= hi:
                return False
            self._shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return specs[name].concrete(self._shapes[contract.input_names[0]][0])

        def execute_async_v3(self, stream):
            feed = {}
            for spec in contract.inputs:
                shape = self._shapes[spec.name]
                block = memory.blocks[self._address[spec.name]]
                feed[spec.name] = block.view(dtypes[spec.name])[:int(np.prod(shape))] \
                    .reshape(shape).astype(spec.dtype)
            for name, value in compute(feed).items():
                raw = np.ascontiguousarray(value.astype(dtypes[name])).reshape(-1).view(np.uint8)
                memory.blocks[self._address[name]][:raw.size] = raw
            return True

    class Engine(strict_class("ICudaEngine")):
        num_io_tensors = len(names)

        def get_tensor_name(self, i):
            return names[i]

        def get_tensor_mode(self, name):
            return trt.TensorIOMode.INPUT if name in contract.input_names \
                else trt.TensorIOMode.OUTPUT

        def get_tensor_dtype(self, name):
            return dtypes[name]

        def get_tensor_shape(self, name):
            return tuple(-1 if d == "batch" else d for d in specs[name].shape)

        def get_tensor_profile_shape(self, name, profile):
            return specs[name].concrete(lo), specs[name].concrete(lo), specs[name].concrete(hi)

        def create_execution_context(self):
            return Context()

    return Engine()


def fake_tensorrt(memory: Memory, contract, batch_range: tuple[int, int], int_dtype: str):
    """A stand-in TensorRT whose one engine (b"PLAN") computes `expected_outputs`."""
    def open_plan(data):
        assert data == b"PLAN"
        return stand_in_engine(trt, memory, contract, batch_range, int_dtype, expected_outputs)

    trt = stand_in_tensorrt(open_plan)
    return trt


@pytest.fixture
def make_runner(tmp_path, monkeypatch):
    def make(batch_range=(1, 4), int_dtype="int64", cuda_graph=False, capture_fails=False):
        contract = tiny_contract(BatchRange(1, 2, 4))
        memory = Memory()
        monkeypatch.setitem(sys.modules, "tensorrt",
                            fake_tensorrt(memory, contract, batch_range, int_dtype))
        monkeypatch.setattr(runtime, "cuda_backend", lambda prefer=None: FakeCuda(memory))
        graphs = FakeGraphs(fail=capture_fails)
        monkeypatch.setattr(runtime, "_DriverGraphs", lambda: graphs)
        monkeypatch.setattr(targets, "query_cuda_device", lambda: (MACHINE.gpu_name, "9.0"))
        monkeypatch.setattr(targets, "detect_platform", lambda: Platform(jetson=False))
        engine = tmp_path / "model.fp16.engine"
        engine.write_bytes(b"PLAN")
        write_manifest(EngineManifest(
            engine=engine.name, onnx="model.fp16.onnx", onnx_sha256="a" * 64, precision="fp16",
            build_path="strongly-typed", machine=MACHINE, profile_shapes={}), engine)
        return runtime.trt_runner(engine, contract=contract, cuda_graph=cuda_graph), graphs
    return make


def feed(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"video": rng.standard_normal((batch, 4, 3, 32, 32)).astype(np.float32),
            "input_ids": rng.integers(100, 3000, (batch, 8)),
            "attention_mask": np.ones((batch, 8), np.int64)}


def check(out: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> None:
    expected = expected_outputs(inputs)
    assert list(out) == ["itm_logits", "itc_sim", "frame_scores_1", "frame_indices_1"]
    for name, value in expected.items():
        assert out[name].dtype == (np.int64 if name == "frame_indices_1" else np.float32)
        np.testing.assert_allclose(out[name], value, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("int_dtype", ["int64", "int32"])  # 10.x, and 8.x's INT32 I/O
def test_every_batch_in_the_range_gives_the_rows_computed_alone(make_runner, int_dtype):
    runner, _ = make_runner(int_dtype=int_dtype)
    with runner:
        for batch in (2, 4, 1, 4):  # shape changes both ways reuse the buffers
            inputs = feed(batch, seed=batch)
            check(runner.infer(inputs), inputs)


def test_a_static_engine_runs_other_batches_in_padded_slices(make_runner):
    runner, _ = make_runner(batch_range=(2, 2))  # DLA: built at the contract's OPT batch only
    with runner:
        for batch in (1, 3, 4):
            inputs = feed(batch, seed=batch)
            check(runner.infer(inputs), inputs)


def test_cuda_graph_replay_equals_the_plain_path(make_runner):
    runner, graphs = make_runner(cuda_graph=True)
    with runner:
        for seed, batch in enumerate((2, 2, 1, 2)):
            inputs = feed(batch, seed=seed)
            check(runner.infer(inputs), inputs)
            assert len(graphs.captured) == 1  # only the current shape's graph is kept
    assert graphs.launches == 4 and not graphs.captured  # freed at deactivation


def test_a_failed_graph_capture_falls_back_to_plain_enqueue_and_says_why(make_runner):
    runner, graphs = make_runner(cuda_graph=True, capture_fails=True)
    with runner:
        with pytest.warns(RuntimeWarning, match="CUDA graph capture failed .*error 900"):
            inputs = feed(2)
            check(runner.infer(inputs), inputs)
        for batch in (2, 1):  # no second attempt, no second warning: plain enqueue
            inputs = feed(batch, seed=batch)
            check(runner.infer(inputs), inputs)
        assert "error 900" in runner.graph_error and graphs.launches == 0


class FakeDriver:
    """libcuda's graph calls, recording the order; cuStreamEndCapture fails after a failed
    enqueue, as the driver does for an invalidated capture."""

    def __init__(self):
        self.calls: list[str] = []
        self.invalidated = False

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return 901 if name == "cuStreamEndCapture" and self.invalidated else 0
        return call


def test_capture_reports_the_enqueue_error_not_the_end_capture_error():
    graphs = runtime._DriverGraphs.__new__(runtime._DriverGraphs)
    graphs.lib = FakeDriver()

    def enqueue():
        graphs.lib.invalidated = True
        raise RuntimeError("TensorRT execute_async_v3 failed")

    with pytest.raises(RuntimeError, match="execute_async_v3 failed"):
        graphs.capture(7, enqueue)
    assert graphs.lib.calls == ["cuStreamBeginCapture_v2", "cuStreamEndCapture"]


def test_the_pycuda_context_is_popped_and_released_even_when_a_free_fails(monkeypatch):
    calls: list[str] = []

    class Alloc:
        def __init__(self, ok):
            self.ok = ok

        def free(self):
            calls.append("free")
            if not self.ok:
                raise RuntimeError("cuMemFree failed")

    backend = runtime.PyCudaBackend.__new__(runtime.PyCudaBackend)
    backend.ctx = types.SimpleNamespace(pop=lambda: calls.append("pop"),
                                        detach=lambda: calls.append("detach"))
    backend.stream_obj, backend._allocs = object(), [Alloc(False), Alloc(True)]
    with pytest.raises(RuntimeError, match="cuMemFree failed"):
        backend.close()
    assert calls == ["free", "free", "pop", "detach"]


# -- the split engine set (split_trt.SplitEngines) ------------------------------------------------
def split_compute(graph: str, x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What each stand-in split engine computes, row by row (tiny_split_contracts' shapes)."""
    if graph == "text":
        embeds = x["input_ids"][:, :, None] * 1e-3 + np.arange(6) * x["attention_mask"][:, :, None]
        return {"text_embeds": embeds.astype(np.float32), "text_cls": embeds[:, 0]}
    if graph == "video_stem":
        frames = x["video"].mean(axis=(2, 3, 4))  # (B, T)
        return {"stem": (frames[:, :, None, None] + np.arange(5)[:, None] * 0.5
                         + np.arange(6) * 0.1).astype(np.float32)}
    if graph == "select":
        scores = x["stem"].mean(axis=(2, 3)) + x["text_cls"].mean(1, keepdims=True)
        return {"itc_sim": (x["stem"].mean(axis=(1, 2, 3)) * x["text_cls"].sum(1)),
                "video_embeds": x["stem"][:, :3, 0, :] + x["text_cls"][:, None, :],
                "frame_scores_1": scores,
                "frame_indices_1": np.argsort(-scores, axis=1, kind="stable")[:, :2]}
    fused = (x["text_embeds"] * x["attention_mask"][:, :, None]).sum((1, 2)) \
        + x["video_embeds"].sum((1, 2))
    return {"itm_logits": np.stack([fused, -fused], 1)}


def host_composition(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    text = split_compute("text", feed)
    stem = split_compute("video_stem", feed)["stem"]
    selected = split_compute("select", {"stem": stem, "text_cls": text["text_cls"]})
    fused = split_compute("fuse", {**text, "attention_mask": feed["attention_mask"],
                                   "video_embeds": selected["video_embeds"]})
    return {**selected, **fused}


class CountingCuda(FakeCuda):
    """FakeCuda recording which tensors cross between host and device (by buffer)."""

    def __init__(self, memory):
        super().__init__(memory)
        self.names: dict[int, str] = {}
        self.htod_names: list[str] = []
        self.dtoh_names: list[str] = []
        self.syncs = 0

    def htod(self, dst, src):
        self.htod_names.append(self.names[dst])
        super().htod(dst, src)

    def dtoh(self, dst, src):
        self.dtoh_names.append(self.names[src])
        super().dtoh(dst, src)

    def synchronize(self):
        self.syncs += 1


def fake_split_tensorrt(memory: Memory, contracts, batch_range, int_dtype: str, opened: list):
    """A stand-in TensorRT whose engines (b"PLAN:<graph>") compute `split_compute` reading and
    writing device memory at the addresses the contexts are given."""
    def open_plan(data):
        graph = data.decode().split(":", 1)[1]
        opened.append(graph)
        return stand_in_engine(trt, memory, contracts[graph], batch_range, int_dtype,
                               lambda feed: split_compute(graph, feed))

    trt = stand_in_tensorrt(open_plan)
    return trt


@pytest.fixture
def make_split_engines(tmp_path, monkeypatch):
    from trtdata import tiny_split_contracts

    from twbert_export.retrieval import split_trt

    def make(batch_range=(1, 4), int_dtype="int64", sha=None):
        contracts = tiny_split_contracts(BatchRange(1, 2, 4))
        memory, opened = Memory(), []
        cuda = CountingCuda(memory)
        real_malloc = cuda.malloc
        monkeypatch.setitem(sys.modules, "tensorrt",
                            fake_split_tensorrt(memory, contracts, batch_range, int_dtype, opened))
        monkeypatch.setattr(runtime, "cuda_backend", lambda prefer=None: cuda)
        monkeypatch.setattr(targets, "query_cuda_device", lambda: (MACHINE.gpu_name, "9.0"))
        monkeypatch.setattr(targets, "detect_platform", lambda: Platform(jetson=False))
        files = {}
        for graph in contracts:
            files[graph] = tmp_path / f"{graph}.fp16.engine"
            files[graph].write_bytes(f"PLAN:{graph}".encode())
            write_manifest(EngineManifest(
                engine=files[graph].name, onnx=f"{graph}.fp16.onnx", onnx_sha256="a" * 64,
                precision="fp16", build_path="strongly-typed", machine=MACHINE,
                profile_shapes={}), files[graph])
        buffers: list[int] = []
        cuda.malloc = lambda n: buffers.append(real_malloc(n)) or buffers[-1]
        engines = split_trt.SplitEngines(files, contracts, tiny_contract(BatchRange(1, 2, 4)),
                                         onnx_sha256={g: sha or "a" * 64 for g in contracts})
        names = {n for c in contracts.values() for n in (*c.input_names, *c.output_names)}
        # One buffer per tensor name, in the order the engines' plans list them.
        assert len(buffers) == len(names)
        for engine in engines.engines.values():
            for name in engine.plan:
                cuda.names[engines.device[name]] = name
        return engines, cuda, opened
    return make


@pytest.mark.parametrize("int_dtype", ["int64", "int32"])  # 10.x, and 8.x's INT32 I/O
def test_the_engine_set_infers_the_composition_passing_intermediates_on_the_device(
        make_split_engines, int_dtype):
    engines, cuda, opened = make_split_engines(int_dtype=int_dtype)
    assert opened == ["text", "video_stem", "select", "fuse"]
    with engines:
        for batch in (3, 1, 4):
            cuda.htod_names.clear(), cuda.dtoh_names.clear()
            inputs = feed(batch, seed=batch)
            out = engines.infer(inputs)
            expected = host_composition(inputs)
            assert list(out) == ["itm_logits", "itc_sim", "frame_scores_1", "frame_indices_1"]
            for name, value in out.items():
                assert value.dtype == (np.int64 if name == "frame_indices_1" else np.float32)
                np.testing.assert_allclose(value, expected[name], rtol=1e-6, err_msg=name)
            # Only the feed goes in and only the monolithic outputs come out: stem, text_cls,
            # text_embeds and video_embeds never cross to the host.
            assert sorted(cuda.htod_names) == ["attention_mask", "input_ids", "video"]
            assert sorted(cuda.dtoh_names) == sorted(out)
        assert engines.executions == {g: 3 for g in ("text", "video_stem", "select", "fuse")}
    assert not cuda.memory.blocks  # freed on exit


def test_score_keeps_video_embeds_on_the_device_and_parts_match_the_host(make_split_engines):
    engines, cuda, _ = make_split_engines()
    inputs = feed(4, seed=3)
    with engines:
        text = engines.encode_texts(inputs["input_ids"], inputs["attention_mask"])
        stems = engines.encode_clips(inputs["video"])
        host_text = split_compute("text", inputs)
        np.testing.assert_allclose(text["text_cls"], host_text["text_cls"], rtol=1e-6)
        np.testing.assert_allclose(stems, split_compute("video_stem", inputs)["stem"], rtol=1e-6)
        selected = engines.select(stems, text["text_cls"])
        np.testing.assert_allclose(selected["video_embeds"], split_compute(
            "select", {"stem": stems, "text_cls": text["text_cls"]})["video_embeds"], rtol=1e-6)
        cuda.htod_names.clear(), cuda.dtoh_names.clear()
        out = engines.score(stems, text, inputs["attention_mask"])
        assert "video_embeds" not in cuda.htod_names + cuda.dtoh_names
        expected = host_composition(inputs)
        for name, value in out.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-6, err_msg=name)
        fused = engines.fuse(text["text_embeds"], inputs["attention_mask"],
                             selected["video_embeds"])
        np.testing.assert_allclose(fused["itm_logits"], expected["itm_logits"], rtol=1e-6)


def test_a_static_engine_set_runs_every_batch_in_aligned_padded_slices(make_split_engines):
    engines, _, _ = make_split_engines(batch_range=(2, 2))  # DLA: the OPT batch only
    with engines:
        for batch in (1, 3, 4):
            inputs = feed(batch, seed=batch)
            expected = host_composition(inputs)
            for name, value in engines.infer(inputs).items():
                np.testing.assert_allclose(value, expected[name], rtol=1e-6, err_msg=name)


def test_an_input_neither_fed_nor_produced_is_an_error_not_stale_memory(make_split_engines):
    engines, _, _ = make_split_engines()
    inputs = feed(2)
    with engines:
        engines.infer(inputs)  # leaves every buffer written at batch 2
        with pytest.raises(RuntimeError, match="video_embeds was neither fed nor produced"):
            engines.run_chain(("fuse",), {"text_embeds": np.zeros((2, 8, 6), np.float32),
                                          "attention_mask": inputs["attention_mask"]},
                              ["itm_logits"])


def test_an_engine_built_from_another_onnx_is_refused_before_any_is_read(make_split_engines):
    from twbert_export.trt.engine_manifest import EngineMismatch

    with pytest.raises(EngineMismatch):
        make_split_engines(sha="b" * 64)
