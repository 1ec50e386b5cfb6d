"""Fine-tune TW-BERT for retrieval (ITC + ITM with hard negatives), QA (cross-entropy), or both.

    python -m model.train --data demo:train --val-data demo --task both --preset tiny \
        --out runs/demo

Starts from our checkpoint or the authors' (`--init`), or from scratch; from scratch,
`--video-warmup N` first trains the video encoder alone for N epochs (see `video_warmup`).
AdamW with linear warm-up
and decay, gradient clipping, validation after every epoch, `best.pt` (our checkpoint format) by
the validation metric, `resume.pt` (training state) after every epoch for `--resume`, and a JSON
line per epoch in `train_log.jsonl`. Deterministic for a given seed on a given machine.
The paper's Table A2 settings are the defaults for the base preset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from twbert_export.util import atomic_path

from .checkpoint import load_checkpoint, save_checkpoint
from .config import TWBertConfig
from .data.dataset import ClipTextDataset
from .evaluate import evaluate_qa, evaluate_retrieval
from .twbert import TWBert

# Table A2 (base): learning rate per task; tiny trains from scratch and takes a larger one.
DEFAULT_LR = {("base", "retrieval"): 2.5e-5, ("base", "qa"): 5e-5, ("base", "both"): 5e-5,
              ("tiny", "retrieval"): 5e-4, ("tiny", "qa"): 5e-4, ("tiny", "both"): 5e-4}


# -- losses -------------------------------------------------------------------------------------
def retrieval_losses(model: TWBert, stems: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
                     same: torch.Tensor) -> dict[str, torch.Tensor]:
    """ITC (symmetric InfoNCE over the batch) and ITM on positives plus one hard negative text and
    video per sample, drawn from the ITC similarities. `same[i, j]` marks pairs that are positive
    (the same video, or the same caption)."""
    B = len(stems)
    video = model.select_and_encode(stems, text[:, 0])["video_embeds"]
    text_feat, video_feat, _ = model.itc(text[:, 0], video[:, 0])
    sim_t2v = text_feat @ video_feat.T / model.temp
    targets = same.float() / same.float().sum(1, keepdim=True)
    itc = (-(sim_t2v.log_softmax(1) * targets).sum(1).mean()
           - (sim_t2v.T.log_softmax(1) * targets.T).sum(1).mean()) / 2

    with torch.no_grad():
        weights = sim_t2v.softmax(1).masked_fill(same, 0) + 1e-9 * ~same
        neg_video = torch.multinomial(weights, 1).squeeze(1)  # per text
        weights = sim_t2v.T.softmax(1).masked_fill(same.T, 0) + 1e-9 * ~same.T
        neg_text = torch.multinomial(weights, 1).squeeze(1)  # per video
    valid_v = ~same[torch.arange(B), neg_video]  # a batch of one video has no negative
    valid_t = ~same.T[torch.arange(B), neg_text]
    stems_n = torch.cat([stems[neg_video], stems])
    text_n = torch.cat([text, text[neg_text]])
    mask_n = torch.cat([mask, mask[neg_text]])
    video_n = model.select_and_encode(stems_n, text_n[:, 0])["video_embeds"]
    fused = model.fuse(torch.cat([text, text_n]), torch.cat([mask, mask_n]),
                       torch.cat([video, video_n]))
    logits = model.heads(fused, text.shape[1])["itm_logits"]
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
    keep = torch.cat([torch.ones(B, dtype=torch.bool, device=logits.device), valid_v, valid_t])
    return {"itc": itc, "itm": F.cross_entropy(logits[keep], labels[keep])}


def qa_loss(model: TWBert, stems: torch.Tensor, text: torch.Tensor, mask: torch.Tensor,
            answer: torch.Tensor) -> torch.Tensor:
    video = model.select_and_encode(stems, text[:, 0])["video_embeds"]
    logits = model.heads(model.fuse(text, mask, video), text.shape[1])["qa_logits"]
    return F.cross_entropy(logits, answer)


def training_step(model: TWBert, batch: dict[str, torch.Tensor], task: str
                  ) -> dict[str, torch.Tensor]:
    model.clamp_temperature_()  # as the authors' training step does; the losses divide by temp
    stems = model.encode_video_stem(batch["video"])
    losses: dict[str, torch.Tensor] = {}
    has_caption = batch["has_caption"]
    if task in ("retrieval", "both") and has_caption.sum() >= 2:
        rows = has_caption.nonzero().squeeze(1)
        ids, mask = batch["caption_ids"][rows], batch["caption_mask"][rows]
        vid = batch["video_index"][rows]
        same = (vid[:, None] == vid[None, :]) | (ids[:, None] == ids[None, :]).all(-1)
        text = model.encode_text(ids, mask)
        losses.update(retrieval_losses(model, stems[rows], text, mask, same))
    has_answer = batch["answer"] >= 0
    if task in ("qa", "both") and has_answer.any():
        rows = has_answer.nonzero().squeeze(1)
        ids, mask = batch["question_ids"][rows], batch["question_mask"][rows]
        losses["qa"] = qa_loss(model, stems[rows], model.encode_text(ids, mask), mask,
                               batch["answer"][rows])
    return losses


def video_warmup(model: TWBert, data: ClipTextDataset, epochs: int, lr: float, batch_size: int,
                 weight_decay: float, clip_grad: float, seed: int, log=print) -> list[dict]:
    """Train the video encoder alone, on all T frames, to predict each clip's QA answers.

    The authors start from a TimeSformer pretrained on Kinetics, which already tells motions apart;
    a from-scratch model has no such start, and under the full objective (ITC / ITM / QA through
    the noisy training-time selection) the demo's tiny model learned content but never the camera
    motion. This stage is that missing pretraining, on the training clips only: the mean of the
    frame cls tokens through a temporary linear head, cross-entropy against the uniform
    distribution over the clip's answers. Returns one log entry per epoch.
    """
    targets = data.answer_targets()
    keep = targets.sum(1) > 0
    if not keep.any():
        raise ValueError("--video-warmup needs question / answer lines in the training data")
    videos, targets = data.videos[keep], targets[keep]
    encoder, depth = model.video, model.cfg.video.depth
    head = torch.nn.Linear(model.cfg.dim, targets.shape[1])
    params = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = math.ceil(len(videos) / batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear(s, steps * epochs, steps))
    generator = torch.Generator().manual_seed(seed)
    history = []
    encoder.train()
    for epoch in range(epochs):
        t0, total, correct = time.perf_counter(), 0.0, 0
        for rows in torch.randperm(len(videos), generator=generator).split(batch_size):
            tokens = encoder.run_blocks(encoder.embed(videos[rows]), 0, depth)
            logits = head(encoder.norm(tokens[:, :, 0]).mean(dim=1))
            loss = -(targets[rows] * logits.log_softmax(-1)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(rows)
            correct += (targets[rows].gather(1, logits.argmax(-1, keepdim=True)) > 0).sum().item()
        entry = {"video_warmup_epoch": epoch + 1, "loss": total / len(videos),
                 "top1_is_an_answer": correct / len(videos),
                 "train_seconds": time.perf_counter() - t0}
        log(f"video warm-up {epoch + 1}/{epochs}: loss {entry['loss']:.3f}, top answer right for "
            f"{100 * entry['top1_is_an_answer']:.0f}% of clips")
        history.append(entry)
    return history


# -- schedule and validation --------------------------------------------------------------------
def warmup_linear(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def validation_metrics(model: TWBert, data: ClipTextDataset, task: str) -> dict[str, Any]:
    model.eval()
    metrics: dict[str, Any] = {}
    if task in ("retrieval", "both"):
        metrics["retrieval"] = evaluate_retrieval(model, data)
    if task in ("qa", "both"):
        metrics["qa"] = evaluate_qa(model, data)
    scores = []
    if "retrieval" in metrics:
        scores.append(metrics["retrieval"]["t2v"]["R@1"])
    if "qa" in metrics:
        scores.append(metrics["qa"]["accuracy"])
    metrics["score"] = sum(scores) / len(scores)
    model.train()
    return metrics


def param_groups(model: TWBert, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on biases, norms, embeddings' position tables and the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name and "token" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# -- main loop ----------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> dict[str, Any]:
    from twbert_export.data.assets import resolve_checkpoint, resolve_data
    from twbert_export.data.preprocess import Tokenizer

    out = Path(args.out)
    resume_path = out / "resume.pt"
    if args.resume and not resume_path.is_file():
        raise ValueError(f"--resume: {resume_path} not found")
    if not args.resume and (out / "best.pt").exists() and not args.force:
        raise ValueError(f"{out} already holds a run (best.pt); pass --resume to continue it or "
                         "--force to start over")
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # starting over (--force): the old log would mix two runs
        (out / "train_log.jsonl").unlink(missing_ok=True)
    torch.manual_seed(args.seed)

    tokenizer = Tokenizer.from_file(args.tokenizer) if args.tokenizer else Tokenizer.default()
    answers_path = Path(args.answers) if args.answers else resolve_data(args.data).parent / "answers.json"
    answers = json.loads(answers_path.read_text()) if args.task != "retrieval" else []
    if args.init:
        model, report = load_checkpoint(resolve_checkpoint(args.init), preset=args.preset,
                                        schedule=args.schedule, strict=not args.non_strict,
                                        trust_pickle=args.trust_checkpoint)
        print(report.summary(), file=sys.stderr)
        model.train()
    else:
        cfg = TWBertConfig.preset(args.preset, args.schedule, args.select_layers,
                                  num_answers=len(answers))
        model = TWBert(cfg)
    if args.estimator:
        model.use_estimator(args.estimator)
    cfg = model.cfg
    if answers and cfg.num_answers != len(answers):
        raise ValueError(f"the model has {cfg.num_answers} answers, {answers_path} lists "
                         f"{len(answers)}")
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    train_data = ClipTextDataset(resolve_data(args.data), cfg.selector.frames,
                                 cfg.video.image_size, tokenizer, cfg.max_text_len, answers,
                                 on_error=args.on_error)
    val_data = ClipTextDataset(resolve_data(args.val_data), cfg.selector.frames,
                               cfg.video.image_size, tokenizer, cfg.max_text_len, answers,
                               on_error=args.on_error)
    log(f"data: {len(train_data)} train lines ({len(train_data.videos)} videos), "
        f"{len(val_data)} val lines, decoded in {time.perf_counter() - t0:.1f}s")

    lr = args.lr or DEFAULT_LR[(args.preset, args.task)]
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr)
    steps_per_epoch = math.ceil(len(train_data) / args.batch_size)
    total = steps_per_epoch * args.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_linear(s, total, int(args.warmup_ratio * total)))
    loader_gen = torch.Generator().manual_seed(args.seed)
    start_epoch, best_score, history = 0, -1.0, []
    if args.resume:
        state = torch.load(resume_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader_gen.set_state(state["loader_rng"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, best_score = state["epoch"], state["best_score"]
        log(f"resumed from {resume_path} after epoch {start_epoch}")
    loader = torch.utils.data.DataLoader(train_data, batch_size=args.batch_size, shuffle=True,
                                         generator=loader_gen, drop_last=False)
    metadata = {"answers": answers, "tokenizer": tokenizer.source, "task": args.task,
                "train_data": str(args.data), "seed": args.seed}

    if args.video_warmup and start_epoch == 0:
        for entry in video_warmup(model, train_data, args.video_warmup, lr, args.batch_size,
                                  args.weight_decay, args.clip_grad, args.seed, log):
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
    model.train()
    for epoch in range(start_epoch, args.epochs):
        t_epoch, sums, n = time.perf_counter(), {}, 0
        for step, batch in enumerate(loader):
            losses = training_step(model, batch, args.task)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            scheduler.step()
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.item()
            n += 1
            if (step + 1) % args.log_every == 0 or step + 1 == steps_per_epoch:
                avg = " ".join(f"{k} {v / n:.3f}" for k, v in sums.items())
                log(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{steps_per_epoch} {avg} "
                    f"lr {scheduler.get_last_lr()[0]:.2e}")
        entry: dict[str, Any] = {"epoch": epoch + 1, "train_seconds": time.perf_counter() - t_epoch,
                                 "loss": {k: v / n for k, v in sums.items()}}
        if (epoch + 1) % args.val_every == 0 or epoch + 1 == args.epochs:
            entry["val"] = validation_metrics(model, val_data, args.task)
            score = entry["val"]["score"]
            log(f"epoch {epoch + 1}: validation score {score:.3f} (best {max(best_score, 0):.3f})")
            if score > best_score:
                best_score = score
                save_checkpoint(model, out / "best.pt", overwrite=True,
                                metadata={**metadata, "epoch": epoch + 1, "val": entry["val"]})
                entry["saved_best"] = True
        history.append(entry)
        with open(out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        with atomic_path(resume_path) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "epoch": epoch + 1,
                        "best_score": best_score, "loader_rng": loader_gen.get_state(),
                        "torch_rng": torch.get_rng_state()}, tmp)
    return {"best_score": best_score, "epochs": args.epochs, "out": str(out)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m model.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="demo:train", help="training data directory or demo:train")
    ap.add_argument("--val-data", default="demo", help="validation data directory or demo")
    ap.add_argument("--task", choices=["retrieval", "qa", "both"], default="both")
    ap.add_argument("--preset", choices=["base", "tiny"], default="tiny")
    ap.add_argument("--schedule", help="frame schedule T-K1-K2 (default: the checkpoint's with "
                                       "--init, else the preset's)")
    ap.add_argument("--select-layers")
    ap.add_argument("--estimator", choices=["full", "diagonal"],
                    help="gradient of the training-time frame selection (perturbed top-k): the "
                         "full-Jacobian estimator of Berthet et al. or the authors' diagonal one "
                         "(default: the checkpoint's with --init, else full; docs/model.md)")
    ap.add_argument("--init", help="start from a checkpoint (ours or the authors'); default scratch")
    ap.add_argument("--non-strict", action="store_true",
                    help="with --init: load what matches, report the rest")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="with --init: allow full unpickling (only for files you trust)")
    ap.add_argument("--video-warmup", type=int, default=0, metavar="N",
                    help="first train the video encoder alone for N epochs on the clips' QA "
                         "answers (a stand-in for a pretrained TimeSformer; from scratch)")
    ap.add_argument("--answers", help="JSON list of QA answers (default: DATA/../answers.json)")
    ap.add_argument("--tokenizer", help="tokenizer.json or vocab.txt (default: bundled BERT vocab)")
    ap.add_argument("--out", required=True, help="run directory: best.pt, resume.pt, train_log.jsonl")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out")
    ap.add_argument("--force", action="store_true", help="start over in an --out that has a run")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, help="peak learning rate (default: Table A2 / preset)")
    ap.add_argument("--weight-decay", type=float, default=1e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--clip-grad", type=float, default=5.0)
    ap.add_argument("--val-every", type=int, default=1, help="validate every N epochs")
    ap.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="a video that does not decode: stop, or skip it and go on")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        result = train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
