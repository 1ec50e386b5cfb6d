"""Retrieval and QA metrics of a checkpoint on a data directory.

    python -m model.evaluate --ckpt demo --data demo --task retrieval --json
    python -m model.evaluate --ckpt best.pt --data DIR --task qa --json

Retrieval follows the authors' protocol: every (text, video) pair gets an ITC
score from a full pass (the video features depend on the text through frame selection; blocks
1..s1 are computed once per video); per text the `--k` (50) videos with the highest ITC score
are re-ranked by the ITM match probability, the others stay below them in ITC order. Video to
text is the same with the roles swapped. Ranks are pessimistic: a candidate tied with the right
one counts as ahead of it. QA accuracy counts an answer outside the checkpoint's answer list as
wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any, Callable

import torch

from twbert_export.validation.metrics import retrieval_metrics

from .data.dataset import ClipTextDataset
from .twbert import TWBert

Progress = Callable[[str], None]


# -- model scoring ------------------------------------------------------------------------------
@torch.no_grad()
def encode_stems(model: TWBert, videos: torch.Tensor, batch_size: int,
                 shuffle_frames: torch.Generator | None = None) -> torch.Tensor:
    if shuffle_frames is not None:
        perm = torch.stack([torch.randperm(videos.shape[1], generator=shuffle_frames)
                            for _ in range(videos.shape[0])])
        videos = videos[torch.arange(videos.shape[0])[:, None], perm]
    return torch.cat([model.encode_video_stem(videos[i:i + batch_size])
                      for i in range(0, len(videos), batch_size)])


@torch.no_grad()
def score_pairs(model: TWBert, stems: torch.Tensor, text_embeds: torch.Tensor,
                text_mask: torch.Tensor, video_idx: torch.Tensor, text_idx: torch.Tensor,
                batch_size: int, with_itm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ITC similarity (and ITM match probability) of the pairs (video_idx[i], text_idx[i])."""
    itc, itm = [], []
    for start in range(0, len(video_idx), batch_size):
        v, t = video_idx[start:start + batch_size], text_idx[start:start + batch_size]
        text, mask = text_embeds[t], text_mask[t]
        video = model.select_and_encode(stems[v], text[:, 0])["video_embeds"]
        itc.append(model.itc(text[:, 0], video[:, 0])[2])
        if with_itm:
            fused = model.fuse(text, mask, video)
            itm.append(model.heads(fused, text.shape[1])["itm_logits"].softmax(-1)[:, 1])
    return torch.cat(itc), (torch.cat(itm) if with_itm else None)


@torch.no_grad()
def evaluate_retrieval(model: TWBert, data: ClipTextDataset, k: int = 50, batch_size: int = 64,
                       shuffle_frames: torch.Generator | None = None,
                       progress: Progress | None = None) -> dict[str, Any]:
    ids, mask, gt_video = data.captions()
    if len(ids) == 0:
        raise ValueError(f"{data.data_dir}: no captions to evaluate retrieval on")
    stems = encode_stems(model, data.videos, batch_size, shuffle_frames)
    text_embeds = model.encode_text(ids, mask)
    Nt, Nv = len(ids), len(stems)
    all_t, all_v = torch.meshgrid(torch.arange(Nt), torch.arange(Nv), indexing="ij")
    if progress:
        progress(f"retrieval: ITC over {Nt} texts x {Nv} videos")
    itc = score_pairs(model, stems, text_embeds, mask, all_v.flatten(), all_t.flatten(),
                      batch_size, with_itm=False)[0].view(Nt, Nv)
    # ITM only where either direction's shortlist needs it.
    kt, kv = min(k, Nv), min(k, Nt)
    need = torch.zeros(Nt, Nv, dtype=torch.bool)
    need.scatter_(1, itc.topk(kt, dim=1).indices, True)
    need.scatter_(0, itc.topk(kv, dim=0).indices, True)
    t_idx, v_idx = need.nonzero(as_tuple=True)
    if progress:
        progress(f"retrieval: ITM over {len(t_idx)} shortlisted pairs")
    itm = torch.full((Nt, Nv), float("nan"))
    itm[t_idx, v_idx] = score_pairs(model, stems, text_embeds, mask, v_idx, t_idx,
                                    batch_size, with_itm=True)[1]
    return retrieval_metrics(itc.numpy(), itm.numpy(), gt_video.numpy(), k)


