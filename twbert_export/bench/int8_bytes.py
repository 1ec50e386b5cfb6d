"""INT8 file sizes (a benchmark, not a test): the bytes of the int8 and int8w files of a preset
against the FP32 and FP16 ones, and of the int8 file in the form it had before issue 21 (FP32
weights behind QuantizeLinear / DequantizeLinear).

    python -m twbert_export.bench.int8_bytes --preset base --schedule 20-14-8 --calib-clips 16 \
        --json docs/results/int8_bytes_base_20-14-8.json

Builds the preset with random weights (seeded as the scale check), exports and rewrites the
whole-model graph, then runs the precision steps of the export on it: FP16, int8w and INT8
(calibrated on the first --calib-clips clips of --calib-data, 16 by default, the fewest the
INT8 step takes: the file's bytes do not depend on how many clips set its activation scales, and
the full 64-clip calibration is the scale check's business). The earlier INT8 form is the int8
file with its weights put back to FP32 + Q/DQ
(`export.legacy.requantize_int8_weights`, the TensorRT 8.x twin's step): the same graph, the
weights stored as before. Target (issue 21): at most 1.1 bytes per parameter of the quantized
layers plus 2 bytes per other parameter.

    python -m twbert_export.bench.int8_bytes --project-from model.fp32.onnx \
        --fp16-bytes N --int8-before-bytes N

projects the sizes from an FP32 graph and measured FP16 and earlier-INT8 sizes instead
(`projected_bytes`), when a preset is too large to convert.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BYTES_PER_QUANTIZED = 1.1  # the target: INT8 weights and their scales
BYTES_PER_OTHER = 2.0  # the FP16 rest


def weight_parameters(path: Path) -> dict[str, int]:
    """Elements of the graph's initializers by storage: int8 (the quantized weights), other."""
    import numpy as np
    import onnx

    counts = {"int8": 0, "other": 0}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        counts["int8" if t.data_type == onnx.TensorProto.INT8 else "other"] += n
    return counts


def earlier_int8_form(int8: Path, dst: Path) -> Path:
    """The int8 file with its INT8 weights back to FP32 + QuantizeLinear (the form before)."""
    import onnx
    import onnx_graphsurgeon as gs

    from ..export.legacy import requantize_int8_weights

    model = onnx.load(str(int8))
    graph = requantize_int8_weights(gs.import_onnx(model))
    onnx.save(gs.export_onnx(graph), str(dst))
    return dst


def int8_bytes(preset: str, schedule: str, calib_data: str, calib_clips: int, seed: int = 0,
               keep: str | None = None) -> dict[str, Any]:
    import torch

    from model import TWBert, TWBertConfig

    from .. import precision
    from ..artifact.contract import BatchRange, IOContract
    from ..data.assets import resolve_data
    from ..data.calibration import load_feeds
    from ..data.preprocess import Tokenizer
    from ..export.onnx_export import export_onnx
    from ..export.rewrite import rewrite

    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="twbert-int8-bytes-") as scratch:
        work = Path(keep or scratch)
        work.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        cfg = TWBertConfig.preset(preset, schedule)
        model = TWBert(cfg).eval()
        params = sum(p.numel() for p in model.parameters())
        contract = IOContract.for_model(cfg, "retrieval", BatchRange(1, 1, 8))
        raw, fp32 = work / "model.raw.onnx", work / "model.fp32.onnx"
        export_onnx(model, contract, raw)
        del model
        rewrite(raw, fp32, contract)
        raw.unlink()
        seconds["export + rewrite"] = time.perf_counter() - t0
        calib = load_feeds(resolve_data(calib_data), contract, Tokenizer.default(),
                           limit=calib_clips, texts_per_video=1)
        files = {"fp32": fp32}
        with precision.ActivationRanges(fp32, calib) as ranges:
            t = time.perf_counter()
            files["fp16"] = work / "model.fp16.onnx"
            precision.to_fp16(fp32, files["fp16"], ranges)
            seen = ranges.seen()
            seconds["fp16"] = time.perf_counter() - t
        with precision.ActivationRanges(fp32, calib) as ranges:
            ranges.resume(seen)
            t = time.perf_counter()
            files["int8w"] = work / "model.int8w.onnx"
            precision.to_int8_weights(fp32, files["int8w"], ranges)
            seconds["int8w"] = time.perf_counter() - t
        t = time.perf_counter()
        files["int8"] = work / "model.int8.onnx"
        precision.to_int8(fp32, files["int8"], calib, "max", use_cache=False, seen=seen)
        seconds["int8"] = time.perf_counter() - t
        files["int8 (FP32 weights, before)"] = earlier_int8_form(files["int8"],
                                                                 work / "model.int8.before.onnx")
        sizes = {name: path.stat().st_size for name, path in files.items()}
        stored = {name: weight_parameters(files[name]) for name in ("int8w", "int8")}
    result: dict[str, Any] = {
        "preset": preset, "schedule": schedule, "parameters": params, "seed": seed,
        "calibration_clips": calib_clips, "onnx_bytes": sizes,
        "bytes_per_parameter": {name: size / params for name, size in sizes.items()},
        "seconds": seconds, "total_seconds": time.perf_counter() - t0}
    for name in ("int8w", "int8"):
        quantized, other = stored[name]["int8"], stored[name]["other"]
        target = BYTES_PER_QUANTIZED * quantized + BYTES_PER_OTHER * other
        result[name] = {"int8_parameters": quantized, "other_stored_elements": other,
                        "target_bytes": target, "within_target": sizes[name] <= target}
    return result


