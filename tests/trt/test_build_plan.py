"""Build-path selection, option checks and the direct TensorRT API path, against a recording
stand-in for the `tensorrt` module (the calls and flags, not TensorRT's behaviour)."""

import sys
import types
from pathlib import Path

import pytest
from trtdata import artifact_manifest, split_manifest, tiny_contract, tiny_split_contracts

from twbert_export.trt import build as build_mod
from twbert_export.trt import targets
from twbert_export.trt.build import BuildOptions, plan_for
from twbert_export.trt.cli import build_main
from twbert_export.trt.engine_manifest import read_manifest
from twbert_export.trt.targets import PRESETS, Platform
from trtapi import StrictModule, enum, strict_class
from trtapi import check_name


@pytest.mark.parametrize("version, precision, typed, fp16, int8", [
    ("11.0.0.1", "int8", True, False, False),
    ("10.3.0", "fp16", True, False, False),
    ("10.13.0.35", "fp32", True, False, False),
    ("8.6.2", "fp16", False, True, False),
    ("8.6.2", "int8", False, True, True),
    ("8.5.2.2", "fp32", False, False, False),
])
def test_build_path_per_tensorrt_version(version, precision, typed, fp16, int8):
    plan = plan_for(version, precision)
    assert (plan.strongly_typed, plan.fp16_flag, plan.int8_flag) == (typed, fp16, int8)
    assert ("strongly typed" in plan.describe()) == typed
    assert plan.pin_file_types == (fp16 and not typed)  # weak typing keeps the file's types
    assert plan.tf32 is False and "TF32 off" in plan.describe()


@pytest.mark.parametrize("version, message", [
    ("8.4.1", "too old: this toolchain needs TensorRT 8.5"),  # JetPack 5.0.x
    ("7.1.3", "too old"), ("9.2.0", "9.x releases are not a target")])
def test_unsupported_tensorrt_releases_are_refused_as_bad_input(version, message):
    with pytest.raises(ValueError, match=message):
        plan_for(version, "fp16")


@pytest.mark.parametrize("version, precision, outcome", [
    ("8.5.2", "fp16", "weak"), ("10.3.0", "fp16", "weak"), ("10.7.0", "fp16", "weak"),
    ("8.6.2", "int8", "Q/DQ network is not documented to run on DLA"),
    ("10.3.0", "int8", "Q/DQ network is not documented"),
    ("10.8.0", "fp16", "no DLA support"), ("11.4.0", "fp16", "no DLA support"),
    ("11.4.1", "fp16", "typed"), ("11.4.1", "int8", "typed"),
    ("10.3.0", "fp32", "FP16 and INT8 only")])
def test_dla_builds_only_what_is_documented(version, precision, outcome):
    if outcome in ("weak", "typed"):
        plan = plan_for(version, precision, dla=True)
        assert plan.strongly_typed == (outcome == "typed")
        assert plan.pin_file_types == (outcome == "weak")
    else:
        with pytest.raises(ValueError, match=outcome):
            plan_for(version, precision, dla=True)


def test_options_default_from_target_and_check_dla():
    opts = BuildOptions(Path("a/model.fp16.onnx"), tiny_contract(), "fp16", PRESETS["agx-orin"])
    assert opts.engine == Path("a/model.fp16.engine") and opts.workspace_mb == 4096
    opts.dla_core = 1
    opts.check()
    assert set(map(tuple, opts.profile_shapes()["video"])) == {(2, 4, 3, 32, 32)}  # static OPT
    opts.dla_core = 2
    with pytest.raises(ValueError, match="DLA cores 0..1"):
        opts.check()
    nano = BuildOptions(Path("m.fp16.onnx"), tiny_contract(), "fp16", PRESETS["orin-nano-8gb"],
                        dla_core=0)
    with pytest.raises(ValueError, match="has no DLA"):
        nano.check()
    fp32 = BuildOptions(Path("m.fp32.onnx"), tiny_contract(), "fp32", PRESETS["agx-orin"],
                        dla_core=0)
    with pytest.raises(ValueError, match="FP16 and INT8 only"):
        fp32.check()


