"""TensorRT on a GPU: `pytest -m trt` on a machine with TensorRT (>= 8.5), a CUDA GPU and
pycuda or cuda-python. Builds FP32/FP16/INT8 engines from a tiny export with the target
`auto` detects, then checks parity with ONNX Runtime on the same files, the preflight refusal
and the CUDA-graph path. Skips (with the reason) everywhere else."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
from clipdata import copy_clips

pytestmark = pytest.mark.trt

trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed (pip wheels need "
                          "NVIDIA's index; on Jetson it comes with JetPack)")
if not hasattr(trt, "Builder"):  # e.g. a bare stub directory named tensorrt
    pytest.skip("`tensorrt` here has no bindings (stubs only)", allow_module_level=True)

from twbert_export.trt.targets import query_cuda_device  # noqa: E402

if query_cuda_device() is None:
    pytest.skip("no CUDA GPU visible (libcuda found no device)", allow_module_level=True)
if not (importlib.util.find_spec("pycuda") or importlib.util.find_spec("cuda")):
    pytest.skip("the TensorRT runner needs pycuda or cuda-python", allow_module_level=True)

from twbert_export.contract import IOContract  # noqa: E402
from twbert_export.pipeline import ExportOptions, run_export  # noqa: E402
from twbert_export.trt.commands import DEVICE_ATOL_FLOOR  # noqa: E402
from twbert_export.runners import ort_runner, run_batches  # noqa: E402
from twbert_export.trt.build import BuildOptions, build_engine  # noqa: E402
from twbert_export.trt.engine_manifest import EngineMismatch, sidecar_path  # noqa: E402
from twbert_export.trt.runtime import trt_runner  # noqa: E402
from twbert_export.trt.targets import resolve_target  # noqa: E402

PRECISIONS = ("fp32", "fp16", "int8")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    val = copy_clips(tmp_path_factory.mktemp("val") / "data", 6)
    out = tmp_path_factory.mktemp("engines") / "demo"
    report = run_export(ExportOptions(ckpt="demo", precisions=("fp16", "int8"),
                                      val_data=str(val), out=str(out), calib_cache=False))
    manifest = json.loads((out / "manifest.json").read_text())
    return out, report, manifest


@pytest.fixture(scope="module")
def engines(artifact, tmp_path_factory):
    out, _, manifest = artifact
    contract = IOContract.from_dict(manifest["contract"])
    target, _ = resolve_target("auto")
    cache = tmp_path_factory.mktemp("cache") / "timing.cache"
    built = {}
    for p in PRECISIONS:
        result = build_engine(BuildOptions(out / f"model.{p}.onnx", contract, p, target,
                                           timing_cache=cache,
                                           onnx_sha256=manifest["files"][p]["sha256"]))
        built[p] = result
    assert cache.stat().st_size > 0  # written after the first build, read by the next ones
    return built


def feeds(out, contract, batches=(1, 2)):
    from polygraphy.json import load_json

    rows = {k: np.concatenate([f[k] for f in load_json(str(out / "reference/inputs.json"))])
            for k in contract.input_names}
    n = len(rows["video"])
    result, start = [], 0
    for b in batches * 4:
        if start + b > n:
            break
        result.append({k: v[start:start + b] for k, v in rows.items()})
        start += b
    return result


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_matches_onnx_runtime_within_the_gate(artifact, engines, precision):
    out, report, manifest = artifact
    contract = IOContract.from_dict(manifest["contract"])
    plan = engines[precision].plan
    assert plan.strongly_typed == (int(trt.__version__.split(".")[0]) >= 10)
    batch_feeds = feeds(out, contract)
    with ort_runner(out / f"model.{precision}.onnx") as ort:
        ref = run_batches(ort, batch_feeds)
    with trt_runner(engines[precision].engine) as runner:
        got = run_batches(runner, batch_feeds)
    errors = report["precisions"][precision]["outputs"]
    for name, r in ref.items():
        if np.issubdtype(r.dtype, np.integer):
            continue  # frame indices may differ on near-ties; the float scores are gated
        atol = max(DEVICE_ATOL_FLOOR[precision], 2 * errors.get(name, {}).get("max_abs", 0))
        err = float(np.abs(got[name].astype(np.float64) - r).max())
        assert err <= atol, f"{precision} {name}: max abs error {err:.3g} > {atol:.3g}"
        assert got[name].dtype == r.dtype


def test_cuda_graph_path_equals_plain_path(artifact, engines):
    out, _, manifest = artifact
    contract = IOContract.from_dict(manifest["contract"])
    batch_feeds = feeds(out, contract, batches=(2, 1))  # graphs for two batch sizes
    with trt_runner(engines["fp16"].engine) as plain:
        a = run_batches(plain, batch_feeds)
    with trt_runner(engines["fp16"].engine, cuda_graph=True) as graphed:
        b = run_batches(graphed, batch_feeds)
        c = run_batches(graphed, batch_feeds)  # replay of the captured graphs
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        np.testing.assert_array_equal(a[name], c[name])


def test_preflight_refuses_an_engine_from_another_tensorrt(engines, tmp_path):
    src = engines["fp16"].engine
    engine = tmp_path / src.name
    engine.write_bytes(src.read_bytes())
    sidecar = json.loads(sidecar_path(src).read_text())
    sidecar["machine"]["tensorrt_version"] = "9.9.9"
    sidecar_path(engine).write_text(json.dumps(sidecar))
    (tmp_path / "manifest.json").write_text((src.parent / "manifest.json").read_text())
    with pytest.raises(EngineMismatch, match="built for TensorRT 9.9.9"):
        trt_runner(engine).activate()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_validate_engine_passes_the_hosts_gates(artifact, engines, precision, capsys):
    """`export.py validate --engine` on the device: the shipped validation set, the host's
    gates, against the PyTorch reference outputs (no PyTorch run here)."""
    from twbert_export.reference import main as validate_engine

    assert validate_engine(["--engine", str(engines[precision].engine)]) == 0, \
        capsys.readouterr().out