def projected_bytes(fp32: Path, fp16_bytes: int, int8_before_bytes: int) -> dict[str, Any]:
    """The int8w and int8 sizes projected from an FP32 graph and measured FP16 / earlier-INT8
    sizes, for a preset too large to convert on a loaded machine (no conversion runs):

    - int8w = the FP16 file with each weight of `weight_only.weights_to_quantize` (N elements,
      C output channels) as INT8 + an FP16 scale and an INT8 zero point per channel:
      fp16 - 2N + N + 3C;
    - int8 = the earlier INT8 file with those weights' FP32 values (4 B) stored as INT8 (1 B):
      before - 3N, a lower bound when ModelOpt leaves some of them unquantized (GEMV shapes).

    Node and name overhead is left out (on the demo the projections are within 1.1% of the
    files: `--project-from` on its FP32 graph)."""
    import numpy as np
    import onnx

    from ..precision.weight_only import weights_to_quantize

    graph = onnx.load(str(fp32)).graph
    axes = weights_to_quantize(graph)
    inits = {t.name: t for t in graph.initializer}
    elements = sum(int(np.prod(inits[n].dims)) for n in axes)
    channels = sum(int(inits[n].dims[axis]) for n, axis in axes.items())
    parameters = sum(int(np.prod(t.dims)) for t in graph.initializer
                     if t.data_type == onnx.TensorProto.FLOAT)
    target = BYTES_PER_QUANTIZED * elements + BYTES_PER_OTHER * (parameters - elements)
    int8w = fp16_bytes - 2 * elements + elements + 3 * channels
    int8 = int8_before_bytes - 3 * elements
    return {"fp32_graph": str(fp32), "quantized_weights": len(axes),
            "quantized_elements": elements, "channels": channels,
            "float_parameters": parameters, "fp16_bytes": fp16_bytes,
            "int8_before_bytes": int8_before_bytes, "int8w_projected_bytes": int8w,
            "int8_projected_bytes": int8, "target_bytes": target}


def render(result: dict[str, Any]) -> str:
    lines = [f"INT8 file sizes: {result['preset']} F@{result['schedule']} "
             f"({result['parameters'] / 1e6:.1f}M parameters, random weights)",
             f"{'file':<28} {'MB':>9} {'bytes/param':>12}"]
    for name, size in result["onnx_bytes"].items():
        lines.append(f"{name:<28} {size / 1e6:>9.1f} {result['bytes_per_parameter'][name]:>12.2f}")
    for name in ("int8w", "int8"):
        r = result[name]
        lines.append(f"{name}: {r['int8_parameters'] / 1e6:.1f}M INT8 weights; target "
                     f"{r['target_bytes'] / 1e6:.1f} MB (1.1 B each + 2 B per other element): "
                     + ("met" if r["within_target"] else "MISSED"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twbert_export.bench.int8_bytes",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=["base", "tiny"], default="base")
    ap.add_argument("--schedule", default="20-14-8")
    ap.add_argument("--calib-data", default="demo:calib")
    ap.add_argument("--calib-clips", type=int, default=16, help="the fewest INT8 takes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--keep", metavar="DIR", help="keep the graphs in DIR")
    ap.add_argument("--project-from", metavar="FP32_ONNX",
                    help="convert nothing: project the int8w and int8 sizes from this FP32 graph "
                         "and --fp16-bytes / --int8-before-bytes (`projected_bytes`)")
    ap.add_argument("--fp16-bytes", type=int)
    ap.add_argument("--int8-before-bytes", type=int)
    args = ap.parse_args(argv)
    if args.project_from:
        if args.fp16_bytes is None or args.int8_before_bytes is None:
            ap.error("--project-from needs --fp16-bytes and --int8-before-bytes")
        projection = projected_bytes(Path(args.project_from), args.fp16_bytes,
                                     args.int8_before_bytes)
        print("\n".join(f"{k}: {v}" for k, v in projection.items()))
        if args.json:
            from ..util import write_json

            write_json(Path(args.json), projection)
        return 0
    result = int8_bytes(args.preset, args.schedule, args.calib_data, args.calib_clips,
                        args.seed, args.keep)
    print(render(result))
    if args.json:
        from ..util import write_json

        write_json(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
