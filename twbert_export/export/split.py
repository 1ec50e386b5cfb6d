"""Split deployment: four graphs from one TW-BERT, composed back into the monolithic I/O.

    text        input_ids, attention_mask      -> text_embeds, text_cls
    video_stem  video                          -> stem
    select      stem, text_cls                 -> itc_sim, video_embeds, frame_scores_1,
                                                  frame_indices_1, frame_scores_2, frame_indices_2
    fuse        text_embeds, attention_mask,   -> itm_logits (and qa_logits for QA)
                video_embeds

The cuts are the model's own stages (`TWBert.encode_text`, `encode_video_stem`,
`select_and_encode`, `fuse`, `heads`). The stem does not depend on the text, so a clip's stem is
computed once when the clip is recorded (`clip_index`); the text runs once per query.

`select` takes the text's CLS vector (B, D), not all of text_embeds (B, L, D) and the mask: the
selectors and ITC read only the CLS, and a graph input nobody reads would still have to be fed
(and, on TensorRT, bound to a device buffer of L times the size). The `text` graph therefore
outputs `text_cls` beside `text_embeds`: a device runner binds it as its own buffer instead of
slicing a strided view on the host. ITC is computed in `select` (it needs the video CLS that
`select` makes, and the text projection is one small matrix product), so a query scores every
clip with `select` alone and runs `fuse` only on its shortlist (docs/split.md).

Each graph has its own `IOContract` (batch dynamic), is exported by `onnx_export.export_onnx`
(dynamo, opset 19, nodes named by module scope: the selectors' nodes keep the names
`/model/selector{1,2}/...` that `precision.SELECTION_NODES` keeps in FP32) and rewritten by
`rewrite.rewrite`. `validation.composed.ComposedSplit` runs the four files and gives the
monolithic outputs (validation, calibration rows of each graph, retrieval).

Timing of one query over N indexed clips, split against the whole model:
`python -m twbert_export.bench.artifact_bench --artifact engines/NAME --gallery 100,1000`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from ..artifact.contract import BATCH, IOContract, TensorSpec
from ..data.calibration import FeedSet
from ..validation.composed import GRAPHS, ComposedSplit, graph_feeds
from ..util import Stopwatch, human_size
from .job import Conversion, Loaded, StageLog

if TYPE_CHECKING:
    import torch
    from model import TWBert, TWBertConfig

    from ..precision import PrecisionReport

SELECTION_OUTPUTS = ("frame_scores_1", "frame_indices_1", "frame_scores_2", "frame_indices_2")


# -- contracts ----------------------------------------------------------------------------------
def split_contracts(monolithic: IOContract, cfg: "TWBertConfig") -> dict[str, IOContract]:
    """The four graphs' contracts, derived from the monolithic one (text length, frames, image
    size, task, batch range) and the model configuration (widths). Torch-free."""
    D, L, T = cfg.dim, monolithic.text_len, monolithic.frames
    stem_tokens = cfg.video.tokens_per_frame
    spec = {t.name: t for t in (*monolithic.inputs, *monolithic.outputs)}
    text_embeds = TensorSpec("text_embeds", "float32", (BATCH, L, D))
    text_cls = TensorSpec("text_cls", "float32", (BATCH, D))
    stem = TensorSpec("stem", "float32", (BATCH, T, stem_tokens, D))
    video_embeds = TensorSpec("video_embeds", "float32", (BATCH, cfg.video_tokens, D))
    selection = tuple(spec[n] for n in SELECTION_OUTPUTS if n in spec)
    heads = tuple(spec[n] for n in ("itm_logits", "qa_logits") if n in spec)
    graphs = {
        "text": ((spec["input_ids"], spec["attention_mask"]), (text_embeds, text_cls)),
        "video_stem": ((spec["video"],), (stem,)),
        "select": ((stem, text_cls), (spec["itc_sim"], video_embeds, *selection)),
        "fuse": ((text_embeds, spec["attention_mask"], video_embeds), heads),
    }
    return {name: IOContract(inputs, outputs, monolithic.batch, monolithic.task,
                             monolithic.schedule, monolithic.opset)
            for name, (inputs, outputs) in graphs.items()}


def example_inputs(contract: IOContract, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for any graph's contract; the second sample's text is half padding (as
    `onnx_export.example_feed` does for the monolithic graph)."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for spec in contract.inputs:
        shape = spec.concrete(batch)
        if spec.name == "input_ids":
            feed[spec.name] = rng.integers(1000, 2000, shape, dtype=np.int64)
            feed[spec.name][:, 0] = 101
        elif spec.name == "attention_mask":
            feed[spec.name] = np.ones(shape, np.int64)
            feed[spec.name][1:, shape[1] // 2:] = 0
        else:
            feed[spec.name] = rng.standard_normal(shape, dtype=np.float32)
    if "input_ids" in feed and "attention_mask" in feed:
        feed["input_ids"] *= feed["attention_mask"]
    return feed


# -- export -------------------------------------------------------------------------------------
def graph_wrapper(model: "TWBert", graph: str, contract: IOContract) -> "torch.nn.Module":
    """One stage of the model as a module whose forward takes the contract's inputs by name
    (torch.export matches dynamic shapes by parameter name) and returns its outputs in order.
    The model is the `model` attribute, as in the monolithic wrapper, so nodes are named alike."""
    import torch

    names = contract.output_names

    class Stage(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

    class Text(Stage):
        def forward(self, input_ids, attention_mask):
            text_embeds = self.model.encode_text(input_ids, attention_mask)
            return text_embeds, text_embeds[:, 0]

    class VideoStem(Stage):
        def forward(self, video):
            return (self.model.encode_video_stem(video),)

    class Select(Stage):
        def forward(self, stem, text_cls):
            out = self.model.select_and_encode(stem, text_cls)
            _, _, out["itc_sim"] = self.model.itc(text_cls, out["video_embeds"][:, 0])
            return tuple(out[n] for n in names)

    class Fuse(Stage):
        def forward(self, text_embeds, attention_mask, video_embeds):
            fused = self.model.fuse(text_embeds, attention_mask, video_embeds)
            out = self.model.heads(fused, text_embeds.shape[1])
            return tuple(out[n] for n in names)

    stages = {"text": Text, "video_stem": VideoStem, "select": Select, "fuse": Fuse}
    return stages[graph]().eval()


def export_split(model: "TWBert", contracts: dict[str, IOContract], out_dir: str | Path,
                 graphs: tuple[str, ...] = GRAPHS) -> dict[str, Path]:
    """Export and rewrite each graph to OUT/<graph>.fp32.onnx (the raw export is removed)."""
    from .onnx_export import export_onnx
    from .rewrite import rewrite

    out_dir = Path(out_dir)
    files = {}
    for graph in graphs:
        contract = contracts[graph]
        raw = out_dir / f"{graph}.raw.onnx"
        export_onnx(model, contract, raw, wrapper=graph_wrapper(model, graph, contract),
                    example=example_inputs(contract))
        files[graph] = out_dir / f"{graph}.fp32.onnx"
        rewrite(raw, files[graph], contract)
        raw.unlink()
    return files


# -- precision ----------------------------------------------------------------------------------
def split_to_fp16(fp32_files: dict[str, Path], contracts: dict[str, IOContract],
                  monolithic: IOContract, calib: FeedSet, out_dir: str | Path
                  ) -> tuple[dict[str, Path], dict[str, "PrecisionReport"]]:
    """Each graph through `precision.to_fp16` (AutoCast, FP32 I/O, the selection and
    out-of-range nodes kept FP32), its activation ranges taken on its own inputs as the FP32
    pipeline computes them from the calibration rows. -> OUT/<graph>.fp16.onnx and reports."""
    from .. import precision

    from ..validation import parity as validate

    pipeline = ComposedSplit(fp32_files, contracts, monolithic,
                             max_batch=validate.validation_batch(monolithic))
    feeds = graph_feeds(pipeline, calib)
    del pipeline
    files, reports = {}, {}
    for graph in GRAPHS:
        files[graph] = Path(out_dir) / f"{graph}.fp16.onnx"
        # GraphFeeds reads as a FeedSet where ActivationRanges and to_fp16 read one.
        graph_rows = cast(FeedSet, feeds[graph])
        with precision.ActivationRanges(fp32_files[graph], graph_rows) as ranges:
            reports[graph] = precision.to_fp16(fp32_files[graph], files[graph], ranges)
    return files, reports


# -- the export's stage ---------------------------------------------------------------------------
def split_export_stage(loaded: Loaded, work: Path, stages: StageLog,
                       conversion: Conversion) -> None:
    """The four split graphs (`split.export_split`: export and rewrite, as the whole model) to
    <graph>.fp32.onnx. After the whole model's export, which it leaves untouched."""
    from .split import export_split

    with Stopwatch() as sw:
        files = export_split(loaded.model, loaded.graph_contracts, work)
        for graph, path in files.items():
            conversion.files[(graph, "fp32")] = path
    sizes = ", ".join(f"{path.name} {human_size(path.stat().st_size)}"
                      for path in files.values())
    stages.line("split", sw.seconds, None, sizes)
