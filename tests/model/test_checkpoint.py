"""Checkpoint save / load: our format round trips, the authors' layouts, and clear errors."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import pytest
import torch

from model import TWBert, TWBertConfig
from model.config import schedule_for_frames
from model.checkpoint import (FORMAT_NAME, CheckpointError, load_checkpoint, save_checkpoint,
                              to_authors_state_dict)

BATCH, FRAMES, WORDS = 2, 8, 7


def make_model(cfg: TWBertConfig, seed: int = 0) -> TWBert:
    torch.manual_seed(seed)
    return TWBert(cfg).eval()


@pytest.fixture(scope="module")
def qa_model() -> TWBert:
    return make_model(TWBertConfig.tiny(num_answers=5))


@pytest.fixture(scope="module")
def retrieval_model() -> TWBert:
    return make_model(TWBertConfig.tiny(), seed=1)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    video = torch.randn(BATCH, FRAMES, 3, 64, 64, generator=generator)
    ids = torch.randint(1, 1000, (BATCH, WORDS), generator=generator)
    mask = torch.ones(BATCH, WORDS, dtype=torch.long)
    mask[1, 4:] = 0  # one padded caption, so the text mask matters
    return video, ids, mask


def assert_same_outputs(expected: TWBert, actual: TWBert, inputs) -> None:
    with torch.no_grad():
        want, got = expected(*inputs), actual(*inputs)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), f"output {name} differs"


def training_only_entries(model: TWBert, text_prefix: str) -> dict[str, torch.Tensor]:
    """Tensors an authors' training checkpoint holds besides the model, all to be skipped."""
    unused_text_layer = model.cfg.text.layers  # the first layer past our text encoder
    dim = model.cfg.dim
    return {
        "visual_encoder_m.model.cls_token": torch.zeros(1, 1, dim),
        "text_proj_m.weight": torch.zeros(model.cfg.itc_dim, dim),
        "video_queue": torch.zeros(model.cfg.itc_dim, 16),
        "queue_ptr": torch.zeros(1, dtype=torch.long),
        f"{text_prefix}encoder.layer.{unused_text_layer}.attention.self.query.weight": torch.zeros(dim, dim),
        f"{text_prefix}embeddings.position_ids": torch.arange(512)[None],
        "visual_encoder.model.head.weight": torch.zeros(400, dim),
    }


def authors_state_dict(model: TWBert, layout: str) -> dict[str, torch.Tensor]:
    prefix = {"retrieval": "text_encoder.bert.", "qa": "text_encoder."}[layout]
    state = to_authors_state_dict(model, layout)
    state.update(training_only_entries(model, prefix))
    if layout == "retrieval":
        state["text_encoder.cls.predictions.bias"] = torch.zeros(model.cfg.text.vocab_size)
    return state


# -- our format -----------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip_reproduces_outputs_config_and_metadata(tmp_path, qa_model, inputs, suffix):
    path = save_checkpoint(qa_model, tmp_path / f"model{suffix}", metadata={"dataset": "msrvtt-qa"})
    loaded, report = load_checkpoint(path)
    assert loaded.cfg == qa_model.cfg
    assert not loaded.training
    assert report.format == FORMAT_NAME and report.complete
    assert report.metadata == {"dataset": "msrvtt-qa"}
    assert_same_outputs(qa_model, loaded, inputs)


def test_pt_file_is_a_plain_dict_that_loads_weights_only(tmp_path, qa_model):
    path = save_checkpoint(qa_model, tmp_path / "model.pt")
    contents = torch.load(path, weights_only=True)
    assert contents["format"] == FORMAT_NAME and contents["format_version"] == 1
    assert TWBertConfig.from_dict(contents["config"]) == qa_model.cfg
    assert contents["state_dict"].keys() == qa_model.state_dict().keys()


