"""The split deployment wired into the product (demo checkpoint, tiny preset): the export job
writes and validates the split graphs beside the whole model, `export.py index` keeps an index
of one artifact's stems, and `predict --index` ranks as `predict --video` does."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import onnx
from onnx import helper, numpy_helper

import export
from twbert_export.export import legacy
from twbert_export.artifact.manifest import DEFAULT_FLAVOUR, TRT8_FLAVOUR, Manifest, Report
from twbert_export.retrieval import first_stage as fs
from twbert_export.retrieval import selection_stage as ss
from twbert_export.retrieval.clip_index import (INDEX_FILE, ClipIndex, MissingSelectionsWarning,
                                                first_stage_candidates, videos_in)
from twbert_export.retrieval.gallery import SplitArtifact, encode_text
from twbert_export.export.pipeline import ExportOptions, run_export
from twbert_export.export.split import GRAPHS
from twbert_export.util import file_sha256
from twbert_export.validation.files import SPLIT_FP32_ATOL


def test_split_graphs_are_exported_and_gated_beside_the_whole_model(artifact, small_val):
    out, report = artifact
    manifest = Manifest.load(out)
    for p in ("fp32", "fp16", "int8"):
        for graph in GRAPHS:
            entry = manifest.file(p, graph)
            assert entry.path == f"{graph}.{p}.onnx"
            assert entry.sha256 == file_sha256(out / entry.path)
    assert list(manifest.graph_contracts) == list(GRAPHS)
    # The trt8 twins of the split graphs are judged as the default flavour's are.
    labels = {"fp32", "fp16", "int8w", "int8", "fp32.trt8", "fp16.trt8", "int8.trt8"}
    assert Report.load(out).split.keys() == report.split.keys() == labels
    for p, flavour, whole_model in report.results():
        label = p if flavour == DEFAULT_FLAVOUR else f"{p}.{flavour}"
        result = report.split[label]
        assert result.passed, (label, [g for g in result.gates if not g["passed"]])
        # The same gates as the whole model's, plus the split-vs-whole check at FP32 against
        # the whole-model FP32 file of the same flavour.
        extra = [g["name"] for g in result.gates
                 if g["name"] not in {g["name"] for g in whole_model.gates}]
        against = "the whole-model FP32 ONNX" + (
            "" if flavour == DEFAULT_FLAVOUR else f" of flavour {TRT8_FLAVOUR}")
        assert extra == ([f"itm_logits vs {against}"] if p == "fp32" else [])
        assert manifest.passed(p, flavour) is True
    assert report.split["int8"].conversion["select"]["kept_fp32_selection"]


def test_split_fp32_equals_the_whole_model_fp32_within_1e_5_on_every_pair(artifact, small_val):
    _, report = artifact
    gate = next(g for g in report.split["fp32"].gates
                if g["name"] == "itm_logits vs the whole-model FP32 ONNX")
    clips = len(videos_in(small_val))
    error = float(gate["detail"].split()[0])
    assert gate["passed"] and error <= SPLIT_FP32_ATOL
    assert f"over all {clips * clips} rows" in gate["detail"]


def test_split_validation_computes_each_stem_and_text_once(artifact, small_val):
    _, report = artifact
    clips = len(videos_in(small_val))
    for p in ("fp32", "fp16", "int8", "fp32.trt8", "fp16.trt8", "int8.trt8"):
        run = report.validation_runs[f"split-{p}"]
        rows = run["graph_rows"]
        blocks = rows.pop("select blocks 2-3")  # once per distinct selection (select_pieces.py)
        # select: every pair, and the paired rows twice more (whole and in pieces: the check)
        assert rows == {"video_stem": clips, "text": clips, "select": clips * clips + 2 * clips,
                        "fuse": clips * clips}
        assert clips <= blocks < clips * clips / 2, blocks
        assert run["select"].startswith("select in pieces (stage 0, blocks 2-3, stage 1)")
        assert report.validation_runs[f"onnx-{p}"]["graph_rows"] == {"model": clips * clips}
    assert "## Validation cost per runner" in (artifact[0] / "report.md").read_text()


@pytest.fixture(scope="module")
def monolithic_only(tmp_path_factory, small_val):
    out = tmp_path_factory.mktemp("mono") / "demo"
    run_export(ExportOptions(ckpt="demo", precisions=("fp32",), val_data=str(small_val),
                             out=str(out), graphs="monolithic", rtx_check=False))
    return out


@pytest.mark.slow  # the monolithic-only export: about 16 s
def test_the_whole_models_file_is_the_same_with_or_without_split_graphs(artifact,
                                                                        monolithic_only):
    out, _ = artifact
    assert file_sha256(monolithic_only / "model.fp32.onnx") == file_sha256(out / "model.fp32.onnx")
    manifest = Manifest.load(monolithic_only)
    assert manifest.graphs == ["model"] and not manifest.graph_contracts
    assert not Report.load(monolithic_only).split


def _offset_itm_logits(path: Path, offset: float) -> None:
    """A planted fault: `offset` added to the graph's itm_logits output, in place."""
    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        node.output[:] = [f"{o}_unshifted" if o == "itm_logits" else o for o in node.output]
    graph.initializer.append(numpy_helper.from_array(np.float32(offset), "itm_offset"))
    graph.node.append(helper.make_node("Add", ["itm_logits_unshifted", "itm_offset"],
                                       ["itm_logits"]))
    onnx.save(model, str(path))


