"""`select` run in pieces for validation (twbert_export/validation/select_pieces.py): cut from the split
select graphs the export writes (session artifact: every precision and flavour), the pieces give
the whole graph's outputs exactly while the video blocks run once per distinct selection; pieces
that disagree with the whole graph are not used."""

import numpy as np
import onnx
import pytest

from twbert_export.artifact.manifest import Manifest
from twbert_export.data.calibration import load_feeds
from twbert_export.data.preprocess import Tokenizer
from twbert_export.validation.runners import ort_session
from twbert_export.validation.select_pieces import NoCut, PiecewiseSelect, cut
from twbert_export.validation.composed import ComposedSplit, unique_texts


@pytest.fixture(scope="module")
def every_pair(artifact, small_val):
    """(stems, text_cls) of every (clip, text) pair of the validation clips, clip-major."""
    out, _ = artifact
    manifest = Manifest.load(out)
    files = {g: out / manifest.file("fp32", g).path for g in manifest.graph_contracts}
    val = load_feeds(small_val, manifest.contract, Tokenizer.default())
    with ComposedSplit(files, manifest.graph_contracts, manifest.contract) as pipeline:
        stems = pipeline.encode_clips(val.video)
        text_cls = unique_texts(pipeline, val.input_ids, val.attention_mask)["text_cls"]
    v, t = np.meshgrid(np.arange(len(stems)), np.arange(len(text_cls)), indexing="ij")
    return stems[v.ravel()], text_cls[t.ravel()]


@pytest.mark.parametrize("name", ["select.fp32.onnx", "select.fp16.onnx", "select.int8.onnx",
                                  "select.fp32.trt8.onnx", "select.fp16.trt8.onnx",
                                  "select.int8.trt8.onnx"])
def test_the_pieces_give_the_whole_graphs_outputs_exactly(artifact, every_pair, name):
    path = artifact[0] / name
    stems, text_cls = every_pair
    whole = ort_session(path)
    names = [o.name for o in whole.get_outputs()]
    pieces = PiecewiseSelect(path)
    assert [p.name for p in pieces.pieces] == ["stage 0", "blocks 2-3", "stage 1"]
    assert [p.memoized for p in pieces.pieces] == [False, True, False]
    batch = 8
    for start in range(0, len(stems), batch):
        feed = {"stem": stems[start:start + batch], "text_cls": text_cls[start:start + batch]}
        for n, expected, got in zip(names, whole.run(names, feed), pieces.run(feed)):
            np.testing.assert_array_equal(got, expected, err_msg=n)
    pairs = len(stems)
    assert pieces.rows["stage 0"] == pieces.rows["stage 1"] == pairs
    # The blocks after selector 1 ran once per distinct selection of a clip.
    assert pieces.rows["blocks 2-3"] < pairs / 2


def test_a_graph_without_video_blocks_is_not_cut(artifact):
    with pytest.raises(NoCut, match="no video blocks"):
        cut(onnx.load(str(artifact[0] / "fuse.fp32.onnx")))


def test_pieces_that_differ_from_the_whole_graph_are_not_used(artifact, every_pair,
                                                              monkeypatch):
    out, _ = artifact
    manifest = Manifest.load(out)
    files = {g: out / manifest.file("fp32", g).path for g in manifest.graph_contracts}
    stems, text_cls = every_pair
    with ComposedSplit(files, manifest.graph_contracts, manifest.contract,
                       select_in_pieces=True) as pipeline:
        pipeline.check_pieces(stems[:8], text_cls[:8])
        assert pipeline.pieces is not None
        assert "max rel. difference 0" in pipeline.pieces_note
        run = PiecewiseSelect.run

        def off_by_a_little(self, feed):
            out = run(self, feed)
            return [o + 1e-3 if n == "itc_sim" else o for n, o in zip(self.output_names, out)]

        monkeypatch.setattr(PiecewiseSelect, "run", off_by_a_little)
        pipeline.check_pieces(stems[:8], text_cls[:8])
        assert pipeline.pieces is None
        assert pipeline.pieces_note.startswith("select run whole: its pieces")
        whole = ort_session(files["select"]).run(["itc_sim"], {"stem": stems[:8],
                                                               "text_cls": text_cls[:8]})[0]
        np.testing.assert_array_equal(pipeline.select(stems[:8], text_cls[:8])["itc_sim"], whole)


def test_with_room_for_one_batch_only_the_memo_forgets_but_never_answers_wrong(
        artifact, every_pair, monkeypatch):
    from twbert_export.validation import select_pieces

    monkeypatch.setattr(select_pieces, "MEMO_BYTES", 1)  # keeps this batch's rows, no more
    path = artifact[0] / "select.fp32.onnx"
    stems, text_cls = every_pair
    whole, pieces = ort_session(path), PiecewiseSelect(path)
    names = [o.name for o in whole.get_outputs()]
    order = np.random.default_rng(0).permutation(len(stems))  # clips no longer in turn
    for start in range(0, len(stems), 8):
        rows = order[start:start + 8]
        feed = {"stem": stems[rows], "text_cls": text_cls[rows]}
        for n, expected, got in zip(names, whole.run(names, feed), pieces.run(feed)):
            np.testing.assert_array_equal(got, expected, err_msg=n)
        assert len(pieces.memos[1]) == len({s.tobytes() for s in pieces_input(pieces, feed)})


def pieces_input(pieces, feed):
    """The rows the memoized run took for this feed (stage 0's output it reads)."""
    stage = pieces.pieces[0]
    values = dict(zip(stage.outputs, pieces.sessions[0].run(stage.outputs, feed)))
    return values[pieces.pieces[1].inputs[0]]


def test_where_each_clip_meets_one_text_select_runs_whole(artifact, small_val):
    """Nothing to reuse (one clip, one text): the pieces would only add their check."""
    from twbert_export.validation import parity as validate
    from twbert_export.validation.runners import ort_runner
    from twbert_export.validation.composed import validate_split

    out, _ = artifact
    manifest = Manifest.load(out)
    files = {g: out / manifest.file("fp32", g).path for g in manifest.graph_contracts}
    one = load_feeds(small_val, manifest.contract, Tokenizer.default(), limit=1,
                     texts_per_video=1)
    with ort_runner(out / "model.fp32.onnx") as runner:
        reference, metrics = validate.run_validation(runner, one, manifest.contract)
    result = validate_split(files, manifest.graph_contracts, manifest.contract, "fp32", one,
                            reference, metrics, validate.DEFAULT_GATES["fp32"])
    assert result["passed"]
    assert result["select"] == "select run whole: each clip meets one text, nothing to reuse"
    assert result["graph_rows"] == {"video_stem": 1, "text": 1, "select": 1, "fuse": 1}