def test_save_refuses_to_overwrite_unless_asked(tmp_path, qa_model, retrieval_model):
    path = save_checkpoint(qa_model, tmp_path / "model.pt")
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_checkpoint(retrieval_model, path)
    assert path.read_bytes() == before
    save_checkpoint(retrieval_model, path, overwrite=True)
    assert load_checkpoint(path)[0].cfg == retrieval_model.cfg
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_schedule_override_keeps_weights_and_changes_selection(tmp_path, qa_model, inputs):
    path = save_checkpoint(qa_model, tmp_path / "model.pt")
    loaded, report = load_checkpoint(path, schedule="8-4-2", select_layers="1,3")
    assert (loaded.cfg.selector.keep, loaded.cfg.selector.layers) == ((4, 2), (1, 3))
    assert report.complete
    for name, tensor in qa_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    with torch.no_grad():
        assert loaded(*inputs)["frame_indices_2"].shape == (BATCH, 2)


def test_schedule_without_selection_reports_selector_weights(tmp_path, qa_model, inputs):
    path = save_checkpoint(qa_model, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="selector1.scorer.norm.weight") as error:
        load_checkpoint(path, schedule="8")
    # Advice in the command line's terms: the CLI has no strict=False.
    assert "--schedule 8-6-4" in str(error.value) and "strict=False" not in str(error.value)

    loaded, report = load_checkpoint(path, schedule="8", strict=False)
    selector_names = [n for n in qa_model.state_dict() if n.startswith("selector")]
    assert sorted(report.unexpected) == sorted(selector_names)
    assert not report.missing and not report.mismatched
    with torch.no_grad():
        assert "frame_indices_1" not in loaded(*inputs)


@pytest.mark.parametrize("damage", ["missing section", "inconsistent widths"])
def test_invalid_config_is_a_checkpoint_error(tmp_path, qa_model, damage):
    config = qa_model.cfg.to_dict()
    if damage == "missing section":
        del config["video"]
    else:
        config["video"]["dim"] = 48
    path = tmp_path / "model.pt"
    torch.save({"format": FORMAT_NAME, "format_version": 1, "config": config,
                "state_dict": qa_model.state_dict(), "metadata": {}}, path)
    with pytest.raises(CheckpointError, match="invalid model config"):
        load_checkpoint(path)


# -- the authors' format --------------------------------------------------------------------------
def test_authors_retrieval_checkpoint_loads_and_lists_skipped(tmp_path, retrieval_model, inputs):
    state = authors_state_dict(retrieval_model, "retrieval")
    training_only = training_only_entries(retrieval_model, "text_encoder.bert.").keys() \
        | {"text_encoder.cls.predictions.bias"}
    # A training checkpoint: DDP prefix, wrapped next to the optimizer state and the epoch.
    wrapped = {"model": {f"module.{name}": t for name, t in state.items()},
               "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 4}
    path = tmp_path / "authors_retrieval.pt"
    torch.save(wrapped, path)

    # The tiny model's own schedule (without it, the authors' rule gives 8-5-3: see below).
    loaded, report = load_checkpoint(path, preset="tiny", schedule="8-6-4")
    assert report.format == "authors-retrieval" and report.complete
    assert {name for name, _ in report.skipped} == training_only
    assert all(reason for _, reason in report.skipped)
    assert report.metadata["epoch"] == 4
    assert_same_outputs(retrieval_model, loaded, inputs)


def test_authors_qa_checkpoint_loads_with_sizes_from_tensors(tmp_path, inputs):
    cfg = TWBertConfig.tiny(schedule="4-2-1", num_answers=7)  # the authors' rule for 4 frames
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, time_embed_frames=4),
                              text=dataclasses.replace(cfg.text, max_positions=64))
    model = make_model(cfg, seed=3)
    path = tmp_path / "authors_qa.pt"
    torch.save(authors_state_dict(model, "qa"), path)

    # The tiny preset has no QA head, 8 frames and 512 positions: the tensors decide.
    loaded, report = load_checkpoint(path, preset="tiny")
    assert report.format == "authors-qa" and report.complete
    assert loaded.cfg == cfg
    assert report.schedule_reason.startswith("F@4-2-1 from the checkpoint's 4-frame time table")
    assert len(report.skipped) == len(training_only_entries(model, "text_encoder."))
    video, ids, mask = inputs
    assert_same_outputs(model, loaded, (video[:, :4], ids, mask))


