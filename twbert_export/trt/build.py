"""Build a TensorRT engine from a precision-explicit ONNX file of an artifact.

Which path is taken depends on the TensorRT found (`plan_for`):

- TensorRT >= 10: a strongly typed network (`1 << int(NetworkDefinitionCreationFlag.
  STRONGLY_TYPED)`, or Polygraphy's `NetworkFromOnnxPath(strongly_typed=True)`): the FP16 /
  Q/DQ types in the file are what gets built. On 11.x no weak-typing call is made at all.
- TensorRT 8.5 / 8.6 (JetPack 5.1 / 6.0): no strong typing; `BuilderFlag.FP16` for the FP16
  file, `INT8` + `FP16` for the Q/DQ file (explicit quantization: no calibrator).

Everything else is shared: one optimization profile from the I/O contract (batch MIN:OPT:MAX;
static at OPT on DLA), a workspace cap, the builder optimization level, a timing cache file
read before and written after every build, DLA with GPU fallback, version compatibility.
TF32 stays off (parity with the FP32 ONNX file is what validation measured).

Polygraphy's loaders (`NetworkFromOnnxPath`, `CreateConfig`, `EngineBytesFromNetwork`) are
used when Polygraphy is installed; a Jetson with only TensorRT and numpy takes the equivalent
direct TensorRT API path. `tensorrt` is imported lazily; nothing here imports torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..contract import IOContract
from ..util import atomic_path, file_sha256, require
from .commands import default_timing_cache, engine_name, python_build_command
from .engine_manifest import EngineManifest, MachineInfo, write_manifest
from .targets import Platform, Target, detect_platform, dla_available, query_cuda_device


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

    @property
    def path(self) -> str:
        return "strongly-typed" if self.strongly_typed else "precision-flags"

    def describe(self) -> str:
        if self.strongly_typed:
            return (f"TensorRT {self.trt_version}: strongly typed network, the precision written "
                    f"in the ONNX file ({self.precision}) is built as is")
        flags = [f for f, on in (("FP16", self.fp16_flag), ("INT8", self.int8_flag)) if on]
        return (f"TensorRT {self.trt_version}: no strong typing before 10.0, builder flags "
                f"{'+'.join(flags) or 'none (FP32)'} for the {self.precision} file")


def version_tuple(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0"])[:2]
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def plan_for(trt_version: str, precision: str) -> BuildPlan:
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    v = version_tuple(trt_version)
    if v >= (10, 0):
        return BuildPlan(trt_version, precision, strongly_typed=True)
    if v < (8, 5):
        raise BuildError(f"TensorRT {trt_version} is too old: this toolchain needs 8.5 or newer "
                         "(JetPack >= 5.1)")
    return BuildPlan(trt_version, precision, strongly_typed=False,
                     fp16_flag=precision in ("fp16", "int8"), int8_flag=precision == "int8")


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


def machine_info(trt_version: str, platform: Platform | None = None) -> MachineInfo:
    """This machine as an engine sees it (CUDA device via libcuda, JetPack via L4T)."""
    platform = platform if platform is not None else detect_platform()
    device = query_cuda_device()
    name, cc = device if device else (platform.gpu_name or platform.model or None,
                                      platform.compute_capability)
    return MachineInfo(tensorrt_version=trt_version, gpu_name=name, compute_capability=cc,
                       l4t=platform.l4t, jetpack=platform.jetpack)


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
    if plan.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif version_tuple(plan.trt_version) < (10, 0):
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
    if opts.optimization_level is not None and version_tuple(plan.trt_version) >= (8, 6):
        config.builder_optimization_level = opts.optimization_level
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if plan.fp16_flag:  # only ever set on 8.x (plan_for)
        config.set_flag(trt.BuilderFlag.FP16)
    if plan.int8_flag:
        config.set_flag(trt.BuilderFlag.INT8)
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
    ptrt = require("polygraphy.backend.trt", "for the TensorRT loaders")
    # Options are passed only when used: the Polygraphy that comes with an 8.5/8.6 JetPack
    # predates `strongly_typed` (and 8.5 has no optimization levels or version compatibility).
    network = ptrt.NetworkFromOnnxPath(str(opts.onnx), **(
        {"strongly_typed": True} if plan.strongly_typed else {}))
    profile = ptrt.Profile()
    for name, (lo, opt, hi) in opts.profile_shapes().items():
        profile.add(name, lo, opt, hi)
    kwargs: dict[str, Any] = {"profiles": [profile], "tf32": False}
    if version_tuple(plan.trt_version) >= (8, 6):
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
    if plan.fp16_flag:  # weak typing exists only on 8.x; never passed on 10/11
        kwargs["fp16"] = True
    if plan.int8_flag:
        kwargs["int8"] = True
    if opts.dla_core is not None:
        kwargs.update(use_dla=True, allow_gpu_fallback=True)
    create_config = ptrt.CreateConfig(**kwargs)

    def config_loader(builder: Any, net: Any) -> Any:
        config = create_config(builder, net)
        if opts.dla_core is not None:  # CreateConfig always picks core 0
            config.DLA_core = opts.dla_core
        return config

    opts.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    engine = ptrt.EngineBytesFromNetwork(network, config=config_loader,
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
        version_compatible=opts.version_compatible,
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
    return write_engine_manifest(opts, plan_for(trt_version, opts.precision), platform,
                                 built_by="trtexec")


def build_engine(opts: BuildOptions, platform: Platform | None = None,
                 manifest_extra: dict[str, Any] | None = None) -> BuildResult:
    """Build opts.onnx into opts.engine and write the engine's sidecar manifest."""
    trt = require("tensorrt", "to build TensorRT engines")
    opts.check()
    plan = plan_for(trt.__version__, opts.precision)
    if opts.dla_core is not None and not dla_available(trt.__version__):
        raise ValueError(f"--dla-core: TensorRT {trt.__version__} has no DLA support (DLA is in "
                         "TensorRT <= 10.7 and >= 11.4.1); build for the GPU")
    if opts.version_compatible and version_tuple(trt.__version__) < (8, 6):
        raise ValueError(f"--version-compatible needs TensorRT >= 8.6 (found {trt.__version__})")
    if opts.timing_cache is None:
        opts.timing_cache = default_timing_cache(trt.__version__)
    opts.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    notes = [plan.describe()]
    if not plan.strongly_typed and opts.contract.opset > 17:
        notes.append(f"the ONNX file is opset {opts.contract.opset}; TensorRT "
                     f"{plan.trt_version}'s parser was written for opset <= 17 and may reject "
                     "some nodes")
    use_pg = opts.use_polygraphy
    if use_pg is None:
        try:
            require("polygraphy.backend.trt", "")
            use_pg = True
        except ImportError:
            use_pg = False
    notes.append("Polygraphy loaders" if use_pg else "TensorRT API (Polygraphy not installed)")
    start = time.perf_counter()
    data = (_build_polygraphy if use_pg else _build_direct)(trt, opts, plan)
    seconds = time.perf_counter() - start
    assert opts.engine is not None
    with atomic_path(opts.engine) as tmp:
        tmp.write_bytes(data)  # exactly TensorRT's bytes: no header (trtexec/DeepStream read it)
    manifest = write_engine_manifest(opts, plan, platform, manifest_extra)
    return BuildResult(opts.engine, manifest, plan, seconds, notes)