@pytest.mark.slow  # a whole export of its own: about 30 s
def test_a_wrong_trt8_split_twin_fails_the_export_with_exit_1(tmp_path, small_val, monkeypatch,
                                                              capsys):
    write_trt8_twin = legacy.write_trt8_twin

    def faulty_fuse_twin(src, work_dir):
        twin = write_trt8_twin(src, work_dir)
        if Path(src).name == "fuse.fp32.onnx":
            _offset_itm_logits(twin, 0.5)
        return twin

    monkeypatch.setattr(legacy, "write_trt8_twin", faulty_fuse_twin)
    out = tmp_path / "demo"
    code = export.main(["--precision", "fp32", "--val-data", str(small_val), "--out", str(out)])
    assert code == 1
    assert "fp32.trt8 (split)" in capsys.readouterr().err
    report, manifest = Report.load(out), Manifest.load(out)
    # Only the planted file's layout fails: the whole-model twin and the default flavour pass.
    assert not report.split["fp32.trt8"].passed and report.split["fp32"].passed
    assert report.flavours[TRT8_FLAVOUR]["fp32"].passed
    failed = {g["name"] for g in report.split["fp32.trt8"].gates if not g["passed"]}
    assert f"itm_logits vs the whole-model FP32 ONNX of flavour {TRT8_FLAVOUR}" in failed
    assert manifest.passed("fp32", TRT8_FLAVOUR) is False and manifest.passed("fp32") is True
    assert "fp32.trt8" in (out / "report.md").read_text()


# -- export.py index ----------------------------------------------------------------------------
def index_cli(*args) -> int:
    return export.main(["index", *map(str, args)])


def test_index_appends_new_clips_and_skips_unchanged_ones(artifact, small_val, tmp_path, capsys):
    out, _ = artifact
    clips = tmp_path / "clips"
    clips.mkdir()
    videos = videos_in(small_val)
    for v in videos[:2]:
        shutil.copy(v, clips / v.name)
    assert index_cli("--artifact", out, "--videos", clips, "--out", tmp_path / "index") == 0
    first = capsys.readouterr().out
    assert "added 2, replaced 0, unchanged 0; 2 clips" in first
    assert "2/2 new or changed clips stored" in first
    for v in videos[2:]:
        shutil.copy(v, clips / v.name)
    assert index_cli("--artifact", out, "--videos", clips, "--out", tmp_path / "index") == 0
    second = capsys.readouterr().out
    assert f"added {len(videos) - 2}, replaced 0, unchanged 2; {len(videos)} clips" in second
    index = json.loads((tmp_path / "index" / INDEX_FILE).read_text())
    # The index belongs to the video_stem file that made it (default: the last precision).
    assert index["artifact"] == Manifest.load(out).file("int8", "video_stem").sha256
    assert list(index["clips"]) == [v.name for v in videos]


