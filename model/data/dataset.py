"""Torch view of a data directory for training and evaluation.

Decoding, sampling, resizing, normalising and tokenising are done by the one torch-free
implementation in `twbert_export.data.preprocess`; this module only stacks its numpy output into
tensors. Every distinct video is decoded once and kept in memory (the demo splits are a few
tens of MB at the tiny preset's 64 px).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from twbert_export.data.preprocess import TextTruncatedWarning, Tokenizer, load_clips


@dataclass
class Annotation:
    video: int  # index into ClipTextDataset.videos
    caption: str | None
    question: str | None
    answer: str | None


class ClipTextDataset(torch.utils.data.Dataset):
    """One item per annotation line: its clip, caption tokens, question tokens, answer index."""

    def __init__(self, data_dir: str | Path, num_frames: int, size: int, tokenizer: Tokenizer,
                 max_text_len: int, answers: list[str] | None = None, on_error: str = "fail"):
        loader = load_clips(data_dir, num_frames, size, on_error=on_error)
        self.data_dir = Path(data_dir)
        self.video_paths: list[str] = []
        videos: list[np.ndarray] = []
        self.annotations: list[Annotation] = []
        for clip in loader:
            for rec in clip.records:
                self.annotations.append(Annotation(len(videos), rec.get("caption"),
                                                   rec.get("question"), rec.get("answer")))
            self.video_paths.append(clip.video_path)
            videos.append(clip.frames)
        if not videos:
            raise ValueError(f"{data_dir}: no decodable video")
        self.skipped = [e.path for e in loader.skipped]
        self.videos = torch.from_numpy(np.stack(videos))  # (V, T, 3, S, S)

        self.answers = list(answers or [])
        answer_index = {a: i for i, a in enumerate(self.answers)}
        self.answer_ids = torch.tensor([answer_index.get(a.answer, -1) if a.answer else -1
                                        for a in self.annotations])
        self.unknown_answers = sum(1 for a, i in zip(self.annotations, self.answer_ids.tolist())
                                   if a.answer and i < 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", TextTruncatedWarning)
            self.caption_ids, self.caption_mask, n_cap = _encode(
                tokenizer, [a.caption for a in self.annotations], max_text_len)
            self.question_ids, self.question_mask, n_q = _encode(
                tokenizer, [a.question for a in self.annotations], max_text_len)
        self.truncated = n_cap + n_q
        for w in caught:
            if not issubclass(w.category, TextTruncatedWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if self.truncated:
            warnings.warn(f"{data_dir}: {self.truncated} texts were longer than "
                          f"{max_text_len} tokens and were truncated", TextTruncatedWarning)

    def __len__(self) -> int:
        return len(self.annotations)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        a = self.annotations[i]
        return {
            "video": self.videos[a.video],
            "video_index": torch.tensor(a.video),
            "caption_ids": self.caption_ids[i], "caption_mask": self.caption_mask[i],
            "has_caption": torch.tensor(a.caption is not None),
            "question_ids": self.question_ids[i], "question_mask": self.question_mask[i],
            "answer": self.answer_ids[i],
        }

    # -- views used by evaluation ---------------------------------------------------------------
    def captions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every caption line: (ids (N, L), mask (N, L), its video index (N,))."""
        rows = [i for i, a in enumerate(self.annotations) if a.caption is not None]
        video = torch.tensor([self.annotations[i].video for i in rows], dtype=torch.long)
        return self.caption_ids[rows], self.caption_mask[rows], video

    def answer_targets(self) -> torch.Tensor:
        """(V, A) per video: uniform over the known answers of its question lines (rows sum to
        one; a video without any is all zero)."""
        targets = torch.zeros(len(self.videos), len(self.answers))
        for a, i in zip(self.annotations, self.answer_ids.tolist()):
            if i >= 0:
                targets[a.video, i] = 1.0
        return targets / targets.sum(1, keepdim=True).clamp(min=1.0)

    def questions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every question line: (ids, mask, video index, answer index or -1 if not in the list)."""
        rows = [i for i, a in enumerate(self.annotations) if a.question is not None]
        video = torch.tensor([self.annotations[i].video for i in rows], dtype=torch.long)
        return self.question_ids[rows], self.question_mask[rows], video, self.answer_ids[rows]


def _encode(tokenizer: Tokenizer, texts: list[str | None], max_len: int):
    # A line without this text gets "[CLS] [SEP]"; the losses skip it (has_caption / answer -1).
    ids, mask, truncated = tokenizer.encode([t or "" for t in texts], max_len)
    return torch.from_numpy(ids), torch.from_numpy(mask), truncated
