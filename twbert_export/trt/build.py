"""Build a TensorRT engine from a precision-explicit ONNX file of an artifact.

Which path is taken depends on the TensorRT found (`plan_for`):

- TensorRT >= 10: a strongly typed network (`1 << int(NetworkDefinitionCreationFlag.
  STRONGLY_TYPED)`, or Polygraphy's `NetworkFromOnnxPath(strongly_typed=True)`): the FP16 /
  Q/DQ types in the file are what gets built. On 11.x no weak-typing call is made at all.
- TensorRT 8.5 / 8.6 (JetPack 5.1 / 6.0): the artifact's opset-17 `model.PRECISION.trt8.onnx`
  (twbert_export.export.legacy; `check_graph_for` lints the file with that parser's rules first); no
  strong typing, so `BuilderFlag.FP16` for the FP16 file, `INT8` + `FP16` for the Q/DQ file
  (explicit quantization: no calibrator), and every layer pinned to the type the file gives it
  (`pin_file_types`, OBEY_PRECISION_CONSTRAINTS): otherwise the FP16 flag lets TensorRT run the
  FP32 frame-selection nodes in FP16.
- DLA: only what is documented (`check_dla`), with the layer placement read back from the
  engine (`layer_placement`, `<engine>.layers.json`).

Everything else is shared: one optimization profile from the I/O contract (batch MIN:OPT:MAX;
static at OPT on DLA), a workspace cap, the builder optimization level, a timing cache file
read before and written after every build, DLA with GPU fallback, version compatibility.
TF32 stays off on every path (TF32_NOTE; trtexec gets `--noTF32`), recorded in the sidecar.

Polygraphy's loaders (`NetworkFromOnnxPath`, `CreateConfig`, `EngineBytesFromNetwork`) build
the strongly typed GPU engines when Polygraphy is installed; weak typing and DLA, and a Jetson
with only TensorRT and numpy, take the direct TensorRT API path. `tensorrt` is imported lazily;
nothing here imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorrt

from ..artifact.manifest import TRT8_FLAVOUR, ArtifactFormatError, Manifest
from ..artifact.contract import IOContract
from ..util import atomic_path, file_sha256, require
from .commands import default_timing_cache, engine_name, python_build_command
from .engine_manifest import EngineManifest, write_manifest
from .targets import Platform, Target, machine_info
from .version import (STRONG_TYPING_SINCE, UnsupportedTensorRT, check_precision, check_supported,
                      dla_available, parse_version)


class BuildError(RuntimeError):
    """TensorRT could not parse or build the network."""


@dataclass(frozen=True)
class BuildPlan:
    """How a precision is built on a TensorRT version."""
    trt_version: str
    precision: str
    strongly_typed: bool
    fp16_flag: bool = False
    int8_flag: bool = False
    # Weak typing lets the builder run any layer in FP16 once the FP16 flag is on (the FP32
    # frame-selection nodes included): pin every layer to the type the file gives it.
    pin_file_types: bool = False
    tf32: bool = False  # off on every path: see TF32_NOTE

    @property
    def path(self) -> str:
        return "strongly-typed" if self.strongly_typed else "precision-flags"

    def describe(self) -> str:
        if self.strongly_typed:
            return (f"TensorRT {self.trt_version}: strongly typed network, the precision written "
                    f"in the ONNX file ({self.precision}) is built as is; TF32 off")
        flags = [f for f, on in (("FP16", self.fp16_flag), ("INT8", self.int8_flag)) if on]
        return (f"TensorRT {self.trt_version}: no strong typing before 10.0, builder flags "
                f"{'+'.join(flags) or 'none (FP32)'} for the {self.precision} file"
                + (", every layer pinned to the file's type (obey precision constraints)"
                   if self.pin_file_types else "") + "; TF32 off")


# Why TF32 is off everywhere (Python builder, Polygraphy, trtexec --noTF32): validation measured
# the FP32 file at 1e-4 on the logits and exact frame choices, and the FP16 file keeps its 75
# frame-selection nodes in FP32 so that no frame flips. TF32 rounds FP32 matrix products to a
# 10-bit mantissa (relative error ~1e-3), an order above the FP32 budget, exactly in those nodes.
TF32_NOTE = "TF32 off: the FP32 selection nodes are what the parity gates protect"


def plan_for(trt_version: str, precision: str, dla: bool = False) -> BuildPlan:
    """The build of `precision` on `trt_version` (a DLA build when `dla`). Raises
    UnsupportedTensorRT (a ValueError) for a release or combination we do not build."""
    if precision not in ("fp32", "fp16", "int8w", "int8"):
        raise ValueError(f"precision must be fp32, fp16, int8w or int8, got {precision!r}")
    v = check_supported(trt_version)
    check_precision(trt_version, precision)  # int8w: 10.0 and later (strongly typed below)
    if dla:
        check_dla(trt_version, precision)
    if v >= STRONG_TYPING_SINCE and not (dla and v < (11, 0, 0)):
        return BuildPlan(trt_version, precision, strongly_typed=True)
    # 8.5 / 8.6, and DLA on 10.0-10.7 (documented with the FP16 flag, not strongly typed).
    weak = precision in ("fp16", "int8")
    return BuildPlan(trt_version, precision, strongly_typed=False, fp16_flag=weak,
                     int8_flag=precision == "int8", pin_file_types=weak)


def check_dla(trt_version: str, precision: str) -> None:
    """What a DLA build may be, per TensorRT release (documented behaviour only):
    - fp32: never (DLA runs FP16 and INT8).
    - 8.5 .. 10.7: FP16 with the FP16 builder flag (weak typing: TensorRT 10.7's trtexec sets
      FP16 and prefer-precision-constraints on every DLA build, sampleEngines.cpp); a Q/DQ
      (INT8) network is not documented to run on DLA there and falls back to the GPU silently:
      refused.
    - 10.8 .. 11.4.0: no DLA.
    - 11.4.1+: strongly typed FP16 or INT8 (the network's types decide), AGX Orin on JetPack
      >= 7.2.2 only ("Strongly Typed Networks for DLA", TensorRT 11.4.1)."""
    if precision == "fp32":
        raise UnsupportedTensorRT("DLA runs FP16 and INT8 only: build the fp16 or int8 file")
    if precision == "int8w":
        raise UnsupportedTensorRT("weight-only INT8 (int8w) is not documented to run on DLA "
                                  "(DLA runs FP16 and W8A8 INT8): build fp16 or int8 for DLA")
    if not dla_available(trt_version):
        raise UnsupportedTensorRT(f"TensorRT {trt_version} has no DLA support (DLA is in TensorRT "
                                  "<= 10.7 and >= 11.4.1); build for the GPU")
    if precision == "int8" and parse_version(trt_version) < (11, 0, 0):
        raise UnsupportedTensorRT(f"INT8 on DLA with TensorRT {trt_version}: a Q/DQ network is not "
                                  "documented to run on DLA before the strongly typed DLA of "
                                  "11.4.1 (it falls back to the GPU silently); build fp16 for DLA")


@dataclass
class BuildOptions:
    onnx: Path
    contract: IOContract
    precision: str
    target: Target
    engine: Path | None = None  # default: model.PRECISION.engine beside the ONNX file
    workspace_mb: int | None = None  # default: the target's cap
    optimization_level: int | None = None  # default: the target's level
    dla_core: int | None = None
    timing_cache: Path | None = None  # default: one per TensorRT version in ~/.cache
    version_compatible: bool = False
    use_polygraphy: bool | None = None  # None: when installed
    onnx_sha256: str | None = None

    def __post_init__(self) -> None:
        self.onnx = Path(self.onnx)
        if self.engine is None:
            self.engine = self.onnx.with_name(engine_name(self.onnx.name))
        if self.workspace_mb is None:
            self.workspace_mb = self.target.workspace_mb
        if self.optimization_level is None:
            self.optimization_level = self.target.builder_optimization_level

    def check(self) -> None:
        """Refuse option combinations TensorRT would reject late (or silently ignore)."""
        if self.dla_core is not None:
            if self.target.dla_cores == 0:
                raise ValueError(f"--dla-core: {self.target.description} has no DLA")
            if not 0 <= self.dla_core < self.target.dla_cores:
                raise ValueError(f"--dla-core {self.dla_core}: {self.target.name} has DLA cores "
                                 f"0..{self.target.dla_cores - 1}")
            if self.precision == "fp32":
                raise ValueError("DLA runs FP16 and INT8 only: build the fp16 or int8 file")
        if self.optimization_level is not None and not 0 <= self.optimization_level <= 5:
            raise ValueError("builder optimization level must be in 0..5")

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], ...]]:
        """Per input (min, opt, max); pinned to the OPT batch on DLA (static shapes only)."""
        if self.dla_core is not None:
            b = self.contract.batch.opt
            return {t.name: (t.concrete(b),) * 3 for t in self.contract.inputs}
        return dict(self.contract.profile_shapes())


@dataclass
class BuildResult:
    engine: Path
    manifest: EngineManifest
    plan: BuildPlan
    seconds: float
    notes: list[str] = field(default_factory=list)


def _load_cache(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


def _network_and_config_direct(opts: BuildOptions, plan: BuildPlan, logger: Any
                               ) -> tuple[Any, Any, Any, Any]:
    """The direct TensorRT API path (TensorRT 8.5 .. 11.x). Type-checked against
    tensorrt-stubs: the import below is typed for mypy and lazy at run time."""
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = require("tensorrt", "to build TensorRT engines")
    builder = trt.Builder(logger)
    flags = 0
    version = parse_version(plan.trt_version)
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif version < (10, 0, 0):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(opts.onnx)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT {plan.trt_version} cannot parse {opts.onnx.name}: "
                         + "; ".join(errors))
    config = builder.create_builder_config()
    if opts.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(opts.workspace_mb) << 20)
    if opts.optimization_level is not None and version >= (8, 6, 0):
        config.builder_optimization_level = opts.optimization_level
    if hasattr(trt.BuilderFlag, "TF32"):  # TF32_NOTE
        config.clear_flag(trt.BuilderFlag.TF32)
    if plan.fp16_flag:  # only ever set on weak typing (8.x, DLA before 11; plan_for)
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.int8_flag:
        config.set_flag(trt.BuilderFlag.INT8)
    if plan.pin_file_types:
        pin_file_types(network)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    if opts.dla_core is not None:  # the layer placement is read back from the engine
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in opts.profile_shapes().items():
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    assert opts.timing_cache is not None
    cache = config.create_timing_cache(_load_cache(opts.timing_cache))
    config.set_timing_cache(cache, False)
    if opts.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = opts.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if opts.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    return builder, network, config, parser


def pin_file_types(network: "tensorrt.INetworkDefinition") -> int:
    """Weak typing (8.x; DLA before 11) with the FP16 flag lets the builder run ANY layer in
    FP16, the FP32 frame-selection nodes and LayerNorm statistics of the file included. Pin
    each layer whose outputs are all FP32 (or all FP16) to that type, as a strongly typed build
    would. Q/DQ, constant and shape layers, and the layers fed by a DequantizeLinear (the
    quantized matrix products, whose INT8 precision the Q/DQ pair decides), keep TensorRT's own
    rules. Returns how many were pinned."""
    if TYPE_CHECKING:
        import tensorrt as trt
    else:
        trt = require("tensorrt", "to build TensorRT engines")
    floats = (trt.DataType.FLOAT, trt.DataType.HALF)
    skip = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE, trt.LayerType.CONSTANT,
            trt.LayerType.SHAPE)
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    dequantized = {layer.get_output(0).name for layer in layers
                   if layer.type == trt.LayerType.DEQUANTIZE}
    pinned = 0
    for layer in layers:
        inputs = (layer.get_input(j) for j in range(layer.num_inputs))
        if layer.type in skip or any(t is not None and t.name in dequantized for t in inputs):
            continue
        types = {layer.get_output(j).dtype for j in range(layer.num_outputs)}
        if len(types) == 1 and next(iter(types)) in floats:
            dtype = next(iter(types))
            layer.precision = dtype
            for j in range(layer.num_outputs):
                layer.set_output_type(j, dtype)
            pinned += 1
    return pinned


def layer_placement(report: str) -> dict[str, int]:
    """{"DLA": n, "GPU": m}: where the layers of a DLA build run, from either record TensorRT
    leaves of it.

    - The builder's log (trtexec's output; what `build_on_device.sh` keeps as
      `<engine>.build.log`): the "Layers Running on DLA / GPU" lists, one `[DlaLayer] ...` or
      `[GpuLayer] ...` line per layer.
    - The engine inspector's JSON (`--exportLayerInfo=FILE --profilingVerbosity=detailed`, or
      `IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`): a layer counts
      as DLA when its record names the DLA. (Not by its `{ForeignNode[...]}` name: Myelin's
      fused GPU subgraphs are named that way too.)"""
    import json
    import re

    if not report.lstrip().startswith("{"):
        return {"DLA": len(re.findall(r"\[DlaLayer\]", report)),
                "GPU": len(re.findall(r"\[GpuLayer\]", report))}
    counts = {"DLA": 0, "GPU": 0}
    for layer in json.loads(report).get("Layers", []):
        text = layer if isinstance(layer, str) else json.dumps(layer)
        counts["DLA" if re.search(r"\bDLA|Dla", text) else "GPU"] += 1
    return counts


def _engine_layer_info(trt: Any, data: bytes) -> str:
    """The engine inspector's JSON for serialised engine bytes (needs the device)."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(data)
    inspector = engine.create_engine_inspector()
    return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))


