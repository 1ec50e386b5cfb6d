import shutil
import subprocess

import pytest
from trtdata import artifact_manifest, split_manifest, tiny_contract, tiny_split_contracts

from twbert_export.trt.commands import (build_script, deploy_md, polygraphy_command,
                                        precision_flags, python_build_command, shape_flags,
                                        trtexec_command, write_device_kit)

SHAPES = ["--minShapes=video:1x4x3x32x32,input_ids:1x8,attention_mask:1x8",
          "--optShapes=video:2x4x3x32x32,input_ids:2x8,attention_mask:2x8",
          "--maxShapes=video:4x4x3x32x32,input_ids:4x8,attention_mask:4x8"]


def test_shapes_come_from_the_contract_profile():
    assert shape_flags(tiny_contract()) == SHAPES
    static = shape_flags(tiny_contract(), static_batch=2)
    assert all(":2x" in f and ":1x" not in f and ":4x" not in f for f in static)


@pytest.mark.parametrize("version, precision, flags", [
    ((8, 6), "fp32", []), ((8, 6), "fp16", ["--fp16"]), ((8, 6), "int8", ["--int8", "--fp16"]),
    ((8, 5), "fp16", ["--fp16"]),
    ((10, 3), "fp16", ["--stronglyTyped"]), ((10, 13), "int8", ["--stronglyTyped"]),
    ((11, 0), "fp16", []), ((11, 4), "int8", []),
])
def test_precision_flags_per_tensorrt_major(version, precision, flags):
    assert precision_flags(version, precision) == flags


def test_trtexec_on_tensorrt_11_has_no_precision_flags():
    args = trtexec_command("model.int8.onnx", "model.int8.engine", tiny_contract(), "int8",
                           (11, 0), 1024, "timing.cache", 3)
    assert not {"--fp16", "--int8", "--stronglyTyped", "--best"} & set(args)
    assert args[:2] == ["--onnx=model.int8.onnx", "--saveEngine=model.int8.engine"]
    assert SHAPES[0] in args and SHAPES[2] in args
    assert "--memPoolSize=workspace:1024" in args
    assert "--timingCacheFile=timing.cache" in args
    assert "--builderOptimizationLevel=3" in args and "--skipInference" in args


def test_trtexec_on_tensorrt_10_is_strongly_typed():
    args = trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp16", (10, 3), 512,
                           "c.cache", 4, version_compatible=True)
    assert "--stronglyTyped" in args and "--fp16" not in args
    assert "--versionCompatible" in args and "--builderOptimizationLevel=4" in args


def test_trtexec_on_tensorrt_86_and_85():
    args86 = trtexec_command("m.trt8.onnx", "m.engine", tiny_contract(), "fp32", (8, 6), 1024,
                             "c.cache", 3)
    assert "--fp16" not in args86 and "--stronglyTyped" not in args86 and "--noTF32" in args86
    assert "--builderOptimizationLevel=3" in args86 and "--skipInference" in args86
    args85 = trtexec_command("m.trt8.onnx", "m.engine", tiny_contract(), "fp32", (8, 5), 1024,
                             "c.cache", 3)
    assert not any(a.startswith("--builderOptimizationLevel") for a in args85)
    assert "--buildOnly" in args85 and "--skipInference" not in args85
    with pytest.raises(ValueError, match="8.6"):
        trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp32", (8, 5),
                        version_compatible=True)


@pytest.mark.parametrize("version, dla", [((8, 6), None), ((8, 5), None), ((10, 3), 0)])
def test_trtexec_refuses_weak_typing_with_fp16(version, dla):
    """Without strong typing, trtexec's --fp16 may run the file's FP32 nodes in FP16: the kit
    builds these with the Python builder, which pins each layer to the file's type."""
    with pytest.raises(ValueError, match="python3 -m twbert_export.trt.cli"):
        trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp16", version, dla_core=dla)


