"""The cascade's first stage, step two: the clips FAISS pooled, scored with the frames the
query's own text makes the selectors keep, from a few per-frame vectors stored at index time.

Why the FAISS score misses: a clip's slot vectors hold the frames that fixed texts (the neutral
text, the anchors) made the selectors keep, and a caption can make them keep others. But the
selectors are cheap to rerun without the `select` graph (docs/twbert-architecture.md, 4): a
frame's score is w . GELU(A f_t + B c), with f_t = GELU(frame_proj(LN(x_t))) of the frame's cls
token (text-independent) and c the text CLS; and when selector 2 sits after the last block (the
paper's schedules, `layers[1] == depth`), the video CLS is the mean of the kept frames' cls tokens
after the final LayerNorm, so the ITC vector is normalize(mean of vision_proj(LN(x_t))) over the
frames selector 2 keeps. Stored per video (`VideoSelections`, one file each):

    first   (T, D)       A1 f_t of the stem's T frames (selector 1's frame side)
    kept    (U, K1)      selector 1's choices the slots' texts made, each once (U <= slots)
    second  (U, K1, D)   A2 f_t of those K1 frames after the last block (selector 2's frame side)
    vision  (U, K1, E)   vision_proj(LN(x_t)) of those frames

A query reruns selector 1 on `first`. When its choice is one of the U stored, selector 2 on
`second` and the mean of `vision` give the clip's ITC vector as the `select` graph computes it (to
float rounding); else the clip's score is the best over the stored choices, an estimate
(docs/benchmarks.md: how often each happens, and the recall). The exact stage then runs `select`
on the best M of the pool, as before. The per-frame tensors come from the artifact's own `select`
graph, run with three of its inner tensors as extra outputs (`SelectionProbe`); the weights are the
FP32 file's (`SelectorWeights`); nothing is re-exported and the model is unchanged.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..util import atomic_path, file_sha256, require

DIRECTORY = "first_stage/selection"  # one file per video: <sha256>.sel (`VideoSelections`)
SUFFIX = ".sel"
MAGIC = b"TWSEL\x00\x01\x00"
WEIGHTS_FILE = "first_stage/selectors.npz"  # the query side of both selectors
POOL_FACTOR = 8  # FAISS pools this many times M clips for step two (docs/benchmarks.md)
FORMAT = 1


class SelectionStageError(ValueError):
    """A graph the selection step cannot read its tensors or weights from."""


# -- arithmetic shared by index and query -------------------------------------------------------
def gelu(x: np.ndarray) -> np.ndarray:
    """GELU (erf form), with erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7):
    numpy has no erf, and the serving environment has no scipy."""
    z = np.abs(x) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = ((((1.061405429 * t - 1.453152027) * t + 1.421413741) * t - 0.284496736) * t
            + 0.254829592) * t
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return (0.5 * x * (1.0 + erf)).astype(np.float32)


def kept_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """(..., T) scores -> (..., T) bool, the k highest, a tie going to the earlier frame: the
    rule of the graph's hard top-k (`model.selector.hard_topk_indicators`)."""
    T = scores.shape[-1]
    earlier = np.tri(T, k=-1, dtype=bool)  # [t, u]: u before t
    s_t, s_u = scores[..., :, None], scores[..., None, :]
    ahead = (s_u > s_t) | ((s_u == s_t) & earlier)
    return ahead.sum(-1) < k


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


