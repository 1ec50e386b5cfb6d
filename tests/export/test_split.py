"""Split deployment on the demo checkpoint (tiny preset): the four graphs composed give what the
monolithic graph gives, the clip index keeps whole entries of one artifact only, and ranking
from the index is the monolithic ranking."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from twbert_export import precision
from twbert_export.validation import parity as validate
from twbert_export.data.calibration import load_feeds
from twbert_export.retrieval.clip_index import (INDEX_FILE, ClipIndex, ClipIndexError,
                                                ForeignIndexError, index_videos, rank, videos_in)
from twbert_export.artifact.contract import IOContract
from twbert_export.validation.metrics import rerank, softmax
from twbert_export.export.onnx_export import example_feed, export_onnx
from twbert_export.data.preprocess import Tokenizer
from twbert_export.export.rewrite import rewrite
from twbert_export.validation.runners import (make_torch_runner, ort_runner, ort_session,
                                              run_batches)
from twbert_export.export.split import GRAPHS, export_split, split_contracts, split_to_fp16
from twbert_export.validation.composed import ComposedSplit, validate_split

# Its own exports of the four graphs (about 35 s): the slow tier. The fast tier checks the
# split graphs the pipeline writes (test_split_pipeline.py, on the session artifact).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo():
    from model import load_checkpoint
    from twbert_export.data.assets import resolve_checkpoint

    model, _ = load_checkpoint(resolve_checkpoint("demo"))
    monolithic = IOContract.for_model(model.cfg)
    return model.eval(), monolithic, split_contracts(monolithic, model.cfg)


@pytest.fixture(scope="module")
def graphs(demo, tmp_path_factory):
    """OUT/model.fp32.onnx and the four split FP32 graphs of the demo checkpoint."""
    model, monolithic, contracts = demo
    out = tmp_path_factory.mktemp("split")
    export_onnx(model, monolithic, out / "model.raw.onnx")
    rewrite(out / "model.raw.onnx", out / "model.fp32.onnx", monolithic)
    return out, export_split(model, contracts, out)


@pytest.fixture(scope="module")
def val(demo, small_val):
    return load_feeds(small_val, demo[1], Tokenizer.default())


@pytest.fixture(scope="module")
def reference(demo, val):
    model, monolithic, _ = demo
    with make_torch_runner(model, monolithic, "hard") as runner:
        return validate.run_validation(runner, val, monolithic)


def monolithic_outputs(path: Path, contract: IOContract, feed: dict) -> dict:
    return dict(zip(contract.output_names, ort_session(path).run(contract.output_names, feed)))


def test_each_graph_has_its_contracts_io_and_the_selection_keeps_its_node_names(demo, graphs):
    _, monolithic, contracts = demo
    out, files = graphs
    for graph in GRAPHS:
        model = onnx.load(str(files[graph]))
        assert [i.name for i in model.graph.input] == contracts[graph].input_names
        assert [o.name for o in model.graph.output] == contracts[graph].output_names
        batch_axes = {t.type.tensor_type.shape.dim[0].dim_param
                      for t in (*model.graph.input, *model.graph.output)}
        assert batch_axes == {"batch"}
    # The FP16 step keeps these in FP32 by name: the same nodes as in the monolithic graph.
    selection = [re.compile(p) for p in precision.SELECTION_NODES]

    def selection_nodes(path):
        return {n.name for n in onnx.load(str(path)).graph.node
                if any(p.match(n.name) for p in selection)}
    assert selection_nodes(files["select"]) == selection_nodes(out / "model.fp32.onnx") != set()
    assert all(not selection_nodes(files[g]) for g in GRAPHS if g != "select")


def test_split_graphs_composed_equal_the_monolithic_graph_at_fp32(demo, graphs, val):
    _, monolithic, contracts = demo
    out, files = graphs
    pipeline = ComposedSplit(files, contracts, monolithic)
    for feed in (example_feed(monolithic, batch=4, seed=1), val.feed(slice(None))):
        expected = monolithic_outputs(out / "model.fp32.onnx", monolithic, feed)
        got = pipeline.infer(feed)
        assert list(got) == monolithic.output_names
        for name in ("itm_logits", "itc_sim"):
            assert np.abs(got[name] - expected[name]).max() <= 1e-5, name
        for name in ("frame_indices_1", "frame_indices_2"):
            np.testing.assert_array_equal(got[name], expected[name])


def test_qa_split_answers_as_pytorch_does(demo, graphs, val, tmp_path):
    """For QA only the fuse graph changes (it adds qa_logits)."""
    import torch

    model, _, _ = demo
    qa = IOContract.for_model(model.cfg, "qa")
    contracts = split_contracts(qa, model.cfg)
    files = {**graphs[1], **export_split(model, contracts, tmp_path, graphs=("fuse",))}
    feed = val.feed(slice(0, 4))
    got = ComposedSplit(files, contracts, qa).infer(feed)
    with torch.no_grad(), model.selection("hard"):
        expected = model(*(torch.from_numpy(feed[n]) for n in qa.input_names))
    assert list(got) == qa.output_names
    np.testing.assert_allclose(got["qa_logits"], expected["qa_logits"].numpy(), atol=1e-4)


def test_composed_validation_passes_the_fp32_gates_computing_each_stem_and_text_once(
        demo, graphs, val, reference):
    _, monolithic, contracts = demo
    _, files = graphs
    ref, ref_metrics = reference
    result = validate_split(files, contracts, monolithic, "fp32", val, ref, ref_metrics,
                            validate.DEFAULT_GATES["fp32"])
    assert result["passed"], [g for g in result["gates"] if not g["passed"]]
    assert result["task_metrics"]["t2v"] == ref_metrics["t2v"]
    assert result["graph_rows"]["video_stem"] == len(val.video)
    assert result["graph_rows"]["text"] == len(set(map(tuple, val.input_ids)))
    pairs = len(val.video) * len(val)
    assert result["graph_rows"]["fuse"] == pairs
    # select on every pair, in pieces after a check on the paired rows (whole and in pieces);
    # its video blocks once per distinct selection of a clip
    assert result["graph_rows"]["select"] == pairs + 2 * len(val)
    assert result["graph_rows"]["select blocks 2-3"] < pairs / 2
    assert result["select"].startswith("select in pieces")


def test_fp16_split_passes_the_same_gates_as_the_monolithic_fp16(demo, graphs, val, reference,
                                                                 small_val, tmp_path):
    _, monolithic, contracts = demo
    out, files = graphs
    ref, ref_metrics = reference
    gate = validate.DEFAULT_GATES["fp16"]
    calib = load_feeds(small_val, monolithic, Tokenizer.default(), texts_per_video=1)
    with precision.ActivationRanges(out / "model.fp32.onnx", calib) as ranges:
        whole = precision.to_fp16(out / "model.fp32.onnx", tmp_path / "model.fp16.onnx", ranges)
    with ort_runner(tmp_path / "model.fp16.onnx") as runner:
        test, metrics = validate.run_validation(runner, val, monolithic)
    monolithic_result = validate.compare_precision("fp16", test, ref, monolithic, gate, metrics,
                                                   ref_metrics)
    fp16_files, reports = split_to_fp16(files, contracts, monolithic, calib, tmp_path)
    assert sorted(reports["select"].kept_fp32_selection) == sorted(whole.kept_fp32_selection)
    assert all(reports[g].low_precision_nodes > 0 for g in GRAPHS)
    split_result = validate_split(fp16_files, contracts, monolithic, "fp16", val, ref,
                                  ref_metrics, gate)
    assert monolithic_result["passed"]
    assert split_result["passed"], [g for g in split_result["gates"] if not g["passed"]]
    assert [g["name"] for g in split_result["gates"]] == [
        g["name"] for g in monolithic_result["gates"]]


# -- the clip index -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(demo, graphs):
    _, monolithic, contracts = demo
    return ComposedSplit(graphs[1], contracts, monolithic)


def open_index(path, contracts, artifact="artifact-a", dtype="float32"):
    return ClipIndex.open(path, artifact, contracts["video_stem"].outputs[0].shape[1:], dtype)


def test_index_appends_new_clips_and_skips_unchanged_ones(demo, pipeline, small_val, tmp_path):
    _, _, contracts = demo
    videos = videos_in(small_val)
    index = open_index(tmp_path / "index", contracts)
    first = index_videos(index, videos[:3], pipeline, contracts["video_stem"], root=small_val)
    assert first.added == ["videos/val_00000.mp4", "videos/val_00001.mp4",
                           "videos/val_00002.mp4"]
    runs = pipeline.rows["video_stem"]
    index = open_index(tmp_path / "index", contracts)
    second = index_videos(index, videos, pipeline, contracts["video_stem"], root=small_val)
    assert second.skipped == first.added and len(second.added) == len(videos) - 3
    assert pipeline.rows["video_stem"] - runs == len(videos) - 3  # no stem computed twice
    reopened = open_index(tmp_path / "index", contracts)
    assert reopened.clip_ids == first.added + second.added
    np.testing.assert_array_equal(reopened.stems(first.added[:1]),
                                  pipeline.encode_clips(np.stack(
                                      [val_video(small_val / first.added[0], contracts)])))


def val_video(path, contracts):
    from twbert_export.data.preprocess import load_video

    c = contracts["video_stem"]
    return load_video(path, c.frames, c.image_size)


def test_index_replaces_a_changed_clip_and_its_stem_file(demo, pipeline, small_val, tmp_path):
    _, _, contracts = demo
    clips = tmp_path / "clips"
    clips.mkdir()
    videos = videos_in(small_val)
    shutil.copy(videos[0], clips / "a.mp4")
    index = open_index(tmp_path / "index", contracts)
    index_videos(index, [clips / "a.mp4"], pipeline, contracts["video_stem"], root=clips)
    old_stem = index.entries["a.mp4"].stem
    shutil.copy(videos[1], clips / "a.mp4")  # the same name, other content
    report = index_videos(index, [clips / "a.mp4"], pipeline, contracts["video_stem"],
                          root=clips)
    assert report.replaced == ["a.mp4"] and not report.added
    assert not (index.path / old_stem).exists()
    np.testing.assert_array_equal(index.stems(["a.mp4"]), pipeline.encode_clips(
        val_video(videos[1], contracts)[None]))


def test_index_of_another_artifact_is_refused(demo, pipeline, small_val, tmp_path):
    _, _, contracts = demo
    index = open_index(tmp_path / "index", contracts)
    index_videos(index, videos_in(small_val)[:1], pipeline, contracts["video_stem"])
    before = (tmp_path / "index" / INDEX_FILE).read_bytes()
    with pytest.raises(ForeignIndexError, match="artifact-a"):
        open_index(tmp_path / "index", contracts, artifact="artifact-b")
    with pytest.raises(ClipIndexError, match="shape"):
        ClipIndex.open(tmp_path / "index", "artifact-a", (1, 2, 3))
    assert (tmp_path / "index" / INDEX_FILE).read_bytes() == before


def test_interrupted_indexing_leaves_whole_entries_only(demo, pipeline, small_val, tmp_path,
                                                        monkeypatch):
    _, _, contracts = demo
    videos = videos_in(small_val)
    written = []
    real_write = ClipIndex.write_stem

    def crash_on_third(self, sha, stem):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated crash while writing the third stem")
        written.append(sha)
        return real_write(self, sha, stem)

    index = open_index(tmp_path / "index", contracts)
    with monkeypatch.context() as m:
        m.setattr(ClipIndex, "write_stem", crash_on_third)
        with pytest.raises(KeyboardInterrupt):
            # Batches of 2: the first is committed, the crash is within the second.
            index_videos(index, videos, pipeline, contracts["video_stem"], root=small_val,
                         batch=2)
    on_disk = json.loads((tmp_path / "index" / INDEX_FILE).read_text())
    assert list(on_disk["clips"]) == ["videos/val_00000.mp4", "videos/val_00001.mp4"]
    survivor = open_index(tmp_path / "index", contracts)
    assert survivor.stems().shape[0] == 2  # every listed entry is whole
    assert not list((tmp_path / "index").rglob("*.tmp"))
    report = index_videos(survivor, videos, pipeline, contracts["video_stem"], root=small_val)
    assert len(report.skipped) == 2 and len(report.added) == len(videos) - 2


def test_a_crash_in_the_first_batch_leaves_no_index(demo, pipeline, small_val, tmp_path,
                                                    monkeypatch):
    _, _, contracts = demo
    index = open_index(tmp_path / "index", contracts)
    monkeypatch.setattr(ClipIndex, "write_stem", lambda *a: (_ for _ in ()).throw(OSError(28)))
    with pytest.raises(OSError):
        index_videos(index, videos_in(small_val), pipeline, contracts["video_stem"])
    assert not (tmp_path / "index" / INDEX_FILE).exists()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float16", 2e-3)])
def test_ranking_from_the_index_equals_the_monolithic_ranking(demo, graphs, pipeline, small_val,
                                                              val, tmp_path, dtype, tol):
    _, monolithic, contracts = demo
    out, _ = graphs
    videos = videos_in(small_val)
    index = open_index(tmp_path / "index", contracts, dtype=dtype)
    index_videos(index, videos, pipeline, contracts["video_stem"], root=small_val)
    ids, mask = val.input_ids[:1], val.attention_mask[:1]
    k = 3
    ranked = rank(index, pipeline, ids, mask, k=k)

    n = len(videos)
    feed = {"video": np.stack([val_video(v, contracts) for v in videos]),
            "input_ids": np.repeat(ids, n, 0), "attention_mask": np.repeat(mask, n, 0)}
    with ort_runner(out / "model.fp32.onnx") as runner:
        expected = run_batches(runner, [feed])
    itm = softmax(expected["itm_logits"].astype(np.float64))[:, 1]
    order = np.argsort(-rerank(expected["itc_sim"][None], itm[None], k)[0], kind="stable")
    assert [r.clip_id for r in ranked] == [index.clip_ids[i] for i in order]
    for r, i in zip(ranked, order):
        assert abs(r.itc - expected["itc_sim"][i]) <= tol
        assert (r.itm is None) == (i not in order[:k])
        if r.itm is not None:
            assert abs(r.itm - itm[i]) <= tol
        assert r.frames == expected["frame_indices_2"][i].tolist()