def test_authors_schedule_comes_from_the_time_table_not_the_preset(tmp_path, inputs):
    """A 16-frame file loaded without a schedule: the preset alone would say its own (tiny 8-6-4,
    base 32-24-16) and resize the time table; the table's length says 16, with selectors
    16-11-7 (the authors' rule)."""
    cfg = TWBertConfig.tiny(schedule="16-11-7")
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, time_embed_frames=16))
    model = make_model(cfg, seed=5)
    path = tmp_path / "authors_16_frames.pt"
    torch.save(to_authors_state_dict(model), path)

    loaded, report = load_checkpoint(path, preset="tiny")
    assert loaded.cfg == cfg and report.complete
    assert report.schedule_reason.startswith("F@16-11-7 from the checkpoint's 16-frame time table")
    assert "schedule: F@16-11-7 from the checkpoint's 16-frame time table" in report.summary()
    video, ids, mask = inputs
    assert_same_outputs(model, loaded, (torch.cat([video, video], dim=1), ids, mask))

    requested, report = load_checkpoint(path, preset="tiny", schedule="8-6-4")
    assert requested.cfg.selector.schedule == "8-6-4"
    assert report.schedule_reason == ("F@8-6-4 as requested (the checkpoint's 16-frame time "
                                      "table is interpolated)")


def test_authors_file_without_selectors_gets_a_schedule_without_selection(tmp_path, inputs):
    cfg = TWBertConfig.tiny(schedule="8")
    model = make_model(cfg, seed=4)
    path = tmp_path / "authors_no_selection.pt"
    torch.save(to_authors_state_dict(model), path)
    loaded, report = load_checkpoint(path, preset="tiny")
    assert loaded.cfg.selector.schedule == "8" and report.complete
    assert report.schedule_reason == ("F@8 from the checkpoint's 8-frame time table and its lack "
                                      "of frame-selector weights")
    assert_same_outputs(model, loaded, inputs)


@pytest.mark.parametrize("frames, schedule", [(8, "8-5-3"), (20, "20-14-10"), (32, "32-23-16")])
def test_authors_file_without_schedule_gets_the_authors_own_rule(tmp_path, frames, schedule):
    """Issue 23 item 14: the authors' code that trained the file keeps int(T * 0.72) frames, then
    int(K1 * 0.72) (`select_ratio` 0.72 in their TimeSformer config), not the paper's table; the
    load line says which rule chose the schedule."""
    cfg = TWBertConfig.tiny(schedule=schedule)
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, time_embed_frames=frames))
    path = tmp_path / f"authors_{frames}.pt"
    torch.save(to_authors_state_dict(make_model(cfg, seed=6)), path)
    loaded, report = load_checkpoint(path, preset="tiny")
    assert loaded.cfg.selector.schedule == schedule and loaded.cfg == cfg and report.complete
    assert report.schedule_reason == (
        f"F@{schedule} from the checkpoint's {frames}-frame time table, by the authors' rule "
        "(keep int(T*0.72), then int(K1*0.72): their select_ratio)")
    assert f"schedule: {report.schedule_reason}" in report.summary()
    requested, report = load_checkpoint(path, preset="tiny", schedule=schedule_for_frames(frames))
    assert requested.cfg.selector.schedule == schedule_for_frames(frames)
    assert report.schedule_reason == f"F@{schedule_for_frames(frames)} as requested"


@pytest.mark.parametrize("frames, schedule", [(32, "32-24-16"), (24, "24-18-12"), (20, "20-14-8"),
                                              (8, "8-6-4"), (16, "16-12-8"), (2, "2-2-1")])
def test_schedule_for_frames_follows_the_paper(frames, schedule):
    assert schedule_for_frames(frames) == schedule
    assert schedule_for_frames(frames, selection=False) == str(frames)


def test_our_format_reports_its_own_schedule(tmp_path, qa_model):
    path = save_checkpoint(qa_model, tmp_path / "model.pt")
    assert load_checkpoint(path)[1].schedule_reason == "F@8-6-4, the checkpoint's own"
    assert load_checkpoint(path, schedule="8-4-2")[1].schedule_reason == \
        "F@8-4-2 as requested (trained at F@8-6-4)"


