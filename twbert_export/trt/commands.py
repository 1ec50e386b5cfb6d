"""The device kit written with every export: trtexec commands, build_on_device.sh, DEPLOY.md.

Engines are built ON the target (they are not portable across GPUs, TensorRT versions or
JetPacks), so an artifact ships the commands rather than engines. What differs per TensorRT
major (checked against the trtexec reference of each release):

- 8.5 / 8.6 (JetPack 5.1 / 6.0): the opset-17 `model.PRECISION.trt8.onnx` file. No strong
  typing: trtexec's `--fp16` / `--int8 --fp16` would let TensorRT run the file's FP32 nodes in
  FP16, so FP16 / INT8 go through the Python builder, which pins each layer to the file's type
  (`trtexec_route`); FP32 through trtexec. 8.5 has neither `--builderOptimizationLevel` nor
  `--versionCompatible` (both from 8.6) and says `--buildOnly` where 8.6+ says
  `--skipInference`. 8.4 and older and 9.x are refused.
- 10.x: `--stronglyTyped`: the types written in the ONNX file are the types built.
- 11.x: every network is strongly typed; there are no precision flags at all.

Every trtexec build gets `--noTF32` (trtexec enables TF32 by default: samples/common/
sampleOptions.cpp, release/8.5 to 11.1). Shapes come from the I/O contract's profile (batch
MIN:OPT:MAX). DLA (Orin NX / AGX Orin) runs only static shapes, so a DLA build pins every input
to the OPT batch, and reports its layer placement (`--exportLayerInfo`). The Polygraphy check
of a built engine against the shipped reference (`polygraphy_command`) lives here too.
Torch-free and tensorrt-free.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..artifact.manifest import MODEL_GRAPH, PRECISIONS, SPLIT_GRAPHS, TRT8_FLAVOUR, Manifest
from ..artifact.contract import IOContract
from ..util import write_text
from .version import WEIGHT_ONLY_REFUSAL, UnsupportedTensorRT, dla_available

DEFAULT_WORKSPACE_MB = 1024  # the kit's default: safe on an 8 GB Jetson
TIMING_CACHE_DIR = "${XDG_CACHE_HOME:-$HOME/.cache}/twbert-export"


def default_timing_cache(trt_version: str) -> Path:
    """Timing cache shared by every build on this machine, one file per TensorRT version (a
    cache only matches the TensorRT build, GPU and CUDA that wrote it)."""
    import os

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "twbert-export"
    return base / f"timing-trt{trt_version}.cache"


def precision_flags(trt_version: tuple[int, int], precision: str) -> list[str]:
    """trtexec flags that set the precision of a precision-explicit ONNX file."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    major = trt_version[0]
    if precision == "int8w" and major < 10:
        raise UnsupportedTensorRT(f"TensorRT {major}.{trt_version[1]}: {WEIGHT_ONLY_REFUSAL}")
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


def trtexec_route(trt_version: tuple[int, int], precision: str, dla: bool = False) -> str:
    """Which builder the kit uses: "trtexec", or "python" where trtexec cannot build what was
    validated (weak typing with FP16: TensorRT 8.x, and DLA before 11, where only the Python
    builder pins each layer to the file's type, build.pin_file_types)."""
    weak = trt_version[0] < 10 or (dla and trt_version[0] < 11)
    return "python" if weak and precision != "fp32" else "trtexec"