# -- a recording stand-in for tensorrt ------------------------------------------------------------
# Each object answers only to the names of the TensorRT class it stands for (trt_api.API): a
# misspelt or removed TensorRT call fails here as it would on the device.
RETURNS = {"create_builder_config": "IBuilderConfig",
           "create_optimization_profile": "IOptimizationProfile",
           "create_timing_cache": "ITimingCache"}


def rec(api):
    class Rec(strict_class(api)):
        def __init__(self, log, name):
            object.__setattr__(self, "_log", log)
            object.__setattr__(self, "_name", name)

        def __getattr__(self, attr):
            check_name(api, attr)  # __getattribute__ refused it: refuse here too

            def call(*args):
                self._log.append((f"{self._name}.{attr}", args))
                return rec(RETURNS[attr])(self._log, attr) if attr in RETURNS else None
            return call

        def __setattr__(self, key, value):
            super().__setattr__(key, value)  # refuses names the class does not have
            self._log.append((f"{self._name}.{key}=", (value,)))
    return Rec


# A parsed network: (layer type, output dtype, the layer its input comes from) per layer, as the
# parser would leave a mixed file (FP16 matrix products, an FP32 selection path, Q/DQ feeding a
# quantized matrix product, shape arithmetic).
LAYERS = [("MATRIX_MULTIPLY", "HALF", None), ("CONVOLUTION", "FLOAT", 0),
          ("QUANTIZE", "INT8", 0), ("DEQUANTIZE", "HALF", 2), ("SHAPE", "INT64", 0),
          ("CONSTANT", "HALF", None), ("MATRIX_MULTIPLY", "HALF", 3)]


def fake_network(trt, log):
    Tensor, Layer, Network = (strict_class(a) for a in ("ITensor", "ILayer", "INetworkDefinition"))

    outputs = []
    for index, (_, dtype, _) in enumerate(LAYERS):
        tensor = Tensor()
        tensor.dtype = getattr(trt.DataType, dtype)
        tensor.name = f"t{index}"
        outputs.append(tensor)

    def layer(index, kind, source):
        obj = rec("ILayer")(log, f"layer{index}")
        object.__setattr__(obj, "type", getattr(trt.LayerType, kind))
        object.__setattr__(obj, "num_outputs", 1)
        object.__setattr__(obj, "get_output", lambda i: outputs[index])
        object.__setattr__(obj, "num_inputs", 0 if source is None else 1)
        object.__setattr__(obj, "get_input", lambda i: outputs[source])
        return obj

    network = Network()
    layers = [layer(i, k, src) for i, (k, _, src) in enumerate(LAYERS)]
    network.num_layers = len(layers)
    network.get_layer = lambda i: layers[i]
    return network


def fake_tensorrt(version, log):
    major = int(version.split(".")[0])
    trt = StrictModule("tensorrt")
    trt.__version__ = version
    trt.NetworkDefinitionCreationFlag = (enum("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH",
                                              "STRONGLY_TYPED") if major < 11
                                         else enum("NetworkDefinitionCreationFlag",
                                                   "STRONGLY_TYPED"))
    flags = ["FP16", "INT8", "DEBUG", "GPU_FALLBACK", "TF32", "VERSION_COMPATIBLE",
             "OBEY_PRECISION_CONSTRAINTS"]
    if major >= 11:  # removed in 11.0 with weak typing
        flags = [f for f in flags if f not in ("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS")]
    trt.BuilderFlag = enum("BuilderFlag", *flags)
    trt.MemoryPoolType = enum("MemoryPoolType", "WORKSPACE")
    trt.DeviceType = enum("DeviceType", "GPU", "DLA")
    trt.DataType = enum("DataType", "FLOAT", "HALF", "INT8", "INT32", "INT64", "BOOL")
    trt.LayerType = enum("LayerType", *sorted({k for k, _, _ in LAYERS}))
    trt.ProfilingVerbosity = enum("ProfilingVerbosity", "DETAILED")
    trt.LayerInformationFormat = enum("LayerInformationFormat", "JSON")
    trt.Dims = lambda shape: tuple(shape)

    class Logger(strict_class("Logger")):
        WARNING = 2

        def __init__(self, level):
            pass

    class Parser(rec("OnnxParser")):
        num_errors = 0

        def __init__(self, network, logger):
            super().__init__(log, "parser")

        def parse_from_file(self, path):
            log.append(("parser.parse_from_file", (path,)))
            return True

    class Builder(rec("Builder")):
        def __init__(self, logger):
            super().__init__(log, "builder")

        def create_network(self, flags):
            log.append(("builder.create_network", (flags,)))
            return fake_network(trt, log)

        def build_serialized_network(self, network, config):
            log.append(("builder.build_serialized_network", ()))
            return b"PLAN"

    class Config(rec("IBuilderConfig")):
        def get_timing_cache(self):
            cache = strict_class("ITimingCache")()
            object.__setattr__(cache, "serialize", lambda: b"CACHE")
            return cache

    trt.Logger, trt.OnnxParser, trt.Builder = Logger, Parser, Builder
    Builder.create_builder_config = lambda self: Config(log, "config")
    return trt