@pytest.mark.parametrize("version", [(8, 6), (10, 3), (11, 4)])
def test_every_trtexec_build_turns_tf32_off(version):
    precision = "fp32" if version[0] == 8 else "fp16"
    assert "--noTF32" in trtexec_command("m.onnx", "m.engine", tiny_contract(), precision,
                                         version)


def test_dla_build_is_static_with_gpu_fallback_and_refuses_fp32():
    args = trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp16", (11, 4), 1024,
                           dla_core=1)
    assert "--useDLACore=1" in args and "--allowGPUFallback" in args
    assert "--profilingVerbosity=detailed" in args  # the layer placement is reported
    assert "--exportLayerInfo=m.engine.layers.json" in args
    assert "--minShapes=video:2x4x3x32x32,input_ids:2x8,attention_mask:2x8" in args
    assert "--maxShapes=video:2x4x3x32x32,input_ids:2x8,attention_mask:2x8" in args
    with pytest.raises(ValueError, match="FP16 and INT8 only"):
        trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp32", (10, 3), dla_core=0)
    with pytest.raises(ValueError, match="TensorRT 10.13 has no DLA support"):
        trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp16", (10, 13), dla_core=0)


def test_device_kit_is_written_and_the_script_is_valid_bash(tmp_path):
    manifest = artifact_manifest()
    paths = write_device_kit(tmp_path, manifest)
    assert [p.name for p in paths] == ["build_on_device.sh", "DEPLOY.md"]
    script = (tmp_path / "build_on_device.sh")
    assert script.stat().st_mode & 0o111  # executable
    text = script.read_text()
    assert 'PRECISION="${1:-int8}"' in text  # default: the last precision exported
    for flag in ("--stronglyTyped", "--noTF32", "--useDLACore", "--allowGPUFallback",
                 "--exportLayerInfo", "--timingCacheFile", "--memPoolSize=workspace", *SHAPES):
        assert flag in text, flag
    assert "python3 -m twbert_export.trt.cli" in text
    if shutil.which("bash"):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def _run_script(tmp_path, precision, trt_version, extra_env=None, expect_rc=0, trt8=True,
                manifest=None):
    """Run build_on_device.sh with a fake trtexec that prints its arguments, and a fake python3
    that says the package (and TensorRT's bindings) are installed and prints what it is asked
    to run."""
    write_device_kit(tmp_path, manifest or artifact_manifest(trt8=trt8))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = tmp_path / "fake-trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    python = bin_dir / "python3"
    python.write_text('#!/usr/bin/env bash\n[ "$1" = -c ] && exit 0\necho "python3 $*"\n')
    python.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TRTEXEC": str(fake),
           "TRT_VERSION": trt_version, **(extra_env or {})}
    proc = subprocess.run(["bash", str(tmp_path / "build_on_device.sh"), precision],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == expect_rc, proc.stderr
    return proc.stdout.splitlines() if expect_rc == 0 else proc.stderr


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@pytest.mark.parametrize("version, precision, onnx, expect, forbid", [
    ("8.6.2", "fp32", "model.fp32.trt8.onnx", ["--builderOptimizationLevel=3"],
     ["--stronglyTyped", "--fp16"]),
    ("8.5.2", "fp32", "model.fp32.trt8.onnx", ["--buildOnly"], ["--builderOptimizationLevel=3"]),
    ("10.3.0", "int8", "model.int8.onnx", ["--stronglyTyped"], ["--fp16", "--int8"]),
    ("11.0.0", "int8", "model.int8.onnx", [], ["--fp16", "--int8", "--stronglyTyped"]),
])
def test_script_runs_the_right_trtexec_per_version(tmp_path, version, precision, onnx, expect,
                                                   forbid):
    *args, record = _run_script(tmp_path, precision, version)
    engine = onnx[:-len(".onnx")] + ".engine"
    assert args[:2] == [f"--onnx={onnx}", f"--saveEngine={engine}"]
    assert record == (f"python3 -m twbert_export.trt.cli --onnx {onnx} --engine "
                      f"{engine} --target auto --workspace-mb 1024 --opt-level 3 "
                      f"--record-trtexec-build {version}")
    assert all(e in args for e in expect), args
    assert not set(forbid) & set(args), args
    assert "--noTF32" in args  # trtexec enables TF32 by default
    assert f"--timingCacheFile={tmp_path}/.cache/twbert-export/timing-trt{version}.cache" in args
    assert "--memPoolSize=workspace:1024" in args and SHAPES[2] in args


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@pytest.mark.parametrize("version", ["8.5.2", "8.6.2"])
def test_script_builds_fp16_on_tensorrt_8_with_the_python_builder_from_the_opset17_file(
        tmp_path, version):
    (line,) = _run_script(tmp_path, "fp16", version)
    assert line == ("python3 -m twbert_export.trt.cli --onnx model.fp16.trt8.onnx --target auto "
                    "--workspace-mb 1024 --opt-level 3 --timing-cache "
                    f"{tmp_path}/.cache/twbert-export/timing-trt{version}.cache")


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@pytest.mark.parametrize("version, message, trt8", [
    ("8.4.1", "TensorRT 8.4.1 is too old", True), ("7.1.3", "not a target", True),
    ("9.2.0", "not a target", True), ("", "cannot tell the TensorRT version", True),
    ("banana", "cannot tell the TensorRT version", True),
    ("8.6.2", "has no TensorRT 8.x graph for fp16", False)])
def test_script_refuses_what_it_cannot_build_with_one_line(tmp_path, version, message, trt8):
    err = _run_script(tmp_path, "fp16", version, expect_rc=2, trt8=trt8)
    assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_script_dla_and_bad_precision(tmp_path):
    agx = {"JETSON_MODEL": "NVIDIA Jetson AGX Orin Developer Kit"}
    err = _run_script(tmp_path, "fp16", "11.4.1", {"DLA_CORE": "0", "JETSON_MODEL": "NVIDIA "
                      "Jetson Orin NX Engineering Reference Developer Kit"}, expect_rc=2)
    assert "documented for Jetson AGX Orin (JetPack >= 7.2.2) only" in err
    args = _run_script(tmp_path, "fp16", "11.4.1", {"DLA_CORE": "0", "WORKSPACE_MB": "512", **agx})
    assert "--useDLACore=0" in args and "--allowGPUFallback" in args
    assert "--exportLayerInfo=model.fp16.engine.layers.json" in args
    assert args[-1].endswith("--dla-core 0 --record-trtexec-build 11.4.1")
    for no_dla in ("10.13.3", "11.4.0"):
        err = _run_script(tmp_path, "fp16", no_dla, {"DLA_CORE": "0"}, expect_rc=2)
        assert f"TensorRT {no_dla} has no DLA support" in err
    (python_line,) = _run_script(tmp_path, "fp16", "10.3.0", {"DLA_CORE": "1"})
    assert python_line.startswith("python3 -m twbert_export.trt.cli --onnx model.fp16.onnx")
    assert python_line.endswith("--dla-core 1")  # weak typing on DLA: the Python builder
    err = _run_script(tmp_path, "int8", "10.3.0", {"DLA_CORE": "0"}, expect_rc=2)
    assert "INT8 on DLA needs TensorRT >= 11.4.1" in err
    assert "--maxShapes=video:2x4x3x32x32,input_ids:2x8,attention_mask:2x8" in args
    assert "--memPoolSize=workspace:512" in args
    proc = subprocess.run(["bash", str(tmp_path / "build_on_device.sh"), "bf16"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "not in this artifact" in proc.stderr


def test_deploy_md_names_the_commands_for_each_tensorrt():
    text = deploy_md(artifact_manifest(("fp32", "fp16")))
    assert "batch 1:2:4" in text and "`frame_indices_1`" in text
    assert "--stronglyTyped" in text  # the 10.x line
    line_8 = next(line for line in text.splitlines() if line.startswith("- 8.5 / 8.6"))
    assert "model.fp16.trt8.onnx" in line_8 and "Python builder" in line_8
    assert "| 11.4.1+ | 7.2.2+, Jetson AGX Orin only |" in text  # the DLA table
    assert "Orin NX 16GB 2, Orin NX 8GB 1" in text
    for habit in ("nvpmodel", "jetson_clocks", "swapon", "--useCudaGraph --useSpinWait"):
        assert habit in text, habit
    line_11 = next(line for line in text.splitlines() if line.startswith("- 11.x"))
    assert "--fp16" not in line_11 and "--stronglyTyped" not in line_11
    assert "./build_on_device.sh fp16" in text


def test_python_build_command():
    assert python_build_command("model.fp16.onnx") == \
        "python3 -m twbert_export.trt.cli --onnx model.fp16.onnx --target auto"
    assert build_script(artifact_manifest(("fp32",))).count("fp32) ONNX=model.fp32.onnx") == 1


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_script_builds_every_graph_one_at_a_time_each_with_its_own_profile(tmp_path):
    manifest = split_manifest()
    write_device_kit(tmp_path, manifest)
    assert subprocess.run(["bash", "-n", str(tmp_path / "build_on_device.sh")]).returncode == 0
    # The fake trtexec records when each build starts and ends: builds must never overlap.
    log = tmp_path / "builds.log"
    fake = tmp_path / "logging-trtexec"
    fake.write_text('#!/usr/bin/env bash\necho "start $1" >> %s\nsleep 0.05\nprintf "%%s\\n" "$@"\n'
                    'echo "end $1" >> %s\n' % (log, log))
    fake.chmod(0o755)
    lines = _run_script(tmp_path, "fp16", "10.3.0", {"TRTEXEC": str(fake)}, manifest=manifest)
    graphs = ["model", "text", "video_stem", "select", "fuse"]
    events = log.read_text().split("\n")[:-1]
    assert events == [f"{e} --onnx={g}.fp16.onnx" for g in graphs for e in ("start", "end")]
    for graph, contract in tiny_split_contracts().items():
        assert f"--saveEngine={graph}.fp16.engine" in lines
        assert shape_flags(contract)[2] in lines  # the graph's own MAX shapes
    records = [line for line in lines if "--record-trtexec-build 10.3.0" in line]
    assert [r.split("--onnx ")[1].split()[0] for r in records] == [f"{g}.fp16.onnx" for g in graphs]


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
@pytest.mark.parametrize("graphs, built", [
    ("split", ["text", "video_stem", "select", "fuse"]), ("model", ["model"]), ("fuse", ["fuse"])])
def test_script_graph_selection(tmp_path, graphs, built):
    lines = _run_script(tmp_path, "fp16", "10.3.0", {"GRAPHS": graphs}, manifest=split_manifest())
    assert [a.split("=", 1)[1] for a in lines if a.startswith("--onnx=")] \
        == [f"{g}.fp16.onnx" for g in built]


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_script_builds_the_trt8_twin_of_each_split_graph_on_86(tmp_path):
    lines = _run_script(tmp_path, "fp32", "8.6.2", {"GRAPHS": "split"}, manifest=split_manifest())
    assert [a for a in lines if a.startswith("--onnx=")] == [
        f"--onnx={g}.fp32.trt8.onnx" for g in ("text", "video_stem", "select", "fuse")]
    assert lines.count("--noTF32") == 4
    python = _run_script(tmp_path, "fp16", "8.6.2", {"GRAPHS": "split"}, manifest=split_manifest())
    assert [line.split()[4] for line in python] == [  # weak typing: the Python builder, per graph
        f"{g}.fp16.trt8.onnx" for g in ("text", "video_stem", "select", "fuse")]


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_script_stops_at_the_first_graph_that_cannot_be_built(tmp_path):
    manifest = split_manifest()
    manifest.files = [f for f in manifest.files if (f.graph, f.precision) != ("select", "fp16")]
    err = _run_script(tmp_path, "fp16", "10.3.0", {"GRAPHS": "split"}, expect_rc=2,
                      manifest=manifest)
    assert "graph 'select' at precision 'fp16' is not in this artifact" in err
    assert "== fuse" not in err  # nothing after the failed one
