import shutil
import subprocess

import pytest
from trtdata import artifact_manifest, tiny_contract

from twbert_export.trt.commands import (build_script, deploy_md, precision_flags,
                                        python_build_command, shape_flags, trtexec_command,
                                        write_device_kit)

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
    args86 = trtexec_command("m.onnx", "m.engine", tiny_contract(), "int8", (8, 6), 1024,
                             "c.cache", 3)
    assert "--int8" in args86 and "--fp16" in args86 and "--stronglyTyped" not in args86
    assert "--builderOptimizationLevel=3" in args86 and "--skipInference" in args86
    args85 = trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp16", (8, 5), 1024,
                             "c.cache", 3)
    assert not any(a.startswith("--builderOptimizationLevel") for a in args85)
    assert "--buildOnly" in args85 and "--skipInference" not in args85
    with pytest.raises(ValueError, match="8.6"):
        trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp16", (8, 5),
                        version_compatible=True)


def test_dla_build_is_static_with_gpu_fallback_and_refuses_fp32():
    args = trtexec_command("m.onnx", "m.engine", tiny_contract(), "fp16", (10, 3), 1024,
                           dla_core=1)
    assert "--useDLACore=1" in args and "--allowGPUFallback" in args
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
    for flag in ("--stronglyTyped", "--int8", "--fp16", "--useDLACore", "--allowGPUFallback",
                 "--timingCacheFile", "--memPoolSize=workspace", *SHAPES):
        assert flag in text, flag
    assert "python3 -m twbert_export.trt.cli" in text
    if shutil.which("bash"):
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def _run_script(tmp_path, precision, trt_version, extra_env=None, expect_rc=0):
    """Run build_on_device.sh with a fake trtexec that prints its arguments, and a fake python3
    that says the package is installed and prints what it is asked to run."""
    write_device_kit(tmp_path, artifact_manifest())
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
@pytest.mark.parametrize("version, expect, forbid", [
    ("8.6.2", ["--int8", "--fp16", "--builderOptimizationLevel=3"], ["--stronglyTyped"]),
    ("8.5.2", ["--int8", "--fp16", "--buildOnly"], ["--builderOptimizationLevel=3"]),
    ("10.3.0", ["--stronglyTyped"], ["--fp16", "--int8"]),
    ("11.0.0", [], ["--fp16", "--int8", "--stronglyTyped"]),
])
def test_script_runs_the_right_trtexec_per_version(tmp_path, version, expect, forbid):
    *args, record = _run_script(tmp_path, "int8", version)
    assert args[:2] == ["--onnx=model.int8.onnx", "--saveEngine=model.int8.engine"]
    assert record == ("python3 -m twbert_export.trt.cli --onnx model.int8.onnx --engine "
                      "model.int8.engine --target auto --workspace-mb 1024 --opt-level 3 "
                      f"--record-trtexec-build {version}")
    assert all(e in args for e in expect), args
    assert not set(forbid) & set(args), args
    assert f"--timingCacheFile={tmp_path}/.cache/twbert-export/timing-trt{version}.cache" in args
    assert "--memPoolSize=workspace:1024" in args and SHAPES[2] in args


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_script_dla_and_bad_precision(tmp_path):
    args = _run_script(tmp_path, "fp16", "10.3.0", {"DLA_CORE": "0", "WORKSPACE_MB": "512"})
    assert "--useDLACore=0" in args and "--allowGPUFallback" in args
    assert args[-1].endswith("--dla-core 0 --record-trtexec-build 10.3.0")
    for no_dla in ("10.13.3", "11.4.0"):
        err = _run_script(tmp_path, "fp16", no_dla, {"DLA_CORE": "0"}, expect_rc=2)
        assert f"TensorRT {no_dla} has no DLA support" in err
    assert "--useDLACore=0" in _run_script(tmp_path, "fp16", "11.4.1", {"DLA_CORE": "0"})
    assert "--maxShapes=video:2x4x3x32x32,input_ids:2x8,attention_mask:2x8" in args
    assert "--memPoolSize=workspace:512" in args
    proc = subprocess.run(["bash", str(tmp_path / "build_on_device.sh"), "bf16"],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "not in this artifact" in proc.stderr


def test_deploy_md_names_the_commands_for_each_tensorrt():
    text = deploy_md(artifact_manifest(("fp32", "fp16")))
    assert "batch 1:2:4" in text and "`frame_indices_1`" in text
    assert "--stronglyTyped" in text  # the 10.x line
    assert "trtexec --onnx=model.fp16.onnx --saveEngine=model.fp16.engine --fp16" in text  # 8.6
    line_11 = next(line for line in text.splitlines() if line.startswith("- 11.x"))
    assert "--fp16" not in line_11 and "--stronglyTyped" not in line_11
    assert "./build_on_device.sh fp16" in text


def test_python_build_command():
    assert python_build_command("model.fp16.onnx") == \
        "python3 -m twbert_export.trt.cli --onnx model.fp16.onnx --target auto"
    assert build_script(artifact_manifest(("fp32",))).count("fp32) ONNX=model.fp32.onnx") == 1
