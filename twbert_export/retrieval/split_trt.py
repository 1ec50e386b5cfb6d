"""The four split graphs as TensorRT engines on ONE CUDA stream, passing device buffers between
them: `SplitEngines`, a `split.ComposedSplit` whose graphs are engines built by `export.py
build` (what `gallery.SplitArtifact(engines=True).pipeline()` returns).

One device buffer per tensor NAME, shared by every engine that has the tensor: the graphs'
contracts name a producer's output and its consumer's input alike (`stem`: video_stem ->
select; `text_cls`: text -> select; `text_embeds`: text -> fuse; `video_embeds`: select ->
fuse; `attention_mask` is read by text and fuse), so binding both contexts to the same address
(`IExecutionContext.set_tensor_address`) hands the tensor over with no copy at all, on the
device or through the host. Work on the one stream runs in order, so a consumer enqueued after
its producer reads what the producer wrote. A chain of engines (`run_chain`) copies in only
the inputs it is given from the host and copies out only the outputs asked for, then
synchronises once:

- `infer` (the monolithic feed): text, video_stem, select and fuse, all on the device; in and
  out only the feed and the monolithic outputs. Unlike the ONNX Runtime composition it keeps no
  stem / text caches (those live on the host); each row's text and stem run on the device.
- `score` (stored stems and encoded texts, as `gallery.answers` calls it): select then fuse,
  `video_embeds` staying on the device.
- `encode_clips`, `encode_texts`, `select`, `fuse` (what `clip_index.rank` and `index_videos`
  call): one engine, host in and out, since their callers keep the results on the host (the
  index's stems; the ITC shortlist's video embeddings, k rows at most).

Which engine input has been written at which batch is tracked, so an input neither fed nor
produced earlier in the chain at that batch is an error, never stale memory. Batches beyond an
engine's profile run in slices (`runtime.engine_batches`: a static DLA engine pads short
slices), every engine of a chain at the same slice, so device rows stay aligned.
Preflight (each engine's sidecar against this machine) comes before any engine is read.
TensorRT and CUDA are imported when the engines are opened, not with this module.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..artifact.manifest import MANIFEST_FILE, Manifest
from ..artifact.contract import IOContract
from ..validation.composed import GRAPHS, ComposedSplit
from ..trt import runtime as trt_runtime
from ..trt.engine_manifest import preflight
from ..trt.version import check_supported
from ..util import require

# The graphs `infer` chains, in dependency order.
CHAIN = ("text", "video_stem", "select", "fuse")


class _GraphEngine:
    """One split graph's engine and execution context, bound to the shared device buffers."""

    def __init__(self, graph: str, path: Path, contract: IOContract, trt: Any, runtime: Any,
                 onnx_sha256: str | None):
        self.graph, self.path, self.contract = graph, path, contract
        self.manifest = preflight(path, trt_runtime.machine_info(trt.__version__), onnx_sha256)
        if self.manifest.version_compatible:  # the engine carries its lean runtime
            runtime.engine_host_code_allowed = True
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {path}")
        self.context = self.engine.create_execution_context()
        self.desc = trt_runtime.describe_engine(self.engine)
        trt_runtime.check_description(self.desc, contract)
        lo, hi = trt_runtime.profile_batch_range(self.desc) or (1, contract.batch.max)
        self.batch_range = (lo, min(hi, contract.batch.max))
        self.plan = trt_runtime.plan_buffers(self.desc, self.batch_range[1])
        self.batch: int | None = None  # the batch the context's input shapes are set for

    def set_batch(self, batch: int) -> None:
        if batch == self.batch:
            return
        for spec in self.contract.inputs:
            if not self.context.set_input_shape(spec.name, spec.concrete(batch)):
                raise ValueError(f"{self.path.name} rejects {spec.name} {spec.concrete(batch)}")
        self.batch = batch


