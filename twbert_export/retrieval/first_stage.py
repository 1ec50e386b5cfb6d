"""The first stage of the retrieval cascade: text-independent vectors per clip in a FAISS
index, searched with the query text's ITC vector (step one), then the pooled clips scored with
the query's own frame selection (step two, `selection_stage`) for a shortlist of M clips, which
`rank` then scores exactly (`select` on the M, `fuse` on the k best of them).

The vectors live in the ITC space the model already has (`TWBert.itc`): a clip's vector is
normalize(vision_proj(video CLS)) with the video CLS from the `select` graph run with a fixed text,
and the query's is normalize(text_proj(text CLS)). Their inner product, divided by the model's
temperature, is the clip's exact ITC score whenever the query's text makes the selectors keep the
frames that fixed text kept. A clip has one vector per fixed text, its slots: slot 0 the neutral
text (NEUTRAL_TEXT, the empty caption), slots 1..P the anchors (`Anchors`: k-means centroids of
the text CLS of captions like the queries, `export.py index --anchors`). A clip's first-stage
score is the largest over its slots: a caption that makes the selectors keep frames the neutral
text drops (a cut to another scene, say) finds the clip through the anchor whose selection is
nearest its own (docs/benchmarks.md measures how often the exact top k falls inside the first M,
with and without anchors). The two projections are read from the `select` graph's own weights
(`Projections`), so nothing is re-exported and the model is unchanged.

On disk, beside the stems (index.json's `first_stage` says which files and their sha256):

    INDEX/first_stage/<sha256>.faiss     the FAISS index, named by its content
    INDEX/first_stage/text_proj.npz      the text-side projection (what a query needs)
    INDEX/first_stage/anchors.npy        the anchors' text CLS (P, D), when it has anchors
    INDEX/first_stage/selectors.npz      step two's query side (`selection_stage`)
    INDEX/first_stage/selection/<sha256>.sel  step two's per-frame tensors of one video

Each distinct video (sha256) has `slots` vectors, each with the FAISS id video id * SLOTS_MAX +
slot (the video id: the first 60 bits of its sha256), so two clip ids of the same file share
them. The index type is chosen by the number of videos: exact inner product
(`IndexIDMap2(IndexFlatIP)`) up to EXACT_MAX, an inverted file (`IndexIVFFlat`, inner product,
nlist ~ 4 sqrt(vectors), nprobe NPROBE) beyond it. Both add and remove by id, so a commit changes only
the clips it changed.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..util import atomic_path, file_sha256, require
from . import selection_stage as ss

NEUTRAL_TEXT = ""  # the caption slot 0's frame selection is made for
ANCHORS = 4  # anchors (slots 1..P) made from --anchors captions (docs/benchmarks.md: P measured)
DIRECTORY = "first_stage"
TEXT_PROJECTION = f"{DIRECTORY}/text_proj.npz"
ANCHORS_FILE = f"{DIRECTORY}/anchors.npy"
SLOT_BITS = 3  # a vector's FAISS id: its video's 60-bit id, then its slot (int64 holds 63 bits)
SLOTS_MAX = 1 << SLOT_BITS
ID_SCHEME = "video*8+slot"  # index.json's word for it; an index without it has one slot, id = video
EXACT_MAX = 50_000  # videos up to which the FAISS index is exact (flat inner product)
NPROBE = 64  # inverted lists an approximate index searches (docs/benchmarks.md: its recall)
RETRAIN_GROWTH = 4  # an inverted file is trained again once it holds this many times its training set
FLAT, IVF = "flat-ip", "ivf-flat-ip"


class FirstStageError(ValueError):
    """A first stage that cannot be used: missing, or not the one the index describes."""


def faiss_module() -> Any:
    return require("faiss", "for the retrieval cascade's first stage")


# -- the two ITC projections, read from the select graph ------------------------------------
@dataclass
class Projections:
    text_weight: np.ndarray  # (itc_dim, D): y = x W^T + b, as nn.Linear
    text_bias: np.ndarray
    vision_weight: np.ndarray
    vision_bias: np.ndarray

    @classmethod
    def from_select_graph(cls, path: str | Path) -> "Projections":
        """`text_proj` and `vision_proj` of a `select` ONNX file: the Gemm (or MatMul + Add)
        nodes named by those modules, their weights as the graph holds them (FP16 in an FP16
        graph), in float32."""
        onnx = require("onnx", "to read the ITC projections from the select graph")
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        inits = {i.name: i for i in graph.initializer}
        found = {}
        for module in ("text_proj", "vision_proj"):
            gemm = next((n for n in graph.node if n.name.startswith(f"/model/{module}/")
                         and n.op_type == "Gemm"), None)
            if gemm is None or gemm.input[1] not in inits or len(gemm.input) < 3 \
                    or gemm.input[2] not in inits:
                raise FirstStageError(f"{path}: no {module} Gemm with constant weights (an "
                                      "INT8 or older select graph?): index with the fp16 or "
                                      "fp32 split graphs")
            weight = numpy_helper.to_array(inits[gemm.input[1]]).astype(np.float32)
            trans_b = next((a.i for a in gemm.attribute if a.name == "transB"), 0)
            found[module] = (weight if trans_b else weight.T,
                             numpy_helper.to_array(inits[gemm.input[2]]).astype(np.float32))
        return cls(*found["text_proj"], *found["vision_proj"])

    def save_text(self, index_dir: Path) -> tuple[str, str]:
        """Write the text projection into the index (atomically); (relative path, sha256)."""
        path = index_dir / TEXT_PROJECTION
        buffer = io.BytesIO()
        np.savez(buffer, weight=self.text_weight, bias=self.text_bias)
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(buffer.getvalue())
        return TEXT_PROJECTION, file_sha256(path)


def normalized(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (F.normalize's eps 1e-12)."""
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def text_vectors(weight: np.ndarray, bias: np.ndarray, text_cls: np.ndarray) -> np.ndarray:
    return normalized(text_cls.astype(np.float32) @ weight.T + bias)


