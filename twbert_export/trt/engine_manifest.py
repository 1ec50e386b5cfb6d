"""The sidecar manifest of a TensorRT engine, and the preflight that reads it.

An engine is tied to the TensorRT version, the GPU (compute capability) and, on a Jetson, the
JetPack that built it. Loading it elsewhere fails inside TensorRT with an opaque message, so
the build writes `model.fp16.engine.json` beside `model.fp16.engine` (the engine file itself is
left exactly as TensorRT wrote it: trtexec and DeepStream read it), and the runner checks the
sidecar against the running machine BEFORE deserialising, refusing with a message that says
what the engine was built for and the command that rebuilds it.

Torch-free and tensorrt-free.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..util import write_json
from .version import parse_version

FORMAT = "twbert-trt-engine"
# (built with, runs on) majors a version-compatible engine crosses; the same major always works.
VERSION_COMPATIBLE_MAJORS = {(8, 9), (8, 10), (10, 11)}


class EngineMismatch(RuntimeError):
    """The engine was built for another machine or TensorRT; rebuild it here."""


@dataclass(frozen=True)
class MachineInfo:
    """What an engine depends on, for the machine that builds or runs it."""
    tensorrt_version: str
    gpu_name: str | None = None
    compute_capability: str | None = None  # "8.7"
    l4t: str | None = None
    jetpack: str | None = None
    # Jetson only, recorded (not compared): tactic timings depend on them.
    power_mode: str | None = None  # `nvpmodel -q`: "MAXN" / "15W" ...
    clocks_locked: bool | None = None  # jetson_clocks pinned the GPU/EMC clocks (None: unknown)


@dataclass
class EngineManifest:
    engine: str  # file name, beside the sidecar
    onnx: str  # file name in the artifact directory
    onnx_sha256: str
    precision: str
    build_path: str  # "strongly-typed" (TensorRT >= 10) or "precision-flags" (8.5/8.6)
    machine: MachineInfo
    profile_shapes: dict[str, list[list[int]]]  # input -> [min, opt, max]
    target: str = ""
    workspace_mb: int | None = None
    builder_optimization_level: int | None = None
    dla_core: int | None = None
    version_compatible: bool = False
    tf32: bool = False  # TF32 off on every build path (build.TF32_NOTE); trtexec gets --noTF32
    rebuild_command: str = ""
    created: str = ""
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineManifest":
        if d.get("format") != FORMAT:
            raise ValueError(f"not an engine manifest (format {d.get('format')!r})")
        d = dict(d)
        d["machine"] = MachineInfo(**d["machine"])
        return cls(**d)

    def built_for(self) -> str:
        m = self.machine
        where = f"{m.gpu_name or 'a GPU'} (compute capability {m.compute_capability or '?'})"
        if m.l4t:
            where += f", L4T R{m.l4t} / JetPack {m.jetpack or '?'}"
        return f"TensorRT {m.tensorrt_version} on {where}"


def sidecar_path(engine_path: str | Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_manifest(manifest: EngineManifest, engine_path: str | Path) -> Path:
    return write_json(sidecar_path(engine_path), manifest.to_dict())


def read_manifest(engine_path: str | Path) -> EngineManifest:
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise EngineMismatch(f"{engine_path} has no sidecar manifest {path.name}: it was not built "
                             "by `export.py build`, so what it was built for is unknown. Rebuild "
                             "it on this device with build_on_device.sh from its artifact "
                             "directory.")
    return EngineManifest.from_dict(json.loads(path.read_text()))


def mismatches(manifest: EngineManifest, here: MachineInfo) -> list[str]:
    """Reasons the engine cannot run here (empty: it can).

    TensorRT: an engine runs only on the TensorRT version that built it (major.minor.patch);
    a version-compatible engine (8.6+) also runs on newer runtimes of the same major, and
    across majors only from 8 to 9 or 10 and from 10 to 11 ("Version Compatibility" in the
    TensorRT 10.16 developer guide; "Engine Portability" in the 11.4 support matrix: a
    TensorRT 8 engine cannot run on a TensorRT 11 runtime). GPU: the compute capability must
    match. Jetson: the L4T major.minor must match (it fixes CUDA and the TensorRT build)."""
    built = manifest.machine
    reasons = []
    b, h = parse_version(built.tensorrt_version), parse_version(here.tensorrt_version)
    if manifest.version_compatible:
        if h < b:
            reasons.append(f"TensorRT {here.tensorrt_version} here; a version-compatible engine "
                           f"from {built.tensorrt_version} needs a runtime >= "
                           f"{built.tensorrt_version}")
        elif h[0] != b[0] and (b[0], h[0]) not in VERSION_COMPATIBLE_MAJORS:
            reasons.append(f"TensorRT {here.tensorrt_version} here; a version-compatible engine "
                           f"from TensorRT {b[0]} runs on TensorRT "
                           + " or ".join(str(m) for m in sorted(
                               {b[0]} | {r for s, r in VERSION_COMPATIBLE_MAJORS if s == b[0]})))
    elif b != h:
        reasons.append(f"TensorRT {here.tensorrt_version} here, engine built with "
                       f"{built.tensorrt_version}")
    if built.compute_capability and here.compute_capability \
            and built.compute_capability != here.compute_capability:
        reasons.append(f"GPU compute capability {here.compute_capability} here "
                       f"({here.gpu_name}), engine built for {built.compute_capability} "
                       f"({built.gpu_name})")
    if bool(built.l4t) != bool(here.l4t):
        reasons.append("engine built on " + ("a Jetson" if built.l4t else "a discrete GPU")
                       + ", this is " + ("a Jetson" if here.l4t else "not a Jetson"))
    elif built.l4t and here.l4t and \
            parse_version(built.l4t)[:2] != parse_version(here.l4t)[:2]:
        reasons.append(f"L4T R{here.l4t} here, engine built on R{built.l4t}")
    return reasons


def preflight(engine_path: str | Path, here: MachineInfo, onnx_sha256: str | None = None
              ) -> EngineManifest:
    """Read the sidecar and refuse (EngineMismatch) an engine that cannot run here. Pass
    onnx_sha256 (the manifest.json of the artifact has it) to also refuse a stale engine."""
    manifest = read_manifest(engine_path)
    reasons = mismatches(manifest, here)
    if onnx_sha256 and manifest.onnx_sha256 != onnx_sha256:
        reasons.append(f"{manifest.onnx} changed since the engine was built (sha256 "
                       f"{manifest.onnx_sha256[:12]} -> {onnx_sha256[:12]})")
    if reasons:
        rebuild = manifest.rebuild_command or "./build_on_device.sh"
        raise EngineMismatch(f"{Path(engine_path).name} was built for {manifest.built_for()}; "
                             f"it cannot run here: {'; '.join(reasons)}. Rebuild it on this "
                             f"device from its artifact directory: {rebuild}")
    return manifest