# -- the ITC temperature ----------------------------------------------------------------------------
def test_itc_divides_by_the_stored_temperature_as_the_authors_do(retrieval_model, inputs):
    with torch.no_grad():
        out = retrieval_model(*inputs)
        cosine = (out["text_feat"] * out["video_feat"]).sum(-1)
    torch.testing.assert_close(out["itc_sim"], cosine / retrieval_model.temp, rtol=0, atol=0)


@pytest.mark.parametrize("stored, used", [(0.9, 0.5), (1e-5, 0.001)])
def test_out_of_range_temperature_is_clamped_with_a_warning(tmp_path, retrieval_model, stored,
                                                            used):
    state = to_authors_state_dict(retrieval_model)
    state["temp"] = torch.tensor(stored)
    path = tmp_path / "authors_temp.pt"
    torch.save(state, path)
    with pytest.warns(UserWarning, match=f"ITC temperature {stored:g} is outside"):
        loaded, report = load_checkpoint(path, preset="tiny")
    assert loaded.temp.item() == pytest.approx(used)
    assert any("ITC temperature" in note for note in report.notes)


def test_in_range_temperature_loads_as_stored_and_silently(tmp_path, retrieval_model, recwarn):
    path = save_checkpoint(retrieval_model, tmp_path / "model.pt")
    loaded, report = load_checkpoint(path)
    assert loaded.temp.item() == retrieval_model.temp.item() and not report.notes
    assert not [w for w in recwarn if "temperature" in str(w.message)]


def test_non_finite_temperature_is_refused(tmp_path, retrieval_model):
    state = to_authors_state_dict(retrieval_model)
    state["temp"] = torch.tensor(float("nan"))
    path = tmp_path / "authors_nan_temp.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="non-finite ITC temperature"):
        load_checkpoint(path, preset="tiny")


# Spec sections 5 and 8, written out independently of the loader's table.
SPEC_NAMES = [
    ("crossmodal_encoder.layers.1.self_attn.linears.0.weight", "cross.layers.1.attn.shared_q.weight"),
    ("crossmodal_encoder.layers.1.self_attn.linears.1.weight", "cross.layers.1.attn.shared_k.weight"),
    ("crossmodal_encoder.layers.1.self_attn.linears.2.weight", "cross.layers.1.attn.shared_v.weight"),
    ("crossmodal_encoder.layers.1.self_attn.linears.3.weight", "cross.layers.1.attn.word_q.weight"),
    ("crossmodal_encoder.layers.1.self_attn.linears.4.weight", "cross.layers.1.attn.word_k.weight"),
    ("crossmodal_encoder.layers.1.self_attn.linears.5.weight", "cross.layers.1.attn.word_v.weight"),
    ("crossmodal_encoder.layers.1.self_attn.linears.6.weight", "cross.layers.1.attn.stream_out.weight"),
    ("crossmodal_encoder.layers.1.self_attn.linears.7.weight", "cross.layers.1.attn.frame_out.weight"),
    ("crossmodal_encoder.layers.1.self_attn.norm.weight", "cross.layers.1.attn.trajectory_norm.weight"),
    ("crossmodal_encoder.layers.1.sublayer.0.norm.weight", "cross.layers.1.attn_norm.weight"),
    ("crossmodal_encoder.layers.1.sublayer.1.norm.weight", "cross.layers.1.ffn_norm.weight"),
    ("crossmodal_encoder.layers.1.feed_forward.w_1.weight", "cross.layers.1.ffn_in.weight"),
    ("crossmodal_encoder.norm.bias", "cross.norm.bias"),
    ("visual_encoder.model.blocks.2.norm1.weight", "video.blocks.2.spatial_norm.weight"),
    ("visual_encoder.model.blocks.2.temporal_norm1.weight", "video.blocks.2.temporal_norm.weight"),
    ("visual_encoder.model.blocks.2.norm2.weight", "video.blocks.2.mlp_norm.weight"),
    ("visual_encoder.model.blocks.2.attn.qkv.bias", "video.blocks.2.spatial_attn.qkv.bias"),
    ("visual_encoder.model.blocks.2.temporal_attn.proj.weight", "video.blocks.2.temporal_attn.proj.weight"),
    ("visual_encoder.model.patch_embed.proj.weight", "video.patch_embed.weight"),
    ("visual_encoder.model.time_embed", "video.time_embed"),
    ("visual_encoder.model.visual_token_selector2.score_predictor.in_conv.0.weight",
     "selector2.scorer.norm.weight"),
    ("visual_encoder.model.visual_token_selector2.score_predictor.in_conv.1.weight",
     "selector2.scorer.frame_proj.weight"),
    ("visual_encoder.model.visual_token_selector2.score_predictor.out_conv.0.weight",
     "selector2.scorer.fuse_proj.weight"),
    ("visual_encoder.model.visual_token_selector2.score_predictor.out_conv.2.weight",
     "selector2.scorer.score_out.weight"),
    ("text_encoder.embeddings.LayerNorm.weight", "text.embeddings.norm.weight"),
    ("text_encoder.encoder.layer.1.attention.self.key.weight", "text.layers.1.k_proj.weight"),
    ("text_encoder.encoder.layer.1.attention.output.LayerNorm.weight", "text.layers.1.attn_norm.weight"),
    ("text_encoder.encoder.layer.1.output.LayerNorm.weight", "text.layers.1.ffn_norm.weight"),
    ("text_encoder.encoder.layer.1.intermediate.dense.weight", "text.layers.1.ffn_in.weight"),
    ("temp", "temp"),
    ("classifier.0.weight", "qa_head.fc1.weight"),
    ("classifier.2.bias", "qa_head.fc2.bias"),
]