# -- weights, read from the FP32 select graph -----------------------------------------------------
@dataclass
class SelectorWeights:
    """Both selectors' fuse and output weights, split into frame and text halves (the fuse
    Linear acts on [f_t, c]), the final LayerNorm and `vision_proj`; `keep` (K1, K2)."""
    frame_fuse: tuple[np.ndarray, np.ndarray]  # (D, D) each: the half that multiplies f_t
    text_fuse: tuple[np.ndarray, np.ndarray]  # (D, D) each: the half that multiplies c
    score_out: tuple[np.ndarray, np.ndarray]  # (D,) each
    norm: tuple[np.ndarray, np.ndarray, float]  # the video encoder's final LayerNorm
    vision: tuple[np.ndarray, np.ndarray]  # vision_proj (E, D), (E,)
    keep: tuple[int, int]

    @classmethod
    def from_select_graph(cls, path: str | Path, keep: tuple[int, int],
                          vision: tuple[np.ndarray, np.ndarray]) -> "SelectorWeights":
        onnx = require("onnx", "to read the selectors' weights from the select graph")
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i).astype(np.float32) for i in graph.initializer}
        fuse, out = [], []
        for s in (1, 2):
            concat = scorer_concat(graph, s, inits)
            fuse_mm = next(n for n in graph.node
                           if n.op_type == "MatMul" and n.input[0] == concat.output[0])
            fuse.append(inits[fuse_mm.input[1]])  # (2D, D): rows 0..D-1 take f_t
            outs = [n for n in graph.node if n.name.startswith(f"/model/selector{s}/")
                    and n.op_type == "MatMul" and n.input[1] in inits
                    and inits[n.input[1]].shape[-1] == 1]
            if len(outs) != 1:
                raise SelectionStageError(f"{path}: selector {s}'s output Linear not found")
            out.append(inits[outs[0].input[1]][:, 0])
        norm = next((n for n in graph.node if n.op_type == "LayerNormalization"
                     and n.name.startswith("/model/video/norm/")), None)
        if norm is None or norm.input[1] not in inits or norm.input[2] not in inits:
            raise SelectionStageError(f"{path}: the video encoder's final LayerNorm not found")
        eps = next((a.f for a in norm.attribute if a.name == "epsilon"), 1e-5)
        D = out[0].shape[0]
        return cls((fuse[0][:D], fuse[1][:D]), (fuse[0][D:], fuse[1][D:]), (out[0], out[1]),
                   (inits[norm.input[1]], inits[norm.input[2]], float(eps)), vision,
                   (int(keep[0]), int(keep[1])))

    def save_query_side(self, index_dir: Path) -> tuple[str, str]:
        """What a query needs (text halves, output weights, keep) into the index, atomically;
        (relative path, sha256)."""
        buffer = io.BytesIO()
        np.savez(buffer, text_fuse_1=self.text_fuse[0], text_fuse_2=self.text_fuse[1],
                 score_out_1=self.score_out[0], score_out_2=self.score_out[1],
                 keep=np.array(self.keep, np.int64))
        path = index_dir / WEIGHTS_FILE
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(buffer.getvalue())
        return WEIGHTS_FILE, file_sha256(path)


@dataclass
class QuerySide:
    """The selectors' text halves and output weights as an index stores them."""
    text_fuse: tuple[np.ndarray, np.ndarray]
    score_out: tuple[np.ndarray, np.ndarray]
    keep: tuple[int, int]

    @classmethod
    def load(cls, path: Path) -> "QuerySide":
        with np.load(path, allow_pickle=False) as d:
            return cls((d["text_fuse_1"], d["text_fuse_2"]), (d["score_out_1"], d["score_out_2"]),
                       (int(d["keep"][0]), int(d["keep"][1])))


def scorer_concat(graph: Any, selector: int, inits: dict[str, np.ndarray] | set[str]) -> Any:
    """The Concat of [f_t, c] in selector `selector`'s scorer: the node under
    /model/selector{s}/ whose output a MatMul with constant (2D, D) weights takes."""
    for node in graph.node:
        if node.op_type != "Concat" or not node.name.startswith(f"/model/selector{selector}/"):
            continue
        if any(n.op_type == "MatMul" and n.input[0] == node.output[0] and n.input[1] in inits
               for n in graph.node):
            return node
    raise SelectionStageError(f"selector {selector}'s scorer (Concat of frame and text) not "
                              "found in the select graph")