def run_fake_build(tmp_path, monkeypatch, version, precision, **kw):
    log: list = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, log))
    monkeypatch.setattr(targets, "query_cuda_device", lambda: ("NVIDIA H100", "9.0"))
    linted = []
    monkeypatch.setattr(build_mod, "check_graph_for", lambda onnx, v: linted.append(v))
    onnx = tmp_path / f"model.{precision}.onnx"
    onnx.write_bytes(b"onnx")
    opts = BuildOptions(onnx, tiny_contract(), precision, PRESETS["datacenter"],
                        timing_cache=tmp_path / "timing.cache", use_polygraphy=False, **kw)
    result = build_mod.build_engine(opts, platform=Platform(jetson=False))
    assert linted == [version]  # the graph is linted for the parser that builds it
    return result, log


def names(log):
    return [n for n, _ in log]


def test_tensorrt_11_build_makes_no_weak_typing_call(tmp_path, monkeypatch):
    result, log = run_fake_build(tmp_path, monkeypatch, "11.0.0", "int8")
    assert ("builder.create_network", (1 << 0,)) in log  # 1 << STRONGLY_TYPED (0 on 11)
    set_flags = [args[0] for n, args in log if n == "config.set_flag"]
    assert set_flags == []  # no FP16/INT8 (they do not even exist on 11)
    assert result.engine.read_bytes() == b"PLAN"
    assert (tmp_path / "timing.cache").read_bytes() == b"CACHE"
    manifest = read_manifest(result.engine)
    assert manifest.build_path == "strongly-typed" and manifest.machine.compute_capability == "9.0"
    assert manifest.profile_shapes["video"][2] == [4, 4, 3, 32, 32]


def test_tensorrt_10_build_is_strongly_typed_with_profile_workspace_and_cache(tmp_path,
                                                                              monkeypatch):
    (tmp_path / "timing.cache").write_bytes(b"OLD")
    _, log = run_fake_build(tmp_path, monkeypatch, "10.3.0", "fp16", version_compatible=True)
    assert ("builder.create_network", (1 << 1,)) in log  # STRONGLY_TYPED is 1 on 10.x
    assert ("config.set_memory_pool_limit", (0, 8192 << 20)) in log
    assert ("config.builder_optimization_level=", (3,)) in log
    assert ("config.create_timing_cache", (b"OLD",)) in log  # reused across builds
    assert ("config.set_flag", (5,)) in log  # VERSION_COMPATIBLE
    assert not [a for n, a in log if n == "config.set_flag" and a[0] in (0, 1)]  # no FP16/INT8
    shapes = [a for n, a in log if n == "create_optimization_profile.set_shape"]
    assert shapes[0] == ("video", (1, 4, 3, 32, 32), (2, 4, 3, 32, 32), (4, 4, 3, 32, 32))