def _build_direct(trt: Any, opts: BuildOptions, plan: BuildPlan) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, config, _parser = _network_and_config_direct(opts, plan, logger)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT {plan.trt_version} failed to build {opts.onnx.name} (see "
                         "the log above; on an 8 GB Jetson try a smaller --workspace-mb)")
    assert opts.timing_cache is not None
    with atomic_path(opts.timing_cache) as tmp:
        tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _build_polygraphy(trt: Any, opts: BuildOptions, plan: BuildPlan) -> bytes:
    """Strongly typed GPU builds only (`build_engine` sends weak typing and DLA builds, which
    need `pin_file_types` and the layer placement, to the direct path)."""
    ptrt = require("polygraphy.backend.trt", "for the TensorRT loaders")
    network = ptrt.NetworkFromOnnxPath(str(opts.onnx), strongly_typed=True)
    profile = ptrt.Profile()
    for name, (lo, opt, hi) in opts.profile_shapes().items():
        profile.add(name, lo, opt, hi)
    kwargs: dict[str, Any] = {"profiles": [profile], "tf32": False}  # TF32_NOTE
    if parse_version(plan.trt_version) >= (8, 6, 0):
        if opts.optimization_level is not None:
            kwargs["builder_optimization_level"] = opts.optimization_level
        if opts.version_compatible:
            kwargs["version_compatible"] = True
    if opts.workspace_mb:
        kwargs["memory_pool_limits"] = {trt.MemoryPoolType.WORKSPACE:
                                        int(opts.workspace_mb) << 20}
    assert opts.timing_cache is not None
    if opts.timing_cache.is_file():
        kwargs["load_timing_cache"] = str(opts.timing_cache)
    create_config = ptrt.CreateConfig(**kwargs)

    opts.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    engine = ptrt.EngineBytesFromNetwork(network, config=create_config,
                                         save_timing_cache=str(opts.timing_cache))()
    return bytes(engine)


