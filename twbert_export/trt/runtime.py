"""A TensorRT runner with the interface of the ONNX Runtime and PyTorch runners (Polygraphy's
BaseRunner: activate, infer on a dict of numpy arrays, deactivate).

- Preflight first: the engine's sidecar manifest is checked against this machine (TensorRT
  version, compute capability, JetPack) BEFORE the engine is deserialised; a mismatch raises
  `EngineMismatch` saying what the engine was built for and how to rebuild it.
- One CUDA stream; device buffers and pinned host buffers allocated once at activation, sized
  for the profile's MAX batch (`plan_buffers`, testable from an `EngineDescription` without
  TensorRT); `set_input_shape` only when the batch changes; `execute_async_v3`.
- Optional CUDA graph: one plain `execute_async_v3` at the current shape first (so TensorRT
  finishes its shape-dependent setup outside the capture), then capture of the enqueue; copies
  stay outside the graph, which is replayed while the batch size stays the same. A graph fixes
  the shapes and the context state it was captured with, so a new batch size drops it and
  captures again: keep the batch fixed to profit from graphs. A capture that fails is reported
  once (a RuntimeWarning with the first error, kept in `graph_error`) and the runner enqueues
  normally from then on.
- CUDA through pycuda, or cuda-python when pycuda is absent; graph capture through the CUDA
  driver API (libcuda via ctypes), which both share.
- Integer I/O: TensorRT 8.x has no INT64 I/O (its parser narrows to INT32): inputs are cast to
  the engine's dtype (range-checked) and outputs back to the contract's dtype.

Nothing is imported at module level beyond numpy and this package.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifact.contract import IOContract
from ..util import require
from .engine_manifest import EngineManifest, preflight
from .targets import machine_info
from .version import check_supported

Shape = tuple[int, ...]


# -- engine description (TensorRT-free, so buffer sizing is testable) --------------------------
@dataclass(frozen=True)
class TensorDesc:
    name: str
    is_input: bool
    dtype: str  # numpy dtype name of the engine's I/O tensor
    shape: Shape  # -1 for dynamic axes
    profile: tuple[Shape, Shape, Shape] | None = None  # inputs: (min, opt, max) of profile 0


@dataclass(frozen=True)
class EngineDescription:
    tensors: tuple[TensorDesc, ...]

    @property
    def inputs(self) -> list[TensorDesc]:
        return [t for t in self.tensors if t.is_input]

    @property
    def outputs(self) -> list[TensorDesc]:
        return [t for t in self.tensors if not t.is_input]


@dataclass(frozen=True)
class BufferSpec:
    name: str
    is_input: bool
    dtype: str
    max_shape: Shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.max_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


if TYPE_CHECKING:
    import tensorrt


def _dims(dims: Any) -> Shape:
    """A TensorRT Dims (tuple-like) as a tuple of ints."""
    return tuple(int(dims[i]) for i in range(len(dims)))


def describe_engine(engine: "tensorrt.ICudaEngine") -> EngineDescription:
    """An EngineDescription from a deserialised ICudaEngine (named-tensor API, TensorRT >= 8.5).
    Type-checked against tensorrt-stubs."""
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = require("tensorrt", "to read TensorRT engines")
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        shape = _dims(engine.get_tensor_shape(name))
        profile: tuple[Shape, Shape, Shape] | None = None
        if is_input:
            lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
            profile = (_dims(lo), _dims(opt), _dims(hi))
        tensors.append(TensorDesc(name, is_input, dtype, shape, profile))
    return EngineDescription(tuple(tensors))


def plan_buffers(desc: EngineDescription, max_batch: int) -> dict[str, BufferSpec]:
    """Buffer per I/O tensor at its largest shape: inputs at the profile's MAX, outputs with the
    leading dynamic (batch) axis at max_batch. Any other dynamic output axis is a
    data-dependent shape this runner does not serve: ValueError."""
    plan: dict[str, BufferSpec] = {}
    for t in desc.tensors:
        if t.is_input:
            if t.profile is None:
                if any(d < 0 for d in t.shape):
                    raise ValueError(f"input {t.name} is dynamic {t.shape} but has no profile")
                shape = t.shape
            else:
                shape = tuple(t.profile[2])
                if shape[0] > max_batch:
                    shape = (max_batch, *shape[1:])
        else:
            if any(d < 0 for d in t.shape[1:]):
                raise ValueError(f"output {t.name} has a data-dependent shape {t.shape}: only a "
                                 "dynamic batch (first) axis is supported")
            shape = (max_batch if t.shape and t.shape[0] < 0 else t.shape[0], *t.shape[1:]) \
                if t.shape else ()
        plan[t.name] = BufferSpec(t.name, t.is_input, t.dtype, tuple(int(d) for d in shape))
    return plan


def check_description(desc: EngineDescription, contract: IOContract) -> None:
    """Raise ValueError if the engine's I/O names differ from the contract's."""
    have_in, have_out = [t.name for t in desc.inputs], [t.name for t in desc.outputs]
    if sorted(have_in) != sorted(contract.input_names) \
            or sorted(have_out) != sorted(contract.output_names):
        raise ValueError(f"engine I/O {have_in} -> {have_out} does not match the artifact's "
                         f"contract {contract.input_names} -> {contract.output_names}")


def profile_batch_range(desc: EngineDescription) -> tuple[int, int] | None:
    """(MIN, MAX) batch of the engine's profile 0 (a DLA engine is static: MIN = MAX = the
    contract's OPT), or None for an engine without a dynamic batch."""
    profiles = [t.profile for t in desc.inputs if t.profile]
    if not profiles:
        return None
    return max(p[0][0] for p in profiles), min(p[2][0] for p in profiles)