def trtexec_command(onnx: str, engine: str, contract: IOContract, precision: str,
                    trt_version: tuple[int, int], workspace_mb: int | str | None = None,
                    timing_cache: str | None = None, optimization_level: int | None = None,
                    dla_core: int | str | None = None, version_compatible: bool = False
                    ) -> list[str]:
    """The trtexec argument list (without the program) that builds `engine` from `onnx`.
    `--noTF32` always (trtexec enables TF32 by default, sampleOptions.cpp; build.TF32_NOTE)."""
    major, minor = trt_version
    if dla_core is not None and precision == "fp32":
        raise ValueError("DLA runs FP16 and INT8 only: build the fp16 or int8 file for DLA")
    # Only major.minor is known here: a minor counts if any of its patches has DLA (11.4.1+);
    # build_on_device.sh checks the full version on the device.
    if dla_core is not None and not dla_available(f"{major}.{minor}.99"):
        raise ValueError(f"TensorRT {major}.{minor} has no DLA support (<= 10.7 and >= 11.4.1 do)")
    if trtexec_route(trt_version, precision, dla_core is not None) != "trtexec":
        raise ValueError(f"TensorRT {major}.{minor} has no strong typing"
                         + (" for DLA" if major >= 10 else "")
                         + f": trtexec's --fp16 may run the file's FP32 nodes in FP16; build "
                         f"{precision} with `{python_build_command(onnx)}` (it pins every layer "
                         "to the file's type)")
    args = [f"--onnx={onnx}", f"--saveEngine={engine}", *precision_flags(trt_version, precision),
            "--noTF32"]
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
        args += [f"--useDLACore={dla_core}", "--allowGPUFallback",
                 "--profilingVerbosity=detailed", f"--exportLayerInfo={engine}.layers.json"]
    args.append("--skipInference" if has_86 else "--buildOnly")
    return args


# -- the Polygraphy check against the shipped reference ----------------------------------------
# Smallest absolute tolerance per precision for the device comparison; above it, twice the error
# ONNX Runtime showed on the host (TensorRT picks other kernels, so allow some headroom).
DEVICE_ATOL_FLOOR = {"fp32": 1e-4, "fp16": 1e-2, "int8w": 5e-2, "int8": 5e-2}
REFERENCE_INPUTS = "reference/inputs.json"
REFERENCE_INPUTS_INT32 = "reference/inputs.int32.json"  # 8.x engines bind INT64 I/O as INT32
REFERENCE_OUTPUTS = "reference/outputs.json"


def polygraphy_tolerances(precision: str, errors: dict[str, dict]) -> dict[str, str]:
    """An explicit absolute tolerance for every output: float outputs max(floor, 2x the host's
    error); frame indices exactly equal ("0"), except on INT8, whose gate allows divergent
    selections: there they are excluded on purpose ("inf"); `python3 -m twbert_export.validation.reference
    --engine` judges selections near-tie-aware on the whole validation set."""
    floor = DEVICE_ATOL_FLOOR[precision]
    tolerances = {}
    for name, e in errors.items():
        if "max_abs" in e:
            tolerances[name] = f"{max(floor, 2 * e['max_abs']):.2g}"
        else:
            tolerances[name] = "inf" if precision == "int8" else "0"
    return tolerances


def polygraphy_command(model: str, precision: str, errors: dict[str, dict],
                       contract: IOContract | None = None, trt_major: int = 10,
                       backend: str = "trt") -> str:
    """`polygraphy run` comparing `model` with the shipped PyTorch reference rows.

    - `model.*.engine` (the default printed): the BUILT engine (`--model-type engine`), i.e.
      what the device runs; no build options involved.
    - `model.*.onnx` with backend "trt": Polygraphy builds it: profile shapes from the contract
      (they cover the batches in reference/inputs.json; without them Polygraphy pins dynamic
      dims to 1) and `--strongly-typed` on 10.x+. Not offered for 8.x: its weak typing would
      not build what was validated (use the engine form there).
    - backend "onnxrt": the same comparison on ONNX Runtime (how the command is tested here).
    8.x engines bind INT64 inputs as INT32, so they read reference/inputs.int32.json."""
    args = ["polygraphy", "run", model]
    if model.endswith(".engine"):
        if backend != "trt":
            raise ValueError("an engine runs on the trt backend only")
        args += ["--model-type", "engine", "--trt"]
    elif backend == "trt":
        if trt_major < 10 or contract is None:
            raise ValueError("Polygraphy builds from ONNX strongly typed (TensorRT 10+) with the "
                             "contract's shapes only; on 8.x compare the built engine")
        args += ["--trt", "--strongly-typed"]
        for flag, i in (("--trt-min-shapes", 0), ("--trt-opt-shapes", 1), ("--trt-max-shapes", 2)):
            args += [flag] + [f"{n}:[{','.join(map(str, s[i]))}]"
                              for n, s in contract.profile_shapes().items()]
    elif backend == "onnxrt":
        args += ["--onnxrt"]
    else:
        raise ValueError(f"backend must be trt or onnxrt, got {backend!r}")
    inputs = REFERENCE_INPUTS_INT32 if backend == "trt" and trt_major < 9 else REFERENCE_INPUTS
    args += ["--load-inputs", inputs, "--load-outputs", REFERENCE_OUTPUTS, "--atol"]
    args += [f"{n}:{t}" for n, t in polygraphy_tolerances(precision, errors).items()]
    args += ["--rtol", "0", "--check-error-stat", "max"]
    return " ".join(shlex.quote(a) for a in args)


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