def test_authors_names_follow_the_spec_roles():
    model = TWBert(TWBertConfig.tiny(num_answers=3))
    with torch.no_grad():  # a distinct value per tensor, so a swapped name cannot go unnoticed
        for value, tensor in enumerate(model.state_dict().values()):
            tensor.fill_(value)
    state = to_authors_state_dict(model, "qa")
    ours = model.state_dict()
    for authors_name, our_name in SPEC_NAMES:
        assert torch.equal(state[authors_name], ours[our_name]), f"{authors_name} -> {our_name}"


def test_missing_tensor_error_names_it_in_both_namings(tmp_path, retrieval_model):
    state = authors_state_dict(retrieval_model, "retrieval")
    del state["crossmodal_encoder.layers.0.self_attn.linears.7.weight"]
    path = tmp_path / "authors.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="1 missing") as error:
        load_checkpoint(path, preset="tiny")
    assert "cross.layers.0.attn.frame_out.weight" in str(error.value)
    assert "crossmodal_encoder.layers.0.self_attn.linears.7.weight" in str(error.value)


def test_misshaped_tensor_error_gives_both_shapes(tmp_path, retrieval_model):
    state = authors_state_dict(retrieval_model, "retrieval")
    state["vision_proj.weight"] = torch.zeros(33, 64)
    path = tmp_path / "authors.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"vision_proj.weight \(model \[32, 64\], file \[33, 64\]\)") \
            as error:
        load_checkpoint(path, preset="tiny")
    # Actionable in the CLI's terms: another model size, the preset flag; no strict=False.
    assert "another model size" in str(error.value) and "--preset" in str(error.value)
    assert "strict=False" not in str(error.value)


def test_misshaped_tensor_in_our_format_says_the_file_is_damaged(tmp_path, retrieval_model):
    state = dict(retrieval_model.state_dict(), **{"text_proj.weight": torch.zeros(33, 64)})
    path = tmp_path / "edited.pt"
    torch.save({"format": FORMAT_NAME, "format_version": 1, "config": retrieval_model.cfg.to_dict(),
                "state_dict": state, "metadata": {}}, path)
    with pytest.raises(CheckpointError, match="damaged or edited") as error:
        load_checkpoint(path)
    assert "strict=False" not in str(error.value)


def test_long_key_lists_are_truncated(tmp_path, retrieval_model):
    state = {n: t for n, t in authors_state_dict(retrieval_model, "retrieval").items()
             if not n.startswith("visual_encoder.")}
    path = tmp_path / "no_video.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"\.\.\. and \d+ more") as error:
        load_checkpoint(path, preset="tiny")
    assert "video.blocks.3.mlp.fc2.bias" not in str(error.value)  # far past the first 20