def engine_batches(batch: int, lo: int, hi: int) -> list[tuple[int, int, int]]:
    """Split `batch` rows into runs the profile accepts: (start, stop, run) with `run` rows
    executed, the slice's last row repeated up to the profile's MIN where a slice is short."""
    runs = []
    for start in range(0, batch, hi):
        stop = min(start + hi, batch)
        runs.append((start, stop, max(stop - start, lo)))
    return runs


def to_engine_dtype(name: str, arr: np.ndarray, dtype: str) -> np.ndarray:
    """Cast a feed to the engine's dtype; int64 -> int32 only when every value fits."""
    if arr.dtype == np.dtype(dtype):
        return arr
    target = np.dtype(dtype)
    if np.issubdtype(arr.dtype, np.integer) and np.issubdtype(target, np.integer):
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError(f"input {name}: values do not fit the engine's {target}")
    return arr.astype(target)


# -- CUDA ------------------------------------------------------------------------------------
class _DriverGraphs:
    """CUDA graph capture of a stream through the driver API (libcuda), for either backend."""
    CAPTURE_MODE_GLOBAL = 0

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUDA driver error {rc}")

    def capture(self, stream: int, enqueue: Any) -> int:
        """A graph of what `enqueue` puts on `stream`. On failure the capture is ended and
        whatever it made destroyed, and the FIRST error is raised (an enqueue that failed
        inside the capture makes cuStreamEndCapture fail too: that one would mask it)."""
        self._check(self.lib.cuStreamBeginCapture_v2(ctypes.c_void_p(stream),
                                                     self.CAPTURE_MODE_GLOBAL),
                    "cuStreamBeginCapture")
        graph = ctypes.c_void_p()
        try:
            enqueue()
        except BaseException:
            self.lib.cuStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(graph))
            if graph.value:
                self.lib.cuGraphDestroy(graph)
            raise
        self._check(self.lib.cuStreamEndCapture(ctypes.c_void_p(stream), ctypes.byref(graph)),
                    "cuStreamEndCapture")
        exec_ = ctypes.c_void_p()
        try:
            self._check(self.lib.cuGraphInstantiateWithFlags(ctypes.byref(exec_), graph,
                                                             ctypes.c_ulonglong(0)),
                        "cuGraphInstantiate")
        finally:
            self.lib.cuGraphDestroy(graph)
        return int(exec_.value or 0)

    def launch(self, graph_exec: int, stream: int) -> None:
        self._check(self.lib.cuGraphLaunch(ctypes.c_void_p(graph_exec), ctypes.c_void_p(stream)),
                    "cuGraphLaunch")

    def destroy(self, graph_exec: int) -> None:
        self.lib.cuGraphExecDestroy(ctypes.c_void_p(graph_exec))


