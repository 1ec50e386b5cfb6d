"""twbert-export: TW-BERT checkpoint -> precision-explicit ONNX for TensorRT, validated on real clips.

    python export.py [--ckpt best.pt] [--precision fp16] [--task retrieval|qa] [--schedule 20-14-8]
                     [--batch 1:1:8] [--calib-data DIR] [--val-data DIR] [--out engines/NAME] [--force]
    python export.py validate --ckpt CKPT --onnx engines/NAME/model.fp16.onnx [--val-data DIR]
                     [--val-clips N]
    python export.py validate --engine engines/NAME/model.fp16.engine   (on the device: against
                     the reference data shipped in engines/NAME/reference/, no PyTorch)
    python export.py predict --model engines/NAME/model.fp16.onnx --video a.mp4 [--video b.mp4 ...]
                     (--text "a caption" | --question "...")
    python export.py build --onnx engines/NAME/model.fp16.onnx [--target auto]   (needs TensorRT)
    python export.py build --artifact engines/NAME [--graphs all|model|split] [--precision fp16]
                     (each graph's engine in turn, one at a time; needs TensorRT)
    python export.py index --artifact engines/NAME --videos DIR --out INDEX [--precision fp16]
                     (each clip's video stem, computed once, and its FAISS first-stage vector)
    python export.py predict --index INDEX --artifact engines/NAME (--text "..." [--k 50]
                     [--shortlist 400 | --exact] | --question "..." --clip ID)
    python export.py serve --artifact engines/NAME [--index INDEX] [--http-port 8000]
                     [--grpc-port 8001] [--instances N] [--max-batch B] [--max-queue-delay-us U]
                     (Triton, PyTriton; --index also serves twbert_retrieve over a clip index)
    python export.py triton-repo --artifact engines/NAME --out REPO [--index INDEX]
                     (for the Triton container; --index also writes twbert_retrieve)
    python export.py index-split --index INDEX --shards S --out DIR
                     (S shards of a clip index, each served by its own `serve --index SHARD`)
    python export.py query --shards HOST:PORT,... --text "a caption" [--k 50] [--top N]
                     (one query over every shard's server, merged into the unsplit ranking)

Without --ckpt the demo checkpoint is used ('demo'); --calib-data demo:calib and --val-data demo
name the demo splits; any directory with annotations.jsonl and the videos it names works.
Exit codes: 0 success, 1 a validation gate failed (or TensorRT-RTX's parser or builder refused a
graph), 2 bad input (one line), 3 an internal error
(one line; the traceback goes to a file named there, and TWBERT_DEBUG=1 lets it through instead),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM); either way the partial artifact is removed.
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED = 1, 2, 3, 130
DEBUG_ENV = "TWBERT_DEBUG"  # =1: an internal error raises with its traceback


def export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python export.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="demo", help="checkpoint (ours or the authors'), or 'demo'")
    ap.add_argument("--precision", default="fp16",
                    help="fp32, fp16, int8w, int8 or a comma list; fp32 is always written as the "
                         "base. "
                         "Or a precision per split graph, e.g. video_stem=int8,text=fp16,"
                         "select=fp16,fuse=fp16 (the whole model: the plan's most accurate "
                         "precision, or model=P; docs/split.md)")
    ap.add_argument("--task", choices=["retrieval", "qa"], default="retrieval")
    ap.add_argument("--schedule", help="frame schedule T-K1-K2 (default: the checkpoint's)")
    ap.add_argument("--batch", default="1:1:8", help="dynamic batch range MIN:OPT:MAX")
    ap.add_argument("--max-text-len", type=int, help="text length L (default: the checkpoint's)")
    ap.add_argument("--calib-data", default="demo:calib", help="real clips for FP16/INT8")
    ap.add_argument("--calib-method", choices=["max", "entropy"], default="max",
                    help="INT8 calibration (max measured 5x more accurate than entropy here)")
    ap.add_argument("--no-calib-cache", action="store_true",
                    help="recalibrate even when a cached INT8 result matches model and data, "
                         "and store the fresh result over that cache entry")
    ap.add_argument("--val-data", default="demo", help="real clips for validation")
    ap.add_argument("--val-clips", type=int, metavar="N",
                    help="validate on the first N clips only (retrieval runs every text-video "
                         "pair, N^2 forwards per runner: bound it for large models)")
    ap.add_argument("--out", help="artifact directory (default engines/<ckpt>-<task>-<schedule>)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out directory")
    ap.add_argument("--gate", action="append", default=[], metavar="PRECISION.FIELD=VALUE",
                    help="override a validation gate, e.g. fp16.min_identical=0.98")
    ap.add_argument("--tokenizer", help="tokenizer.json / vocab.txt (default: bundled BERT vocab)")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="allow full unpickling of the checkpoint (only for files you trust)")
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="a video that does not decode: stop, or skip it and go on")
    ap.add_argument("--graphs", choices=["both", "monolithic"], default="both",
                    help="both (default): the whole model (model.<p>.onnx) and beside it the "
                         "split graphs text, video_stem, select, fuse (<graph>.<p>.onnx) that "
                         "`export.py index` and `predict --index` use; monolithic: the whole "
                         "model only (docs/split.md)")
    ap.add_argument("--rtx-engines", action="store_true",
                    help="keep the TensorRT-RTX engines the rtx stage builds on the CPU "
                         "(<file>.rtx.engine + .json, for RTX GPUs; docs/rtx.md)")
    return ap


def input_errors() -> tuple[type[Exception], ...]:
    """What bad input raises: each is reported as one line with exit code 2."""
    from twbert_export.artifact.manifest import ArtifactFormatError
    from twbert_export.data.calibration import CalibrationDataError
    from twbert_export.artifact.input_checks import ModelFileMismatch, OutputDirError, UserError
    from twbert_export.data.preprocess import AnnotationError, VideoDecodeError
    from twbert_export.validation.parity import GateSpecError

    return (UserError, ArtifactFormatError, CalibrationDataError, VideoDecodeError,
            AnnotationError, GateSpecError, OutputDirError, ModelFileMismatch, FileNotFoundError)


def bad_input(error: Exception, hint: str) -> int:
    print(f"error: {error}", file=sys.stderr)
    print(f"hint: {hint}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run_export(argv: list[str]) -> int:
    from twbert_export.artifact.plan import is_plan_spec
    from twbert_export.artifact.render import summary_table
    from twbert_export.export import pipeline
    from twbert_export.trt.rtx import RtxGraphError
    from twbert_export.validation.parity import parse_gate_overrides

    args = export_parser().parse_args(argv)
    try:
        gates = parse_gate_overrides(args.gate)
        plan = args.precision if is_plan_spec(args.precision) else None
        opts = pipeline.ExportOptions(
            ckpt=args.ckpt, plan=plan,
            precisions=() if plan else tuple(p.strip() for p in args.precision.split(",")),
            task=args.task, schedule=args.schedule, batch=args.batch,
            max_text_len=args.max_text_len, calib_data=args.calib_data,
            calib_method=args.calib_method, val_data=args.val_data, out=args.out,
            force=args.force, tokenizer=args.tokenizer, trust_checkpoint=args.trust_checkpoint,
            on_error=args.on_error, gates=gates, calib_cache=not args.no_calib_cache,
            val_limit=args.val_clips, graphs=args.graphs, rtx_engines=args.rtx_engines)
        result = pipeline.run_export(opts)
    except input_errors() as e:
        return bad_input(e, "python export.py --help")
    except RtxGraphError as e:  # NVIDIA's parser or builder refused a graph: a failed gate
        print(f"error: {e}; nothing was written to the output directory", file=sys.stderr)
        return EXIT_GATE_FAILED
    print()
    print(summary_table(result.manifest, result.report))
    out = result.out
    print(f"\nartifacts: {out}/ (manifest.json, report.md, reference/)")
    failed = result.report.failed
    if failed:
        print(f"\nvalidation FAILED for {', '.join(failed)}: see {out}/report.md", file=sys.stderr)
        return EXIT_GATE_FAILED
    ok, why = pipeline.tensorrt_available()
    if ok:
        from twbert_export.trt.cli import build_main

        onnx = str(result.next_onnx)
        print(f"\nTensorRT and a GPU are present: building {onnx}")
        return build_main(["--onnx", onnx, "--target", "auto"])
    print(f"\nTensorRT engine build skipped here: {why}. Validation passed; the artifacts are "
          "ready to build on the device.")
    print("next, copy the directory to the device and run inside it:")
    for command in result.report.next_commands:
        print(f"  {command}")
    return 0


def run_validate(argv: list[str]) -> int:
    if any(a.split("=")[0] in ("--engine", "--model") for a in argv):
        from twbert_export.validation.reference import main as validate_against_reference

        return validate_against_reference(argv)
    from twbert_export.artifact.manifest import PRECISIONS
    from twbert_export.validation.files import validate_onnx
    from twbert_export.validation.parity import parse_gate_overrides

    ap = argparse.ArgumentParser(prog="python export.py validate",
                                 description="Validate an ONNX file against its checkpoint on "
                                 "real clips; exit 1 if a gate fails. On a device: "
                                 "validate --engine FILE (see: validate --engine FILE --help).")
    ap.add_argument("--ckpt", default="demo")
    ap.add_argument("--onnx", required=True)
    ap.add_argument("--val-data", default="demo")
    ap.add_argument("--val-clips", type=int, metavar="N",
                    help="validate on the first N clips only (retrieval: N^2 forwards per runner)")
    ap.add_argument("--task", choices=["retrieval", "qa"])
    ap.add_argument("--precision", choices=PRECISIONS,
                    help="default: from the artifact manifest or the file name model.<p>.onnx")
    ap.add_argument("--gate", action="append", default=[], metavar="PRECISION.FIELD=VALUE")
    ap.add_argument("--tokenizer")
    ap.add_argument("--trust-checkpoint", action="store_true")
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if args.val_clips is not None and args.val_clips < 1:
        return bad_input(ValueError(f"--val-clips must be >= 1, got {args.val_clips}"),
                         "python export.py validate --help")
    try:
        report = validate_onnx(args.ckpt, args.onnx, args.val_data, args.task, args.precision,
                               parse_gate_overrides(args.gate), args.tokenizer,
                               args.trust_checkpoint, args.on_error, limit=args.val_clips)
    except input_errors() as e:
        return bad_input(e, "python export.py validate --help")
    if args.json:
        import json

        print(json.dumps(report, indent=2, default=str))
    for p, r in report["precisions"].items():
        for g in r["gates"]:
            print(f"{p:<5} {'PASS' if g['passed'] else 'FAIL'}  {g['name']}: {g['detail']}")
    failed = {p: r for p, r in report["precisions"].items() if not r["passed"]}
    return EXIT_GATE_FAILED if failed else 0


def run_build(argv: list[str]) -> int:
    from twbert_export.trt.cli import build_main

    return build_main(argv)


def run_predict(argv: list[str]) -> int:
    from twbert_export.retrieval.predict import main

    return main(argv)


def run_index(argv: list[str]) -> int:
    from twbert_export.retrieval.gallery import index_main

    return index_main(argv)


def run_serve(argv: list[str]) -> int:
    from twbert_export.serving.serve import main

    return main(argv)


def run_triton_repo(argv: list[str]) -> int:
    from twbert_export.serving.triton_repo import main

    return main(argv)


def run_index_split(argv: list[str]) -> int:
    from twbert_export.retrieval.shards import split_main

    return split_main(argv)


def run_query(argv: list[str]) -> int:
    from twbert_export.serving.fanout import main

    return main(argv)


def run_command(argv: list[str]) -> int:
    commands = {"validate": run_validate, "predict": run_predict, "build": run_build,
                "index": run_index, "serve": run_serve, "triton-repo": run_triton_repo,
                "index-split": run_index_split, "query": run_query}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    if argv and argv[0] == "export":
        argv = argv[1:]
    return run_export(argv)


def internal_error(error: Exception) -> int:
    """One line for an exception nobody expected (exit 1 means a failed gate, so never that);
    the traceback goes to a file for the bug report."""
    import tempfile
    import traceback

    message = " ".join(str(error).split())  # one line, whatever the exception printed
    try:
        with tempfile.NamedTemporaryFile("w", prefix="twbert-export-", suffix=".traceback",
                                         delete=False) as f:
            f.write(traceback.format_exc())
        where = f"traceback in {f.name}"
    except OSError:
        where = "no traceback file could be written"
    print(f"internal error: {type(error).__name__}: {message} ({where}; {DEBUG_ENV}=1 shows it "
          "here)", file=sys.stderr)
    return EXIT_INTERNAL_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input and failed gates return their own codes, and nothing else
    reaches the user as a traceback (see the exit codes above)."""
    try:
        return run_command(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # run in-process (the signal handlers are installed below)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if os.environ.get(DEBUG_ENV) == "1":
            raise
        return internal_error(e)


def one_line_warnings() -> None:
    """Warnings (a skipped video, a repeated frame, an empty caption) as `warning: ...` lines."""
    import warnings

    warnings.formatwarning = lambda message, category, *_: f"warning: {message}\n"


if __name__ == "__main__":
    from twbert_export.util import stop_on_signals

    one_line_warnings()
    stop_on_signals()
    sys.exit(main())
