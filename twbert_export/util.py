"""Small shared helpers: lazy imports, atomic writes, stopping on a signal, hashes, stage timing
(torch-free)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

# Shape inference (`infer_shapes`) sees larger initializers by their type and shape only.
LIGHT_TENSOR_ELEMENTS = 256
# Package to install for each optional module, and why it is needed.
INSTALL_HINTS = {
    "onnx": "onnx",
    "faiss": "faiss-cpu",
    "onnxruntime": "onnxruntime",
    "onnx_graphsurgeon": "onnx-graphsurgeon",
    "polygraphy": "polygraphy",
    "modelopt": "nvidia-modelopt",
    "tensorrt": "tensorrt (NVIDIA's wheel or JetPack; only on a machine with an NVIDIA GPU)",
    "pycuda": "pycuda (or cuda-python)",
    "torch": "torch",
    "pytriton": "-r requirements-serve.txt (nvidia-pytriton, in the serving environment: README "
                "\"Serving\")",
    "tritonclient": "-r requirements-serve.txt (tritonclient[http,grpc], in the serving "
                    "environment: README \"Serving\")",
}


class MissingDependency(ImportError):
    pass


def require(module: str, why: str) -> ModuleType:
    """Import an optional dependency, or say which package to install and why."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingDependency(f"{module} is needed {why}: pip install "
                                f"{INSTALL_HINTS.get(top, top)} ({e})") from e


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; if the block succeeds, flush the file to
    disk and move it into place, else remove it. Readers see the old file or the new one, never
    a part. The one atomic-write helper of the project (model/'s checkpoint, training and demo
    writers use it too: this module imports only the standard library)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target (os.replace is atomic only within one file system), and unique: two
    # writers of the same file never share a temporary name.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with removed_if_stopped(tmp):
            yield tmp
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())  # the data is on disk before the name points at it
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)



# -- stopping on SIGINT / SIGTERM ---------------------------------------------------------------
# Why not KeyboardInterrupt: raised at an arbitrary bytecode, it can land inside a library's
# C++ -> Python callback (torch.export's dispatch: the process aborts) or half-way through a
# lazy import (a later AttributeError, reported as an internal error). So the handler unwinds
# nothing: it removes the scratch paths registered here, prints one line and leaves.
STOP_SIGNALS = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
_remove_on_stop: dict[Path, None] = {}  # an ordered set: the paths this process is writing
_deferral = {"depth": 0, "pending": None}


def stop_on_signals() -> None:
    """On SIGINT or SIGTERM remove what `removed_if_stopped` registered, print `interrupted` or
    `terminated` and exit 130 or 143 (128 + the signal, as a shell reports it)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop)


def remove_if_stopped(path: Path) -> None:
    """Register `path` for removal should a signal stop the process (until a `removed_if_stopped`
    block on it ends): for a path made where no block can open before it exists."""
    _remove_on_stop[Path(path)] = None


@contextlib.contextmanager
def removed_if_stopped(path: Path) -> Iterator[Path]:
    """Register `path` (a file or directory this process creates) for removal should a signal
    stop the process within the block."""
    path = Path(path)
    remove_if_stopped(path)
    try:
        yield path
    finally:
        _remove_on_stop.pop(path, None)


@contextlib.contextmanager
def removed_afterwards(path: Path) -> Iterator[Path]:
    """`path` (a file or directory this process creates) is removed at the end of the block,
    and by a stopping signal within it."""
    with removed_if_stopped(path):
        try:
            yield path
        finally:
            _remove(path)


@contextlib.contextmanager
def scratch_directory(prefix: str = "twbert-") -> Iterator[Path]:
    """A new temporary directory, removed at the end of the block or by a stopping signal."""
    with removed_afterwards(Path(tempfile.mkdtemp(prefix=prefix))) as path:
        yield path


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A step that must not stop half-way (moving a finished artifact into place): a stopping
    signal that arrives within waits for its end."""
    _deferral["depth"] += 1
    try:
        yield
    finally:
        _deferral["depth"] -= 1
        if not _deferral["depth"] and _deferral["pending"] is not None:
            _stop(_deferral["pending"], None)


def _stop(signum: int, frame: Any) -> None:
    if _deferral["depth"]:
        _deferral["pending"] = signum
        return
    for other in STOP_SIGNALS:  # a second Ctrl-C does not cut the clean-up short
        signal.signal(other, signal.SIG_IGN)
    for path in reversed(list(_remove_on_stop)):
        _remove(path)
    code, line = STOP_SIGNALS[signal.Signals(signum)]
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(code)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()

