"""Deployment targets: named presets and detection of the machine we run on.

Torch-free and tensorrt-free: detection reads text (/etc/nv_tegra_release, the device-tree
model, /proc/meminfo, `nvidia-smi` output), so every rule is testable from recorded samples.

A preset holds the build defaults that depend on the device: the builder workspace cap (sized
so that an 8 GB board does not get its build killed for memory), the builder optimization
level, how many DLA cores the board has, and the compute capability an engine for it has.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .engine_manifest import MachineInfo


class TargetError(ValueError):
    """No target could be chosen (unknown preset name, no GPU found)."""


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    jetson: bool
    workspace_mb: int | None  # builder workspace cap; None: TensorRT's default (device memory)
    builder_optimization_level: int = 3  # TensorRT's default; 0..5
    dla_cores: int = 0  # DLA cores on the board (0: none)
    compute_capability: str | None = None  # "8.7"; None where it varies or is unconfirmed
    note: str = ""


PRESETS: dict[str, Target] = {t.name: t for t in (
    Target("orin-nano-8gb", "Jetson Orin Nano 8GB (JetPack 5.1 / 6.x)", jetson=True,
           workspace_mb=1024, dla_cores=0, compute_capability="8.7",
           note="shared 8 GB: build one engine at a time, close other programs"),
    # DLA cores per module: NVIDIA's Jetson Orin NX series module specification (16GB: 2x
    # NVDLA v2.0, 8GB: 1x); the Orin Nano has none. Detection tells them apart by memory.
    Target("orin-nx", "Jetson Orin NX 8GB", jetson=True, workspace_mb=1536,
           dla_cores=1, compute_capability="8.7",
           note="8 GB shared: one engine at a time; DLA with TensorRT <= 10.7 only (the "
                "11.4.1 DLA is documented for the AGX Orin)"),
    Target("orin-nx-16gb", "Jetson Orin NX 16GB", jetson=True, workspace_mb=3072,
           dla_cores=2, compute_capability="8.7",
           note="DLA with TensorRT <= 10.7 only (the 11.4.1 DLA is documented for the AGX Orin)"),
    Target("agx-orin", "Jetson AGX Orin 32GB / 64GB", jetson=True, workspace_mb=4096,
           dla_cores=2, compute_capability="8.7",
           note="DLA with TensorRT <= 10.7 (JetPack 5.1 - 6.x) or >= 11.4.1 on JetPack >= 7.2.2"),
    Target("thor", "Jetson AGX Thor (JetPack 7.x)", jetson=True, workspace_mb=4096,
           dla_cores=0, compute_capability=None,
           note="no DLA on Thor; compute capability read from the device at build time"),
    Target("datacenter", "Data-centre / desktop GPU (A100, H100, L4, L40S, RTX ...)",
           jetson=False, workspace_mb=8192, dla_cores=0,
           note="compute capability read from nvidia-smi at build time"),
)}
TARGET_CHOICES = ("auto", *PRESETS)

# L4T release -> JetPack, from NVIDIA's JetPack release notes (major.minor of L4T -> JetPack).
L4T_TO_JETPACK = {
    "35.1": "5.0.2", "35.2": "5.1", "35.3": "5.1.1", "35.4": "5.1.2", "35.5": "5.1.3",
    "35.6": "5.1.4", "36.2": "6.0 DP", "36.3": "6.0", "36.4": "6.1/6.2", "38.2": "7.0",
}
# JetPack major.minor -> the TensorRT it ships (deployment-facts.md).
JETPACK_TENSORRT = {"5.0": "8.4", "5.1": "8.5.2", "6.0": "8.6.2", "6.1": "10.3", "6.2": "10.3",
                    "7.0": "10.13", "7.1": "10.13", "7.2": "10.16"}


@dataclass(frozen=True)
class Platform:
    """What detection found. gpu_name/compute_capability come from nvidia-smi (discrete GPUs);
    on a Jetson, from the device-tree model and the L4T release."""
    jetson: bool
    model: str = ""  # device-tree model or GPU name
    l4t: str | None = None  # "36.4.3"
    jetpack: str | None = None  # "6.1/6.2"
    memory_mb: int | None = None
    gpu_name: str | None = None
    compute_capability: str | None = None
    gpu_memory_mb: int | None = None
    power_mode: str | None = None  # Jetson: `nvpmodel -q`
    clocks_locked: bool | None = None  # Jetson: devfreq min == max (what jetson_clocks does)

    def expected_tensorrt(self) -> str | None:
        """The TensorRT the detected JetPack ships (None off Jetson or when unknown)."""
        if not self.jetpack:
            return None
        key = ".".join(self.jetpack.split()[0].split("/")[0].split(".")[:2])
        return JETPACK_TENSORRT.get(key)


# -- parsing recorded text -------------------------------------------------------------------
_TEGRA_RE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


def parse_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: ...' -> '36.4.3' (None if not an L4T file)."""
    m = _TEGRA_RE.search(text or "")
    return f"{m.group(1)}.{m.group(2).rstrip('.')}" if m else None


