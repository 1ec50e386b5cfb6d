"""`python export.py build`: a TensorRT engine from an artifact's ONNX file, on this device.

    python export.py build --onnx engines/NAME/model.fp16.onnx [--target auto|orin-nano-8gb|...]
        [--workspace-mb N] [--opt-level N] [--dla-core N] [--timing-cache PATH]
        [--version-compatible] [--engine PATH]

Also `python3 -m twbert_export.trt.cli --onnx ...` (what build_on_device.sh --python runs: no
export.py, no torch). Exit codes: 0 built, 1 TensorRT failed, 2 bad input / no TensorRT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..artifact import PRECISIONS, ArtifactFormatError, Manifest
from ..util import MissingDependency, human_size
from .targets import PRESETS, TARGET_CHOICES, TargetError, resolve_target


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="export.py build", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", required=True, help="model.PRECISION.onnx in an artifact directory")
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
    p.add_argument("--precision", choices=PRECISIONS,
                   help="precision of --onnx (default: from manifest.json)")
    p.add_argument("--record-trtexec-build", metavar="TRT_VERSION",
                   help="build nothing: write the sidecar manifest of the engine trtexec built "
                        "from --onnx with these options (build_on_device.sh runs this)")
    return p


def build_main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    onnx = Path(args.onnx)
    err = lambda msg: print(f"error: {msg}", file=sys.stderr) or 2  # noqa: E731
    if not onnx.is_file():
        return err(f"ONNX file not found: {onnx}")
    try:
        artifact = Manifest.load(onnx.parent)  # the I/O contract and profile shapes
    except ArtifactFormatError as e:
        return err(str(e))
    contract = artifact.contract
    entry = artifact.entry_for(onnx)
    sha = entry.sha256 if entry else None
    precision = args.precision or (entry.precision if entry else None)
    if precision is None:
        return err(f"{onnx.name} is not listed in manifest.json: pass --precision")
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
        return 0
    try:
        opts.check()
        result = build_engine(opts)
    except MissingDependency as e:
        return err(f"{e}. On a machine without TensorRT, copy {onnx.parent} to the device and "
                   "run its build_on_device.sh there.")
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
    print("next       polygraphy run "
          f"{result.engine} --trt --load-inputs {onnx.parent / 'reference/inputs.json'} "
          f"--load-outputs {onnx.parent / 'reference/outputs.json'}")
    return 0


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["build"]:
        argv = argv[1:]
    return build_main(argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_main", "build_parser", "PRESETS"]