def write_engine_manifest(opts: BuildOptions, plan: BuildPlan, platform: Platform | None = None,
                          extra: dict[str, Any] | None = None, built_by: str = ""
                          ) -> EngineManifest:
    """The sidecar of opts.engine, describing this machine and the build settings."""
    assert opts.engine is not None
    shapes = {n: [list(s) for s in mom] for n, mom in opts.profile_shapes().items()}
    manifest = EngineManifest(
        engine=opts.engine.name, onnx=opts.onnx.name,
        onnx_sha256=opts.onnx_sha256 or file_sha256(opts.onnx), precision=opts.precision,
        build_path=plan.path + (f" ({built_by})" if built_by else ""),
        machine=machine_info(plan.trt_version, platform), profile_shapes=shapes,
        target=opts.target.name, workspace_mb=opts.workspace_mb,
        builder_optimization_level=opts.optimization_level, dla_core=opts.dla_core,
        version_compatible=opts.version_compatible, tf32=plan.tf32,
        rebuild_command=python_build_command(opts.onnx.name, "auto") + (
            f" --dla-core {opts.dla_core}" if opts.dla_core is not None else ""),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), extra=extra or {})
    write_manifest(manifest, opts.engine)
    return manifest


def record_trtexec_build(opts: BuildOptions, trt_version: str,
                         platform: Platform | None = None) -> EngineManifest:
    """Write the sidecar of an engine that trtexec built from opts.onnx with opts' settings
    (build_on_device.sh calls this after trtexec), so the runner's preflight can check it.
    Needs neither TensorRT's Python bindings nor a build."""
    assert opts.engine is not None
    if not opts.engine.is_file():
        raise ValueError(f"{opts.engine} does not exist: build it first (build_on_device.sh)")
    opts.check()
    plan = plan_for(trt_version, opts.precision, dla=opts.dla_core is not None)
    if plan.pin_file_types:  # build_on_device.sh sends these builds to the Python builder
        raise ValueError(f"trtexec cannot build {opts.precision}"
                         + (" for DLA" if opts.dla_core is not None else "")
                         + f" on TensorRT {trt_version} as validated (no strong typing: its "
                         f"--fp16 may run FP32 nodes in FP16); rebuild with "
                         f"`{python_build_command(opts.onnx.name)}`")
    return write_engine_manifest(opts, plan, platform, built_by="trtexec")