def test_tensorrt_86_int8_uses_flags_and_explicit_batch(tmp_path, monkeypatch):
    result, log = run_fake_build(tmp_path, monkeypatch, "8.6.2", "int8")
    assert ("builder.create_network", (1 << 0,)) in log  # EXPLICIT_BATCH
    assert ("config.set_flag", (0,)) in log and ("config.set_flag", (1,)) in log  # FP16, INT8
    assert ("config.clear_flag", (4,)) in log  # TF32 off
    assert ("config.set_flag", (6,)) in log  # OBEY_PRECISION_CONSTRAINTS
    assert read_manifest(result.engine).tf32 is False


def test_weak_typing_pins_every_float_layer_to_the_files_type(tmp_path, monkeypatch):
    """8.x with the FP16 flag may run any layer in FP16: the FP32 layer (the selection path)
    is pinned to FP32, the FP16 ones to FP16; Q/DQ, shape and constant layers, and the
    quantized matrix product fed by the DequantizeLinear, are left alone."""
    _, log = run_fake_build(tmp_path, monkeypatch, "8.5.2", "fp16")
    pinned = {n.split(".")[0]: a[0] for n, a in log if n.endswith(".precision=")}
    assert pinned == {"layer0": 1, "layer1": 0}  # MATRIX_MULTIPLY HALF, CONVOLUTION FLOAT
    assert ("layer1.set_output_type", (0, 0)) in log
    assert ("config.set_flag", (6,)) in log


def test_fp32_on_tensorrt_8_pins_nothing(tmp_path, monkeypatch):
    _, log = run_fake_build(tmp_path, monkeypatch, "8.6.2", "fp32")
    assert not [n for n, _ in log if n.endswith(".precision=")]
    assert not [a for n, a in log if n == "config.set_flag" and a[0] in (0, 1, 6)]


def fake_polygraphy(calls: dict) -> types.ModuleType:
    """polygraphy.backend.trt with the loaders we call, recording their keyword arguments."""
    ptrt = types.ModuleType("polygraphy.backend.trt")

    class Profile:
        def add(self, *args):
            return self

    def record(name, result=None):
        def loader(*args, **kwargs):
            calls[name] = kwargs
            return result
        return loader

    ptrt.Profile = Profile
    ptrt.NetworkFromOnnxPath = record("NetworkFromOnnxPath", "network")
    ptrt.CreateConfig = record("CreateConfig")
    ptrt.EngineBytesFromNetwork = record("EngineBytesFromNetwork", lambda: b"PLAN")
    return ptrt


@pytest.mark.parametrize("version, typed, extras", [
    ("8.5.2", False, set()),  # weak typing: the direct path, which pins the file's types
    ("8.6.2", False, set()),
    ("10.3.0", True, {"builder_optimization_level"}),
])
def test_polygraphy_loaders_get_only_the_options_in_use(tmp_path, monkeypatch, version, typed,
                                                         extras):
    calls: dict = {}
    monkeypatch.setitem(sys.modules, "polygraphy.backend.trt", fake_polygraphy(calls))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, []))
    monkeypatch.setattr(targets, "query_cuda_device", lambda: ("NVIDIA H100", "9.0"))
    monkeypatch.setattr(build_mod, "check_graph_for", lambda onnx, v: None)
    onnx = tmp_path / "model.fp16.onnx"
    onnx.write_bytes(b"onnx")
    opts = BuildOptions(onnx, tiny_contract(), "fp16", PRESETS["datacenter"],
                        timing_cache=tmp_path / "timing.cache", use_polygraphy=True)
    result = build_mod.build_engine(opts, platform=Platform(jetson=False))
    assert result.engine.read_bytes() == b"PLAN"
    if not typed:
        assert calls == {}
        return
    assert calls["NetworkFromOnnxPath"] == {"strongly_typed": True}
    base = {"profiles", "tf32", "memory_pool_limits"} if opts.workspace_mb else {"profiles",
                                                                                 "tf32"}
    assert set(calls["CreateConfig"]) == base | extras


