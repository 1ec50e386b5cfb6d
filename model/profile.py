"""Parameter and MAC counts of TW-BERT per module and per deployment stage.

    python -m model.profile --preset base --schedule 32-24-16 [--select-layers 6,12] --json
    python -m model.profile --paper-table          # our counts beside the paper's Table A1

MACs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmul, conv and attention
kernels; MACs = FLOPs / 2) on the meta device, so even the base model profiles in about a second
without allocating weights. Element-wise work (softmax, LayerNorm, GELU) is not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import TWBertConfig
from .twbert import TWBert


def count_params(model: TWBert) -> dict[str, int]:
    groups = {"video_encoder": model.video, "frame_selectors": model.selectors,
              "text_encoder": model.text, "cross_modal_encoder": model.cross}
    counts = {name: sum(p.numel() for m in (mods if isinstance(mods, list) else [mods])
                        for p in m.parameters())
              for name, mods in groups.items()}
    counts["heads"] = sum(p.numel() for p in model.parameters()) - sum(counts.values())
    return counts


def _flops(fn, *args) -> tuple[int, Any]:
    with FlopCounterMode(display=False) as counter:
        result = fn(*args)
    return counter.get_total_flops(), result


@torch.no_grad()
def profile(cfg: TWBertConfig, batch: int = 1, text_len: int | None = None) -> dict[str, Any]:
    """Counts for one forward pass at inference (hard selection) of `batch` (video, text) pairs."""
    L = text_len or cfg.max_text_len
    with torch.device("meta"):
        model = TWBert(cfg).eval()
        size = cfg.video.image_size
        video = torch.empty(batch, cfg.selector.frames, 3, size, size)
        ids = torch.zeros(batch, L, dtype=torch.long)
        mask = torch.ones(batch, L, dtype=torch.long)

        stages: dict[str, int] = {}
        stages["text"], text_embeds = _flops(model.encode_text, ids, mask)
        stages["video_stem"], stem = _flops(model.encode_video_stem, video)
        stages["select_and_encode"], video_out = _flops(model.select_and_encode, stem,
                                                        text_embeds[:, 0])
        video_embeds = video_out["video_embeds"]
        stages["fuse"], fused = _flops(model.fuse, text_embeds, mask, video_embeds)
        head_flops, _ = _flops(model.heads, fused, L)
        itc_flops, _ = _flops(model.itc, text_embeds[:, 0], video_embeds[:, 0])
        stages["heads"] = head_flops + itc_flops

    params = count_params(model)
    macs = {name: flops // 2 for name, flops in stages.items()}
    return {
        "schedule": cfg.selector.schedule,
        "select_layers": list(cfg.selector.layers) if cfg.selector.enabled else None,
        "batch": batch,
        "text_len": L,
        "image_size": cfg.video.image_size,
        "params_total": sum(params.values()),
        "params_by_module": params,
        "macs_total": sum(macs.values()),
        "macs_by_stage": macs,
    }


# Table A1 of the paper's supplementary material (GFLOPs per sample, params in M).
PAPER_TABLE_A1 = {
    ("32-24-16", (2, 4)): (569.5, 236), ("32-24-16", (3, 6)): (602.4, 236),
    ("32-24-16", (4, 8)): (635.4, 236), ("32-24-16", (5, 10)): (668.4, 236),
    ("32-24-16", (6, 12)): (701.3, 236),
    ("8", None): (325.0, 232), ("20-14-8", (6, 12)): (445.7, 236), ("12", None): (430.0, 232),
    ("24-18-12", (6, 12)): (534.3, 236), ("16", None): (555.0, 232), ("32", None): (955.0, 232),
}


def paper_table(preset: str = "base") -> str:
    """Markdown table: our params and GMACs next to the paper's Table A1."""
    rows = ["| frames | select layers | paper GFLOPs | paper params (M) | our GMACs | our params (M) "
            "| ours / paper |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (schedule, layers), (paper_gflops, paper_params) in PAPER_TABLE_A1.items():
        cfg = TWBertConfig.preset(preset, schedule, layers or (6, 12))
        p = profile(cfg)
        gmacs = p["macs_total"] / 1e9
        shown_layers = f"[{layers[0]},{layers[1]}]" if layers else "-"
        rows.append(f"| F@{schedule} | {shown_layers} | {paper_gflops:.1f} | {paper_params} "
                    f"| {gmacs:.1f} | {p['params_total'] / 1e6:.1f} | {gmacs / paper_gflops:.3f} |")
    return "\n".join(rows)


def format_report(p: dict[str, Any]) -> str:
    lines = [f"TW-BERT F@{p['schedule']}, select layers {p['select_layers']}, batch {p['batch']}, "
             f"text length {p['text_len']}, {p['image_size']} px"]
    lines.append(f"{'module':<22}{'params (M)':>12}")
    for name, n in p["params_by_module"].items():
        lines.append(f"{name:<22}{n / 1e6:>12.2f}")
    lines.append(f"{'total':<22}{p['params_total'] / 1e6:>12.2f}")
    lines.append(f"{'stage':<22}{'GMACs':>12}")
    for name, n in p["macs_by_stage"].items():
        lines.append(f"{name:<22}{n / 1e9:>12.2f}")
    lines.append(f"{'total':<22}{p['macs_total'] / 1e9:>12.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="base", choices=["base", "tiny"])
    ap.add_argument("--schedule", help="frames T-K1-K2 or T (default: the preset's)")
    ap.add_argument("--select-layers", help="blocks after which the selectors run, e.g. 6,12")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--text-len", type=int, help="text length L (default: the config's 40)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ap.add_argument("--paper-table", action="store_true",
                    help="print a markdown table of our counts beside the paper's Table A1")
    args = ap.parse_args(argv)
    try:
        if args.paper_table:
            print(paper_table(args.preset))
            return 0
        cfg = TWBertConfig.preset(args.preset, args.schedule, args.select_layers)
        result = profile(cfg, args.batch, args.text_len)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