def _artifact_files(manifest: Manifest) -> tuple[dict[str, str], dict[str, str]]:
    """(precision -> file name, precision -> its TensorRT 8.x twin's) of the whole-model graph."""
    main = {p: entry.path for p in manifest.precisions if (entry := manifest.file(p))}
    trt8 = {p: twin.path for p in main if (twin := manifest.file(p, flavour=TRT8_FLAVOUR))}
    return main, trt8


GRAPH_SELECTIONS = ("all", "model", "split")


def selected_graphs(manifest: Manifest, selection: str = "all") -> list[str]:
    """The artifact's graphs a build covers: "model" (the whole network), "split" (the four
    split graphs) or "all" (every graph the manifest lists), in build order."""
    if selection not in GRAPH_SELECTIONS:
        raise ValueError(f"graphs must be one of {', '.join(GRAPH_SELECTIONS)}, got {selection!r}")
    present = [g for g in (MODEL_GRAPH, *SPLIT_GRAPHS) if g in manifest.graphs]
    wanted = {"model": [MODEL_GRAPH], "split": list(SPLIT_GRAPHS)}.get(selection, present)
    return [g for g in present if g in wanted]


def _graph_cases(manifest: Manifest) -> list[str]:
    """bash `case "$GRAPH:$PRECISION"` arms setting ONNX, ONNX_TRT8 and the graph's own profile
    (DYN_SHAPES, STATIC_SHAPES for DLA) from that graph's contract."""
    arms = []
    for graph in selected_graphs(manifest):
        contract = manifest.contract_of(graph)
        dyn, static = shape_flags(contract), shape_flags(contract, contract.batch.opt)
        for p in PRECISIONS:
            entry = manifest.file(p, graph)
            if entry is None:
                continue
            twin = manifest.twin(entry, TRT8_FLAVOUR)
            arms += [f"  {graph}:{p}) ONNX={shlex.quote(entry.path)}"
                     + (f"; ONNX_TRT8={shlex.quote(twin.path)}" if twin else ""),
                     f"    DYN_SHAPES={_bash_array(dyn)}",
                     f"    STATIC_SHAPES={_bash_array(static)} ;;"]
    return arms