def build_engine(opts: BuildOptions, platform: Platform | None = None,
                 manifest_extra: dict[str, Any] | None = None) -> BuildResult:
    """Build opts.onnx into opts.engine and write the engine's sidecar manifest."""
    trt = require("tensorrt", "to build TensorRT engines")
    opts.check()
    plan = plan_for(trt.__version__, opts.precision, dla=opts.dla_core is not None)
    if opts.dla_core is not None and parse_version(trt.__version__) >= (11, 0, 0) \
            and opts.target.name != "agx-orin":
        raise UnsupportedTensorRT(f"DLA with TensorRT {trt.__version__} is documented for Jetson "
                                  "AGX Orin on JetPack >= 7.2.2 only; build for the GPU")
    if opts.version_compatible and parse_version(trt.__version__) < (8, 6, 0):
        raise ValueError(f"--version-compatible needs TensorRT >= 8.6 (found {trt.__version__})")
    check_graph_for(opts.onnx, trt.__version__)
    if opts.timing_cache is None:
        opts.timing_cache = default_timing_cache(trt.__version__)
    opts.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    notes = [plan.describe()]
    use_pg = opts.use_polygraphy
    if plan.pin_file_types or opts.dla_core is not None:
        use_pg = False  # pinning and layer placement need the network and the engine
    elif use_pg is None:
        try:
            require("polygraphy.backend.trt", "")
            use_pg = True
        except ImportError:
            use_pg = False
    notes.append("Polygraphy loaders" if use_pg else "TensorRT API")
    start = time.perf_counter()
    data = (_build_polygraphy if use_pg else _build_direct)(trt, opts, plan)
    seconds = time.perf_counter() - start
    assert opts.engine is not None
    with atomic_path(opts.engine) as tmp:
        tmp.write_bytes(data)  # exactly TensorRT's bytes: no header (trtexec/DeepStream read it)
    extra = dict(manifest_extra or {})
    if opts.dla_core is not None:
        info = _engine_layer_info(trt, data)
        layers_file = opts.engine.with_name(opts.engine.name + ".layers.json")
        with atomic_path(layers_file) as tmp:
            tmp.write_text(info)
        extra["layer_placement"] = layer_placement(info)
        notes.append("layers on DLA / GPU: {DLA} / {GPU} ({file})".format(
            **extra["layer_placement"], file=layers_file.name))
    manifest = write_engine_manifest(opts, plan, platform, extra)
    return BuildResult(opts.engine, manifest, plan, seconds, notes)