def test_cli_without_tensorrt_points_to_the_device_kit(tmp_path, capsys):
    artifact_manifest().write(tmp_path)
    (tmp_path / "model.fp16.onnx").write_bytes(b"onnx")
    code = build_main(["--onnx", str(tmp_path / "model.fp16.onnx"), "--target", "orin-nx"])
    err = capsys.readouterr()
    assert "target     orin-nx" in err.out
    if "tensorrt" in sys.modules:  # pragma: no cover - a machine with TensorRT
        pytest.skip("TensorRT is installed")
    assert code == 2 and "build_on_device.sh" in err.err


def test_cli_refuses_a_file_outside_an_artifact(tmp_path, capsys):
    (tmp_path / "x.onnx").write_bytes(b"onnx")
    assert build_main(["--onnx", str(tmp_path / "x.onnx"), "--target", "thor"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("version, available", [
    ("8.5.2", True), ("8.6.2", True), ("10.3.0", True), ("10.7.0.23", True), ("10.8.0", False),
    ("10.13.3", False), ("11.0.0", False), ("11.4.0", False), ("11.4.1", True), ("11.5.0", True)])
def test_dla_exists_up_to_tensorrt_10_7_and_again_from_11_4_1(version, available):
    from twbert_export.trt.version import dla_available

    assert dla_available(version) == available


def test_a_dla_build_on_a_tensorrt_without_dla_is_refused_before_building(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.13.3", []))
    onnx = tmp_path / "model.fp16.onnx"
    onnx.write_bytes(b"onnx")
    opts = BuildOptions(onnx, tiny_contract(), "fp16", PRESETS["agx-orin"], dla_core=0,
                        timing_cache=tmp_path / "timing.cache", use_polygraphy=False)
    with pytest.raises(ValueError, match="TensorRT 10.13.3 has no DLA support"):
        build_mod.build_engine(opts, platform=Platform(jetson=True))
    assert not (tmp_path / "model.fp16.engine").exists()


def test_a_trtexec_engine_gets_its_sidecar_without_tensorrt(tmp_path, capsys, monkeypatch):
    """build_on_device.sh records what trtexec built, so the runner's preflight can check it."""
    import json

    monkeypatch.setattr(targets, "query_cuda_device", lambda: ("Orin (nvgpu)", "8.7"))
    artifact_manifest().write(tmp_path)
    (tmp_path / "model.fp16.onnx").write_bytes(b"onnx")
    args = ["--onnx", str(tmp_path / "model.fp16.onnx"), "--target", "agx-orin",
            "--workspace-mb", "1024", "--record-trtexec-build", "11.4.1"]
    assert build_main(args) == 2  # no engine yet
    assert "build it first" in capsys.readouterr().err
    (tmp_path / "model.fp16.engine").write_bytes(b"PLAN")
    dla_10 = [a if a != "11.4.1" else "10.3.0" for a in args] + ["--dla-core", "1"]
    assert build_main(dla_10) == 2  # DLA before 11: weak typing, the Python builder's job
    assert "trtexec cannot build fp16 for DLA on TensorRT 10.3.0" in capsys.readouterr().err
    assert build_main([*args, "--dla-core", "1"]) == 0
    manifest = read_manifest(tmp_path / "model.fp16.engine")
    assert manifest.build_path == "strongly-typed (trtexec)" and manifest.tf32 is False
    assert manifest.machine.tensorrt_version == "11.4.1"
    assert manifest.machine.compute_capability == "8.7"
    assert manifest.dla_core == 1 and manifest.workspace_mb == 1024
    assert manifest.profile_shapes["video"][0] == manifest.profile_shapes["video"][2]  # static
    assert (tmp_path / "model.fp16.engine").read_bytes() == b"PLAN"


# -- which file a TensorRT version builds, checked with that parser's lint -----------------------
def reduce_l2_artifact(tmp_path, trt8: str | None):
    """An artifact whose model.fp16.onnx is an opset-19 ReduceL2 (axes as an input) and whose
    model.fp16.trt8.onnx is `trt8`: "converted", "unconverted" (a copy) or None (absent)."""
    import json

    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from twbert_export.export.legacy import to_trt8_graph

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])
    node = helper.make_node("ReduceL2", ["x", "axes"], ["y"], keepdims=1, name="norm")
    graph = helper.make_graph([node], "g", [x], [y],
                              [numpy_helper.from_array(np.array([-1], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "model.fp16.onnx"))
    if trt8 == "converted":
        to_trt8_graph(tmp_path / "model.fp16.onnx", tmp_path / "model.fp16.trt8.onnx", "8.5")
    elif trt8 == "unconverted":
        onnx.save(model, str(tmp_path / "model.fp16.trt8.onnx"))
    artifact_manifest(("fp16",), trt8=trt8 is not None).write(tmp_path)
    return tmp_path / "model.fp16.onnx"


def error_and_hint(stderr: str) -> str:
    """The error line of a refusal that printed one `error:` line and one `hint:` line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), \
        lines
    return lines[0]


@pytest.mark.parametrize("parser, trt8, code, says", [
    ("8.6", "converted", 0, "onnx       model.fp16.trt8.onnx (TensorRT 8.6 needs the opset-17"),
    ("8.5", "converted", 0, "lint       model.fp16.trt8.onnx: TensorRT 8.5 parser: no errors"),
    ("10", None, 0, "lint       model.fp16.onnx: TensorRT 10 parser: no errors"),
    ("8.6", "unconverted", 2, "TensorRT 8.6 would reject or mis-import it: node norm (ReduceL2)"),
    ("8.6", None, 2, "has no TensorRT 8.x graph for fp16: re-export it"),
    ("8.4", "converted", 2, "TensorRT 8.4 is too old"),
])
def test_build_picks_the_file_the_parser_needs_and_lints_it_first(tmp_path, capsys, parser, trt8,
                                                                  code, says):
    onnx_path = reduce_l2_artifact(tmp_path, trt8)
    assert build_main(["--onnx", str(onnx_path), "--parser", parser]) == code
    out = capsys.readouterr()
    assert says in (out.out if code == 0 else out.err)
    if code:  # the error line and its hint, no traceback
        assert error_and_hint(out.err)


def test_an_installed_tensorrt_84_is_refused_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("8.4.1", []))
    onnx_path = reduce_l2_artifact(tmp_path, "converted")
    assert build_main(["--onnx", str(onnx_path), "--target", "orin-nx"]) == 2
    err = capsys.readouterr().err
    assert "TensorRT 8.4.1 is too old" in error_and_hint(err)


def test_the_layer_report_counts_dla_and_gpu_layers(tmp_path, capsys):
    """From trtexec's build log (its Layers Running on DLA / GPU lists) or the inspector's
    JSON; a Myelin subgraph is named {ForeignNode[...]} too but runs on the GPU."""
    import json

    log = ("[I] [TRT] ---------- Layers Running on DLA ----------\n"
           "[I] [TRT] [DlaLayer] {ForeignNode[/video/patch_embed/Conv.../Add_3]}\n"
           "[I] [TRT] ---------- Layers Running on GPU ----------\n"
           "[I] [TRT] [GpuLayer] MYELIN: {ForeignNode[/text/MatMul.../Softmax]}\n"
           "[I] [TRT] [GpuLayer] SHUFFLE: /selector/Reshape\n")
    path = tmp_path / "model.fp16.engine.build.log"
    path.write_text(log)
    assert build_mod.layer_placement(log) == {"DLA": 1, "GPU": 2}
    assert build_main(["--layer-report", str(path)]) == 0
    assert "1 on DLA, 2 on GPU" in capsys.readouterr().out
    layers = {"Layers": [{"Name": "{ForeignNode[/text/MatMul.../Softmax]}", "LayerType": "Myelin"},
                         {"Name": "{ForeignNode[/video/Conv]}", "LayerType": "DLA"}]}
    assert build_mod.layer_placement(json.dumps(layers)) == {"DLA": 1, "GPU": 1}


# -- `build --artifact DIR --graphs ...`: the split graphs, one engine at a time ----------------
SPLIT = ["text", "video_stem", "select", "fuse"]


@pytest.fixture
def artifact(tmp_path, monkeypatch):
    def make(version):
        log: list = []
        monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version, log))
        monkeypatch.setattr(targets, "query_cuda_device", lambda: ("NVIDIA H100", "9.0"))
        monkeypatch.setattr(targets, "detect_platform", lambda: Platform(jetson=False))
        monkeypatch.setattr(build_mod, "check_graph_for", lambda onnx, v: None)
        monkeypatch.setattr(build_mod, "_build_polygraphy", build_mod._build_direct)
        manifest = split_manifest()
        manifest.write(tmp_path)
        for entry in manifest.files:
            (tmp_path / entry.path).write_bytes(b"onnx")
        return tmp_path, log
    return make


def build(directory, *extra):
    return build_main(["--artifact", str(directory), "--target", "datacenter", "--timing-cache",
                       str(directory / "timing.cache"), *extra])


@pytest.mark.parametrize("graphs, built", [
    ("split", SPLIT), ("model", ["model"]), (None, ["model", *SPLIT])])
def test_each_selected_graph_is_built_in_turn_with_its_own_profile(artifact, capsys, graphs,
                                                                    built):
    directory, log = artifact("10.3.0")
    assert build(directory, "--precision", "fp16", *(["--graphs", graphs] if graphs else [])) == 0
    parsed = [args[0] for name, args in log if name == "parser.parse_from_file"]
    assert parsed == [str(directory / f"{g}.fp16.onnx") for g in built]
    # one network parsed and built before the next is created: one builder at a time
    steps = [n for n, _ in log if n in ("builder.create_network",
                                        "builder.build_serialized_network")]
    assert steps == ["builder.create_network", "builder.build_serialized_network"] * len(built)
    contracts = tiny_split_contracts()
    for graph in built:
        sidecar = read_manifest(directory / f"{graph}.fp16.engine")
        assert sidecar.tf32 is False and sidecar.onnx == f"{graph}.fp16.onnx"
        if graph in contracts:  # the graph's own inputs and MAX batch, not the whole model's
            expected = {t.name: [list(s) for s in shapes]
                        for t, shapes in zip(contracts[graph].inputs,
                                             contracts[graph].profile_shapes().values())}
            assert sidecar.profile_shapes == expected
    out = capsys.readouterr().out
    assert out.count("one engine at a time") == len(built)


def test_tensorrt_86_builds_each_split_graphs_trt8_twin_weakly_typed_and_pinned(artifact):
    directory, log = artifact("8.6.2")
    assert build(directory, "--graphs", "split", "--precision", "fp16") == 0
    parsed = [args[0] for name, args in log if name == "parser.parse_from_file"]
    assert parsed == [str(directory / f"{g}.fp16.trt8.onnx") for g in SPLIT]
    assert log.count(("config.clear_flag", (4,))) == 4  # TF32 off for every engine
    for graph in SPLIT:
        assert read_manifest(directory / f"{graph}.fp16.trt8.engine").tf32 is False


def test_a_missing_graph_or_mixing_modes_is_bad_input_with_one_line(artifact, capsys):
    directory, _ = artifact("10.3.0")
    assert build(directory, "--graphs", "split", "--precision", "int8") == 2
    err = capsys.readouterr().err
    assert "has no int8 file for text, video_stem, select, fuse" in error_and_hint(err)
    assert build_main(["--artifact", str(directory), "--onnx", "x.onnx"]) == 2
    assert build_main(["--onnx", str(directory / "text.fp16.onnx"), "--graphs", "split"]) == 2


def test_a_single_split_file_with_onnx_gets_its_graphs_profile(artifact):
    directory, log = artifact("10.3.0")
    assert build_main(["--onnx", str(directory / "select.fp16.onnx"), "--target", "datacenter",
                       "--timing-cache", str(directory / "timing.cache")]) == 0
    shapes = [a for n, a in log if n == "create_optimization_profile.set_shape"]
    assert [s[0] for s in shapes] == ["stem", "text_cls"]
    assert shapes[0][3] == (4, 4, 5, 6)