# -- the select graph with three inner tensors as outputs ----------------------------------------
class SelectionProbe:
    """The artifact's `select` ONNX file with the tensors step two stores as extra outputs:
    selector 1's and selector 2's f_t (the Concat's frame input) and the frames' cls tokens
    selector 2 scores (its LayerNorm's input). One ONNX Runtime session, opened on first use."""

    EXTRA = ("frames_1", "frames_2", "frame_cls_2")

    def __init__(self, path: str | Path, max_batch: int = 8, threads: int | None = None):
        """Finds the tensors now (SelectionStageError when the graph lacks them); the session
        opens on first use."""
        onnx = require("onnx", "to add the selection step's outputs to the select graph")
        from onnx import TensorProto, helper

        self.path, self.max_batch, self.threads = Path(path), max_batch, threads
        model = onnx.load(str(self.path))
        graph = model.graph
        consts = {i.name for i in graph.initializer}
        norm2 = [n for n in graph.node if n.op_type == "LayerNormalization"
                 and n.name.startswith("/model/selector2/")]
        if len(norm2) != 1:
            raise SelectionStageError(f"{self.path}: selector 2's LayerNorm not found")
        self.names = dict(zip(self.EXTRA, (scorer_concat(graph, 1, consts).input[0],
                                           scorer_concat(graph, 2, consts).input[0],
                                           norm2[0].input[0])))
        present = {o.name for o in graph.output}
        for tensor in self.names.values():
            if tensor not in present:  # float32: the selectors run in FP32 in every precision
                graph.output.append(helper.make_tensor_value_info(tensor, TensorProto.FLOAT,
                                                                  None))
        self._model: bytes | None = model.SerializeToString()
        self._session: Any = None

    def _open(self) -> Any:
        from ..validation.runners import ort_session

        assert self._model is not None
        session, self._model = ort_session(self._model, self.threads), None
        return session

    def run(self, stems: np.ndarray, text_cls: np.ndarray) -> dict[str, np.ndarray]:
        """The select graph's outputs and EXTRA, for stems (N, ...) and text CLS (N, D)."""
        if self._session is None:
            self._session = self._open()
        given = {"stem": stems, "text_cls": text_cls}  # the select contract's input names
        feed = {i.name: given[i.name].astype(np.float16 if i.type == "tensor(float16)"
                                             else np.float32)
                for i in self._session.get_inputs()}
        names = [o.name for o in self._session.get_outputs()]
        parts = [dict(zip(names, self._session.run(None, {k: v[s:s + self.max_batch]
                                                           for k, v in feed.items()})))
                 for s in range(0, len(stems), self.max_batch)]
        out = {name: np.concatenate([p[name] for p in parts]) for name in names}
        for key, tensor in self.names.items():
            out[key] = out[tensor].astype(np.float32)
        return out


# -- per video ---------------------------------------------------------------------------------
@dataclass
class VideoSelections:
    """What step two stores for one video (the module docstring's table)."""
    first: np.ndarray  # (T, D)
    kept: np.ndarray  # (U, K1) frame indices, ascending
    second: np.ndarray  # (U, K1, D)
    vision: np.ndarray  # (U, K1, E)

    PARTS = ("first", "kept", "second", "vision")

    def save(self, index_dir: Path, sha256: str, slots_digest: str) -> str:
        """Atomically, as first_stage/selection/<sha256>.sel; its relative path. The format:
        MAGIC, a JSON header's length (4 bytes, little-endian) and the header (video, slots,
        each part's shape), then the parts as float32 in PARTS order (frame indices are small
        integers, exact in float32). One read and no zip: a query reads thousands of these."""
        arrays = [np.ascontiguousarray(getattr(self, part), np.float32) for part in self.PARTS]
        header = json.dumps({"format": FORMAT, "video": sha256, "slots": slots_digest,
                             "shapes": [list(a.shape) for a in arrays]}).encode()
        relative = f"{DIRECTORY}/{sha256}{SUFFIX}"
        with atomic_path(index_dir / relative) as tmp:
            Path(tmp).write_bytes(MAGIC + len(header).to_bytes(4, "little") + header
                                  + b"".join(a.tobytes() for a in arrays))
        return relative

    @classmethod
    def load(cls, index_dir: Path, sha256: str, slots_digest: str) -> "VideoSelections | None":
        """The video's stored selections when its file is whole and of these slots, else None."""
        try:
            data = (index_dir / DIRECTORY / f"{sha256}{SUFFIX}").read_bytes()
            if not data.startswith(MAGIC):
                return None
            size = int.from_bytes(data[len(MAGIC):len(MAGIC) + 4], "little")
            start = len(MAGIC) + 4
            header = json.loads(data[start:start + size])
            if header.get("format") != FORMAT or header.get("video") != sha256 \
                    or header.get("slots") != slots_digest:
                return None
            shapes = [tuple(int(d) for d in shape) for shape in header["shapes"]]
            values = np.frombuffer(data, np.float32, offset=start + size)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        counts = [int(np.prod(shape)) for shape in shapes]
        if len(shapes) != len(cls.PARTS) or sum(counts) != len(values):
            return None
        first, kept, second, vision = (values[o - c:o].reshape(shape) for o, c, shape in
                                       zip(np.cumsum(counts), counts, shapes))
        U, K1 = kept.shape if kept.ndim == 2 else (-1, -1)
        if first.ndim != 2 or second.shape[:2] != (U, K1) or vision.shape[:2] != (U, K1):
            return None
        return cls(first, kept.astype(np.int64), second, vision)