def test_index_of_another_graph_is_refused_and_left_alone(artifact, small_val, tmp_path, capsys):
    out, _ = artifact
    index = tmp_path / "index"
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index,
                     "--precision", "fp16") == 0
    before = (index / INDEX_FILE).read_bytes()
    capsys.readouterr()
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index,
                     "--precision", "fp32") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "was made by artifact" in err[0] and err[1].startswith("hint: ")
    assert (index / INDEX_FILE).read_bytes() == before


def test_interrupted_index_keeps_the_index_as_it_was(artifact, small_val, tmp_path, monkeypatch,
                                                     capsys):
    out, _ = artifact
    index = tmp_path / "index"
    videos = videos_in(small_val)
    clips = tmp_path / "clips"
    clips.mkdir()
    shutil.copy(videos[0], clips / videos[0].name)
    assert index_cli("--artifact", out, "--videos", clips, "--out", index) == 0
    before = (index / INDEX_FILE).read_bytes()
    for v in videos[1:]:
        shutil.copy(v, clips / v.name)
    real_write, written = ClipIndex.write_stem, []

    def interrupted_on_third(self, sha, stem):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(sha)
        return real_write(self, sha, stem)

    with monkeypatch.context() as m:
        m.setattr(ClipIndex, "write_stem", interrupted_on_third)
        assert index_cli("--artifact", out, "--videos", clips, "--out", index) == 130
    # The batch in progress is lost whole: index.json is as before, and lists only whole stems.
    assert (index / INDEX_FILE).read_bytes() == before
    assert not list(index.rglob("*.tmp"))
    capsys.readouterr()
    assert index_cli("--artifact", out, "--videos", clips, "--out", index) == 0
    assert f"added {len(videos) - 1}, replaced 0, unchanged 1" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--videos", "{clips}/nowhere"], "is not a directory"),
    (["--artifact", "{mono}"], "holds no split graphs"),
    (["--precision", "bf16"], "--precision bf16: the artifact has no such split graphs"),
])
@pytest.mark.slow  # needs the monolithic-only export
def test_index_bad_input_is_one_line_and_exit_2(artifact, monolithic_only, small_val, tmp_path,
                                                capsys, args, message):
    out, _ = artifact
    given = {"--artifact": str(out), "--videos": str(small_val), "--out": str(tmp_path / "i")}
    for key, value in zip(args[::2], args[1::2]):
        given[key] = value.format(clips=small_val, mono=monolithic_only)
    assert index_cli(*[x for kv in given.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and message in err[0] and err[1].startswith("hint: ")


# -- predict --index ----------------------------------------------------------------------------
def predict_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert export.main(["predict", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# FP16: each graph rounds in its own places and the stems are stored in FP16; 1e-2 is a third
# of what the FP16 graphs differ from PyTorch on itc_sim (docs/split.md), on values near 30.
@pytest.mark.parametrize("precision, stem_dtype, tol", [("fp32", "float32", 1e-5),
                                                        ("fp16", "float16", 1e-2)])
def test_predict_from_the_index_equals_predict_from_the_videos(artifact, small_val, tmp_path,
                                                                capsys, precision, stem_dtype,
                                                                tol):
    out, _ = artifact
    index = tmp_path / "index"
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index, "--precision",
                     precision, "--stem-dtype", stem_dtype) == 0
    caption = json.loads((small_val / "annotations.jsonl").read_text().splitlines()[0])["caption"]
    videos = videos_in(small_val)
    k = 3  # fewer than the clips: the shortlist matters
    from_index = predict_json(capsys, "--index", index, "--artifact", out, "--text", caption,
                              "--k", k)["ranking"]
    from_videos = predict_json(capsys, "--model", out / f"model.{precision}.onnx",
                               *[x for v in videos for x in ("--video", v)], "--text", caption,
                               "--k", k)["ranking"]
    assert [r["clip"] for r in from_index] == [
        str(Path(r["video"]).relative_to(small_val)) for r in from_videos]
    for got, expected in zip(from_index, from_videos):
        assert got["shortlisted"] == expected["shortlisted"]
        assert abs(got["itc_similarity"] - expected["itc_similarity"]) <= tol
        assert got["frames"] == expected["frames"]
        if got["shortlisted"]:
            assert abs(got["match_probability"] - expected["match_probability"]) <= tol
        else:
            assert got["match_probability"] is None


def test_predict_index_bad_input_is_one_line_and_exit_2(artifact, small_val, tmp_path, capsys):
    out, _ = artifact
    index = tmp_path / "index"
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index) == 0
    capsys.readouterr()
    cases = [(["--index", tmp_path / "none", "--artifact", out, "--text", "a cat"],
              "is not a clip index"),
             (["--index", index, "--artifact", out, "--question", "what?", "--clip", "x"],
              "was exported for retrieval"),
             (["--index", index, "--artifact", out, "--text", " "], "is empty"),
             (["--index", index, "--artifact", out, "--text", "a cat", "--shortlist", "2",
               "--k", "3"], "--shortlist 2 is smaller than k 3")]
    for args, message in cases:
        assert export.main(["predict", *map(str, args)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 2 and message in err[0] and err[1].startswith("hint: "), err
    # A first-stage FAISS file that is not the one index.json recorded: refused, one line.
    faiss_file = index / json.loads((index / INDEX_FILE).read_text())["first_stage"]["faiss"]
    faiss_file.write_bytes(faiss_file.read_bytes()[:-4] + bytes(4))
    assert export.main(["predict", "--index", str(index), "--artifact", str(out), "--text",
                        "a cat", "--shortlist", "3", "--k", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not match the stems" in err[0], err


def test_predict_index_cascade_ranks_the_first_stages_shortlist_as_the_exact_ranking(
        artifact, small_val, tmp_path, capsys):
    """Issue 22: `--shortlist M` ranks the first stage's M clips with the exact ITC and ITM;
    M at least N (or --exact) is the exact ranking of every clip."""
    out, _ = artifact
    index = tmp_path / "index"
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index) == 0
    caption = json.loads((small_val / "annotations.jsonl").read_text().splitlines()[0])["caption"]
    common = ["--index", index, "--artifact", out, "--text", caption, "--k", 3]
    exact = predict_json(capsys, *common, "--exact")["ranking"]
    assert predict_json(capsys, *common, "--shortlist", 100)["ranking"] == exact  # M > N: N
    cascade = predict_json(capsys, *common, "--shortlist", 4)["ranking"]
    assert len(cascade) == 4 and all(-1 <= r["first_stage_similarity"] <= 1 for r in cascade)
    itc = {r["clip"]: r["itc_similarity"] for r in exact}
    assert all(r["itc_similarity"] == itc[r["clip"]] for r in cascade)
    chosen = {r["clip"] for r in cascade}
    by_itc = sorted(itc, key=lambda c: -itc[c])
    if set(by_itc[:3]) <= chosen:  # the exact ITM shortlist inside M: the same order
        assert [r["clip"] for r in cascade] == [r["clip"] for r in exact if r["clip"] in chosen]


def test_index_anchors_add_a_vector_per_anchor_kept_for_later_runs(artifact, small_val,
                                                                    tmp_path, capsys):
    """`index --anchors CAPTIONS`: each video's first stage holds the neutral text's vector and
    one per anchor, the anchors are kept by the index (a later run without --anchors reuses
    them, recomputing nothing), and the cascade at M >= N is still the exact ranking."""
    out, _ = artifact
    index = tmp_path / "index"
    videos = videos_in(small_val)
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index, "--anchors",
                     small_val) == 0
    stage = json.loads((index / INDEX_FILE).read_text())["first_stage"]
    captions = [json.loads(line).get("caption") for line in
                (small_val / "annotations.jsonl").read_text().splitlines()]
    anchors = min(fs.ANCHORS, len({c for c in captions if c}))
    assert stage["slots"] == 1 + anchors and stage["anchors"]["count"] == anchors
    assert stage["vectors"] == len(videos) * stage["slots"]
    assert f"({stage['slots']} per video, {anchors} anchors)" in capsys.readouterr().out
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index) == 0
    assert f"unchanged {len(videos)}" in capsys.readouterr().out
    again = json.loads((index / INDEX_FILE).read_text())["first_stage"]
    assert again["anchors"] == stage["anchors"] and again["faiss"] == stage["faiss"]
    caption = next(c for c in captions if c)
    common = ["--index", index, "--artifact", out, "--text", caption, "--k", 3]
    exact = predict_json(capsys, *common, "--exact")["ranking"]
    assert predict_json(capsys, *common, "--shortlist", 100)["ranking"] == exact
    cascade = predict_json(capsys, *common, "--shortlist", 4)["ranking"]
    assert len(cascade) == 4 and all(-1 <= r["first_stage_similarity"] <= 1.0001 for r in cascade)
    # The same captions again: the same anchors (nothing recomputed); a missing source: exit 2.
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index, "--anchors",
                     small_val) == 0
    assert json.loads((index / INDEX_FILE).read_text())["first_stage"]["faiss"] == stage["faiss"]
    capsys.readouterr()
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index, "--anchors",
                     tmp_path / "none") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--anchors" in err[0] and "no such file" in err[0], err


def test_step_two_scores_a_clip_as_select_does_and_a_damaged_file_is_written_again(
        artifact, small_val, tmp_path, capsys):
    """The first stage's step two (`selection_stage`): `index` writes one selections file per
    video; a clip whose first selector's choice for the caption is stored gets the cosine the
    `select` graph gives it (to FP16 rounding); a damaged file leaves its video to FAISS, with
    a warning, and the next `index` run writes it again."""
    out, _ = artifact
    index_dir = tmp_path / "index"
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index_dir, "--anchors",
                     small_val) == 0
    record = json.loads((index_dir / INDEX_FILE).read_text())["first_stage"]["selection"]
    files = sorted((index_dir / ss.DIRECTORY).glob(f"*{ss.SUFFIX}"))
    assert len(files) == len({file_sha256(v) for v in videos_in(small_val)})
    art = SplitArtifact.for_index(out, index_dir)
    assert record["keep"] == art.manifest.model_config["selector"]["keep"]
    index = ClipIndex.open(index_dir, art.identity, art.stem_shape)
    caption = json.loads((small_val / "annotations.jsonl").read_text().splitlines()[0])["caption"]
    with art.pipeline() as pipeline:
        ids, mask = encode_text(art, caption)
        text_cls = pipeline.encode_texts(ids, mask)["text_cls"]
        query = fs.text_vectors(*index.text_projection(), text_cls)[0]
        clips = index.clip_ids
        graph = pipeline.select(index.stems(clips), np.repeat(text_cls, len(clips), 0))
        vision = art.clip_embedder(pipeline).projections
    cosine = fs.normalized(graph["video_embeds"][:, 0].astype(np.float32) @ vision.vision_weight.T
                           + vision.vision_bias) @ query
    scores, exact = ss.scores(index.selection_side(), text_cls, query,
                              [index.video_selections(index.entries[c].sha256) for c in clips])
    assert exact.sum() >= len(clips) // 2, exact
    np.testing.assert_allclose(scores[exact], cosine[exact], atol=2e-3)

    files[0].write_bytes(b"damaged")
    with pytest.warns(MissingSelectionsWarning, match="1 of the"):
        candidates, _ = first_stage_candidates(index, text_cls, len(clips))
    assert len(candidates) == len(clips)  # its video still pooled, by its FAISS score
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index_dir) == 0
    assert ss.VideoSelections.load(index_dir, files[0].stem, record["slots_sha256"]) is not None


