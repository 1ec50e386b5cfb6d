"""Tiny ONNX graphs and hand-made calibration rows for the precision steps' tests."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Clips:
    """What the precision steps read from a FeedSet: length, rows, clips, masks, identity."""

    def __init__(self, x: np.ndarray, name: str = "x"):
        self.x, self.name = x, name
        self.video = x
        self.attention_mask = np.ones((len(x), 2), np.int64)
        self.identity = {"note": "hand-made", "files_sha256": "0", "preprocessing_sha256": "0"}

    def __len__(self) -> int:
        return len(self.x)

    def feed(self, rows):
        return {self.name: self.x[rows]}


def matmul_graph(path):
    """x (n, 16, 64) -> MatMul -> Relu -> MatMul -> y: two activations for INT8 to calibrate."""
    rng = np.random.default_rng(0)
    w1, w2 = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(2))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16, 64])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path