@torch.no_grad()
def evaluate_qa(model: TWBert, data: ClipTextDataset, batch_size: int = 64,
                shuffle_frames: torch.Generator | None = None,
                progress: Progress | None = None) -> dict[str, Any]:
    if model.qa_head is None:
        raise ValueError("this checkpoint has no QA head (num_answers = 0)")
    ids, mask, video, answer = data.questions()
    if len(ids) == 0:
        raise ValueError(f"{data.data_dir}: no questions to evaluate QA on")
    if progress:
        progress(f"qa: {len(ids)} questions over {len(data.videos)} videos")
    stems = encode_stems(model, data.videos, batch_size, shuffle_frames)
    preds = []
    for start in range(0, len(ids), batch_size):
        sl = slice(start, start + batch_size)
        text = model.encode_text(ids[sl], mask[sl])
        video_embeds = model.select_and_encode(stems[video[sl]], text[:, 0])["video_embeds"]
        fused = model.fuse(text, mask[sl], video_embeds)
        preds.append(model.heads(fused, text.shape[1])["qa_logits"].argmax(-1))
    correct = torch.cat(preds) == answer
    result: dict[str, Any] = {"accuracy": correct.float().mean().item(), "num_questions": len(ids),
                              "unknown_answers": int((answer < 0).sum())}
    # Per question wording, for the most frequent ones (the demo has two question types).
    rows = [i for i, a in enumerate(data.annotations) if a.question is not None]
    questions = [data.annotations[i].question for i in rows]
    result["by_question"] = {
        q: {"accuracy": correct[[i for i, x in enumerate(questions) if x == q]].float().mean().item(),
            "count": n}
        for q, n in Counter(questions).most_common(10) if n >= 5}
    return result


# -- CLI ----------------------------------------------------------------------------------------
def load_for_eval(ckpt: str, data: str, task: str, tokenizer: str | None = None,
                  on_error: str = "fail", trust_checkpoint: bool = False
                  ) -> tuple[TWBert, ClipTextDataset, dict[str, Any]]:
    from twbert_export.data.assets import resolve_checkpoint, resolve_data
    from twbert_export.data.preprocess import Tokenizer

    from .checkpoint import load_checkpoint

    model, report = load_checkpoint(resolve_checkpoint(ckpt), trust_pickle=trust_checkpoint)
    tok = Tokenizer.from_file(tokenizer) if tokenizer else Tokenizer.default()
    answers = report.metadata.get("answers")
    if task == "qa" and not answers:
        raise ValueError(f"{ckpt}: the checkpoint's metadata has no answer list for QA")
    cfg = model.cfg
    dataset = ClipTextDataset(resolve_data(data), cfg.selector.frames, cfg.video.image_size, tok,
                              cfg.max_text_len, answers, on_error=on_error)
    return model, dataset, report.metadata


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="demo", help="checkpoint path or 'demo'")
    ap.add_argument("--data", default="demo", help="data directory, 'demo' (val) or 'demo:SPLIT'")
    ap.add_argument("--task", choices=["retrieval", "qa"], required=True)
    ap.add_argument("--k", type=int, default=50, help="ITC shortlist re-ranked by ITM")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--selection", choices=["hard", "perturbed"], default="hard",
                    help="frame selection rule: hard (inference) or perturbed (training-time)")
    ap.add_argument("--shuffle-frames", action="store_true",
                    help="ablation: shuffle each clip's frames (seeded) before encoding")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", help="tokenizer.json or vocab.txt (default: bundled BERT vocab)")
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="a video that does not decode: stop, or skip it and go on")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="allow full unpickling of the checkpoint (only for files you trust)")
    ap.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = ap.parse_args(argv)
    log = (lambda msg: print(msg, file=sys.stderr))
    try:
        model, data, _ = load_for_eval(args.ckpt, args.data, args.task, args.tokenizer,
                                       args.on_error, args.trust_checkpoint)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    shuffle = torch.Generator().manual_seed(args.seed) if args.shuffle_frames else None
    with model.selection(args.selection):
        if args.task == "retrieval":
            result = evaluate_retrieval(model, data, args.k, args.batch_size, shuffle, log)
        else:
            result = evaluate_qa(model, data, args.batch_size, shuffle, log)
    result.update(selection=args.selection, shuffled_frames=args.shuffle_frames,
                  skipped_videos=data.skipped)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_result(result))
    return 0


def format_result(r: dict[str, Any]) -> str:
    if "accuracy" in r:
        lines = [f"QA accuracy {100 * r['accuracy']:.1f}% over {r['num_questions']} questions"]
        lines += [f"  {q!r}: {100 * v['accuracy']:.1f}% ({v['count']})"
                  for q, v in r.get("by_question", {}).items()]
        return "\n".join(lines)
    lines = [f"{'':5} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MedR':>6}"]
    for d in ("t2v", "v2t"):
        m = r[d]
        lines.append(f"{d:5} {100 * m['R@1']:6.1f} {100 * m['R@5']:6.1f} {100 * m['R@10']:6.1f} "
                     f"{m['MedR']:6.1f}")
    lines.append(f"{r['num_texts']} texts, {r['num_videos']} videos")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
