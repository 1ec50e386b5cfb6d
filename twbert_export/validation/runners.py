"""Runners with one interface (Polygraphy's: activate, infer on a dict of numpy arrays,
deactivate), so parity is a comparison of runners.

- ONNX Runtime: Polygraphy's own `OnnxrtRunner`, on the CPU provider with a set thread count.
- PyTorch: `TorchRunner` below, the reference model with a chosen frame-selection rule.
Both return the contract's outputs in the contract's order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..artifact.contract import IOContract
from ..util import require

if TYPE_CHECKING:
    from model import TWBert


def _base_runner():
    return require("polygraphy.backend.base", "for the runner interface").BaseRunner


def ort_session(path: str | Path | bytes, threads: int | None = None,
                profile_prefix: str | None = None, arena: bool = True):
    """A CPU ONNX Runtime session (explicitly CPU: onnxruntime-gpu would try CUDA first) of a
    file or a serialized model;
    with `profile_prefix`, ONNX Runtime's profiler records every run (`end_profiling`); without
    `arena`, each run's intermediate tensors are freed when it ends instead of kept for the next
    (less memory between runs, same values)."""
    ort = require("onnxruntime", "to run ONNX files on the CPU")
    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = arena
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def ort_runner(path: str | Path, name: str | None = None, threads: int | None = None):
    onnxrt = require("polygraphy.backend.onnxrt", "for the ONNX Runtime runner")
    return onnxrt.OnnxrtRunner(lambda: ort_session(path, threads), name=name or Path(path).stem)


class RecentStems:
    """The video stems (`TWBert.encode_video_stem`: the blocks before the first selector, which
    do not depend on the text) of the last few clips, found by content. Validation runs each clip
    against every text in turn, and the stem is the larger part of a forward pass."""

    def __init__(self, model: TWBert, capacity: int = 4):
        self.model, self.capacity = model, capacity
        self.stems: OrderedDict[bytes, Any] = OrderedDict()
        self.computed = 0

    def __call__(self, video: np.ndarray):
        import torch

        video = np.ascontiguousarray(video)
        if not self.capacity:
            self.computed += len(video)
            return self.model.encode_video_stem(torch.from_numpy(video))
        keys = [hashlib.blake2b(clip.tobytes(), digest_size=16).digest() for clip in video]
        new = {key: row for row, key in enumerate(keys) if key not in self.stems}
        if new:
            stems = self.model.encode_video_stem(torch.from_numpy(video[list(new.values())]))
            self.computed += len(new)
            self.stems.update(zip(new, stems))
        batch = torch.stack([self.stems[key] for key in keys])
        for key in keys:
            self.stems.move_to_end(key)
        while len(self.stems) > self.capacity:
            self.stems.popitem(last=False)
        return batch


def make_torch_runner(model: "TWBert", contract: IOContract, selection: str = "hard",
                      name: str | None = None, seed: int = 0, reuse_stems: bool = True):
    """PyTorch reference as a Polygraphy runner. selection: "hard" (what export traces) or
    "perturbed" (the training-time rule, seeded per call for repeatability). With `reuse_stems`
    a clip seen in one of the last few calls reuses its stem (`RecentStems`); a benchmark turns
    it off to time whole forward passes."""
    import torch

    BaseRunner = _base_runner()
    TensorMetadata = require("polygraphy.common", "for runner metadata").TensorMetadata

    class TorchRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name or f"torch-{selection}", prefix="torch-runner")

        def activate_impl(self):
            self.model = model.eval()
            self.stems = RecentStems(self.model, capacity=4 if reuse_stems else 0)

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for spec in contract.inputs:
                meta.add(spec.name, spec.np_dtype, [-1 if d == "batch" else d for d in spec.shape])
            return meta

        def infer_impl(self, feed_dict: dict[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
            ids, mask = (torch.from_numpy(np.ascontiguousarray(feed_dict[n]))
                         for n in ("input_ids", "attention_mask"))
            with torch.no_grad(), self.model.selection(selection):
                stem = self.stems(feed_dict["video"])
                if selection == "perturbed":
                    torch.manual_seed(seed)
                out = self.model.forward_from_stem(stem, ids, mask)
            return OrderedDict((n, out[n].numpy()) for n in contract.output_names)

        def deactivate_impl(self):
            del self.model, self.stems

    return TorchRunner()


def run_batches(runner: Any, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Run an activated runner over feeds and concatenate each output over the batch."""
    results: dict[str, list[np.ndarray]] = {}
    for feed in feeds:
        for name, value in runner.infer(feed).items():
            results.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(parts) for name, parts in results.items()}


def batched(feed: dict[str, np.ndarray], batch: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(feed.values())))
    return [{k: v[i:i + batch] for k, v in feed.items()} for i in range(0, n, batch)]
