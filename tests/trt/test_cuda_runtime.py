"""The CUDA half of the TensorRT runner, on a real GPU, without TensorRT: `pytest -m gpu`.

The runner's buffers, copies, stream and CUDA-graph replay do not depend on TensorRT, so they
are checked here on any machine with a CUDA GPU and cuda-python (or pycuda): the backend moves
bytes host -> device -> host exactly; a graph captured over device work replays on new input
written to the same device buffer (the runner copies inputs outside the graph and relies on
this); and the machine detection the preflight uses reads the real device. Skips elsewhere.
"""

from __future__ import annotations

import ctypes
import importlib.util

import numpy as np
import pytest

from twbert_export.trt.targets import detect_platform, machine_info, preset_for, query_cuda_device

pytestmark = pytest.mark.gpu

if query_cuda_device() is None:
    pytest.skip("no CUDA GPU visible (libcuda found no device)", allow_module_level=True)

from twbert_export.trt.runtime import (
    CudaPythonBackend,
    PyCudaBackend,
    _DriverGraphs,
)

BACKENDS = [pytest.param(CudaPythonBackend, id="cuda-python",
                         marks=pytest.mark.skipif(not importlib.util.find_spec("cuda"),
                                                  reason="cuda-python is not installed")),
            pytest.param(PyCudaBackend, id="pycuda",
                         marks=pytest.mark.skipif(not importlib.util.find_spec("pycuda"),
                                                  reason="pycuda is not installed"))]


@pytest.fixture(params=BACKENDS)
def cuda(request):
    backend = request.param()
    yield backend
    backend.close()


def test_buffers_round_trip_exactly(cuda):
    data = np.random.default_rng(0).standard_normal((8, 3, 17)).astype(np.float32)
    device = cuda.malloc(data.nbytes)
    staging = cuda.pinned(data.nbytes).view(np.float32)[:data.size].reshape(data.shape)
    back = cuda.pinned(data.nbytes).view(np.float32)[:data.size].reshape(data.shape)
    np.copyto(staging, data)
    cuda.htod(device, staging)
    back[...] = 0
    cuda.dtoh(back, device)
    cuda.synchronize()
    np.testing.assert_array_equal(back, data)


def _device_copy(dst: int, src: int, nbytes: int, stream: int) -> None:
    """A device-to-device copy on `stream` through the driver API: capturable device work that
    stands in for TensorRT's enqueue."""
    lib = ctypes.CDLL("libcuda.so.1")
    rc = lib.cuMemcpyDtoDAsync_v2(ctypes.c_uint64(dst), ctypes.c_uint64(src),
                                  ctypes.c_size_t(nbytes), ctypes.c_void_p(stream))
    assert rc == 0, f"cuMemcpyDtoDAsync failed: {rc}"


def test_captured_graph_replays_on_new_input(cuda):
    n = 4096
    first, second = np.arange(n, dtype=np.float32), -np.arange(n, dtype=np.float32)
    src, dst = cuda.malloc(first.nbytes), cuda.malloc(first.nbytes)
    host = cuda.pinned(first.nbytes).view(np.float32)[:n]
    graphs = _DriverGraphs()
    np.copyto(host, first)
    cuda.htod(src, host)
    cuda.synchronize()
    graph = graphs.capture(cuda.stream, lambda: _device_copy(dst, src, first.nbytes,
                                                            cuda.stream))
    try:
        for expected in (first, second):
            np.copyto(host, expected)
            cuda.htod(src, host)  # outside the graph, as the runner does
            graphs.launch(graph, cuda.stream)
            host[...] = 0
            cuda.dtoh(host, dst)
            cuda.synchronize()
            np.testing.assert_array_equal(host, expected)
    finally:
        graphs.destroy(graph)


def test_a_failed_capture_raises_the_enqueue_error_and_leaves_the_stream_usable(cuda):
    """A synchronous copy is not allowed while the stream is captured: the capture is
    invalidated and cuStreamEndCapture fails too. The caller must see the enqueue's error (the
    runner then falls back to plain enqueue on the same stream)."""
    n = 1024
    src, dst = cuda.malloc(n * 4), cuda.malloc(n * 4)
    lib = ctypes.CDLL("libcuda.so.1")

    def illegal_enqueue():
        rc = lib.cuMemcpyDtoD_v2(ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(n))
        raise RuntimeError(f"enqueue failed inside the capture: CUDA driver error {rc}")

    with pytest.raises(RuntimeError, match="enqueue failed inside the capture"):
        _DriverGraphs().capture(cuda.stream, illegal_enqueue)
    _device_copy(dst, src, n * 4, cuda.stream)  # plain enqueue still works afterwards
    cuda.synchronize()


def test_machine_detection_reads_the_real_device():
    name, capability = query_cuda_device()
    major, minor = (int(x) for x in capability.split("."))
    assert name and major >= 5 and minor >= 0
    platform = detect_platform()
    target, why = preset_for(platform)
    machine = machine_info("10.0.0")
    assert machine.gpu_name == name and machine.compute_capability == capability
    print(f"{name}, compute capability {capability}: preset {target.name} ({why}); "
          f"platform {platform}")