class SplitEngines(ComposedSplit):
    """`ComposedSplit` on TensorRT engines sharing one stream and their device buffers."""

    def __init__(self, files: Mapping[str, str | Path], contracts: dict[str, IOContract],
                 monolithic: IOContract, onnx_sha256: Mapping[str, str | None] | None = None,
                 backend: str | None = None):
        # Not ComposedSplit.__init__: its sessions are per-graph runners with their own streams.
        self.contracts, self.monolithic = contracts, monolithic
        self.stem_storage = np.dtype("float32")
        self.executions: Counter[str] = Counter()
        self.rows: Counter[str] = Counter()
        self.paths = {g: Path(files[g]) for g in GRAPHS}
        self.onnx_sha256 = dict(onnx_sha256 or {g: _listed_sha256(self.paths[g]) for g in GRAPHS})
        trt = require("tensorrt", "to run TensorRT engines")
        check_supported(trt.__version__)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.cuda: Any = None
        try:
            self.engines = {g: _GraphEngine(g, self.paths[g], contracts[g], trt, self.runtime,
                                            self.onnx_sha256.get(g)) for g in GRAPHS}
            self.cuda = trt_runtime.cuda_backend(backend)
            self._allocate()
        except BaseException:
            self.close()
            raise
        self.sessions = {g: _EngineSession(self, g) for g in GRAPHS}

    def _allocate(self) -> None:
        """One device buffer and one pinned staging buffer per tensor name, sized for the
        largest engine that has it; every context bound to it."""
        specs: dict[str, list[trt_runtime.BufferSpec]] = {}
        for engine in self.engines.values():
            for name, spec in engine.plan.items():
                specs.setdefault(name, []).append(spec)
        self.dtypes: dict[str, str] = {}
        for name, group in specs.items():
            if len({s.dtype for s in group}) > 1:
                raise ValueError(f"the engines disagree on {name}'s type "
                                 f"({', '.join(sorted({s.dtype for s in group}))}): rebuild them "
                                 "all with the same TensorRT")
            self.dtypes[name] = group[0].dtype
        nbytes = {name: max(s.nbytes for s in group) for name, group in specs.items()}
        self.device = {name: self.cuda.malloc(n) for name, n in nbytes.items()}
        self.host = {name: self.cuda.pinned(n) for name, n in nbytes.items()}
        for engine in self.engines.values():
            for name in engine.plan:
                engine.context.set_tensor_address(name, self.device[name])
        self.written: dict[str, int] = {}  # tensor name -> batch of what its buffer holds

    def close(self) -> None:
        """Free the contexts, engines and buffers (once; `with` does it)."""
        engines = getattr(self, "engines", {})
        for engine in engines.values():
            del engine.context, engine.engine
        engines.clear()
        if self.cuda is not None:
            self.cuda.close()
            self.cuda = None

    # -- the chain --------------------------------------------------------------------------
    def _staging(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        return self.host[name].view(self.dtypes[name])[:count].reshape(shape)

    def _enqueue(self, graphs: tuple[str, ...], feed: dict[str, np.ndarray],
                 outputs: list[str], batch: int) -> dict[str, np.ndarray]:
        """One slice through the chain on the stream; the outputs' staging views (valid after
        the stream is synchronised)."""
        for name, value in feed.items():
            arr = trt_runtime.to_engine_dtype(name, value, self.dtypes[name])
            view = self._staging(name, arr.shape)
            np.copyto(view, arr)
            self.cuda.htod(self.device[name], view)
            self.written[name] = batch
        staged: dict[str, np.ndarray] = {}
        for graph in graphs:
            engine = self.engines[graph]
            stale = [n for n in engine.contract.input_names if self.written.get(n) != batch]
            if stale:
                raise RuntimeError(f"{graph}: input {', '.join(stale)} was neither fed nor "
                                   "produced earlier in the chain at this batch")
            engine.set_batch(batch)
            if not engine.context.execute_async_v3(self.cuda.stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed ({engine.path.name})")
            for name in engine.contract.output_names:
                self.written[name] = batch
                if name in outputs:
                    shape = trt_runtime._dims(engine.context.get_tensor_shape(name))
                    staged[name] = self._staging(name, shape)
                    self.cuda.dtoh(staged[name], self.device[name])
        return staged

    def run_chain(self, graphs: tuple[str, ...], feed: dict[str, np.ndarray],
                  outputs: list[str], count: bool = True) -> dict[str, np.ndarray]:
        """`graphs` in order over every row of `feed` (the host inputs of the chain; the rest
        pass between the engines on the device), in slices every engine's profile takes; the
        `outputs` back on the host in their contracts' dtypes. `executions` counts the engine
        runs, `rows` the rows asked for (padding excluded)."""
        if self.cuda is None:
            raise RuntimeError("the engines are closed")
        n = len(next(iter(feed.values())))
        lo = max(self.engines[g].batch_range[0] for g in graphs)
        hi = min(self.engines[g].batch_range[1] for g in graphs)
        dtypes = {s.name: s.np_dtype for g in graphs for s in self.contracts[g].outputs}
        parts: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        self.written.clear()  # what earlier chains left is not this chain's input
        for start, stop, run in trt_runtime.engine_batches(n, lo, hi):
            rows = np.minimum(np.arange(start, start + run), stop - 1)  # pad with the last row
            staged = self._enqueue(graphs, {k: v[rows] for k, v in feed.items()}, outputs, run)
            self.cuda.synchronize()
            for name in outputs:
                parts[name].append(staged[name][:stop - start].astype(dtypes[name], copy=True))
            for g in graphs if count else ():
                self.executions[g] += 1
                self.rows[g] += stop - start
        return {name: np.concatenate(p) for name, p in parts.items()}

    # -- ComposedSplit with device hand-over ------------------------------------------------
    def score(self, stems: np.ndarray, text: dict[str, np.ndarray],
              attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """select then fuse, video_embeds staying on the device."""
        feed = {"stem": stems.astype(np.float32, copy=False), "text_cls": text["text_cls"],
                "text_embeds": text["text_embeds"], "attention_mask": attention_mask}
        return self.run_chain(("select", "fuse"), feed, self.monolithic.output_names)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The monolithic computation with every intermediate tensor on the device."""
        self.monolithic.check_feed(feed)
        return self.run_chain(CHAIN, {n: feed[n] for n in self.monolithic.input_names},
                              self.monolithic.output_names)


class _EngineSession:
    """One engine of the set behind ONNX Runtime's `run(output_names, feed)` (host in, host
    out), what `ComposedSplit.run` calls."""

    def __init__(self, engines: SplitEngines, graph: str):
        self.engines, self.graph = engines, graph

    def run(self, output_names: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        # ComposedSplit.run counts this run itself.
        out = self.engines.run_chain((self.graph,), feed, list(output_names), count=False)
        return [out[name] for name in output_names]


def _listed_sha256(engine: Path) -> str | None:
    """The sha256 manifest.json lists for the ONNX file an engine was built from."""
    if not (engine.parent / MANIFEST_FILE).is_file():
        return None
    entry = Manifest.load(engine.parent).entry_for(engine)
    return entry.sha256 if entry else None


__all__ = ["SplitEngines", "CHAIN"]
