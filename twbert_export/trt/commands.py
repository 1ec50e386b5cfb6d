"""The device kit written with every export: trtexec commands, build_on_device.sh, DEPLOY.md.

Engines are built ON the target (they are not portable across GPUs, TensorRT versions or
JetPacks), so an artifact ships the commands rather than engines. What differs per TensorRT
major (checked against the trtexec reference of each release):

- 8.5 / 8.6 (JetPack 5.1 / 6.0): no strong typing; the precision comes from flags: `--fp16`
  for the FP16 file, `--int8 --fp16` for the Q/DQ file (its non-quantized part is FP16).
  8.5 has neither `--builderOptimizationLevel` nor `--versionCompatible` (both from 8.6) and
  says `--buildOnly` where 8.6+ says `--skipInference`.
- 10.x: `--stronglyTyped`: the types written in the ONNX file are the types built.
- 11.x: every network is strongly typed; there are no precision flags at all.

Shapes come from the I/O contract's profile (batch MIN:OPT:MAX). DLA (Orin NX / AGX Orin)
runs only static shapes, so a DLA build pins every input to the OPT batch. Torch-free and
tensorrt-free.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..artifact import PRECISIONS, Manifest
from ..contract import IOContract
from ..util import write_text
from .targets import dla_available

DEFAULT_WORKSPACE_MB = 1024  # the kit's default: safe on an 8 GB Jetson
TIMING_CACHE_DIR = "${XDG_CACHE_HOME:-$HOME/.cache}/twbert-export"


def default_timing_cache(trt_version: str) -> Path:
    """Timing cache shared by every build on this machine, one file per TensorRT version (a
    cache only matches the TensorRT build, GPU and CUDA that wrote it)."""
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "twbert-export"
    return base / f"timing-trt{trt_version}.cache"


def parse_version(text: str) -> tuple[int, int]:
    parts = (text.split(".") + ["0"])[:2]
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"cannot read a TensorRT version from {text!r}") from None


def precision_flags(trt_version: tuple[int, int], precision: str) -> list[str]:
    """trtexec flags that set the precision of a precision-explicit ONNX file."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    major = trt_version[0]
    if major >= 11:
        return []  # strongly typed is the only mode; --fp16/--int8 do not exist
    if major >= 10:
        return ["--stronglyTyped"]
    return {"fp32": [], "fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}[precision]


def shape_flags(contract: IOContract, static_batch: int | None = None) -> list[str]:
    """--minShapes/--optShapes/--maxShapes from the contract (all three at static_batch when
    given: DLA needs static shapes)."""
    shapes = contract.profile_shapes()
    if static_batch is not None:
        shapes = {t.name: (t.concrete(static_batch),) * 3 for t in contract.inputs}
    flag = lambda i: ",".join(f"{n}:{'x'.join(map(str, s[i]))}"  # noqa: E731
                              for n, s in shapes.items())
    return [f"--minShapes={flag(0)}", f"--optShapes={flag(1)}", f"--maxShapes={flag(2)}"]


def trtexec_command(onnx: str, engine: str, contract: IOContract, precision: str,
                    trt_version: tuple[int, int], workspace_mb: int | str | None = None,
                    timing_cache: str | None = None, optimization_level: int | None = None,
                    dla_core: int | str | None = None, version_compatible: bool = False
                    ) -> list[str]:
    """The trtexec argument list (without the program) that builds `engine` from `onnx`."""
    major, minor = trt_version
    if dla_core is not None and precision == "fp32":
        raise ValueError("DLA runs FP16 and INT8 only: build the fp16 or int8 file for DLA")
    # Only major.minor is known here: a minor counts if any of its patches has DLA (11.4.1+);
    # build_on_device.sh checks the full version on the device.
    if dla_core is not None and not dla_available(f"{major}.{minor}.99"):
        raise ValueError(f"TensorRT {major}.{minor} has no DLA support (<= 10.7 and >= 11.4.1 do)")
    args = [f"--onnx={onnx}", f"--saveEngine={engine}", *precision_flags(trt_version, precision)]
    args += shape_flags(contract, contract.batch.opt if dla_core is not None else None)
    if workspace_mb is not None:
        args.append(f"--memPoolSize=workspace:{workspace_mb}")  # MiB
    if timing_cache:
        args.append(f"--timingCacheFile={timing_cache}")
    has_86 = (major, minor) >= (8, 6)
    if optimization_level is not None and has_86:
        args.append(f"--builderOptimizationLevel={optimization_level}")
    if version_compatible:
        if not has_86:
            raise ValueError("version-compatible engines need TensorRT >= 8.6")
        args.append("--versionCompatible")
    if dla_core is not None:
        args += [f"--useDLACore={dla_core}", "--allowGPUFallback"]
    args.append("--skipInference" if has_86 else "--buildOnly")
    return args


def python_build_command(onnx: str, target: str = "auto", extra: str = "") -> str:
    return f"python3 -m twbert_export.trt.cli --onnx {shlex.quote(onnx)} --target {target}" + (
        f" {extra}" if extra else "")


def engine_name(onnx_name: str) -> str:
    return onnx_name[:-len(".onnx")] + ".engine" if onnx_name.endswith(".onnx") else \
        onnx_name + ".engine"


# -- build_on_device.sh ------------------------------------------------------------------------
def _bash_array(args: list[str]) -> str:
    """Quote for bash, leaving ${VAR} references expandable."""
    out = []
    for a in args:
        out.append(f'"{a}"' if "$" in a else shlex.quote(a))
    return "(" + " ".join(out) + ")"


def _model_files(manifest: Manifest) -> dict[str, str]:
    """precision -> file name of the whole-model graph, default flavour."""
    return {p: entry.path for p in manifest.precisions if (entry := manifest.file(p))}


def build_script(manifest: Manifest) -> str:
    contract = manifest.contract
    files = _model_files(manifest)
    default = next(p for p in reversed(PRECISIONS) if p in files)
    dyn, static = shape_flags(contract), shape_flags(contract, contract.batch.opt)
    lines = [
        "#!/usr/bin/env bash",
        "# Build a TensorRT engine from this artifact ON the device that will run it.",
        "#   ./build_on_device.sh [fp32|fp16|int8] [--python]",
        f"# Default precision: {default}. Environment: WORKSPACE_MB (default "
        f"{DEFAULT_WORKSPACE_MB}, sized for 8 GB Jetsons),",
        "# OPT_LEVEL (builder optimization level, default 3), DLA_CORE (AGX Orin / Orin NX only;",
        "# pins the batch to the profile's OPT value), TIMING_CACHE, TRTEXEC, TRT_VERSION.",
        "# --python builds with `python3 -m twbert_export.trt.cli` instead of trtexec (needs the",
        "# twbert_export package and TensorRT's Python bindings; writes the sidecar manifest the",
        "# runner's preflight reads). Generated by export.py; see DEPLOY.md.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        f'PRECISION="${{1:-{default}}}"',
        'MODE="${2:-trtexec}"',
        "case \"$PRECISION\" in",
        *[f"  {p}) ONNX={shlex.quote(files[p])} ;;" for p in PRECISIONS if p in files],
        f"  *) echo \"precision '$PRECISION' is not in this artifact ({' '.join(files)})\" >&2;"
        " exit 2 ;;",
        "esac",
        "ENGINE=\"${ONNX%.onnx}.engine\"",
        f"WORKSPACE_MB=\"${{WORKSPACE_MB:-{DEFAULT_WORKSPACE_MB}}}\"",
        'OPT_LEVEL="${OPT_LEVEL:-3}"',
        'if [ -z "${TRT_VERSION:-}" ]; then',
        "  TRT_VERSION=\"$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null"
        " || dpkg-query -W -f='${Version}' libnvinfer-bin 2>/dev/null || true)\"",
        "fi",
        'if [ -z "$TRT_VERSION" ]; then',
        '  echo "cannot tell the TensorRT version: install TensorRT (JetPack ships it) or set '
        'TRT_VERSION=10.3" >&2; exit 2',
        "fi",
        'TRT_MAJOR="${TRT_VERSION%%.*}"',
        'TRT_MINOR="$(echo "$TRT_VERSION" | cut -d. -f2)"',
        f'TIMING_CACHE="${{TIMING_CACHE:-{TIMING_CACHE_DIR}/timing-trt$TRT_VERSION.cache}}"',
        'mkdir -p "$(dirname "$TIMING_CACHE")"',
        "",
        'if [ "$MODE" = "--python" ]; then',
        "  EXTRA=(--workspace-mb \"$WORKSPACE_MB\" --timing-cache \"$TIMING_CACHE\")",
        '  if [ -n "${DLA_CORE:-}" ]; then EXTRA+=(--dla-core "$DLA_CORE"); fi',
        '  set -x',
        '  exec python3 -m twbert_export.trt.cli --onnx "$ONNX" --target auto "${EXTRA[@]}"',
        "fi",
        "",
        "# Precision: 8.x flags; 10.x --stronglyTyped; 11.x nothing (always strongly typed).",
        'case "$TRT_MAJOR" in',
        "  8)",
        '    case "$PRECISION" in',
        *[f"      {p}) PRECISION_FLAGS={_bash_array(precision_flags((8, 6), p))} ;;"
          for p in PRECISIONS if p in files],
        "    esac",
        '    if [ "$TRT_MINOR" -ge 6 ]; then',
        "      BUILD_FLAGS=(--builderOptimizationLevel=\"$OPT_LEVEL\" --skipInference)",
        "    else",
        "      BUILD_FLAGS=(--buildOnly)  # 8.5: no optimization levels yet",
        "    fi ;;",
        f"  10) PRECISION_FLAGS={_bash_array(precision_flags((10, 0), default))}",
        "      BUILD_FLAGS=(--builderOptimizationLevel=\"$OPT_LEVEL\" --skipInference) ;;",
        "  *) PRECISION_FLAGS=()",
        "     BUILD_FLAGS=(--builderOptimizationLevel=\"$OPT_LEVEL\" --skipInference) ;;",
        "esac",
        "",
        'if [ -n "${DLA_CORE:-}" ]; then',
        '  if [ "$PRECISION" = fp32 ]; then echo "DLA runs fp16/int8 only" >&2; exit 2; fi',
        "  # DLA is in TensorRT <= 10.7 and again from 11.4.1 (AGX Orin, JetPack >= 7.2.2)",
        '  if [ "$(printf \'%s\\n\' "$TRT_VERSION" 10.7.99999 | sort -V | head -n1)" != '
        '"$TRT_VERSION" ] && [ "$(printf \'%s\\n\' 11.4.1 "$TRT_VERSION" | sort -V | head -n1)" '
        '!= 11.4.1 ]; then',
        '    echo "TensorRT $TRT_VERSION has no DLA support: unset DLA_CORE" >&2; exit 2',
        "  fi",
        f"  SHAPES={_bash_array(static)}  # DLA: static shapes",
        '  DLA_FLAGS=(--useDLACore="$DLA_CORE" --allowGPUFallback)',
        "else",
        f"  SHAPES={_bash_array(dyn)}",
        "  DLA_FLAGS=()",
        "fi",
        "",
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'echo "TensorRT $TRT_VERSION: building $ENGINE from $ONNX" >&2',
        "set -x",
        '"$TRTEXEC" --onnx="$ONNX" --saveEngine="$ENGINE" "${PRECISION_FLAGS[@]}" "${SHAPES[@]}" '
        '--memPoolSize=workspace:"$WORKSPACE_MB" --timingCacheFile="$TIMING_CACHE" '
        '"${BUILD_FLAGS[@]}" "${DLA_FLAGS[@]}"',
        "set +x",
        "# The sidecar manifest (what the engine was built for) that predict / validate --engine",
        "# check before loading; it needs this package, not TensorRT's Python bindings.",
        "if python3 -c 'import twbert_export' 2>/dev/null; then",
        '  RECORD=(--workspace-mb "$WORKSPACE_MB" --opt-level "$OPT_LEVEL")',
        '  if [ -n "${DLA_CORE:-}" ]; then RECORD+=(--dla-core "$DLA_CORE"); fi',
        '  python3 -m twbert_export.trt.cli --onnx "$ONNX" --engine "$ENGINE" --target auto '
        '"${RECORD[@]}" --record-trtexec-build "$TRT_VERSION"',
        "else",
        '  echo "note: twbert_export is not installed here, so no sidecar manifest was written; '
        'python3 -m twbert_export.reference --engine needs it (pip install --no-deps the '
        'twbert-export checkout)" >&2',
        "fi",
        "",
    ]
    return "\n".join(lines)


# -- DEPLOY.md ---------------------------------------------------------------------------------
def deploy_md(manifest: Manifest) -> str:
    contract = manifest.contract
    files = _model_files(manifest)
    default = next(p for p in reversed(PRECISIONS) if p in files)
    onnx = files[default]
    b = contract.batch
    rows = [f"| `{t.name}` | {t.dtype} | {'x'.join(map(str, t.shape))} |"
            for t in (*contract.inputs, *contract.outputs)]
    cmd = lambda v: "trtexec " + " ".join(trtexec_command(  # noqa: E731
        onnx, engine_name(onnx), contract, default, v, DEFAULT_WORKSPACE_MB,
        "timing.cache", 3 if v >= (8, 6) else None))
    return "\n".join([
        f"# Deploying this artifact (F@{manifest.schedule}, task "
        f"{contract.task})", "",
        "Engines are built on the device that runs them: an engine only loads on the TensorRT "
        "version, GPU and JetPack that built it.", "",
        "## Files", "",
        *[f"- `{path}`: {p.upper()} ONNX, precision written in the file" for p, path in
          files.items()],
        "- `build_on_device.sh`: builds `<file>.engine` with trtexec (or `--python`)",
        "- `manifest.json`: the I/O contract, file hashes, parity verdicts",
        "- `reference/`: the validation clips as the model saw them with the PyTorch outputs "
        "and metrics (`validation.npz`, `validation.json`), and the first rows in Polygraphy's "
        "formats (`inputs.json`, `outputs.json`)", "",
        f"## I/O contract (batch {b.min}:{b.opt}:{b.max}, opset {contract.opset})", "",
        "| tensor | dtype | shape |", "| --- | --- | --- |", *rows, "",
        "## Build", "",
        "```bash",
        f"./build_on_device.sh {default}              # trtexec; TensorRT version detected",
        f"./build_on_device.sh {default} --python     # Python API, writes the sidecar manifest",
        f"DLA_CORE=0 ./build_on_device.sh {default}   # AGX Orin / Orin NX; static batch "
        f"{b.opt}",
        "```", "",
        "What the script runs, per TensorRT major:", "",
        f"- 8.6 (JetPack 6.0; 8.5 on JetPack 5.1 drops the optimization level): `{cmd((8, 6))}`",
        f"- 10.x (JetPack 6.1+/7.x, data-centre): `{cmd((10, 3))}`",
        f"- 11.x: `{cmd((11, 0))}`", "",
        "The timing cache (`$TIMING_CACHE`, default one per TensorRT version under "
        "`~/.cache/twbert-export/`) is reused by later builds on the same device.", "",
        "## Validate on the device", "",
        "```bash",
        f"python3 -m twbert_export.reference --engine {engine_name(onnx)}",
        "```", "",
        "Runs the engine over the validation set in `reference/` and applies the gates the host "
        "applied (per-output errors and frame-selection agreement against the PyTorch outputs, "
        "task-metric drops against PyTorch's metrics); exit 1 if one fails. Needs numpy, "
        "TensorRT and pycuda or cuda-python; no PyTorch, no video decoding.", "",
        "## Jetson notes", "",
        "- 8 GB boards (Orin Nano, Orin NX 8GB): keep `WORKSPACE_MB` at 1024 or below, close "
        "other programs, build one engine at a time.",
        "- DLA (not on Orin Nano or Thor): FP16/INT8 only, static shapes; most transformer "
        "layers fall back to the GPU.",
        "- Check the engine against the shipped reference: "
        f"`polygraphy run {engine_name(onnx)} --trt --load-inputs reference/inputs.json "
        "--load-outputs reference/outputs.json` (tolerances: `report.json` next_commands).",
        "- The Python runner (`twbert_export.trt.runtime.TrtRunner`) refuses an engine whose "
        "sidecar `<engine>.json` says it was built for another TensorRT, GPU or JetPack.", "",
    ])


def write_device_kit(artifact_dir: Path, manifest: Manifest) -> list[Path]:
    """Write build_on_device.sh and DEPLOY.md into artifact_dir (called by the export pipeline
    after manifest.json). Returns the paths written."""
    artifact_dir = Path(artifact_dir)
    script = write_text(artifact_dir / "build_on_device.sh", build_script(manifest))
    script.chmod(0o755)
    deploy = write_text(artifact_dir / "DEPLOY.md", deploy_md(manifest))
    return [script, deploy]
