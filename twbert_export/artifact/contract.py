"""The one I/O contract of an exported TW-BERT (in the manner of Optimum's OnnxConfig).

Export, rewriting, precision, engine profiles, runners and validation all read it; it travels in
every artifact's manifest.json. Batch is dynamic within --batch MIN:OPT:MAX; frames, image size
and text length are fixed per export by the schedule and --max-text-len.
Torch-free: a device with only TensorRT and numpy reads it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

OPSET = 19  # Q/DQ INT8 needs 19; TensorRT 10 parses it; dynamo exports no lower than 18.
BATCH = "batch"
# The nodes of the selection path, by the names the export gives them: everything that decides
# which frames are kept (the scorers, their softmax, the hard top-k and the product that gathers
# the kept frames), all under the selector modules. The precision steps keep them FP32 and
# TensorRT-RTX's type audit checks they stayed so. A tuple: ModelOpt's quantize extends the list
# it is given in place (see precision/int8.py).
SELECTION_NODES = (r"/model/selector[12]/.*",)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]  # "batch" marks the dynamic axis

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == BATCH else int(d) for d in self.shape)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)


@dataclass(frozen=True)
class BatchRange:
    min: int = 1
    opt: int = 1
    max: int = 8

    @classmethod
    def parse(cls, text: str) -> "BatchRange":
        """'MIN:OPT:MAX' or a single N (a static batch)."""
        try:
            parts = [int(p) for p in str(text).split(":")]
        except ValueError:
            raise ValueError(f"--batch {text!r} must be MIN:OPT:MAX integers, e.g. 1:1:8") from None
        if len(parts) == 1:
            parts *= 3
        if len(parts) != 3 or not (1 <= parts[0] <= parts[1] <= parts[2]):
            raise ValueError(f"--batch {text!r} must be MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX")
        return cls(*parts)


@dataclass(frozen=True)
class IOContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batch: BatchRange = field(default_factory=BatchRange)
    task: str = "retrieval"
    schedule: str = ""
    opset: int = OPSET

    @classmethod
    def for_model(cls, cfg: Any, task: str = "retrieval", batch: BatchRange | None = None,
                  max_text_len: int | None = None) -> "IOContract":
        """The contract of a TWBertConfig (duck-typed, so this module needs no torch)."""
        if task not in ("retrieval", "qa"):
            raise ValueError(f"task must be 'retrieval' or 'qa', got {task!r}")
        if task == "qa" and not cfg.num_answers:
            raise ValueError("--task qa needs a checkpoint with a QA head (num_answers > 0)")
        L = max_text_len or cfg.max_text_len
        if not 2 <= L <= cfg.text.max_positions:
            raise ValueError(f"--max-text-len {L} must be in [2, {cfg.text.max_positions}]")
        T, S = cfg.selector.frames, cfg.video.image_size
        inputs = (TensorSpec("video", "float32", (BATCH, T, 3, S, S)),
                  TensorSpec("input_ids", "int64", (BATCH, L)),
                  TensorSpec("attention_mask", "int64", (BATCH, L)))
        outputs = [TensorSpec("itm_logits", "float32", (BATCH, 2)),
                   TensorSpec("itc_sim", "float32", (BATCH,))]
        if task == "qa":
            outputs.append(TensorSpec("qa_logits", "float32", (BATCH, cfg.num_answers)))
        if cfg.selector.enabled:
            K1, K2 = cfg.selector.keep
            outputs += [TensorSpec("frame_scores_1", "float32", (BATCH, T)),
                        TensorSpec("frame_indices_1", "int64", (BATCH, K1)),
                        TensorSpec("frame_scores_2", "float32", (BATCH, K1)),
                        TensorSpec("frame_indices_2", "int64", (BATCH, K2))]
        return cls(inputs, tuple(outputs), batch or BatchRange(), task, cfg.selector.schedule)

    # -- views ----------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    @property
    def text_len(self) -> int:
        return int(self.inputs[1].shape[1])

    @property
    def frames(self) -> int:
        return int(self.inputs[0].shape[1])

    @property
    def image_size(self) -> int:
        return int(self.inputs[0].shape[3])

    @property
    def selectors(self) -> list[str]:
        """Names of the selectors present ('1', '2'), from the outputs."""
        return [n[-1] for n in self.output_names if n.startswith("frame_indices_")]

    def profile_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per input: (min, opt, max) shapes, for TensorRT optimization profiles."""
        b = self.batch
        return {t.name: (t.concrete(b.min), t.concrete(b.opt), t.concrete(b.max))
                for t in self.inputs}

    def check_feed(self, feed: dict[str, np.ndarray]) -> None:
        """Raise ValueError if a feed does not match the contract's names, dtypes and shapes."""
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise ValueError(f"missing inputs {missing}; the model takes {self.input_names}")
        batch = feed["video"].shape[0]
        if not self.batch.min <= batch <= self.batch.max:
            raise ValueError(f"batch {batch} is outside the exported range "
                             f"{self.batch.min}..{self.batch.max}")
        for spec in self.inputs:
            arr = feed[spec.name]
            if tuple(arr.shape) != spec.concrete(batch) or arr.dtype != spec.np_dtype:
                raise ValueError(f"input {spec.name}: expected {spec.dtype} "
                                 f"{spec.concrete(batch)}, got {arr.dtype} {tuple(arr.shape)}")

    # -- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IOContract":
        spec = lambda t: TensorSpec(t["name"], t["dtype"], tuple(t["shape"]))  # noqa: E731
        return cls(tuple(spec(t) for t in d["inputs"]), tuple(spec(t) for t in d["outputs"]),
                   BatchRange(**d["batch"]), d["task"], d["schedule"], d["opset"])
