import json

import pytest

from twbert_export.trt.engine_manifest import (EngineManifest, EngineMismatch, MachineInfo,
                                               preflight, sidecar_path, write_manifest)

ORIN_JP62 = MachineInfo("10.3.0", "Orin (nvgpu)", "8.7", l4t="36.4.3", jetpack="6.2")
H100 = MachineInfo("10.13.0.35", "NVIDIA H100 80GB HBM3", "9.0")


def engine_manifest(machine=ORIN_JP62, **kw) -> EngineManifest:
    return EngineManifest(engine="model.fp16.engine", onnx="model.fp16.onnx", onnx_sha256="a" * 64,
                          precision="fp16", build_path="strongly-typed", machine=machine,
                          profile_shapes={"video": [[1, 4], [2, 4], [4, 4]]}, target="orin-nx",
                          rebuild_command="python3 -m twbert_export.trt.cli --onnx "
                          "model.fp16.onnx --target auto", **kw)


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "model.fp16.engine"
    path.write_bytes(b"\x00plan-bytes")  # never read by the preflight
    return path


def test_sidecar_sits_beside_the_engine_and_roundtrips(engine):
    written = write_manifest(engine_manifest(), engine)
    assert written == sidecar_path(engine) and written.name == "model.fp16.engine.json"
    assert engine.read_bytes() == b"\x00plan-bytes"  # engine file untouched: no header
    back = EngineManifest.from_dict(json.loads(written.read_text()))
    assert back == engine_manifest()


def test_preflight_accepts_the_machine_that_built_it(engine):
    write_manifest(engine_manifest(), engine)
    assert preflight(engine, ORIN_JP62, onnx_sha256="a" * 64).precision == "fp16"


@pytest.mark.parametrize("here, needle", [
    (MachineInfo("10.3.1", "Orin (nvgpu)", "8.7", "36.4.3", "6.2"), "TensorRT 10.3.1 here"),
    (MachineInfo("8.6.2", "Orin (nvgpu)", "8.7", "36.3.0", "6.0"), "L4T R36.3.0 here"),
    (H100, "compute capability 9.0 here"),
])
def test_preflight_refuses_another_machine_and_says_how_to_rebuild(engine, here, needle):
    write_manifest(engine_manifest(), engine)
    with pytest.raises(EngineMismatch) as info:
        preflight(engine, here)
    msg = str(info.value)
    assert needle in msg
    assert "built for TensorRT 10.3.0 on Orin (nvgpu) (compute capability 8.7), L4T R36.4.3 / " \
        "JetPack 6.2" in msg
    assert "python3 -m twbert_export.trt.cli --onnx model.fp16.onnx" in msg


def test_jetson_engine_on_a_discrete_gpu_is_refused_even_with_same_versions(engine):
    write_manifest(engine_manifest(), engine)
    with pytest.raises(EngineMismatch, match="built on a Jetson, this is not a Jetson"):
        preflight(engine, MachineInfo("10.3.0", "Some GPU", "8.7"))


def test_version_compatible_engine_runs_on_newer_runtimes_only(engine):
    write_manifest(engine_manifest(machine=H100, version_compatible=True), engine)
    preflight(engine, MachineInfo("10.16.0", "NVIDIA H100 80GB HBM3", "9.0"))
    preflight(engine, MachineInfo("11.0.0", "NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(EngineMismatch, match="needs a runtime >= 10.13.0.35"):
        preflight(engine, MachineInfo("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"))  # older
    with pytest.raises(EngineMismatch, match="from TensorRT 10 runs on TensorRT 10 or 11"):
        preflight(engine, MachineInfo("12.0.0", "NVIDIA H100 80GB HBM3", "9.0"))


def test_a_version_compatible_tensorrt_8_engine_does_not_cross_to_11(engine):
    h100_86 = MachineInfo("8.6.1", "NVIDIA H100 80GB HBM3", "9.0")
    write_manifest(engine_manifest(machine=h100_86, version_compatible=True), engine)
    for runtime in ("8.6.3", "9.3.0", "10.7.0"):
        preflight(engine, MachineInfo(runtime, "NVIDIA H100 80GB HBM3", "9.0"))
    with pytest.raises(EngineMismatch, match="from TensorRT 8 runs on TensorRT 8 or 9 or 10"):
        preflight(engine, MachineInfo("11.4.1", "NVIDIA H100 80GB HBM3", "9.0"))


def test_stale_engine_is_refused_when_the_onnx_changed(engine):
    write_manifest(engine_manifest(), engine)
    with pytest.raises(EngineMismatch, match="changed since the engine was built"):
        preflight(engine, ORIN_JP62, onnx_sha256="b" * 64)


def test_engine_without_sidecar_is_refused(engine):
    with pytest.raises(EngineMismatch, match="no sidecar manifest"):
        preflight(engine, ORIN_JP62)
