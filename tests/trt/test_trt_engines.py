"""TensorRT on a GPU: `pytest -m trt` on a machine with TensorRT (>= 8.5), a CUDA GPU and
pycuda or cuda-python. Builds FP32/FP16/INT8 engines from a tiny export with the target
`auto` detects (on TensorRT 8.5 / 8.6 from the opset-17 `model.PRECISION.trt8.onnx` files),
then checks parity with ONNX Runtime on the same files, the host's gates, the printed
Polygraphy check, the preflight refusal, the CUDA-graph path and, on a board with a DLA, the
reported layer placement; builds the four split engines per precision (`build --artifact
--graphs split`) and checks their engine set against the composed ONNX files and an index query
on engines against the ONNX one. Skips (with the reason) everywhere else. None of it has run
here."""

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

from twbert_export.artifact.manifest import PRECISIONS, TRT8_FLAVOUR  # noqa: E402
from twbert_export.export.pipeline import ExportOptions, run_export  # noqa: E402
from twbert_export.trt.commands import DEVICE_ATOL_FLOOR  # noqa: E402
from twbert_export.validation.runners import ort_runner, run_batches  # noqa: E402
from twbert_export.trt.build import BuildOptions, build_engine  # noqa: E402
from twbert_export.trt.cli import onnx_for_version  # noqa: E402
from twbert_export.trt.commands import polygraphy_command  # noqa: E402
from twbert_export.trt.version import dla_available, parse_version  # noqa: E402
from twbert_export.trt.engine_manifest import EngineMismatch, sidecar_path  # noqa: E402
from twbert_export.trt.runtime import trt_runner  # noqa: E402
from twbert_export.trt.targets import resolve_target  # noqa: E402

TRT_MAJOR = parse_version(trt.__version__)[0]
# int8w (weight-only INT8) needs TensorRT 10 or later (8.x refuses it: test_int8_weights.py).
BUILT = tuple(p for p in PRECISIONS if p != "int8w" or TRT_MAJOR >= 10)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    val = copy_clips(tmp_path_factory.mktemp("val") / "data", 6)
    out = tmp_path_factory.mktemp("engines") / "demo"
    result = run_export(ExportOptions(ckpt="demo", precisions=BUILT[1:],
                                      val_data=str(val), out=str(out), calib_cache=False))
    return out, result.report, result.manifest


@pytest.fixture(scope="module")
def engines(artifact, tmp_path_factory):
    out, _, manifest = artifact
    contract = manifest.contract
    target, _ = resolve_target("auto")
    cache = tmp_path_factory.mktemp("cache") / "timing.cache"
    built = {}
    for p in BUILT:
        onnx = onnx_for_version(out / f"model.{p}.onnx", manifest, trt.__version__)
        entry = manifest.entry_for(onnx)  # the trt8 twin's on 8.x
        result = build_engine(BuildOptions(onnx, contract, p, target, timing_cache=cache,
                                           onnx_sha256=entry.sha256))
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


@pytest.mark.parametrize("precision", BUILT)
def test_engine_matches_onnx_runtime_within_the_gate(artifact, engines, precision):
    out, report, manifest = artifact
    contract = manifest.contract
    plan = engines[precision].plan
    assert plan.strongly_typed == (TRT_MAJOR >= 10) and plan.tf32 is False
    batch_feeds = feeds(out, contract)
    with ort_runner(out / engines[precision].manifest.onnx) as ort:
        ref = run_batches(ort, batch_feeds)
    with trt_runner(engines[precision].engine) as runner:
        got = run_batches(runner, batch_feeds)
    entry = manifest.entry_for(engines[precision].manifest.onnx)  # flavour trt8 on 8.x
    errors = report.result(entry.precision, entry.flavour).outputs
    for name, r in ref.items():
        if np.issubdtype(r.dtype, np.integer):
            continue  # frame indices may differ on near-ties; the float scores are gated
        atol = max(DEVICE_ATOL_FLOOR[precision], 2 * errors.get(name, {}).get("max_abs", 0))
        err = float(np.abs(got[name].astype(np.float64) - r).max())
        assert err <= atol, f"{precision} {name}: max abs error {err:.3g} > {atol:.3g}"
        assert got[name].dtype == r.dtype


def test_cuda_graph_path_equals_plain_path(artifact, engines):
    out, _, manifest = artifact
    contract = manifest.contract
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


@pytest.mark.parametrize("precision", BUILT)
def test_validate_engine_passes_the_hosts_gates(artifact, engines, precision, capsys):
    """`export.py validate --engine` on the device: the shipped validation set, the host's
    gates, against the PyTorch reference outputs (no PyTorch run here)."""
    from twbert_export.validation.reference import main as validate_engine

    assert validate_engine(["--engine", str(engines[precision].engine)]) == 0, \
        capsys.readouterr().out