def video_vectors(projections: Projections, video_embeds: np.ndarray) -> np.ndarray:
    """A `select` output's video CLS (video_embeds[:, 0]) through `vision_proj`, unit length."""
    cls = video_embeds[:, 0].astype(np.float32)
    return normalized(cls @ projections.vision_weight.T + projections.vision_bias)


def clip_vectors(projections: Projections, pipeline: Any, stems: np.ndarray,
                 text_cls: np.ndarray) -> np.ndarray:
    """The vector of each stem (N, T, tokens, D) for one fixed text (its CLS, (1, D)): `select`
    with that text, its video CLS through `vision_proj`, unit length."""
    out = pipeline.select(stems, np.repeat(text_cls, len(stems), 0))
    return video_vectors(projections, out["video_embeds"])


EMBEDDING = ("one vector per slot (the neutral text, each anchor): select with that text, "
             "vision_proj of the video CLS; a clip's score the largest of its slots'")


@dataclass
class Anchors:
    """Slots 1..P: text CLS vectors (P, D) that stand for the captions a gallery is queried with,
    the k-means centroids of those captions' text CLS (`from_captions`)."""
    cls: np.ndarray
    captions: int  # how many captions they were made from
    captions_sha256: str  # of those captions, in order: the same captions give the same anchors

    @staticmethod
    def captions_digest(captions: list[str]) -> str:
        return hashlib.sha256("\n".join(captions).encode()).hexdigest()

    @classmethod
    def from_captions(cls, captions: list[str], text_cls: np.ndarray,
                      count: int = ANCHORS) -> "Anchors":
        """`count` centroids (fewer with fewer distinct captions) of the captions' text CLS."""
        if not captions:
            raise FirstStageError("--anchors holds no caption")
        if len(captions) != len(text_cls):
            raise ValueError(f"{len(captions)} captions, {len(text_cls)} text CLS rows")
        vectors = np.ascontiguousarray(text_cls, np.float32)
        count = min(count, len(np.unique(vectors, axis=0)), SLOTS_MAX - 1)
        if count == len(vectors):
            centroids = vectors.copy()
        else:
            # min_points_per_centroid 1: a few dozen captions are enough for a handful
            kmeans = faiss_module().Kmeans(vectors.shape[1], count, niter=50, seed=1234,
                                           verbose=False, min_points_per_centroid=1)
            kmeans.train(vectors)
            centroids = kmeans.centroids.copy()
        return cls(centroids.astype(np.float32), len(captions), cls.captions_digest(captions))

    @property
    def digest(self) -> str:
        """Of the vectors themselves: what tells two sets of anchors apart."""
        return hashlib.sha256(np.ascontiguousarray(self.cls, np.float32).tobytes()).hexdigest()

    def save(self, index_dir: Path) -> dict[str, Any]:
        """Write the anchors into the index (atomically); their record for index.json."""
        path = index_dir / ANCHORS_FILE
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, self.cls, allow_pickle=False)
        return {"file": ANCHORS_FILE, "sha256": file_sha256(path), "cls_sha256": self.digest,
                "count": len(self.cls),
                "captions": self.captions, "captions_sha256": self.captions_sha256}

    @classmethod
    def load(cls, index_dir: Path, record: dict[str, Any]) -> "Anchors":
        """The anchors index.json records, checked against their sha256."""
        try:
            path = index_dir / record["file"]
            if not path.is_file() or file_sha256(path) != record["sha256"]:
                raise FirstStageError(f"{path} is missing or not the anchors this index "
                                      "recorded; run `export.py index --anchors CAPTIONS` again")
            return cls(np.load(path, allow_pickle=False).astype(np.float32),
                       int(record["captions"]), str(record["captions_sha256"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FirstStageError(f"{index_dir}: unreadable first_stage anchors ({e})") from None


@dataclass
class SelectionSide:
    """What the index needs for the first stage's step two (`selection_stage`): the select
    graph with its inner tensors as outputs, and the selectors' weights."""
    probe: "ss.SelectionProbe"
    weights: "ss.SelectorWeights"


@dataclass
class ClipEmbedder:
    """What `export.py index` needs to keep the first stage: the projections, the neutral
    text's CLS (the `text` graph's output for NEUTRAL_TEXT), the anchors, if any, and, for step
    two, the selection side (None where it cannot run: engines, or a selector 2 before the last
    block)."""
    projections: Projections
    neutral_cls: np.ndarray  # (1, D)
    anchors: Anchors | None = None
    selection: SelectionSide | None = None

    @property
    def dim(self) -> int:
        return int(self.projections.vision_weight.shape[0])

    @property
    def slots(self) -> int:
        return 1 + (0 if self.anchors is None else len(self.anchors.cls))

    @property
    def texts(self) -> np.ndarray:
        """The slots' text CLS (slots, D): the neutral text, then each anchor."""
        return np.concatenate([self.neutral_cls] + ([] if self.anchors is None else
                                                     [self.anchors.cls])).astype(np.float32)

    @property
    def slots_digest(self) -> str:
        """What the slots' texts are (the neutral caption, the anchors' digest), not their CLS
        vectors, which another precision's text graph moves a little: step-two files made
        with either stay valid, as `same_vectors` keeps the FAISS vectors."""
        anchors = None if self.anchors is None else self.anchors.digest
        return hashlib.sha256(f"neutral {NEUTRAL_TEXT!r}; anchors {anchors}".encode()).hexdigest()

    def embed(self, pipeline: Any, stems: np.ndarray
              ) -> tuple[np.ndarray, list["ss.VideoSelections"] | None]:
        """Each stem's vectors (N, slots, dim), for the neutral text then for each anchor, and,
        with a selection side, its selections for step two (one run of the probe graph per slot
        gives both)."""
        if self.selection is None:
            return np.stack([clip_vectors(self.projections, pipeline, stems, t[None])
                             for t in self.texts], 1), None
        runs = [self.selection.probe.run(stems, np.repeat(t[None], len(stems), 0))
                for t in self.texts]
        vectors = np.stack([video_vectors(self.projections, r["video_embeds"]) for r in runs], 1)
        return vectors, ss.video_selections(self.selection.weights, runs)


def same_vectors(stage: dict[str, Any] | None, embedder: Any) -> bool:
    """Whether a recorded first stage holds the vectors `embedder` makes (same id scheme, slots
    and anchors): else its vectors are all computed again."""
    if stage is None or stage.get("id_scheme") != ID_SCHEME or stage.get("slots") != embedder.slots:
        return False
    recorded = (stage.get("anchors") or {}).get("cls_sha256")
    return recorded == (None if embedder.anchors is None else embedder.anchors.digest)


def vector_id(sha256: str) -> int:
    """A video's id: the first 60 bits of its sha256 (its vectors' FAISS ids: `slot_ids`)."""
    return int(sha256[:15], 16)


def slot_ids(video_ids: np.ndarray | list[int], slots: int) -> np.ndarray:
    """The FAISS ids of the videos' vectors, video by video, slot by slot."""
    videos = np.asarray(video_ids, np.int64)
    return (videos[:, None] * SLOTS_MAX + np.arange(slots, dtype=np.int64)).reshape(-1)


def video_ids(ids: np.ndarray) -> np.ndarray:
    """The videos of FAISS ids (`slot_ids`)."""
    return np.asarray(ids, np.int64) >> SLOT_BITS


def complete_videos(ids: np.ndarray, slots: int) -> set[int]:
    """The videos of which FAISS ids `ids` hold all `slots` vectors."""
    videos, counts = np.unique(video_ids(ids), return_counts=True)
    return set(videos[counts == slots].tolist())


# -- the FAISS index -----------------------------------------------------------------------------
def index_type(vectors: int, slots: int = 1) -> str:
    """Flat up to EXACT_MAX videos (whatever their slots: a flat search over 5 x 50,000 vectors
    still takes milliseconds), an inverted file beyond."""
    return FLAT if vectors <= EXACT_MAX * slots else IVF


def nlist_for(n: int) -> int:
    return max(1, int(4 * math.sqrt(n)))


def build(vectors: np.ndarray, ids: np.ndarray, slots: int = 1) -> Any:
    """A FAISS index of the type for len(vectors) (`slots` per video) holding them under
    `ids`."""
    faiss = faiss_module()
    vectors = np.ascontiguousarray(vectors, np.float32)
    dim = vectors.shape[1]
    if index_type(len(vectors), slots) == FLAT:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    else:
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist_for(len(vectors)),
                                   faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = NPROBE
    index.add_with_ids(vectors, np.ascontiguousarray(ids, np.int64))
    return index


def contents(index: Any) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, ids) an index holds, as built by `build`."""
    faiss = faiss_module()
    if isinstance(index, faiss.IndexIDMap2) or isinstance(index, faiss.IndexIDMap):
        flat = faiss.downcast_index(index.index)
        vectors = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal,
                                                                                   flat.d)
        return vectors.copy(), faiss.vector_to_array(index.id_map).copy()
    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    vectors, ids = [], []
    for l in range(ivf.nlist):
        size = lists.list_size(l)
        if size:
            vectors.append(faiss.rev_swig_ptr(lists.get_codes(l), size * ivf.code_size).view(
                np.float32).reshape(size, ivf.d).copy())
            ids.append(faiss.rev_swig_ptr(lists.get_ids(l), size).copy())
    if not vectors:
        return np.empty((0, ivf.d), np.float32), np.empty(0, np.int64)
    return np.concatenate(vectors), np.concatenate(ids).astype(np.int64)


def kind_of(index: Any) -> str:
    faiss = faiss_module()
    return FLAT if isinstance(index, (faiss.IndexIDMap2, faiss.IndexIDMap)) else IVF


def updated(index: Any | None, dim: int, remove: Iterable[int], add_vectors: np.ndarray,
            add_ids: np.ndarray, trained_on: int, slots: int = 1) -> tuple[Any, int]:
    """The index with `remove` taken out and the new vectors added; rebuilt (as `build` chooses
    for the new size, `slots` vectors per video) when that changes the type or an inverted file
    has outgrown its training. Returns (index, how many vectors its type was chosen / trained
    for)."""
    faiss = faiss_module()
    remove = np.fromiter(remove, np.int64)
    if index is None:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        trained_on = 0
    if len(remove):
        index.remove_ids(faiss.IDSelectorBatch(remove))
    n = index.ntotal + len(add_ids)
    kind = kind_of(index)
    if kind != index_type(n, slots) or (kind == IVF and n > RETRAIN_GROWTH * trained_on):
        vectors, ids = contents(index)
        if len(add_ids):
            vectors, ids = np.concatenate([vectors, add_vectors]), np.concatenate([ids, add_ids])
        return build(vectors, ids, slots), len(ids)
    if len(add_ids):
        index.add_with_ids(np.ascontiguousarray(add_vectors, np.float32),
                           np.ascontiguousarray(add_ids, np.int64))
    return index, trained_on if kind == IVF else n


def write(index: Any, directory: Path) -> tuple[str, str]:
    """Write an index under its content's name (atomically); (relative path, sha256). A file
    of that name is kept only when its bytes are this content (a damaged one is replaced)."""
    faiss = faiss_module()
    data = faiss.serialize_index(index).tobytes()
    digest = hashlib.sha256(data).hexdigest()
    relative = f"{DIRECTORY}/{digest}.faiss"
    path = directory / relative
    if not path.is_file() or file_sha256(path) != digest:
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(data)
    return relative, digest


def is_content_named(path: Path) -> bool:
    """Whether `path` has the name `write` gives a FAISS file (its sha256, .faiss)."""
    return path.suffix == ".faiss" and len(path.stem) == 64 and \
        all(c in "0123456789abcdef" for c in path.stem)


def read(directory: Path, relative: str, sha256: str) -> Any:
    """The FAISS index index.json names, checked against the sha256 recorded with it."""
    faiss = faiss_module()
    path = directory / relative
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FirstStageError(f"{path}: the first stage's FAISS file is unreadable ({e}); run "
                              "`export.py index` again to rebuild it") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise FirstStageError(f"{path} is not the FAISS file this index recorded (sha256 "
                              "differs): it does not match the stems; run `export.py index` "
                              "again to rebuild it")
    index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
    if kind_of(index) == IVF:
        faiss.extract_index_ivf(index).nprobe = NPROBE
    return index
