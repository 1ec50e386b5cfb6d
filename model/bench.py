"""Inference speed of the reference model (random weights, hard selection).

    python -m model.bench --preset base --schedule 32-24-16 --batch 1,8 \
        --dtype fp32,bf16,fp16 --device cuda --json results.json

Prints a table (median latency, samples/s, achieved TFLOP/s from the profiled MACs); `--json PATH`
also saves the rows, `--json -` prints JSON instead of the table. bf16 / fp16 run under autocast
(the frame selection stays in FP32 inside the model). `--against 32` also times that schedule and
compares the latency ratio with the MACs ratio (does selection save the time it saves in MACs?).
This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any

import torch

from .config import TWBertConfig
from .profile import profile
from .twbert import TWBert

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_forward(model: TWBert, batch: int, dtype: str, device: torch.device, warmup: int,
                 repeat: int, text_len: int) -> list[float]:
    cfg = model.cfg
    size = cfg.video.image_size
    video = torch.randn(batch, cfg.selector.frames, 3, size, size, device=device)
    ids = torch.randint(1000, 2000, (batch, text_len), device=device)
    mask = torch.ones(batch, text_len, dtype=torch.long, device=device)
    autocast = torch.autocast(device.type, dtype=DTYPES[dtype], enabled=dtype != "fp32")
    times = []
    for i in range(warmup + repeat):
        _sync(device)
        start = time.perf_counter()
        with autocast:
            model(video, ids, mask)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def top_ops(model: TWBert, batch: int, dtype: str, device: torch.device, text_len: int,
            rows: int) -> str:
    """One profiled forward: the ops that take the most device (or CPU) time, as a table."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with torch_profile(activities=activities) as prof:
        time_forward(model, batch, dtype, device, 0, 1, text_len)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def run(cfg: TWBertConfig, batches: list[int], dtypes: list[str], device: torch.device,
        warmup: int, repeat: int, progress=print, top: int = 0) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = TWBert(cfg).eval().to(device)
    rows = []
    for batch in batches:
        macs = profile(cfg, batch)["macs_total"]
        for dtype in dtypes:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = time_forward(model, batch, dtype, device, warmup, repeat, cfg.max_text_len)
            median = statistics.median(times)
            row = {"batch": batch, "dtype": dtype, "median_ms": median * 1e3,
                   "min_ms": min(times) * 1e3, "samples_per_s": batch / median,
                   "tflops": 2 * macs / median / 1e12, "gmacs": macs / 1e9, "runs": len(times)}
            if device.type == "cuda":
                row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rows.append(row)
            progress(f"  batch {batch} {dtype}: {row['median_ms']:.1f} ms")
            if top:
                progress(top_ops(model, batch, dtype, device, cfg.max_text_len, top))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'batch':>5} {'dtype':>5} {'median ms':>10} {'samples/s':>10} {'TFLOP/s':>8}"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['dtype']:>5} {r['median_ms']:>10.1f} "
                     f"{r['samples_per_s']:>10.2f} {r['tflops']:>8.3f}")
    return "\n".join(lines)


def compare(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (batch, dtype): latency ratio and MACs ratio of `rows` over `base_rows`."""
    base = {(r["batch"], r["dtype"]): r for r in base_rows}
    out = []
    for r in rows:
        b = base[(r["batch"], r["dtype"])]
        latency, macs = r["median_ms"] / b["median_ms"], r["gmacs"] / b["gmacs"]
        out.append({"batch": r["batch"], "dtype": r["dtype"], "latency_ratio": latency,
                    "macs_ratio": macs, "relative_gap": latency / macs - 1})
    return out


def format_comparison(rows: list[dict[str, Any]], schedule: str, against: str) -> str:
    lines = [f"F@{schedule} / F@{against}:",
             f"{'batch':>5} {'dtype':>5} {'latency':>8} {'MACs':>8} {'gap':>7}"]
    for r in rows:
        lines.append(f"{r['batch']:>5} {r['dtype']:>5} {r['latency_ratio']:>8.3f} "
                     f"{r['macs_ratio']:>8.3f} {100 * r['relative_gap']:>+6.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", choices=["base", "tiny"])
    ap.add_argument("--schedule", help="frames T-K1-K2 or T (default: the preset's)")
    ap.add_argument("--select-layers")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--dtype", default="fp32", help="comma-separated: fp32, bf16, fp16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--against", metavar="SCHEDULE",
                    help="also time this schedule (e.g. 32) and compare latency and MACs ratios")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--top-ops", type=int, default=0, metavar="N",
                    help="after timing, profile one forward and print the N costliest ops")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="save rows as JSON to PATH; '-' (or no PATH) prints JSON instead "
                         "of the table")
    args = ap.parse_args(argv)
    try:
        cfg = TWBertConfig.preset(args.preset, args.schedule, args.select_layers)
        base_cfg = (TWBertConfig.preset(args.preset, args.against, args.select_layers)
                    if args.against else None)
        batches = [int(b) for b in args.batch.split(",")]
        dtypes = args.dtype.split(",")
        unknown = [d for d in dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"unknown dtype {unknown}; choose from {list(DTYPES)}")
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is visible")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda msg: print(msg, file=sys.stderr))
    log(f"TW-BERT {args.preset} F@{cfg.selector.schedule} on {device_name(device)}, "
        f"torch {torch.__version__}")
    rows = run(cfg, batches, dtypes, device, args.warmup, args.repeat, progress=log,
               top=args.top_ops)
    result = {"preset": args.preset, "schedule": cfg.selector.schedule,
              "select_layers": list(cfg.selector.layers), "device": device_name(device),
              "torch": torch.__version__, "warmup": args.warmup, "rows": rows}
    if base_cfg is not None:
        log(f"against F@{base_cfg.selector.schedule}")
        base_rows = run(base_cfg, batches, dtypes, device, args.warmup, args.repeat, progress=log)
        result["against"] = {"schedule": base_cfg.selector.schedule, "rows": base_rows,
                             "comparison": compare(rows, base_rows)}
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        print(format_table(rows))
        if base_cfg is not None:
            print(f"\nF@{base_cfg.selector.schedule}:")
            print(format_table(result["against"]["rows"]))
            print()
            print(format_comparison(result["against"]["comparison"], cfg.selector.schedule,
                                    base_cfg.selector.schedule))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
