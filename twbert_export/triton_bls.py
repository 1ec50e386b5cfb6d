"""The Python-backend (BLS) model that `export.py triton-repo` writes as `model.py` of the
`twbert_score` and `twbert_qa` models: it tokenises the request's text, sends the rows to the
TensorRT engine model in the same server (`pb_utils.InferenceRequest(...).exec()`, so the engine
model's own dynamic batcher and instances apply) and turns the graph's outputs into the served
ones, with the code `export.py serve` uses (`twbert_serving/`: copies of preprocess.py,
metrics.py and served.py written beside it). Unlike PyTriton, it answers each request of a batch
on its own: a bad request gets its error, the others their answers.

Reads its settings from the model's config.pbtxt `parameters`: kind (score or qa), engine_model,
text_len, and the outputs the engine model gives. Needs numpy and tokenizers in the Python
backend's environment (`pip install numpy tokenizers` in the Triton container).
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from twbert_serving.preprocess import Tokenizer  # noqa: E402
from twbert_serving.served import (QA_TEXT, SCORE_TEXT, BadRequest, answer_outputs,  # noqa: E402
                                   score_outputs, texts_of)


class TritonPythonModel:
    def initialize(self, args):
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config["parameters"].items()}
        self.kind = params["kind"]
        self.engine_model = params["engine_model"]
        self.engine_outputs = params["engine_outputs"].split(",")
        self.text_len = int(params["text_len"])
        here = os.path.dirname(os.path.abspath(__file__))
        self.tokenizer = Tokenizer.from_file(os.path.join(here, "tokenizer.json"))
        self.answers = None
        if self.kind == "qa":
            with open(os.path.join(here, "answers.json")) as f:
                self.answers = json.load(f)
        self.text_input = QA_TEXT if self.kind == "qa" else SCORE_TEXT
        self.output_names = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self.answer(request))
            except Exception as e:  # this request's error; the batch's other requests go on
                message = str(e) if isinstance(e, BadRequest) else f"{type(e).__name__}: {e}"
                responses.append(self.pb.InferenceResponse(error=self.pb.TritonError(message)))
        return responses

    def answer(self, request):
        pb = self.pb
        video = pb.get_input_tensor_by_name(request, "video").as_numpy()
        texts = texts_of(pb.get_input_tensor_by_name(request, self.text_input).as_numpy(),
                         self.text_input)
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