def jetpack_for_l4t(l4t: str | None) -> str | None:
    if not l4t:
        return None
    major_minor = ".".join(l4t.split(".")[:2])
    if l4t.startswith("36.4."):
        patch = int(l4t.split(".")[2] or 0)
        return "6.2" if patch >= 3 else "6.1"
    return L4T_TO_JETPACK.get(major_minor)


def parse_meminfo_mb(text: str) -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s+kB", text or "", re.M)
    return int(m.group(1)) // 1024 if m else None


def parse_nvidia_smi(text: str) -> list[dict[str, str | int | None]]:
    """Rows of `nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader`:
    'NVIDIA H100 80GB HBM3, 9.0, 81559 MiB' -> name, compute_capability, memory_mb."""
    gpus: list[dict[str, str | int | None]] = []
    for line in (text or "").splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not re.fullmatch(r"\d+\.\d+", parts[1]):
            continue
        mem = re.match(r"(\d+)\s*MiB", parts[2]) if len(parts) > 2 else None
        gpus.append({"name": parts[0], "compute_capability": parts[1],
                     "memory_mb": int(mem.group(1)) if mem else None})
    return gpus


def parse_nvpmodel(text: str | None) -> str | None:
    """`nvpmodel -q` ('NV Power Mode: MAXN\\n0') -> 'MAXN' (None if absent)."""
    m = re.search(r"NV Power Mode:\s*(\S+)", text or "")
    return m.group(1) if m else None


def clocks_locked(devfreq: dict[str, tuple[str, str]]) -> bool | None:
    """Whether every devfreq device (GPU, EMC...) has min_freq == max_freq, as `jetson_clocks`
    leaves them; devfreq maps a device to its (min_freq, max_freq) text. None: nothing read."""
    if not devfreq:
        return None
    return all(lo.strip() == hi.strip() for lo, hi in devfreq.values())


def classify(tegra_release: str | None = None, device_model: str | None = None,
             meminfo: str | None = None, nvidia_smi: str | None = None,
             nvpmodel: str | None = None, devfreq: dict[str, tuple[str, str]] | None = None
             ) -> Platform:
    """A Platform from the recorded text of the sources (any may be None)."""
    l4t = parse_tegra_release(tegra_release or "")
    model = (device_model or "").replace("\x00", "").strip()
    if l4t or "jetson" in model.lower():
        return Platform(jetson=True, model=model, l4t=l4t, jetpack=jetpack_for_l4t(l4t),
                        memory_mb=parse_meminfo_mb(meminfo or ""),
                        power_mode=parse_nvpmodel(nvpmodel),
                        clocks_locked=clocks_locked(devfreq or {}))
    gpus = parse_nvidia_smi(nvidia_smi or "")
    if not gpus:
        return Platform(jetson=False)
    gpu = gpus[0]
    return Platform(jetson=False, model=str(gpu["name"]), gpu_name=str(gpu["name"]),
                    compute_capability=str(gpu["compute_capability"]),
                    gpu_memory_mb=gpu["memory_mb"] if isinstance(gpu["memory_mb"], int) else None,
                    memory_mb=parse_meminfo_mb(meminfo or ""))