def test_strict_false_loads_what_fits_and_reports_the_rest(tmp_path, retrieval_model):
    state = authors_state_dict(retrieval_model, "retrieval")
    del state["itm_head.bias"]
    state["vision_proj.weight"] = torch.zeros(33, 64)
    state["extra_head.weight"] = torch.zeros(2, 2)
    path = tmp_path / "authors.pt"
    torch.save(state, path)

    loaded, report = load_checkpoint(path, preset="tiny", strict=False)
    assert report.missing == ["itm_head.bias"]
    assert report.mismatched == [("vision_proj.weight", (32, 64), (33, 64))]
    assert report.unexpected == ["extra_head.weight"]
    assert not report.complete and "itm_head.bias" in report.summary()
    assert torch.equal(loaded.text_proj.weight, retrieval_model.text_proj.weight)


def test_file_without_twbert_tensors_is_rejected(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(CheckpointError, match="neither a twbert-export file nor an authors'"):
        load_checkpoint(path)


# -- unreadable and unsafe files ------------------------------------------------------------------
def write_damaged(tmp_path: Path, model: TWBert, kind: str) -> Path:
    if kind == "truncated .pt":
        whole = save_checkpoint(model, tmp_path / "whole.pt").read_bytes()
        path = tmp_path / "truncated.pt"
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "truncated .safetensors":
        whole = save_checkpoint(model, tmp_path / "whole.safetensors").read_bytes()
        path = tmp_path / "truncated.safetensors"
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "empty":
        path = tmp_path / "empty.pt"
        path.write_bytes(b"")
    elif kind == "text":
        path = tmp_path / "notes.pt"
        path.write_text("epoch 3: loss 0.41\n")
    else:
        path = tmp_path / "does_not_exist.pt"
    return path


@pytest.mark.parametrize("kind, message", [
    ("truncated .pt", "is not a readable PyTorch checkpoint (truncated or not a checkpoint file): "
                      "PytorchStreamReader failed"),
    ("truncated .safetensors", "is not a readable safetensors file"),
    ("empty", "is not a readable PyTorch checkpoint (truncated or not a checkpoint file): "
              "the file is empty"),
    ("text", "is not a readable PyTorch checkpoint (truncated or not a checkpoint file)"),
    ("missing", "does not exist"),
])
def test_unreadable_file_gives_one_clear_error(tmp_path, qa_model, kind, message):
    path = write_damaged(tmp_path, qa_model, kind)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    assert message in str(error.value)
    assert str(path) in str(error.value)
    # No chained torch exception: the message is all the user sees.
    assert error.value.__cause__ is None
    assert error.value.__context__ is None or error.value.__suppress_context__


class RunsACommand:
    """Unpickling calls os.system: what a malicious checkpoint does."""

    def __reduce__(self):
        return os.system, ("echo this-must-not-run",)


def test_pickle_calling_a_blocked_module_says_it_was_blocked(tmp_path, retrieval_model, capfd):
    path = tmp_path / "malicious.pt"
    torch.save({"model": to_authors_state_dict(retrieval_model), "payload": RunsACommand()}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, preset="tiny")
    message = str(error.value)
    assert "was blocked" in message and "system" in message and "--trust-checkpoint" in message
    assert "truncated" not in message
    assert "this-must-not-run" not in capfd.readouterr().out


def test_pickle_needing_full_unpickling_is_refused_unless_trusted(tmp_path, retrieval_model, inputs):
    path = tmp_path / "authors_with_args.pt"
    torch.save({"model": to_authors_state_dict(retrieval_model), "args": argparse.Namespace(lr=1e-4)},
               path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path, preset="tiny")
    for phrase in ("argparse.Namespace", "was blocked", "trust_pickle=True", "--trust-checkpoint"):
        assert phrase in str(error.value)

    loaded, report = load_checkpoint(path, preset="tiny", schedule="8-6-4", trust_pickle=True)
    assert report.metadata["other_entries"] == ["args"]
    assert_same_outputs(retrieval_model, loaded, inputs)
