"""Small shared helpers: lazy imports, atomic writes, hashes, stage timing (torch-free)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Iterator

# Package to install for each optional module, and why it is needed.
INSTALL_HINTS = {
    "onnx": "onnx",
    "onnxruntime": "onnxruntime",
    "onnx_graphsurgeon": "onnx-graphsurgeon",
    "polygraphy": "polygraphy",
    "modelopt": "nvidia-modelopt",
    "tensorrt": "tensorrt (NVIDIA's wheel or JetPack; only on a machine with an NVIDIA GPU)",
    "pycuda": "pycuda (or cuda-python)",
    "torch": "torch",
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
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    blocks in its heap: ModelOpt's INT8 step, which loads the model several times over, peaked
    at 11.1 GB with the default and 10.0 GB with this (base preset, measured alone). Returns
    whether the setting took."""
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