def preset_for(platform: Platform) -> tuple[Target, str]:
    """The preset for a detected platform, and why it was chosen."""
    if platform.jetson:
        model = platform.model.lower()
        for key, name in (("orin nano", "orin-nano-8gb"), ("orin nx", "orin-nx"),
                          ("agx orin", "agx-orin"), ("thor", "thor")):
            if key in model:
                why = f"Jetson model {platform.model!r}"
                if name == "orin-nx" and platform.memory_mb and platform.memory_mb > 12000:
                    return PRESETS["orin-nx-16gb"], why + f", {platform.memory_mb} MB memory"
                if name == "orin-nano-8gb" and platform.memory_mb and platform.memory_mb < 6000:
                    target = replace(PRESETS[name], workspace_mb=512,
                                     note="4 GB module: workspace halved")
                    return target, why + f", {platform.memory_mb} MB memory"
                return PRESETS[name], why
        major = (platform.l4t or "0").split(".")[0]
        if major == "38":
            return PRESETS["thor"], f"unknown Jetson model on L4T R{platform.l4t} (JetPack 7)"
        return PRESETS["orin-nano-8gb"], ("unknown Jetson model: the smallest Orin preset, "
                                          "the safest memory caps")
    if platform.gpu_name:
        target = replace(PRESETS["datacenter"], compute_capability=platform.compute_capability)
        if platform.gpu_memory_mb and platform.gpu_memory_mb < 16384:
            target = replace(target, workspace_mb=min(target.workspace_mb or 8192,
                                                      platform.gpu_memory_mb // 4))
        return target, (f"GPU {platform.gpu_name} (compute capability "
                        f"{platform.compute_capability})")
    raise TargetError("no NVIDIA GPU found: no /etc/nv_tegra_release and nvidia-smi lists no "
                      "GPU. Build on the target device, or pass --target NAME to write the "
                      f"commands for one of {', '.join(PRESETS)}")


# -- probing this machine ---------------------------------------------------------------------
def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _output(run: Callable[..., subprocess.CompletedProcess], *command: str) -> str | None:
    try:
        done = run(list(command), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _devfreq(root: Path) -> dict[str, tuple[str, str]]:
    found = {}
    for device in sorted((root / "sys/class/devfreq").glob("*")):
        lo, hi = _read(device / "min_freq"), _read(device / "max_freq")
        if lo is not None and hi is not None:
            found[device.name] = (lo, hi)
    return found


def detect_platform(root: Path = Path("/"), run: Callable[..., subprocess.CompletedProcess]
                    = subprocess.run) -> Platform:
    """Probe this machine (root and run are parameters so that tests can point them elsewhere)."""
    tegra = _read(root / "etc/nv_tegra_release")
    model = _read(root / "proc/device-tree/model")
    meminfo = _read(root / "proc/meminfo")
    if tegra:
        return classify(tegra, model, meminfo, nvpmodel=_output(run, "nvpmodel", "-q"),
                        devfreq=_devfreq(root))
    smi = _output(run, "nvidia-smi", "--query-gpu=name,compute_cap,memory.total",
                  "--format=csv,noheader")
    return classify(tegra, model, meminfo, smi)


def resolve_target(name: str, platform: Platform | None = None) -> tuple[Target, str]:
    """A preset by name, or for `auto` the preset of the (given or detected) platform."""
    if name == "auto":
        return preset_for(platform if platform is not None else detect_platform())
    if name not in PRESETS:
        raise TargetError(f"unknown --target {name!r}; choose from {', '.join(TARGET_CHOICES)}")
    return PRESETS[name], f"--target {name}"


def machine_info(trt_version: str, platform: Platform | None = None) -> MachineInfo:
    """This machine as an engine depends on it: the CUDA device (via libcuda, else what
    detection found), L4T / JetPack, and on a Jetson the power mode and clock state. The one
    reader used by the builder (sidecar) and by the runner (preflight)."""
    platform = platform if platform is not None else detect_platform()
    device = query_cuda_device()
    name, cc = device if device else (platform.gpu_name or platform.model or None,
                                      platform.compute_capability)
    return MachineInfo(tensorrt_version=trt_version, gpu_name=name, compute_capability=cc,
                       l4t=platform.l4t, jetpack=platform.jetpack,
                       power_mode=platform.power_mode, clocks_locked=platform.clocks_locked)


# -- the CUDA device, through the driver library (no pycuda, cuda-python or torch needed) ----
def query_cuda_device(index: int = 0) -> tuple[str, str] | None:
    """(name, "major.minor") of a CUDA device via libcuda's driver API (cuInit, cuDeviceGet,
    cuDeviceGetName, cuDeviceGetAttribute 75/76 = compute capability major/minor), or None
    when there is no driver or no device. libcuda ships with every NVIDIA driver and JetPack."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    device = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(device), index) != 0:
        return None
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    if (cuda.cuDeviceGetName(name, 256, device) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) != 0
            or cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) != 0):
        return None
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"