def build_script(manifest: Manifest) -> str:
    files, trt8 = _artifact_files(manifest)
    default = next(p for p in reversed(PRECISIONS) if p in files)
    graphs = selected_graphs(manifest)
    split = [g for g in graphs if g in SPLIT_GRAPHS]
    lines = [
        "#!/usr/bin/env bash",
        "# Build a TensorRT engine from this artifact ON the device that will run it.",
        "#   ./build_on_device.sh [fp32|fp16|int8w|int8] [--python]",
        f"#   GRAPHS=all|model|split ./build_on_device.sh ...  (default all: {' '.join(graphs)})",
        "# Each graph is its own engine with its own optimization profile (its own I/O contract),",
        "# built ONE AT A TIME, each by its own run of this script (GRAPH=name), so an 8 GB board",
        "# never holds two builders in memory.",
        f"# Default precision: {default}. Environment: WORKSPACE_MB (default "
        f"{DEFAULT_WORKSPACE_MB}, sized for 8 GB Jetsons),",
        "# OPT_LEVEL (builder optimization level, default 3), DLA_CORE (AGX Orin / Orin NX only;",
        "# pins the batch to the profile's OPT value), TIMING_CACHE, TRTEXEC, TRT_VERSION,",
        "# JETSON_MODEL (default: /proc/device-tree/model).",
        "# TensorRT 8.5 / 8.6 build the GRAPH.PRECISION.trt8.onnx file (opset 17; the opset-19",
        "# file would be mis-imported), and FP16/INT8 there (and DLA before 11.x) go through the",
        "# Python builder: without strong typing only it keeps the file's FP32 nodes in FP32.",
        "# TF32 is off on every path (--noTF32). --python builds with `python3 -m",
        "# twbert_export.trt.cli` (needs this package and TensorRT's Python bindings); both write",
        "# the sidecar manifest the runner's preflight reads. Generated by export.py; DEPLOY.md.",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        f'PRECISION="${{1:-{default}}}"',
        'MODE="${2:-trtexec}"',
        'if [ -z "${GRAPH:-}" ]; then',
        '  case "${GRAPHS:-all}" in',
        f"    all) GRAPH_LIST={shlex.quote(' '.join(graphs))} ;;",
        "    model) GRAPH_LIST=model ;;",
        f"    split) GRAPH_LIST={shlex.quote(' '.join(split))} ;;",
        "    *) GRAPH_LIST=\"$GRAPHS\" ;;",
        "  esac",
        '  if [ -z "$GRAPH_LIST" ]; then echo "this artifact has no ${GRAPHS} graphs" >&2; '
        "exit 2; fi",
        '  if [ "$GRAPH_LIST" != "${GRAPH_LIST%% *}" ]; then',
        "    # One engine at a time: each build finishes (and frees its memory) before the next.",
        '    for GRAPH in $GRAPH_LIST; do',
        '      echo "== $GRAPH ($PRECISION): building sequentially, one engine at a time" >&2',
        '      GRAPH="$GRAPH" bash "./$(basename "$0")" "$PRECISION" "$MODE"  # after the cd above',
        "    done",
        "    exit 0",
        "  fi",
        '  GRAPH="$GRAPH_LIST"',
        "fi",
        "ONNX_TRT8=",
        "case \"$GRAPH:$PRECISION\" in",
        *_graph_cases(manifest),
        "  *) echo \"graph '$GRAPH' at precision '$PRECISION' is not in this artifact (graphs "
        f"{' '.join(graphs)}; precisions {' '.join(files)})\" >&2; exit 2 ;;",
        "esac",
        f"WORKSPACE_MB=\"${{WORKSPACE_MB:-{DEFAULT_WORKSPACE_MB}}}\"",
        'OPT_LEVEL="${OPT_LEVEL:-3}"',
        'if [ -z "${TRT_VERSION:-}" ]; then',
        "  TRT_VERSION=\"$(python3 -c 'import tensorrt; print(tensorrt.__version__)' 2>/dev/null"
        " || dpkg-query -W -f='${Version}' libnvinfer-bin 2>/dev/null || true)\"",
        "fi",
        'TRT_MAJOR="${TRT_VERSION%%.*}"',
        'TRT_MINOR="$(echo "$TRT_VERSION" | cut -d. -f2)"',
        'case "$TRT_MAJOR.$TRT_MINOR" in',
        "  [0-9]*.[0-9]*) ;;",
        '  *) echo "cannot tell the TensorRT version (found \"$TRT_VERSION\"): install TensorRT '
        '(JetPack ships it) or set TRT_VERSION=10.3" >&2; exit 2 ;;',
        "esac",
        "",
        "# Precision: 8.x the opset-17 file (FP16/INT8 by the Python builder); 10.x",
        "# --stronglyTyped; 11.x and later nothing (always strongly typed).",
        'case "$TRT_MAJOR" in',
        "  8)",
        '    if [ "$TRT_MINOR" -lt 5 ]; then',
        '      echo "TensorRT $TRT_VERSION is too old: this artifact needs TensorRT 8.5 or newer '
        '(JetPack >= 5.1)" >&2; exit 2',
        "    fi",
        '    if [ "$PRECISION" = int8w ]; then',
        f'      echo "TensorRT $TRT_VERSION: {WEIGHT_ONLY_REFUSAL}" >&2; exit 2',
        "    fi",
        '    if [ -z "$ONNX_TRT8" ]; then',
        '      echo "this artifact has no TensorRT 8.x graph for $PRECISION '
        '($GRAPH.$PRECISION.trt8.onnx): re-export it with a current twbert-export" >&2; exit 2',
        "    fi",
        '    ONNX="$ONNX_TRT8"',
        "    PRECISION_FLAGS=()",
        '    if [ "$PRECISION" != fp32 ]; then MODE=--python; fi',
        '    if [ "$TRT_MINOR" -ge 6 ]; then',
        "      BUILD_FLAGS=(--builderOptimizationLevel=\"$OPT_LEVEL\" --skipInference)",
        "    else",
        "      BUILD_FLAGS=(--buildOnly)  # 8.5: no optimization levels yet",
        "    fi ;;",
        f"  10) PRECISION_FLAGS={_bash_array(precision_flags((10, 0), default))}",
        "      BUILD_FLAGS=(--builderOptimizationLevel=\"$OPT_LEVEL\" --skipInference) ;;",
        "  *)",
        '    if [ "$TRT_MAJOR" -lt 11 ]; then',
        '      echo "TensorRT $TRT_VERSION is not a target of this artifact (8.5, 8.6, 10.x and '
        '11.x+ are)" >&2; exit 2',
        "    fi",
        "    PRECISION_FLAGS=()",
        "    BUILD_FLAGS=(--builderOptimizationLevel=\"$OPT_LEVEL\" --skipInference) ;;",
        "esac",
        'ENGINE="${ONNX%.onnx}.engine"',
        f'TIMING_CACHE="${{TIMING_CACHE:-{TIMING_CACHE_DIR}/timing-trt$TRT_VERSION.cache}}"',
        'mkdir -p "$(dirname "$TIMING_CACHE")"',
        "",
        'if [ -n "${DLA_CORE:-}" ]; then',
        '  if [ "$PRECISION" = fp32 ] || [ "$PRECISION" = int8w ]; then echo "DLA runs fp16/int8 '
        'only" >&2; exit 2; fi',
        "  # DLA: TensorRT <= 10.7 (FP16, weak typing: the Python builder) and again from 11.4.1",
        "  # (strongly typed FP16/INT8; AGX Orin on JetPack >= 7.2.2 only).",
        '  if [ "$(printf \'%s\\n\' "$TRT_VERSION" 10.7.99999 | sort -V | head -n1)" = '
        '"$TRT_VERSION" ]; then',
        '    if [ "$PRECISION" = int8 ]; then',
        '      echo "INT8 on DLA needs TensorRT >= 11.4.1 (a Q/DQ network falls back to the GPU '
        'silently before): build fp16 for DLA" >&2; exit 2',
        "    fi",
        "    MODE=--python",
        '  elif [ "$(printf \'%s\\n\' 11.4.1 "$TRT_VERSION" | sort -V | head -n1)" != 11.4.1 ]; '
        'then',
        '    echo "TensorRT $TRT_VERSION has no DLA support: unset DLA_CORE" >&2; exit 2',
        '  elif ! printf \'%s\' "${JETSON_MODEL:-$(tr -d \'\\0\' < /proc/device-tree/model '
        '2>/dev/null || true)}" | grep -q "AGX Orin"; then',
        '    echo "DLA with TensorRT $TRT_VERSION is documented for Jetson AGX Orin (JetPack >= '
        '7.2.2) only: unset DLA_CORE" >&2; exit 2',
        "  fi",
        "  SHAPES=(\"${STATIC_SHAPES[@]}\")  # DLA: static shapes",
        '  DLA_FLAGS=(--useDLACore="$DLA_CORE" --allowGPUFallback --profilingVerbosity=detailed '
        '--exportLayerInfo="$ENGINE.layers.json")',
        "else",
        "  SHAPES=(\"${DYN_SHAPES[@]}\")",
        "  DLA_FLAGS=()",
        "fi",
        "",
        'if [ "$MODE" = "--python" ]; then',
        "  if ! python3 -c 'import tensorrt, twbert_export' 2>/dev/null; then",
        '    echo "TensorRT $TRT_VERSION: $PRECISION${DLA_CORE:+ on DLA} is built with the Python '
        'builder (it keeps the file\'s FP32 nodes in FP32; trtexec cannot without strong '
        'typing), which needs TensorRT\'s Python bindings and this package: pip install '
        '--no-deps the twbert-export checkout" >&2; exit 2',
        "  fi",
        "  EXTRA=(--workspace-mb \"$WORKSPACE_MB\" --opt-level \"$OPT_LEVEL\" --timing-cache "
        "\"$TIMING_CACHE\")",
        '  if [ -n "${DLA_CORE:-}" ]; then EXTRA+=(--dla-core "$DLA_CORE"); fi',
        '  echo "TensorRT $TRT_VERSION: building $ENGINE from $ONNX (Python builder)" >&2',
        '  set -x',
        '  exec python3 -m twbert_export.trt.cli --onnx "$ONNX" --target auto "${EXTRA[@]}"',
        "fi",
        "",
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
        'echo "TensorRT $TRT_VERSION: building $ENGINE from $ONNX" >&2',
        "# A DLA build keeps trtexec's log: its Layers Running on DLA / GPU lists are the report.",
        'LOG=/dev/null; if [ -n "${DLA_CORE:-}" ]; then LOG="$ENGINE.build.log"; fi',
        "set -x",
        '"$TRTEXEC" --onnx="$ONNX" --saveEngine="$ENGINE" "${PRECISION_FLAGS[@]}" --noTF32 '
        '"${SHAPES[@]}" --memPoolSize=workspace:"$WORKSPACE_MB" --timingCacheFile="$TIMING_CACHE" '
        '"${BUILD_FLAGS[@]}" "${DLA_FLAGS[@]}" 2>&1 | tee "$LOG"',
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
        'python3 -m twbert_export.validation.reference --engine needs it (pip install --no-deps the '
        'twbert-export checkout)" >&2',
        "fi",
        "",
    ]
    return "\n".join(lines)