class PyCudaBackend:
    name = "pycuda"

    def __init__(self) -> None:
        self.cuda = require("pycuda.driver", "for CUDA buffers and streams")
        self.cuda.init()
        self.ctx = self.cuda.Device(0).retain_primary_context()
        self.ctx.push()
        self.stream_obj = self.cuda.Stream()
        self.stream = int(self.stream_obj.handle)
        self._allocs: list[Any] = []

    def malloc(self, nbytes: int) -> int:
        alloc = self.cuda.mem_alloc(max(nbytes, 1))
        self._allocs.append(alloc)
        return int(alloc)

    def pinned(self, nbytes: int) -> np.ndarray:
        return self.cuda.pagelocked_empty(max(nbytes, 1), np.uint8)

    def htod(self, dst: int, src: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(dst, src, self.stream_obj)

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, self.stream_obj)

    def synchronize(self) -> None:
        self.stream_obj.synchronize()

    def close(self) -> None:
        """Free the buffers and the stream while the context is current, then pop it and
        release the retained primary context (detach); the first error is the one raised."""
        first: Exception | None = None
        for a in self._allocs:
            try:
                a.free()
            except Exception as e:  # free the others anyway; report the first failure
                first = first or e
        self._allocs.clear()
        del self.stream_obj
        self.ctx.pop()
        self.ctx.detach()
        if first is not None:
            raise first


class CudaPythonBackend:
    name = "cuda-python"

    def __init__(self) -> None:
        try:
            self.rt = require("cuda.bindings.runtime", "for CUDA buffers and streams")
        except ImportError:
            self.rt = require("cuda.cudart", "for CUDA buffers and streams")  # cuda-python < 12.6
        err, stream = self.rt.cudaStreamCreate()
        self._check(err, "cudaStreamCreate")
        self.stream_obj = stream
        self.stream = int(stream)
        self._device: list[int] = []
        self._host: list[int] = []

    def _check(self, err: Any, what: str) -> None:
        if int(err) != 0:
            raise RuntimeError(f"{what} failed: CUDA error {err}")

    def malloc(self, nbytes: int) -> int:
        err, ptr = self.rt.cudaMalloc(max(nbytes, 1))
        self._check(err, "cudaMalloc")
        self._device.append(int(ptr))
        return int(ptr)

    def pinned(self, nbytes: int) -> np.ndarray:
        err, ptr = self.rt.cudaMallocHost(max(nbytes, 1))
        self._check(err, "cudaMallocHost")
        self._host.append(int(ptr))
        raw = (ctypes.c_uint8 * max(nbytes, 1)).from_address(int(ptr))
        return np.ctypeslib.as_array(raw)

    def htod(self, dst: int, src: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        (err,) = self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, self.stream_obj)
        self._check(err, "cudaMemcpyAsync")

    def dtoh(self, dst: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        (err,) = self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, self.stream_obj)
        self._check(err, "cudaMemcpyAsync")

    def synchronize(self) -> None:
        (err,) = self.rt.cudaStreamSynchronize(self.stream_obj)
        self._check(err, "cudaStreamSynchronize")

    def close(self) -> None:
        for p in self._device:
            self.rt.cudaFree(p)
        for p in self._host:
            self.rt.cudaFreeHost(p)
        self._device.clear()
        self._host.clear()
        self.rt.cudaStreamDestroy(self.stream_obj)