def video_selections(weights: SelectorWeights, probes: list[dict[str, np.ndarray]]
                     ) -> list[VideoSelections]:
    """Per video, from the probe's outputs for each slot's text (one dict per slot, N rows)."""
    A1, A2 = weights.frame_fuse
    nw, nb, eps = weights.norm
    W, b = weights.vision
    first = probes[0]["frames_1"] @ A1  # text-independent: any slot's run gives it
    second = [p["frames_2"] @ A2 for p in probes]
    vision = [layer_norm(p["frame_cls_2"], nw, nb, eps) @ W.T + b for p in probes]
    kept = [p["frame_indices_1"] for p in probes]
    out = []
    for row in range(len(first)):
        choices: dict[tuple[int, ...], int] = {}
        for slot, k in enumerate(kept):
            choices.setdefault(tuple(int(i) for i in k[row]), slot)
        slots = list(choices.values())
        out.append(VideoSelections(first[row].astype(np.float32),
                                   np.array(list(choices), np.int64),
                                   np.stack([second[s][row] for s in slots]).astype(np.float32),
                                   np.stack([vision[s][row] for s in slots]).astype(np.float32)))
    return out


# -- the query ---------------------------------------------------------------------------------
def scores(side: QuerySide, text_cls: np.ndarray, text_vector: np.ndarray,
           videos: list[VideoSelections]) -> tuple[np.ndarray, np.ndarray]:
    """Each video's ITC cosine for the query (text CLS (1, D), unit ITC vector (E,)), and
    whether it is exact (selector 1's choice stored) or an estimate (the best stored choice)."""
    if not videos:
        return np.empty(0, np.float32), np.empty(0, bool)
    K1, K2 = side.keep
    c = text_cls.reshape(-1).astype(np.float32)
    z1, z2 = c @ side.text_fuse[0], c @ side.text_fuse[1]
    first = np.stack([v.first for v in videos])  # (R, T, D)
    chosen = kept_mask(gelu(first + z1) @ side.score_out[0], K1)  # (R, T)
    R, U = len(videos), max(len(v.kept) for v in videos)
    kept = np.full((R, U, K1), -1, np.int64)
    second = np.zeros((R, U, K1, first.shape[-1]), np.float32)
    vision = np.zeros((R, U, K1, videos[0].vision.shape[-1]), np.float32)
    for r, v in enumerate(videos):
        n = len(v.kept)
        kept[r, :n], second[r, :n], vision[r, :n] = v.kept, v.second, v.vision
    valid = kept[..., 0] >= 0  # (R, U)
    frames = np.arange(first.shape[1])
    query_kept = np.where(chosen, frames, first.shape[1])  # kept frames ascending, others last
    query_kept = np.sort(query_kept, axis=1)[:, :K1]
    exact = (kept == query_kept[:, None, :]).all(-1) & valid  # (R, U)
    keep2 = kept_mask(gelu(second + z2) @ side.score_out[1], K2)  # (R, U, K1)
    video = (vision * keep2[..., None]).sum(2) / K2
    video = video / np.maximum(np.linalg.norm(video, axis=-1, keepdims=True), 1e-12)
    cosine = np.where(valid, video @ text_vector.reshape(-1), -np.inf)  # (R, U)
    found = exact.any(1)
    best = np.where(found, cosine[np.arange(R), exact.argmax(1)], cosine.max(1))
    return best.astype(np.float32), found
