"""TensorRT-RTX engines built on the CPU (trt/rtx.py), run on a GPU (trt/rtx_runtime.py) with the
host's gates: `pytest -m gpu`. Skips, saying why, without the TensorRT-RTX wheels, without a
CUDA GPU, or without cuda-python / pycuda (the runner's buffers).

NVIDIA lists compute capability 8.0, 8.6, 8.9, 12.0 and later for engines built ahead of time
with no capability set (as ours are); on another GPU (an H100 is 9.0) what happens is what
these tests record: run them there and write the result into docs/rtx.md.
"""

from __future__ import annotations

import importlib.util
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from twbert_export.artifact.contract import BatchRange, IOContract, TensorSpec
from twbert_export.artifact.manifest import Manifest
from twbert_export.precision import SELECTION_NODES
from twbert_export.trt import rtx
from twbert_export.trt.targets import query_cuda_device

pytestmark = pytest.mark.gpu

RTX, WHY = rtx.load_rtx()
if RTX is None:
    pytest.skip(WHY, allow_module_level=True)
if query_cuda_device() is None:
    pytest.skip("no CUDA GPU visible (libcuda found no device): TensorRT-RTX builds engines on "
                "the CPU (tests/trt/test_rtx.py) but runs them only on a GPU",
                allow_module_level=True)
if not (importlib.util.find_spec("cuda") or importlib.util.find_spec("pycuda")):
    pytest.skip("neither cuda-python nor pycuda is installed (the runner's device buffers)",
                allow_module_level=True)

from twbert_export.trt.rtx_runtime import rtx_runner  # noqa: E402


def test_an_engine_built_on_the_cpu_computes_the_graph_on_the_gpu(tmp_path):
    """x @ w + b over the whole batch range: the GPU's result is the graph's, to FP32 rounding."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="/mm"),
         helper.make_node("Add", ["h", "b"], ["y"], name="/add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    path = tmp_path / "model.fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    contract = IOContract((TensorSpec("x", "float32", ("batch", 16)),),
                          (TensorSpec("y", "float32", ("batch", 8)),), BatchRange(1, 2, 4))
    spec = rtx.GraphSpec("model", "fp32", "trt10", path, contract)
    [built] = rtx.build_graphs([spec], engines=tmp_path, trt=RTX)
    with rtx_runner(tmp_path / built.engine, contract) as runner:
        for batch in (1, 3, 4):
            x = rng.standard_normal((batch, 16)).astype(np.float32)
            np.testing.assert_allclose(runner.infer({"x": x})["y"], x @ w + b, rtol=1e-4,
                                       atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_whole_model_engine_passes_the_host_gates_on_the_gpu(artifact, tmp_path, precision,
                                                              capsys):
    """Built on the CPU, run here: `validate --engine model.<p>.rtx.engine` against the
    reference data the export shipped, with the host's gates (exit 0)."""
    from twbert_export.validation.reference import main as validate_engine

    src, _ = artifact
    out = tmp_path / "artifact"
    shutil.copytree(src, out)
    manifest = Manifest.load(out)
    entry = manifest.file(precision)
    spec = rtx.GraphSpec("model", precision, entry.flavour, out / entry.path, manifest.contract)
    [built] = rtx.build_graphs([spec], SELECTION_NODES, engines=out, trt=RTX,
                               int8_may_fail=False)
    code = validate_engine(["--engine", str(out / built.engine)])
    printed = capsys.readouterr()
    print(f"GPU {query_cuda_device()}: {precision}: exit {code}\n{printed.out}{printed.err}")
    assert code == 0, printed.out + printed.err