# -- DEPLOY.md ---------------------------------------------------------------------------------
# What a DLA build does, per TensorRT release (build.check_dla has the rules; sources: trtexec's
# sampleEngines.cpp on release/10.7 and release/11.1; "Working with DLA" and "Strongly Typed
# Networks for DLA" in the TensorRT 11.4.1 documentation).
DLA_TABLE = [
    "| TensorRT | JetPack | DLA build | precisions |",
    "| --- | --- | --- | --- |",
    "| 8.5 / 8.6 | 5.1.x / 6.0 | weak typing, FP16 flag, every layer pinned to the file's type "
    "(Python builder) | fp16 |",
    "| 10.0 - 10.7 | (6.1/6.2 ship 10.3) | as 8.x: trtexec would add FP16 and "
    "prefer-precision-constraints to a strongly typed network, so the Python builder | fp16 |",
    "| 10.8 - 11.4.0 | 7.0 / 7.1 (Thor, which has no DLA) | no DLA | - |",
    "| 11.4.1+ | 7.2.2+, Jetson AGX Orin only | strongly typed: the file's types decide | "
    "fp16, int8 |",
]


def split_section(manifest: Manifest) -> list[str]:
    """DEPLOY.md's part on the split graphs' engines (none without split graphs)."""
    split = selected_graphs(manifest, "split")
    if not split:
        return []
    precisions = [p for p in manifest.precisions if all(manifest.file(p, g) for g in split)]
    # A per-graph plan (artifact/plan.py) is built by the Python builder, each graph's file at
    # its own precision; build_on_device.sh builds one precision.
    plan = next(iter(manifest.plans), None)
    p = plan or precisions[-1]
    shell = [] if plan else [
        f"./build_on_device.sh {p}                  # every graph: model, then "
        f"{', '.join(split)}; one engine at a time",
        f"GRAPHS=split ./build_on_device.sh {p}     # only the split graphs"]
    return [
        "## Split engines (edge retrieval over a clip index)", "",
        f"The artifact also holds the split graphs ({', '.join(split)}), one ONNX file each per "
        "precision. Each is its own engine with its own optimization profile (from its own I/O "
        "contract in `manifest.json`), its own sidecar and preflight, and the same "
        "per-TensorRT-version rules as the whole model (trt8 twin on 8.5 / 8.6, TF32 off, DLA).",
        "", "```bash", *shell,
        f"python3 -m twbert_export.trt.cli --artifact . --graphs split --precision {p}"
        + (f"   # the plan {p}: each graph at its own precision" if plan else ""),
        "```", "",
        "Engines are built sequentially (each build's memory is released before the next "
        "starts), so an 8 GB board never holds two builders. Then index clips as they come and "
        "query them on the engines:", "",
        "```bash",
        f"python export.py index --artifact . --videos DIR --out INDEX --precision {p} --engines",
        'python export.py predict --index INDEX --artifact . --text "a caption" --engines',
        "```", "",
        "With `--engines` the four engines run on one CUDA stream and share one device buffer "
        "per tensor, so stems, text embeddings and video embeddings pass between them without "
        "a copy through the host (`twbert_export.retrieval.split_trt`). An index query reads the stored "
        "stems from the host and brings back ITC and each batch's video embeddings, of which "
        "it keeps the shortlist's k rows for `fuse`.", ""]


