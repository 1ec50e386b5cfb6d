"""Retrieval and QA with an exported artifact, without PyTorch.

- `predict`: `export.py predict` on the whole-model file (videos and one text or question).
- `clip_index`: the clip index of the edge workflow (each clip's video stem stored once) and
  `rank`, the authors' ranking (ITC for every clip, ITM on the shortlist), or the cascade's
  (the same on the first stage's M clips).
- `first_stage`: the cascade's first stage, a text-independent vector per clip in FAISS.
- `gallery`: `export.py index` and `predict --index`: an artifact's split graphs over an index.
- `split_trt`: the four split graphs' TensorRT engines as one engine set on one CUDA stream.
- `shards`: `export.py index-split` (an index split by clip into shards, each with its
  identity), the shard list's check and the merge of the shards' rankings.

Imports: `util`, `artifact`, `data`, `validation` (runners, metrics, the composed split graphs)
and `trt` (lazily).
"""