def move_files(names: list[str], src: Path, dst: Path) -> None:
    """Move files (paths relative to `src`) to the same places under `dst`, each in one rename
    (both on one file system: an artifact and the scratch directory beside it)."""
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(src / name, dst / name)


def write_json(path: str | Path, obj: Any) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class Stopwatch:
    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def stage_peak_rss_gb() -> float | None:
    """Peak resident memory of this process since the last call (Linux: VmHWM, then reset
    through /proc/self/clear_refs), or None where that is not available."""
    try:
        status = Path("/proc/self/status").read_text()
        peak_kb = next(int(line.split()[1]) for line in status.splitlines()
                       if line.startswith("VmHWM:"))
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration, ValueError):
        return None
    return peak_kb / 2**20


def release_heap() -> None:
    """Return freed heap to the system: glibc otherwise keeps what large ONNX protobufs and
    ONNX Runtime sessions freed, and the next stage's peak stacks on top of it (Linux; a no-op
    elsewhere)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# glibc's mallopt parameter: allocations of at least this many bytes get their own mapping.
M_MMAP_THRESHOLD = -3


def map_large_allocations(threshold: int = 2**20) -> bool:
    """Serve allocations of `threshold` bytes or more from their own mappings, so that freeing
    one returns it to the system at once (glibc; a no-op elsewhere). By default glibc raises
    this threshold (up to 32 MB) as large blocks are freed, and then keeps freed weight-sized
    blocks in its heap, which ModelOpt's INT8 step (loading the model several times over) stacks
    on (docs/benchmarks.md, "Export-time measurements behind the code"). Returns whether the
    setting took."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold) == 1
    return False


def current_rss_gb() -> float | None:
    """Resident memory of this process now, after release_heap (Linux), or None elsewhere."""
    release_heap()
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("VmRSS:")) / 2**20
    except (OSError, StopIteration, ValueError):
        return None


def infer_shapes(model, weights: bool = True, in_place: bool = False, **kwargs):
    """`onnx.shape_inference.infer_shapes`, run on the graph without its weights' data.

    Inference reads the values of small constants only (shapes, axes, pads); each initializer
    of more than LIGHT_TENSOR_ELEMENTS elements goes to it as a graph input of the same type
    and shape instead, so a call no longer serialises and parses the whole model (ModelOpt makes
    several calls per conversion; times: docs/benchmarks.md, "Export-time measurements behind
    the code"). The model returned is `model` with the inferred nodes, value_info and outputs
    (tests/export/test_shape_inference.py checks it equals ONNX's own result); with
    `weights=False`, for reading types and shapes only, the large initializers are left out
    of it (they stay graph inputs). `in_place=True`, for a caller that replaces its model by
    the result: `model` itself gets them and is returned, instead of a copy of its weights (a
    model-sized allocation: 1 GB at the base preset)."""
    onnx = require("onnx", "for shape inference")
    graph = model.graph
    large = [t for t in graph.initializer if math.prod(t.dims) > LIGHT_TENSOR_ELEMENTS]
    if not large:
        return onnx.shape_inference.infer_shapes(model, **kwargs)
    large_names = {t.name for t in large}
    light = onnx.ModelProto(ir_version=model.ir_version)
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    light.graph.name = graph.name
    light.graph.node.extend(graph.node)
    light.graph.input.extend(graph.input)
    declared = {i.name for i in graph.input}
    light.graph.input.extend(
        onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
        for t in large if t.name not in declared)
    light.graph.output.extend(graph.output)
    light.graph.value_info.extend(graph.value_info)
    light.graph.initializer.extend(t for t in graph.initializer if t.name not in large_names)
    light.graph.sparse_initializer.extend(graph.sparse_initializer)
    inferred = onnx.shape_inference.infer_shapes(light, **kwargs)
    if not weights:
        return inferred
    if in_place:
        result = model
    else:
        result = onnx.ModelProto()
        result.CopyFrom(model)
    for name in ("node", "value_info", "output"):
        del getattr(result.graph, name)[:]
        getattr(result.graph, name).extend(getattr(inferred.graph, name))
    return result


def infer_shapes_in_file(model_path: str | Path, output_path: str | Path = "", **kwargs
                         ) -> bool:
    """What `onnx.shape_inference.infer_shapes_path` does, by way of `infer_shapes`: the file's
    model is read and written once, and inference itself leaves the weights out. Returns False,
    doing nothing, for a model that keeps its weights in external files (saving it here would
    inline them)."""
    onnx = require("onnx", "for shape inference")
    model = onnx.load(str(model_path), load_external_data=False)
    if any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        return False
    onnx.save(infer_shapes(model, in_place=True, **kwargs), str(output_path or model_path))
    return True
