"""A runner for TensorRT-RTX engines (<onnx stem>.rtx.engine, built on the CPU by trt/rtx.py),
with the interface of the other runners (Polygraphy's BaseRunner: activate, infer on a dict of
numpy arrays, deactivate), so `validate --engine X.rtx.engine` and `predict` run them against the
host's gates and reference data.

Thin on purpose: the buffers, copies and stream are runtime.py's (`plan_buffers`, `cuda_backend`);
what differs is the module (`tensorrt_rtx_bindings`, not `tensorrt`) and the preflight (the
engine's sidecar from trt/rtx.py: it must come from the artifact's ONNX file). Running needs a
CUDA GPU: NVIDIA lists compute capability 8.0, 8.6, 8.9, 12.0 and later for AOT engines; the
just-in-time phase compiles the kernels for the GPU it finds at deserialisation.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from ..artifact.contract import IOContract
from ..util import MissingDependency
from .engine_manifest import EngineMismatch
from .rtx import DEFAULT_COMPUTE_CAPABILITIES, engine_sidecar, load_rtx
from .runtime import (EngineDescription, TensorDesc, _dims, _runner_base, cuda_backend,
                      plan_buffers, to_engine_dtype)
from .targets import query_cuda_device


def describe_rtx_engine(trt: Any, engine: Any) -> EngineDescription:
    """runtime.describe_engine's description, from TensorRT-RTX's (same named-tensor) API."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name))).name
        profile = None
        if is_input:
            lo, opt, hi = engine.get_tensor_profile_shape(name, 0)
            profile = (_dims(lo), _dims(opt), _dims(hi))
        tensors.append(TensorDesc(name, is_input, dtype, _dims(engine.get_tensor_shape(name)),
                                  profile))
    return EngineDescription(tuple(tensors))


def rtx_runner(engine_path: str | Path, contract: IOContract | None = None,
               onnx_sha256: str | None = None, name: str | None = None,
               backend: str | None = None) -> Any:
    """A runner for a TensorRT-RTX engine; the contract and the ONNX hash come from the
    artifact's manifest.json beside it when not given. Raises EngineMismatch (before
    deserialising) when the sidecar says the engine was built from another file."""
    from ..artifact.manifest import Manifest

    path = Path(engine_path)
    if contract is None:
        manifest = Manifest.load(path.parent)
        entry = manifest.entry_for(path)
        contract = manifest.contract_of(entry.graph) if entry else manifest.contract
        onnx_sha256 = onnx_sha256 or (entry.sha256 if entry else None)
    spec: IOContract = contract
    Base = _runner_base()

    class RtxRunner(Base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(name=name or f"rtx-{path.stem}", prefix="rtx-runner")

        def activate_impl(self) -> None:
            trt, why = load_rtx()
            if trt is None:
                raise MissingDependency(f"{why}, to run {path.name}")
            sidecar = engine_sidecar(path)
            if onnx_sha256 and sidecar.get("onnx_sha256") != onnx_sha256:
                raise EngineMismatch(f"{path.name} was built from another {sidecar.get('onnx')} "
                                     "than the artifact's: rebuild it with `python -m "
                                     f"twbert_export.trt.rtx {path.parent} --engines`")
            if query_cuda_device() is None:
                raise EngineMismatch(f"no CUDA GPU visible here: {path.name} runs only on a GPU "
                                     f"(compute capability "
                                     f"{', '.join(DEFAULT_COMPUTE_CAPABILITIES)} and later)")
            self.cuda = cuda_backend(backend)
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if self.engine is None:
                raise RuntimeError(
                    f"TensorRT-RTX {trt.__version__} could not deserialise {path.name} (built by "
                    f"{sidecar.get('tensorrt_rtx_version')}; AOT engines run on compute "
                    f"capability {', '.join(DEFAULT_COMPUTE_CAPABILITIES)} and later)")
            self.context = self.engine.create_execution_context()
            self.plan = plan_buffers(describe_rtx_engine(trt, self.engine), spec.batch.max)
            self.device = {n: self.cuda.malloc(s.nbytes) for n, s in self.plan.items()}
            self.host = {n: self.cuda.pinned(s.nbytes) for n, s in self.plan.items()}
            for n, address in self.device.items():
                self.context.set_tensor_address(n, address)

        def _view(self, tensor: str, shape: tuple[int, ...]) -> np.ndarray:
            count = int(np.prod(shape, dtype=np.int64))
            return self.host[tensor].view(self.plan[tensor].dtype)[:count].reshape(shape)

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
            spec.check_feed(feed_dict)  # within the contract's batch range = the profile's
            batch = int(feed_dict[spec.input_names[0]].shape[0])
            for t in spec.inputs:
                if not self.context.set_input_shape(t.name, t.concrete(batch)):
                    raise ValueError(f"engine rejects {t.name} {t.concrete(batch)}")
                arr = to_engine_dtype(t.name, feed_dict[t.name], self.plan[t.name].dtype)
                view = self._view(t.name, arr.shape)
                np.copyto(view, arr)
                self.cuda.htod(self.device[t.name], view)
            if not self.context.execute_async_v3(self.cuda.stream):
                raise RuntimeError("TensorRT-RTX execute_async_v3 failed")
            views = {}
            for t in spec.outputs:
                views[t.name] = self._view(t.name, _dims(self.context.get_tensor_shape(t.name)))
                self.cuda.dtoh(views[t.name], self.device[t.name])
            self.cuda.synchronize()
            return OrderedDict((t.name, views[t.name].astype(t.np_dtype, copy=True))
                               for t in spec.outputs)

        def deactivate_impl(self) -> None:
            del self.context, self.engine, self.runtime
            self.cuda.close()

    return RtxRunner()