def test_tensorrt_8_builds_the_opset17_graph_with_the_files_types_pinned(artifact, engines):
    if TRT_MAJOR != 8:
        pytest.skip(f"TensorRT {trt.__version__}: the opset-17 graph is for 8.5 / 8.6")
    manifest = artifact[2]
    for p, result in engines.items():
        assert manifest.entry_for(result.manifest.onnx) == manifest.file(p, flavour=TRT8_FLAVOUR)
        assert result.plan.pin_file_types == (p != "fp32")


@pytest.mark.parametrize("precision", ["fp16"])
def test_the_printed_polygraphy_check_passes_on_the_built_engine(artifact, engines, precision):
    import shlex
    import subprocess

    out, report, manifest = artifact
    entry = manifest.entry_for(engines[precision].manifest.onnx)
    command = polygraphy_command(engines[precision].engine.name, precision,
                                 report.result(entry.precision, entry.flavour).outputs,
                                 trt_major=TRT_MAJOR)
    proc = subprocess.run(shlex.split(command), cwd=out, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_a_dla_build_reports_where_its_layers_run(artifact, tmp_path):
    out, _, manifest = artifact
    target, _ = resolve_target("auto")
    if not target.dla_cores or not dla_available(trt.__version__):
        pytest.skip(f"no DLA here ({target.name}, TensorRT {trt.__version__})")
    contract = manifest.contract
    onnx = onnx_for_version(out / "model.fp16.onnx", manifest, trt.__version__)
    result = build_engine(BuildOptions(onnx, contract, "fp16", target, dla_core=0,
                                       engine=tmp_path / "model.fp16.engine",
                                       timing_cache=tmp_path / "timing.cache"))
    placement = result.manifest.extra["layer_placement"]
    assert placement["DLA"] + placement["GPU"] > 0
    assert (tmp_path / "model.fp16.engine.layers.json").is_file()
    assert any("layers on DLA / GPU" in note for note in result.notes)


# -- the split graphs: four engines per precision, run as one engine set ----------------------
@pytest.fixture(scope="module")
def split_engines(artifact, tmp_path_factory):
    """`export.py build --artifact DIR --graphs split` per precision: the four engines built
    one at a time, each with its graph's profile and sidecar (the trt8 twins on 8.x)."""
    from twbert_export.trt.cli import build_main

    out, _, manifest = artifact
    cache = tmp_path_factory.mktemp("split-cache") / "timing.cache"
    for p in BUILT:
        assert build_main(["--artifact", str(out), "--graphs", "split", "--precision", p,
                           "--target", "auto", "--timing-cache", str(cache)]) == 0
    return out


@pytest.mark.parametrize("precision", BUILT)
def test_the_split_engine_set_matches_the_composed_onnx_within_the_gate(artifact, split_engines,
                                                                        precision):
    from twbert_export.retrieval.gallery import SplitArtifact
    from twbert_export.retrieval.split_trt import SplitEngines

    out, report, manifest = artifact
    on_onnx, on_engines = SplitArtifact(out, precision), SplitArtifact(out, precision, True)
    batch_feeds = feeds(out, manifest.contract)
    with on_onnx.pipeline() as ort, on_engines.pipeline() as engines:
        assert isinstance(engines, SplitEngines)
        for feed in batch_feeds:
            ref, got = ort.infer(feed), engines.infer(feed)
            for name, r in ref.items():
                if np.issubdtype(r.dtype, np.integer):
                    continue  # near-tie frame choices; the float scores are gated
                host = report.split[precision].outputs.get(name, {}).get("max_abs", 0)
                atol = max(DEVICE_ATOL_FLOOR[precision], 2 * host)
                err = float(np.abs(got[name].astype(np.float64) - r).max())
                assert err <= atol, f"{precision} split {name}: {err:.3g} > {atol:.3g}"
    for graph, path in on_engines.files.items():
        assert sidecar_path(path).is_file(), f"{graph}: no sidecar"


def test_an_index_query_on_engines_equals_the_onnx_one(artifact, split_engines, tmp_path,
                                                       capsys):
    import export

    out, _, _ = artifact
    videos = copy_clips(tmp_path / "clips", 6) / "videos"
    index = tmp_path / "index"
    assert export.main(["index", "--artifact", str(out), "--videos", str(videos), "--out",
                        str(index), "--precision", "fp32"]) == 0
    results = []
    for extra in ([], ["--engines"]):
        capsys.readouterr()
        assert export.main(["predict", "--index", str(index), "--artifact", str(out), "--text",
                            "a person is cooking", "--json", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out)["ranking"])
    on_onnx, on_engines = results
    assert [r["clip"] for r in on_engines] == [r["clip"] for r in on_onnx]
    for a, b in zip(on_onnx, on_engines):
        assert abs(a["itc_similarity"] - b["itc_similarity"]) <= DEVICE_ATOL_FLOOR["fp32"] * 10
