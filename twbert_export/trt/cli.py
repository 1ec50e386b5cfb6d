"""`python export.py build`: a TensorRT engine from an artifact's ONNX file, on this device.

    python export.py build --onnx engines/NAME/model.fp16.onnx [--target auto|orin-nano-8gb|...]
    python export.py build --artifact engines/NAME [--graphs all|model|split] [--precision P] ...
        [--workspace-mb N] [--opt-level N] [--dla-core N] [--timing-cache PATH]
        [--version-compatible] [--engine PATH] [--parser 8.5|8.6|10|11]
    python3 -m twbert_export.trt.cli --layer-report model.fp16.engine.build.log

Also `python3 -m twbert_export.trt.cli --onnx ...` (what build_on_device.sh --python runs: no
export.py, no torch). The file built is the one the TensorRT version found needs: on 8.5 / 8.6
the trt8 twin the manifest lists for the file (refused when the artifact has none), and the graph
is linted with that parser's rules first (`--parser` to check for another release without
building). `--artifact` builds each selected graph's file (`model`, and the split graphs
`text`, `video_stem`, `select`, `fuse`) one engine at a time, each with its own contract's
profile and sidecar. Exit codes: 0 built, 1 TensorRT failed, 2 bad input / no TensorRT (one line).
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys
from pathlib import Path

from ..artifact.manifest import (MODEL_GRAPH, PRECISIONS, TRT8_FLAVOUR, ArtifactFormatError,
                                 Manifest, PrecisionResult, Report)
from ..artifact.plan import model_precision, resolve_plan
from ..util import MissingDependency, human_size
from .commands import GRAPH_SELECTIONS, polygraphy_command, selected_graphs
from .targets import PRESETS, TARGET_CHOICES, TargetError, resolve_target
from .version import parse_version


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export.py build", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", help="one GRAPH.PRECISION.onnx file of an artifact directory")
    p.add_argument("--artifact", help="build the engine of every selected graph of this "
                   "artifact directory, one at a time (with --graphs and --precision)")
    p.add_argument("--graphs", choices=GRAPH_SELECTIONS,
                   help="with --artifact: model (whole network), split (its four graphs) or all "
                        "present in manifest.json (default)")
    p.add_argument("--target", default="auto", choices=TARGET_CHOICES,
                   help="device preset; auto detects the GPU / Jetson (default)")
    p.add_argument("--engine", help="engine path (default: model.PRECISION.engine beside --onnx)")
    p.add_argument("--workspace-mb", type=int, help="builder workspace cap in MiB "
                   "(default: the target's, e.g. 1024 on Orin Nano 8GB)")
    p.add_argument("--opt-level", type=int, help="builder optimization level 0..5 (default 3)")
    p.add_argument("--dla-core", type=int, help="build for this DLA core with GPU fallback "
                   "(AGX Orin, Orin NX; fp16/int8; static batch = the profile's OPT)")
    p.add_argument("--timing-cache", help="timing cache file, read and updated (default: one "
                   "per TensorRT version under ~/.cache/twbert-export)")
    p.add_argument("--version-compatible", action="store_true",
                   help="engine that also runs on newer TensorRT runtimes (8.6+; slower)")
    p.add_argument("--precision",
                   help="precision of --onnx (default: from manifest.json); with --artifact a "
                        "precision or a per-graph plan (its name or GRAPH=PRECISION list)")
    p.add_argument("--parser", metavar="TRT_VERSION",
                   help="check the file this TensorRT release would build (8.5, 8.6, 10, 11): "
                        "which file, and the lint of that parser; builds nothing")
    p.add_argument("--layer-report", metavar="LAYERS_JSON",
                   help="print how many layers of a DLA engine run on the DLA and on the GPU, "
                        "from trtexec's build log or the layer-information JSON")
    p.add_argument("--record-trtexec-build", metavar="TRT_VERSION",
                   help="build nothing: write the sidecar manifest of the engine trtexec built "
                        "from --onnx with these options (build_on_device.sh runs this)")
    return p


def onnx_for_version(onnx: Path, artifact: Manifest, trt_version: str) -> Path:
    """The file that TensorRT `trt_version` builds for `onnx`: on 8.x its trt8 twin listed in
    the manifest (ValueError if the artifact has none), else `onnx` itself."""
    from .version import check_precision, check_supported, needs_legacy_graph

    check_supported(trt_version)
    entry = artifact.entry_for(onnx)
    if entry is not None:
        check_precision(trt_version, entry.precision)  # int8w has no 8.x graph: refused
    if not needs_legacy_graph(trt_version) or entry is None or entry.flavour == TRT8_FLAVOUR:
        return onnx
    twin = artifact.twin(entry, TRT8_FLAVOUR)
    if twin is None:
        raise ValueError(f"TensorRT {trt_version} mis-imports {onnx.name} (opset "
                         f"{artifact.contract.opset}) and this artifact has no TensorRT 8.x graph "
                         f"for {entry.precision}: re-export it with a current twbert-export")
    return onnx.parent / twin.path


def layer_report(path: Path) -> str:
    from .build import layer_placement

    counts = layer_placement(path.read_text())
    return (f"layers     {counts['DLA']} on DLA, {counts['GPU']} on GPU ({path.name}; GPU "
            "fallback is silent: this is where it shows)")


def refuse(message: str, hint: str = "python export.py build --help") -> int:
    """Bad input or no TensorRT: the one error line and a hint, as every command prints them."""
    print(f"error: {message}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)
    return 2


def build_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    err = refuse
    if args.layer_report:
        try:
            print(layer_report(Path(args.layer_report)))
        except (OSError, ValueError) as e:
            return err(f"cannot read layer information {args.layer_report}: {e}")
        return 0
    if args.artifact:
        if args.onnx or args.engine:
            return err("--artifact builds the files the manifest lists: no --onnx / --engine")
        return build_artifact(args)
    if args.graphs:
        return err("--graphs chooses the graphs of --artifact DIR")
    if not args.onnx:
        return err("--onnx or --artifact is required (or --layer-report FILE)")
    return build_file(args, Path(args.onnx))


def artifact_onnx_files(artifact: Manifest, artifact_dir: Path, selection: str,
                        precision: str | None) -> list[Path]:
    """The ONNX files `--artifact` builds, one per selected graph (`commands.selected_graphs`),
    at `precision` (default: the artifact's highest precision); ValueError when none."""
    graphs = selected_graphs(artifact, selection)
    if not graphs:
        raise ValueError(f"{artifact_dir} has no {selection} graphs (it has "
                         f"{', '.join(artifact.graphs)})")
    if precision is None and artifact.plans:  # the plan the artifact was exported with
        precision = next(iter(artifact.plans))
    precision = precision or next(p for p in reversed(PRECISIONS) if p in artifact.precisions)
    # A per-graph plan (artifact/plan.py): each split graph at its own precision, the whole
    # model at the plan's.
    of = {g: precision for g in graphs}
    if precision not in PRECISIONS or precision in artifact.plans:
        _, plan = resolve_plan(artifact, precision)  # PlanError: a ValueError
        model = model_precision(artifact, precision) or precision  # not None: precision is set
        of = {g: plan.get(g, model) for g in graphs}
    missing = [g for g in graphs if artifact.file(of[g], g) is None]
    if missing:
        raise ValueError(f"{artifact_dir} has no {precision} file for {', '.join(missing)}")
    return [artifact_dir / artifact.file(of[g], g).path  # type: ignore[union-attr]
            for g in graphs]


def build_artifact(args: argparse.Namespace) -> int:
    """Every selected graph of the artifact, ONE ENGINE AT A TIME (a builder's memory is freed
    before the next starts: 8 GB boards), each by the single-file path; stops at the first
    failure and returns its exit code."""
    artifact_dir = Path(args.artifact)
    try:
        artifact = Manifest.load(artifact_dir)
        files = artifact_onnx_files(artifact, artifact_dir, args.graphs or "all", args.precision)
    except ValueError as e:  # ArtifactFormatError included
        return refuse(str(e))
    for i, onnx in enumerate(files, 1):
        print(f"graph      {artifact.entry_for(onnx).graph} ({i}/{len(files)}, "  # type: ignore[union-attr]
              "one engine at a time)", flush=True)
        # each file's own precision, from its manifest entry (a plan gives graphs different ones)
        rc = build_file(argparse.Namespace(**{**vars(args), "precision": None}), onnx)
        if rc:
            return rc
        gc.collect()  # drop the builder, network and engine before the next build
    return 0


def build_file(args: argparse.Namespace, onnx: Path) -> int:
    """One engine from one ONNX file of an artifact, with the profile of that file's graph."""
    err = refuse
    if not onnx.is_file():
        return err(f"ONNX file not found: {onnx}")
    try:
        artifact = Manifest.load(onnx.parent)  # the I/O contract and profile shapes
        listed = artifact.entry_for(onnx)
        # Each graph's own contract (and so its own optimization profile).
        contract = artifact.contract_of(listed.graph) if listed else artifact.contract
    except ArtifactFormatError as e:
        return err(str(e))
    known_version = args.parser or args.record_trtexec_build or _installed_tensorrt()
    if known_version:
        try:
            chosen = onnx_for_version(onnx, artifact, known_version)
        except ValueError as e:
            return err(str(e))
        if chosen != onnx:
            print(f"onnx       {chosen.name} (TensorRT {known_version} needs the opset-17 graph)")
            onnx = chosen
    entry = artifact.entry_for(onnx)
    sha = entry.sha256 if entry else None
    precision = args.precision or (entry.precision if entry else None)
    if precision is not None and precision not in PRECISIONS:
        return err(f"--precision {precision}: --onnx takes one of {', '.join(PRECISIONS)} (a "
                   "per-graph plan goes with --artifact DIR)")
    if precision is None:
        return err(f"{onnx.name} is not listed in manifest.json: pass --precision")
    if args.parser:
        from .build import check_graph_for

        try:
            check_graph_for(onnx, args.parser)
        except ValueError as e:
            return err(str(e))
        print(f"lint       {onnx.name}: TensorRT {args.parser} parser: no errors")
        return 0
    try:
        target, why = resolve_target(args.target)
    except TargetError as e:
        return err(str(e))
    print(f"target     {target.name}: {target.description} ({why})")

    from .build import BuildError, BuildOptions, build_engine, record_trtexec_build

    opts = BuildOptions(onnx=onnx, contract=contract, precision=precision, target=target,
                        engine=Path(args.engine) if args.engine else None,
                        workspace_mb=args.workspace_mb, optimization_level=args.opt_level,
                        dla_core=args.dla_core,
                        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
                        version_compatible=args.version_compatible, onnx_sha256=sha)
    if args.record_trtexec_build:
        try:
            recorded = record_trtexec_build(opts, args.record_trtexec_build)
        except ValueError as e:
            return err(str(e))
        print(f"manifest   {opts.engine}.json (built for {recorded.built_for()})")
        logged = [Path(f"{opts.engine}.{s}") for s in ("build.log", "layers.json")]
        if opts.dla_core is not None and any(p.is_file() for p in logged):
            print(layer_report(next(p for p in logged if p.is_file())))
        return 0
    try:
        opts.check()
        result = build_engine(opts)
    except MissingDependency as e:
        return refuse(str(e), hint=f"on a machine without TensorRT, copy {onnx.parent} to the "
                      "device and run its build_on_device.sh there")
    except ValueError as e:
        return err(str(e))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for note in result.notes:
        print(f"build      {note}")
    b = contract.batch
    print(f"engine     {result.engine}  {human_size(result.engine.stat().st_size)}  "
          f"{result.seconds:.1f}s  batch {b.min}:{b.opt}:{b.max}"
          + (f", DLA core {opts.dla_core} (static batch {b.opt})"
             if opts.dla_core is not None else ""))
    print(f"manifest   {result.engine.name}.json (built for {result.manifest.built_for()})")
    print(f"cache      {opts.timing_cache}")
    # The shipped reference rows are the whole model's I/O: a split graph has no such check.
    host = _host_result(onnx.parent, entry.precision, entry.flavour) \
        if entry and entry.graph == MODEL_GRAPH else None
    if host is not None:
        trt_major = parse_version(result.plan.trt_version)[0]
        print("next       cd " + shlex.quote(str(onnx.parent)) + " && " + polygraphy_command(
            result.engine.name, precision, host.outputs, trt_major=trt_major))
    return 0


def _installed_tensorrt() -> str | None:
    """tensorrt.__version__ when the bindings are importable (None otherwise)."""
    try:
        import tensorrt
    except ImportError:
        return None
    return str(getattr(tensorrt, "__version__", "")) or None


def _host_result(artifact_dir: Path, precision: str, flavour: str) -> PrecisionResult | None:
    """The host's validation result of that file, from report.json (None when absent)."""
    try:
        return Report.load(artifact_dir).result(precision, flavour)
    except ArtifactFormatError:
        return None


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["build"]:
        argv = argv[1:]
    return build_main(argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_main", "build_parser", "PRESETS"]