def deploy_md(manifest: Manifest) -> str:
    contract = manifest.contract
    files, trt8 = _artifact_files(manifest)
    default = next(p for p in reversed(PRECISIONS) if p in files)
    onnx = files[default]
    b = contract.batch
    rows = [f"| `{t.name}` | {t.dtype} | {'x'.join(map(str, t.shape))} |"
            for t in (*contract.inputs, *contract.outputs)]
    cmd = lambda v, p=default, f=onnx: "trtexec " + " ".join(trtexec_command(  # noqa: E731
        f, engine_name(f), contract, p, v, DEFAULT_WORKSPACE_MB, "timing.cache",
        3 if v >= (8, 6) else None))
    legacy = trt8.get(default)
    if default == "int8w":
        line_8x = f"- 8.5 / 8.6: {WEIGHT_ONLY_REFUSAL}"
    elif legacy is None:
        line_8x = "- 8.5 / 8.6: this artifact has no opset-17 file: re-export it"
    elif default == "fp32":
        line_8x = f"- 8.5 / 8.6 (JetPack 5.1.x / 6.0): `{cmd((8, 6), 'fp32', legacy)}`"
    else:
        line_8x = (f"- 8.5 / 8.6 (JetPack 5.1.x / 6.0): the opset-17 file `{legacy}`, {default} "
                   f"with the Python builder (`{python_build_command(legacy)}`): without strong "
                   "typing, trtexec's `--fp16` lets TensorRT run the file's FP32 nodes (frame "
                   "selection, LayerNorm statistics) in FP16; only the Python builder pins each "
                   "layer to the file's type. FP32 goes through trtexec.")
    return "\n".join([
        f"# Deploying this artifact (F@{manifest.schedule}, task "
        f"{contract.task})", "",
        "Engines are built on the device that runs them: an engine only loads on the TensorRT "
        "version, GPU and JetPack that built it.", "",
        "## Files", "",
        *[f"- `{path}`: {p.upper()} ONNX (opset {contract.opset}), precision written in the file "
          "(TensorRT 10.x / 11.x)" for p, path in files.items()],
        *[f"- `{path}`: the same {p.upper()} graph for TensorRT 8.5 / 8.6 (opset 17, reduce axes "
          "as attributes, LayerNorm decomposed with FP32 statistics), validated with the same "
          "gates" for p, path in trt8.items()],
        "- `build_on_device.sh`: builds `<file>.engine` (the file the TensorRT version found "
        "needs)",
        "- `manifest.json`: the I/O contract, file hashes, parity verdicts",
        "- `reference/`: the validation clips as the model saw them with the PyTorch outputs "
        "and metrics (`validation.npz`, `validation.json`), and the first rows in Polygraphy's "
        "formats (`inputs.json`, `inputs.int32.json` for 8.x engines, `outputs.json`)", "",
        f"## I/O contract (batch {b.min}:{b.opt}:{b.max}, opset {contract.opset})", "",
        "| tensor | dtype | shape |", "| --- | --- | --- |", *rows, "",
        "TensorRT 8.x binds the INT64 tensors as INT32 (its parser narrows them); the Python "
        "runner casts.", "",
        "## Build", "",
        "```bash",
        f"./build_on_device.sh {default}              # TensorRT version detected",
        f"./build_on_device.sh {default} --python     # Python API builder",
        f"DLA_CORE=0 ./build_on_device.sh {default}   # DLA (see below); static batch {b.opt}",
        "```", "",
        "What the script runs, per TensorRT release (TF32 off everywhere: `--noTF32` for "
        "trtexec, which enables it by default; the FP32 frame-selection nodes are what the "
        "parity gates protect; the sidecar records `tf32: false`):", "",
        line_8x,
        f"- 10.x (JetPack 6.1+/7.x, data-centre): `{cmd((10, 3))}`",
        f"- 11.x: `{cmd((11, 0))}`",
        "- 8.4 and older (JetPack 5.0.x), 9.x: refused with a message.", "",
        "The timing cache (`$TIMING_CACHE`, default one per TensorRT version under "
        "`~/.cache/twbert-export/`) is reused by later builds on the same device.", "",
        *split_section(manifest),
        "## DLA", "",
        *DLA_TABLE, "",
        "DLA cores: AGX Orin 2, Orin NX 16GB 2, Orin NX 8GB 1, Orin Nano and Thor none. DLA runs "
        "static shapes only and no Gather; most transformer layers fall back to the GPU "
        "(`--allowGPUFallback`, silently), so every DLA build keeps what TensorRT says about "
        "placement (trtexec's log with its Layers Running on DLA / GPU lists as "
        "`<engine>.build.log`, and `<engine>.layers.json` from `--profilingVerbosity=detailed "
        "--exportLayerInfo` or the Python builder's engine inspector) and prints how many layers "
        "landed on the DLA and on the GPU: `python3 -m twbert_export.trt.cli --layer-report "
        "<engine>.build.log`.", "",
        "## Validate on the device", "",
        "```bash",
        f"python3 -m twbert_export.validation.reference --engine {engine_name(onnx)}",
        "```", "",
        "Runs the engine over the validation set in `reference/` and applies the gates the host "
        "applied (per-output errors and frame-selection agreement against the PyTorch outputs, "
        "task-metric drops against PyTorch's metrics); exit 1 if one fails. Needs numpy, "
        "TensorRT and pycuda or cuda-python; no PyTorch, no video decoding.", "",
        "Polygraphy's own check of the built engine against the shipped rows (every output "
        "with an explicit tolerance: `report.json` next_commands has the exact line):", "",
        "```bash",
        f"polygraphy run {engine_name(onnx)} --model-type engine --trt --load-inputs "
        f"{REFERENCE_INPUTS} --load-outputs {REFERENCE_OUTPUTS} --atol ... --rtol 0 "
        "--check-error-stat max",
        "```", "",
        "(8.x engines: `--load-inputs reference/inputs.int32.json`.)", "",
        "## Jetson: build and benchmark", "",
        "- Before building or timing: `sudo nvpmodel -m 0` (MAXN; `nvpmodel -q` shows the mode) "
        "and `sudo jetson_clocks` (locks the clocks): TensorRT times tactics while building, so "
        "an engine built at a low power mode or with floating clocks picks slower kernels. The "
        "sidecar records the power mode and whether the clocks were locked.",
        "- 8 GB boards (Orin Nano, Orin NX 8GB): keep `WORKSPACE_MB` at 1024 or below, close "
        "other programs (or stop the desktop: `sudo systemctl isolate multi-user.target`), add "
        "swap (`sudo fallocate -l 8G /swapfile && sudo chmod 600 /swapfile && sudo mkswap "
        "/swapfile && sudo swapon /swapfile`) and build one engine at a time.",
        f"- Smoke test and benchmark: `trtexec --loadEngine={engine_name(onnx)} "
        f"--shapes={shape_flags(contract)[1].split('=', 1)[1]} --useCudaGraph --useSpinWait "
        "--noDataTransfers` (8.x engines: the `.trt8.engine`); `python -m "
        "twbert_export.bench.artifact_bench --artifact . --backends trt-" + default + "` reads "
        "`tegrastats` alongside where present.",
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
