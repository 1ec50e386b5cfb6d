"""FP16 range check: nodes whose activations leave FP16's safe range on any calibration clip stay
FP32, found one clip at a time."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from twbert_export.precision import FP16_DATA_MAX, out_of_range_nodes, to_fp16


class Clips:
    """The two things the range check reads from a FeedSet: its length and a feed per row."""

    def __init__(self, x: np.ndarray):
        self.x = x
        self.video = x
        self.identity = {"note": "hand-made"}

    def __len__(self) -> int:
        return len(self.x)

    def feed(self, rows):
        return {"x": self.x[rows]}


def scale_graph(path):
    """x -> scale (x 1e5) -> shrink (x 1e-5) -> relu -> y: only the middle tensor is large."""
    nodes = [helper.make_node("Mul", ["x", "big"], ["scaled"], name="scale"),
             helper.make_node("Mul", ["scaled", "small"], ["shrunk"], name="shrink"),
             helper.make_node("Relu", ["shrunk"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor("big", TensorProto.FLOAT, [], [1e5]),
         helper.make_tensor("small", TensorProto.FLOAT, [], [1e-5])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), str(path))
    return path


def test_a_single_clip_beyond_the_range_flags_the_nodes_around_the_large_tensor(tmp_path):
    src = scale_graph(tmp_path / "m.onnx")
    quiet = np.full((3, 4), 1e-3, np.float32)
    assert out_of_range_nodes(src, Clips(quiet)) == ([], 3)
    loud = quiet.copy()
    loud[2, 1] = 1.0  # 1e5 after `scale`, only in the last clip
    assert 1e5 > FP16_DATA_MAX
    assert out_of_range_nodes(src, Clips(loud)) == (["scale", "shrink"], 3)


def test_fp16_keeps_the_out_of_range_nodes_in_fp32(tmp_path):
    src = scale_graph(tmp_path / "m.onnx")
    x = np.full((3, 4), 1e-3, np.float32)
    x[2, 1] = 1.0
    report = to_fp16(src, tmp_path / "m.fp16.onnx", Clips(x))
    assert set(report.kept_fp32_range) >= {"scale", "shrink"}


def test_a_large_model_is_watched_in_groups_on_fewer_clips(tmp_path, monkeypatch):
    """Groups of tensors per forward pass when a clip's tensors exceed the budget; the maxima
    are the same, from the first LARGE_MODEL_RANGE_CLIPS clips."""
    from twbert_export import precision

    src = scale_graph(tmp_path / "m.onnx")
    monkeypatch.setattr(precision, "RANGE_CHECK_GROUP_BYTES", 16)  # one 4-float tensor a group
    monkeypatch.setattr(precision, "LARGE_MODEL_RANGE_CLIPS", 2)
    x = np.full((3, 4), 1e-3, np.float32)
    x[1, 1] = 1.0
    assert out_of_range_nodes(src, Clips(x)) == (["scale", "shrink"], 2)
    x[1, 1], x[2, 1] = 1e-3, 1.0  # only the third clip is loud: beyond the clips checked
    assert out_of_range_nodes(src, Clips(x)) == ([], 2)
