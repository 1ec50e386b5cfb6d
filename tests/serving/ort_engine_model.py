"""Test stand-in for the TensorRT engine model of a `triton-repo` repository: a Python-backend
model running the artifact's ONNX file on ONNX Runtime, with the engine model's inputs and
outputs, so that the BLS models can be loaded and queried in PyTriton's bundled server (which
has the Python backend only; there is no TensorRT here)."""

import json

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        onnx = config["parameters"]["onnx"]["string_value"]
        self.session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy()
                    for n in self.inputs}
            out = self.session.run(self.outputs, feed)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, out)]))
        return responses