def test_a_select_graph_step_two_cannot_read_leaves_the_first_stage_to_faiss(
        artifact, small_val, tmp_path, capsys, monkeypatch):
    """A select graph whose inner tensors step two does not find: `index` warns, says `no step
    two`, keeps the FAISS first stage, and the cascade still ranks."""
    out, _ = artifact

    def unreadable(*args, **kwargs):
        raise ss.SelectionStageError("selector 2's LayerNorm not found")

    monkeypatch.setattr(ss, "SelectionProbe", unreadable)
    index_dir = tmp_path / "index"
    with pytest.warns(UserWarning, match="no step two for the first stage"):
        assert index_cli("--artifact", out, "--videos", small_val, "--out", index_dir) == 0
    assert "no step two" in capsys.readouterr().out
    stage = json.loads((index_dir / INDEX_FILE).read_text())["first_stage"]
    assert stage["selection"] is None and not (index_dir / ss.DIRECTORY).exists()
    caption = json.loads((small_val / "annotations.jsonl").read_text().splitlines()[0])["caption"]
    cascade = predict_json(capsys, "--index", index_dir, "--artifact", out, "--text", caption,
                           "--k", 3, "--shortlist", 4)["ranking"]
    assert len(cascade) == 4


def test_predict_index_on_engines_runs_each_graphs_engine_with_its_onnx_hash(
        artifact, small_val, tmp_path, capsys, monkeypatch):
    """--engines: each graph's .engine beside its .onnx, as one engine set
    (`split_trt.SplitEngines`; here a stand-in that checks the ONNX hash each engine would be
    preflighted against and runs the ONNX files on ONNX Runtime). The engine set's own logic
    is tests/trt/test_runner_logic.py's."""
    from twbert_export.retrieval import split_trt
    from twbert_export.validation.composed import ComposedSplit

    out = tmp_path / "artifact"
    shutil.copytree(artifact[0], out)
    manifest = Manifest.load(out)
    for graph in GRAPHS:
        (out / f"{graph}.fp16.engine").write_bytes(b"stand-in engine")
    opened = []

    def stand_in_engines(files, contracts, monolithic, **_):
        for graph, path in files.items():
            onnx_path = Path(path).with_suffix(".onnx")
            assert split_trt._listed_sha256(Path(path)) == file_sha256(onnx_path)
            assert contracts[graph] == manifest.contract_of(graph)
            opened.append(Path(path).name)
        return ComposedSplit({g: Path(p).with_suffix(".onnx") for g, p in files.items()},
                             contracts, monolithic)

    monkeypatch.setattr(split_trt, "SplitEngines", stand_in_engines)
    index = tmp_path / "index"
    assert index_cli("--artifact", out, "--videos", small_val, "--out", index,
                     "--precision", "fp16", "--engines") == 0
    assert opened == [f"{g}.fp16.engine" for g in GRAPHS]
    on_engines = predict_json(capsys, "--index", index, "--artifact", out, "--text", "a dog",
                              "--engines")
    on_onnx = predict_json(capsys, "--index", index, "--artifact", out, "--text", "a dog")
    assert on_engines == on_onnx
    (out / "fuse.fp16.engine").unlink()
    assert export.main(["predict", "--index", str(index), "--artifact", str(out), "--text",
                        "a dog", "--engines"]) == 2
    assert "fuse.fp16.engine not found" in capsys.readouterr().err


def test_index_and_predict_index_need_no_torch(artifact, small_val, tmp_path):
    from blocked_imports import REPO, run_without

    out, _ = artifact
    index = tmp_path / "index"
    for argv in (["index", "--artifact", str(out), "--videos", str(small_val), "--out",
                  str(index)],
                 ["predict", "--index", str(index), "--artifact", str(out), "--text", "a cat"]):
        code = ("import runpy\n"
                f"sys.argv = ['export.py', *{argv!r}]\n"
                f"runpy.run_path({str(REPO / 'export.py')!r}, run_name='__main__')\n")
        proc = run_without(("torch",), code)
        assert proc.returncode == 0, proc.stderr
    assert "itc" in proc.stdout


def test_int8_leaves_the_selection_node_patterns_as_they_were(artifact):
    """ModelOpt extends the nodes_to_exclude list it is given; the policy's own list must not
    grow (the FP16 report, the range watch and the calibration key read it)."""
    from twbert_export import precision

    assert artifact[1].precisions["int8"].passed  # an INT8 export ran in this process
    assert isinstance(precision.SELECTION_NODES, tuple)
    assert all(p.startswith("/model/selector") for p in precision.SELECTION_NODES)