def _flavour_of(onnx: Path) -> str | None:
    """The flavour the artifact's manifest lists for the file (None: not listed)."""
    try:
        entry = Manifest.load(onnx.parent).entry_for(onnx)
    except ArtifactFormatError:
        return None
    return entry.flavour if entry else None


def check_graph_for(onnx: Path, trt_version: str) -> None:
    """Refuse (ValueError, one line) a file this TensorRT's parser would reject or mis-import:
    the lint with the rules of that parser release (8.5 / 8.6 / 10 / 11)."""
    from .lint import LintError, check_model, one_line

    major, minor, _ = parse_version(trt_version)
    parser = f"{major}.{minor}" if major == 8 else str(major)
    try:
        check_model(onnx, parser=parser)
    except ImportError:  # a Jetson with TensorRT and numpy only: no onnx to read the graph with
        if major == 8 and _flavour_of(onnx) != TRT8_FLAVOUR:
            raise ValueError(f"{onnx.name}: TensorRT {trt_version} mis-imports the opset-19 "
                             "graph; build the model.PRECISION.trt8.onnx file") from None
    except LintError as e:
        hint = (" (build the model.PRECISION.trt8.onnx file of the artifact)"
                if major == 8 else "")
        raise ValueError(one_line(e, onnx.name) + hint) from None