def cuda_backend(prefer: str | None = None) -> Any:
    """pycuda when installed (or asked for), else cuda-python."""
    if prefer in (None, "pycuda"):
        try:
            return PyCudaBackend()
        except ImportError:
            if prefer == "pycuda":
                raise
    return CudaPythonBackend()


# -- the runner --------------------------------------------------------------------------------
class _PlainRunner:
    """Polygraphy's BaseRunner contract, for a device without Polygraphy."""

    def __init__(self, name: str | None = None, prefix: str = "runner"):
        self.name = name or prefix
        self.is_active = False

    def activate(self) -> None:
        self.activate_impl()
        self.is_active = True

    def infer(self, feed_dict: dict[str, np.ndarray], check_inputs: bool = True
              ) -> "OrderedDict[str, np.ndarray]":
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active: use `with runner:`")
        return self.infer_impl(feed_dict)

    def deactivate(self) -> None:
        self.deactivate_impl()
        self.is_active = False

    def __enter__(self) -> "_PlainRunner":
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    def activate_impl(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
        raise NotImplementedError  # pragma: no cover

    def deactivate_impl(self) -> None:  # pragma: no cover
        raise NotImplementedError


def _runner_base() -> type:
    try:
        return require("polygraphy.backend.base", "").BaseRunner
    except ImportError:
        return _PlainRunner


def trt_runner(engine_path: str | Path, contract: IOContract | None = None,
               cuda_graph: bool = False, name: str | None = None,
               onnx_sha256: str | None = None, backend: str | None = None) -> Any:
    """A runner for an engine built by `export.py build`. The contract comes from the
    artifact's manifest.json beside the engine when not given (and with it the ONNX hash that
    the preflight checks)."""
    from ..artifact.manifest import Manifest

    path = Path(engine_path)
    if contract is None:
        art = Manifest.load(path.parent)
        contract = art.contract
        if onnx_sha256 is None:
            entry = art.entry_for(path)
            onnx_sha256 = entry.sha256 if entry else None
    spec_contract: IOContract = contract
    Base = _runner_base()

    class TrtRunner(Base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(name=name or f"trt-{path.stem}", prefix="trt-runner")
            self.cuda_graph = cuda_graph
            self.graph_error: str | None = None  # why CUDA graphs were given up, if they were
            self.engine_manifest: EngineManifest | None = None

        def activate_impl(self) -> None:
            trt = require("tensorrt", "to run TensorRT engines")
            check_supported(trt.__version__)  # 8.4 and older: no named-tensor API; one line
            # Preflight BEFORE deserialising: refuse with what it was built for.
            self.engine_manifest = preflight(path, machine_info(trt.__version__),
                                             onnx_sha256)
            self.cuda = cuda_backend(backend)
            self.graphs_api = _DriverGraphs() if self.cuda_graph else None
            self.logger = trt.Logger(trt.Logger.WARNING)
            self.runtime = trt.Runtime(self.logger)
            if self.engine_manifest.version_compatible:  # the engine carries its lean runtime
                self.runtime.engine_host_code_allowed = True
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise RuntimeError(f"TensorRT could not deserialise {path}")
            self.context = self.engine.create_execution_context()
            self.desc = describe_engine(self.engine)
            check_description(self.desc, spec_contract)
            self.batch_range = profile_batch_range(self.desc)
            max_batch = spec_contract.batch.max
            if self.batch_range:
                max_batch = min(max_batch, max(self.batch_range))
            self.plan = plan_buffers(self.desc, max_batch)
            self.device: dict[str, int] = {}
            self.host: dict[str, np.ndarray] = {}
            for n, spec in self.plan.items():
                self.device[n] = self.cuda.malloc(spec.nbytes)
                self.host[n] = self.cuda.pinned(spec.nbytes)
                self.context.set_tensor_address(n, self.device[n])
            self.batch: int | None = None
            self.graph: int | None = None

        def _graph_failed(self, error: Exception) -> None:
            """CUDA-graph capture failed: say why once (the first error) and enqueue normally
            from now on; the results are the same, only the launch overhead differs."""
            import warnings

            self.graph_error = str(error)
            self.graphs_api = None
            self.graph = None
            warnings.warn(f"{path.name}: CUDA graph capture failed ({error}); running without "
                          "CUDA graphs", RuntimeWarning, stacklevel=2)

        def _drop_graph(self) -> None:
            if self.graph is not None and self.graphs_api is not None:
                self.graphs_api.destroy(self.graph)
            self.graph = None

        def get_input_metadata_impl(self) -> Any:
            meta = require("polygraphy.common", "for runner metadata").TensorMetadata()
            for spec in spec_contract.inputs:
                meta.add(spec.name, spec.np_dtype, [-1 if d == "batch" else d for d in spec.shape])
            return meta

        def _view(self, name: str, shape: Shape) -> np.ndarray:
            spec = self.plan[name]
            count = int(np.prod(shape, dtype=np.int64))
            return self.host[name].view(spec.dtype)[:count].reshape(shape)

        def _enqueue(self) -> None:
            if not self.context.execute_async_v3(self.cuda.stream):
                raise RuntimeError("TensorRT execute_async_v3 failed")

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
            """Any batch in the contract's range; one the engine's profile does not take (a
            static DLA engine) runs in slices, short ones padded, outputs cut back."""
            spec_contract.check_feed(feed_dict)
            batch = int(feed_dict[spec_contract.input_names[0]].shape[0])
            lo, hi = self.batch_range or (batch, batch)
            if lo <= batch <= hi:
                return self._infer_profile_batch(feed_dict)
            parts = []
            for start, stop, run in engine_batches(batch, lo, hi):
                rows = np.minimum(np.arange(start, start + run), stop - 1)
                out = self._infer_profile_batch({k: v[rows] for k, v in feed_dict.items()})
                parts.append({k: v[:stop - start] for k, v in out.items()})
            return OrderedDict((n, np.concatenate([p[n] for p in parts])) for n in parts[0])

        def _infer_profile_batch(self, feed_dict: dict[str, np.ndarray]
                                 ) -> "OrderedDict[str, np.ndarray]":
            batch = int(feed_dict[spec_contract.input_names[0]].shape[0])
            if batch != self.batch:
                self._drop_graph()  # it holds the old shapes and the context's old state
                for spec in spec_contract.inputs:
                    if not self.context.set_input_shape(spec.name, spec.concrete(batch)):
                        raise ValueError(f"engine rejects {spec.name} {spec.concrete(batch)}")
                self.batch = batch
            for spec in spec_contract.inputs:
                arr = to_engine_dtype(spec.name, feed_dict[spec.name], self.plan[spec.name].dtype)
                view = self._view(spec.name, arr.shape)
                np.copyto(view, arr)
                self.cuda.htod(self.device[spec.name], view)
            if self.graphs_api is None:
                self._enqueue()
            else:
                if self.graph is None:
                    self._enqueue()  # settle shape-dependent state outside the capture
                    self.cuda.synchronize()
                    try:
                        self.graph = self.graphs_api.capture(self.cuda.stream, self._enqueue)
                    except RuntimeError as e:  # e.g. an engine with a non-capturable layer
                        self._graph_failed(e)
                if self.graphs_api is None or self.graph is None:
                    self._enqueue()
                else:
                    self.graphs_api.launch(self.graph, self.cuda.stream)
            views = {}
            for spec in spec_contract.outputs:
                shape = _dims(self.context.get_tensor_shape(spec.name))
                views[spec.name] = self._view(spec.name, shape)
                self.cuda.dtoh(views[spec.name], self.device[spec.name])
            self.cuda.synchronize()
            return OrderedDict((s.name, views[s.name].astype(s.np_dtype, copy=True))
                               for s in spec_contract.outputs)

        def deactivate_impl(self) -> None:
            self._drop_graph()
            del self.context, self.engine, self.runtime
            self.cuda.close()

    return TrtRunner()
