"""The INT8 calibration cache reuses an entry only after checking it (identity, the sha256
recorded when it was stored, Q/DQ nodes present); a bad entry is discarded with one warning and
rebuilt (twbert_export/precision/int8.py)."""

import json
import shutil

import numpy as np
import onnx
import pytest

from twbert_export.precision import to_int8
from twbert_export.precision.int8 import CacheEntryDiscarded

from tinygraphs import Clips, matmul_graph


@pytest.fixture
def cached(tmp_path, monkeypatch):
    """A tiny graph, real-looking calibration rows, and a first INT8 run that filled the cache:
    (fp32 source, calibration rows, the cache entry's graph file)."""
    monkeypatch.setenv("TWBERT_CACHE", str(tmp_path / "cache"))
    src = matmul_graph(tmp_path / "model.fp32.onnx")
    smooth = np.cumsum(np.random.default_rng(1).standard_normal((20, 16, 64)), axis=-1)
    calib = Clips(smooth.astype(np.float32))
    first = to_int8(src, tmp_path / "first.onnx", calib, "max")
    assert first.cache.startswith("stored")
    (entry,) = (tmp_path / "cache" / "int8").glob("*/model.int8.onnx")
    return src, calib, entry


def ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def test_a_good_entry_is_reused(cached, tmp_path):
    src, calib, entry = cached
    report = to_int8(src, tmp_path / "again.onnx", calib, "max")
    assert report.cache == f"reused {entry}"
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "first.onnx").read_bytes()


@pytest.mark.parametrize("damage", ["fp32-copied-over", "truncated", "identity-of-another-model",
                                    "fp32-with-its-hash"])
def test_a_bad_entry_is_discarded_with_one_warning_and_rebuilt(cached, tmp_path, damage):
    src, calib, entry = cached
    identity_file = entry.parent / "identity.json"
    identity = json.loads(identity_file.read_text())
    if damage == "fp32-copied-over":  # the case: the "int8" artifact was FP32
        shutil.copyfile(src, entry)
    elif damage == "truncated":  # the case: a protobuf traceback on every later run
        entry.write_bytes(entry.read_bytes()[:100])
    elif damage == "identity-of-another-model":
        identity_file.write_text(json.dumps({**identity, "source_model_sha256": "0" * 64}))
    else:  # the hash updated as well: only the Q/DQ check can tell
        from twbert_export.util import file_sha256

        shutil.copyfile(src, entry)
        identity_file.write_text(json.dumps({**identity, "int8_sha256": file_sha256(entry)}))
    dst = tmp_path / "rebuilt.onnx"
    with pytest.warns(CacheEntryDiscarded) as discarded:
        report = to_int8(src, dst, calib, "max")
    (warning,) = discarded.list
    assert "\n" not in str(warning.message) and str(entry.parent) in str(warning.message)
    assert report.cache.startswith("stored")
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops(dst)
    assert dst.read_bytes() == (tmp_path / "first.onnx").read_bytes() == entry.read_bytes()


def another_models_qdq_graph(entry, path):
    """A valid INT8 Q/DQ graph of another model: the entry's own, its input and output renamed
    (what a graph of another model, or a split graph, looks like to the checks)."""
    model = onnx.load(str(entry))
    rename = {"x": "video", "y": "itm_logits"}
    for value in list(model.graph.input) + list(model.graph.output):
        value.name = rename.get(value.name, value.name)
    for node in model.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def replace_with_its_hash(entry, graph):
    """The issue's tampering: the entry replaced, and its recorded sha256 rewritten to match."""
    from twbert_export.util import file_sha256

    identity_file = entry.parent / "identity.json"
    shutil.copyfile(graph, entry)
    identity = json.loads(identity_file.read_text())
    identity_file.write_text(json.dumps({**identity, "int8_sha256": file_sha256(entry)}))


def test_a_qdq_graph_of_another_model_with_its_hash_is_discarded_not_reused(cached, tmp_path):
    """Issue 23 item 12: reused, it failed the export at a later stage with exit 3."""
    src, calib, entry = cached
    replace_with_its_hash(entry, another_models_qdq_graph(entry, tmp_path / "other.onnx"))
    dst = tmp_path / "rebuilt.onnx"
    with pytest.warns(CacheEntryDiscarded, match="not the FP32 graph's") as discarded:
        report = to_int8(src, dst, calib, "max")
    assert len(discarded.list) == 1
    assert report.cache.startswith("stored")
    assert [i.name for i in onnx.load(str(dst)).graph.input] == ["x"]
    assert dst.read_bytes() == (tmp_path / "first.onnx").read_bytes() == entry.read_bytes()


def test_no_calib_cache_recalibrates_and_writes_a_fresh_entry_over_a_bad_one(cached, tmp_path):
    """--no-calib-cache is how a user gets rid of an entry they distrust: the entry afterwards
    is the fresh calibration's, and a later run with the cache reuses it."""
    src, calib, entry = cached
    replace_with_its_hash(entry, another_models_qdq_graph(entry, tmp_path / "other.onnx"))
    fresh = tmp_path / "fresh.onnx"
    report = to_int8(src, fresh, calib, "max", use_cache=False)
    assert report.cache == f"refreshed {entry}"
    assert entry.read_bytes() == fresh.read_bytes() == (tmp_path / "first.onnx").read_bytes()
    again = to_int8(src, tmp_path / "again.onnx", calib, "max")
    assert again.cache == f"reused {entry}"
