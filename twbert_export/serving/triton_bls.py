"""The Python-backend (BLS) model that `export.py triton-repo` writes as `model.py` of the
`twbert_score`, `twbert_qa` and `twbert_retrieve` models: it tokenises the request's text, sends the rows to the
TensorRT engine model in the same server (`pb_utils.InferenceRequest(...).exec()`, so the engine
model's own dynamic batcher and instances apply) and turns the graph's outputs into the served
ones, with the code `export.py serve` uses (`twbert_serving/`: copies of preprocess.py,
metrics.py and served.py written beside it, at their places in the package). Unlike PyTriton, it answers each request of a batch
on its own: a bad request gets its error, the others their answers.

`twbert_retrieve` (kind retrieve) ranks a clip index for each text with `clip_index.rank`, the
function `predict --index` runs (the FAISS first stage's `shortlist` M clips, default
`clip_index.DEFAULT_SHORTLIST`; 0: every clip), over `BlsSplit`: the split graphs' engine models (text, select,
fuse) called through BLS. Its twbert_serving/ also holds clip_index.py, contract.py and util.py,
and contracts.json the graphs' I/O contracts. `twbert_shard` (kind shard, written for an index
`export.py index-split` wrote) answers a request with the shard's identity (its shard.json), which
`export.py query --shards` checks before it queries any shard.

Reads its settings from the model's config.pbtxt `parameters`: kind (score, qa, retrieve or shard),
text_len, and for score and qa engine_model and the outputs it gives; for retrieve the index
directory, the artifact identity and stem shape it must have, the engine model of each graph and
the integer type of their I/O. Needs numpy and tokenizers in the Python
backend's environment (`pip install numpy tokenizers` in the Triton container), and for
twbert_retrieve's first stage faiss-cpu (`pip install faiss-cpu`).
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twbert_serving.data.preprocess import Tokenizer  # noqa: E402
from twbert_serving.serving.served import (DEFAULT_K, QA_TEXT, SCORE_TEXT,  # noqa: E402
                                           BadRequest, answer_outputs, check_shortlists,
                                           check_text_lengths, check_video, ranking_width,
                                           retrieval_outputs, row_ints, score_outputs,
                                           texts_of)


class BlsSplit:
    """The split graphs as `clip_index.rank` uses them (`contracts`, `encode_texts`, `select`,
    `fuse`, as on `split.ComposedSplit`), each graph run on its engine model in this server, in
    runs of at most its batch max."""

    def __init__(self, pb, models, contracts, integer_io):
        self.pb, self.models, self.contracts = pb, models, contracts
        self.integer_io = np.dtype(integer_io)

    def run(self, graph, feed):
        pb, contract = self.pb, self.contracts[graph]
        dtypes = {t.name: self.integer_io if t.dtype == "int64" else t.np_dtype
                  for t in contract.inputs}
        rows = len(next(iter(feed.values())))
        parts = {name: [] for name in contract.output_names}
        for start in range(0, rows, contract.batch.max):
            inputs = [pb.Tensor(name, np.ascontiguousarray(value[start:start + contract.batch.max],
                                                           dtypes[name]))
                      for name, value in feed.items()]
            result = pb.InferenceRequest(model_name=self.models[graph], inputs=inputs,
                                         requested_output_names=contract.output_names).exec()
            if result.has_error():
                raise RuntimeError(f"{self.models[graph]}: {result.error().message()}")
            # Triton gives an output in its config's dims: [1] for one value per row (itc_sim)
            for t in contract.outputs:
                value = pb.get_output_tensor_by_name(result, t.name).as_numpy()
                parts[t.name].append(value.reshape(t.concrete(len(value))))
        return {name: np.concatenate(p) for name, p in parts.items()}

    def encode_texts(self, input_ids, attention_mask):
        return self.run("text", {"input_ids": input_ids, "attention_mask": attention_mask})

    def select(self, stems, text_cls):
        return self.run("select", {"stem": stems, "text_cls": text_cls})

    def fuse(self, text_embeds, attention_mask, video_embeds):
        return self.run("fuse", {"text_embeds": text_embeds, "attention_mask": attention_mask,
                                 "video_embeds": video_embeds})


def optional_ints(pb, request, name, rows, default):
    """An optional INT64 (N, 1) input of a request as N ints (`served.row_ints`)."""
    tensor = pb.get_input_tensor_by_name(request, name)
    return row_ints(None if tensor is None else tensor.as_numpy(), rows, default)


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.kind = params["kind"]
        here = os.path.dirname(os.path.abspath(__file__))
        if self.kind == "shard":  # no text, no engine: the shard's identity only
            self.open_shard(params, here)
            return
        self.text_len = int(params["text_len"])
        self.tokenizer = Tokenizer.from_file(os.path.join(here, "tokenizer.json"))
        self.text_input = QA_TEXT if self.kind == "qa" else SCORE_TEXT
        self.output_names = [o["name"] for o in config["output"]]
        if self.kind == "retrieve":
            self.open_index(params, here)
            return
        self.engine_model = params["engine_model"]
        self.engine_outputs = params["engine_outputs"].split(",")
        self.answers = None
        if self.kind == "qa":
            with open(os.path.join(here, "answers.json")) as f:
                self.answers = json.load(f)

    def open_index(self, params, here):
        """The clip index (read when the model loads: reload the model after `export.py index`
        adds clips) and the split graphs' engine models that rank it."""
        from twbert_serving.retrieval.clip_index import ClipIndex
        from twbert_serving.artifact.contract import IOContract

        with open(os.path.join(here, "contracts.json")) as f:
            contracts = {g: IOContract.from_dict(c) for g, c in json.load(f).items()}
        models = dict(item.split("=") for item in params["graph_models"].split(","))
        self.split = BlsSplit(self.pb, models, contracts, params["integer_io"])
        self.index = ClipIndex.open(params["index"], params["artifact_identity"],
                                    params["stem_shape"].split(","))
        self.index.load_first_stage()  # kept for the model's life (clip_index.load_first_stage)
        self.rows = {clip_id: row for row, clip_id in enumerate(self.index.clip_ids)}
        kept = next((t for t in contracts["select"].outputs if t.name == "frame_indices_2"), None)
        self.kept = None if kept is None else int(kept.shape[1])

    def open_shard(self, params, here):
        """twbert_shard: the shard's identity (shard.json, copied in by triton-repo), refused
        when the index's index.json is no longer the one it was split with (as `export.py
        serve --index SHARD` refuses it: `retrieval.shards.shard_of`)."""
        import hashlib

        with open(os.path.join(here, "shard.json"), encoding="utf-8") as f:
            self.identity = f.read()
        recorded = json.loads(self.identity)["index_sha256"]
        with open(os.path.join(params["index"], "index.json"), "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != recorded:
                raise RuntimeError(f"{params['index']}: index.json changed since the index was "
                                   "split: split the source index again")

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self.answer(request))
            except Exception as e:  # this request's error; the batch's other requests go on
                responses.append(self.pb.InferenceResponse(error=self.error_of(e)))
        return responses

    def error_of(self, e):
        """A refused request (BadRequest) as the client's error: its one-line reason with
        INVALID_ARG (HTTP 400, gRPC INVALID_ARGUMENT), where this Triton's Python backend takes
        a code; anything else as Triton's default (INTERNAL)."""
        error = self.pb.TritonError
        if not isinstance(e, BadRequest):
            return error(f"{type(e).__name__}: {e}")
        invalid = getattr(error, "INVALID_ARG", None)
        return error(str(e)) if invalid is None else error(str(e), invalid)

    def answer(self, request):
        if self.kind == "retrieve":
            return self.ranking(request)
        if self.kind == "shard":  # no batch axis: one identity (1,) per request
            identity = np.array([self.identity.encode("utf-8")], dtype=np.object_)
            return self.pb.InferenceResponse(output_tensors=[self.pb.Tensor("identity",
                                                                            identity)])
        pb = self.pb
        video = pb.get_input_tensor_by_name(request, "video").as_numpy()
        texts = texts_of(pb.get_input_tensor_by_name(request, self.text_input).as_numpy(),
                         self.text_input)
        check_text_lengths(self.tokenizer, texts, self.text_len, self.text_input)
        check_video(video)
        ids, mask, _ = self.tokenizer.encode(texts, self.text_len)
        result = pb.InferenceRequest(
            model_name=self.engine_model, requested_output_names=self.engine_outputs,
            inputs=[pb.Tensor("video", np.ascontiguousarray(video, np.float32)),
                    pb.Tensor("input_ids", ids), pb.Tensor("attention_mask", mask)]).exec()
        if result.has_error():
            raise RuntimeError(f"{self.engine_model}: {result.error().message()}")
        out = {name: pb.get_output_tensor_by_name(result, name).as_numpy()
               for name in self.engine_outputs}
        served = answer_outputs(out, self.answers) if self.kind == "qa" else score_outputs(out)
        return pb.InferenceResponse(output_tensors=[pb.Tensor(name, served[name])
                                                    for name in self.output_names])

    def ranking(self, request):
        """Every indexed clip for each text of the request, best first (`clip_index.rank`, as
        `predict --index` ranks them), cut to the request's `top`."""
        from twbert_serving.retrieval.clip_index import DEFAULT_SHORTLIST, rank

        pb = self.pb
        texts = texts_of(pb.get_input_tensor_by_name(request, SCORE_TEXT).as_numpy(), SCORE_TEXT)
        check_text_lengths(self.tokenizer, texts, self.text_len, SCORE_TEXT)
        ks = optional_ints(pb, request, "k", len(texts), DEFAULT_K)
        width = ranking_width(ks, optional_ints(pb, request, "top", len(texts), 0),
                              len(self.index))
        shortlists = optional_ints(pb, request, "shortlist", len(texts), DEFAULT_SHORTLIST)
        check_shortlists(ks, shortlists)
        rankings = []
        for text, k, shortlist in zip(texts, ks, shortlists):
            ids, mask, _ = self.tokenizer.encode([text], self.text_len)
            rankings.append(rank(self.index, self.split, ids, mask, k,
                                 shortlist=shortlist)[:width])
        rows = [[self.rows[c.clip_id] for c in ranking] for ranking in rankings]
        served = retrieval_outputs(rankings, width, self.kept, rows)
        return pb.InferenceResponse(output_tensors=[pb.Tensor(name, served[name])
                                                    for name in self.output_names])
