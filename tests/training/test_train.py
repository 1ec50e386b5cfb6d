import json
import shutil

import pytest
import torch

from model import TWBert, TWBertConfig, load_checkpoint
from model.data.dataset import ClipTextDataset
from model.evaluate import evaluate_qa, evaluate_retrieval
from model.train import build_parser, train, training_step, video_warmup
from twbert_export.data.assets import AssetError, resolve_checkpoint, resolve_data
from twbert_export.data.preprocess import EmptyTextWarning, Tokenizer, VideoDecodeError


@pytest.fixture(scope="module")
def answers(small_data):
    return json.loads((small_data.parent / "answers.json").read_text())


@pytest.fixture(scope="module")
def dataset(small_data, answers):
    cfg = TWBertConfig.tiny()
    return ClipTextDataset(small_data, cfg.selector.frames, cfg.video.image_size,
                           Tokenizer.default(), cfg.max_text_len, answers, on_error="skip")


def test_dataset_skips_and_names_the_corrupt_video(dataset, small_data):
    assert len(dataset.videos) == 6 and len(dataset) == 12
    assert dataset.skipped == [str(small_data / "videos" / "broken.mp4")]
    assert dataset.videos.shape == (6, 8, 3, 64, 64)
    ids, _, video = dataset.captions()
    assert ids.shape == (6, 40) and (ids[:, 0] == 101).all() and video.tolist() == list(range(6))
    _, _, _, answer = dataset.questions()
    assert (answer >= 0).all() and len(answer) == 12


def test_an_empty_caption_is_not_trained_on_and_is_warned_about(small_data, answers, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_data, data)
    lines = [json.loads(x) for x in (data / "annotations.jsonl").read_text().splitlines()][:4]
    blank = next(i for i, x in enumerate(lines) if "caption" in x)
    lines[blank]["caption"] = "   "
    (data / "annotations.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.warns(EmptyTextWarning, match=f'annotations.jsonl:{blank + 1}: empty "caption"'):
        dataset = ClipTextDataset(data, 8, 64, Tokenizer.default(), 40, answers)
    assert not dataset[blank]["has_caption"]
    assert sum(bool(dataset[i]["has_caption"]) for i in range(len(dataset))) == sum(
        "caption" in x for x in lines) - 1


def test_dataset_fails_on_the_corrupt_video_by_default(small_data, answers):
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        ClipTextDataset(small_data, 8, 64, Tokenizer.default(), 40, answers)


def test_one_training_step_lowers_nothing_to_nan_and_updates_weights(dataset, answers):
    torch.manual_seed(0)
    model = TWBert(TWBertConfig.tiny(num_answers=len(answers))).train()
    batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    losses = training_step(model, batch, "both")
    assert set(losses) == {"itc", "itm", "qa"}
    assert all(torch.isfinite(v) for v in losses.values())
    before = model.selector1.scorer.fuse_proj.weight.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(losses.values()).backward()
    opt.step()
    assert not torch.equal(before, model.selector1.scorer.fuse_proj.weight)


def test_answer_targets_spread_over_each_clips_answers(dataset, answers):
    targets = dataset.answer_targets()
    assert targets.shape == (6, len(answers))
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    for a, i in zip(dataset.annotations, dataset.answer_ids.tolist()):
        assert targets[a.video, i] == 0.5  # a motion and a content answer per demo clip


def test_video_warmup_trains_only_the_video_encoder_and_learns(dataset, answers):
    torch.manual_seed(0)
    model = TWBert(TWBertConfig.tiny(num_answers=len(answers)))
    video = {k: v.clone() for k, v in model.video.state_dict().items()}
    rest = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("video.")}
    history = video_warmup(model, dataset, epochs=8, lr=1e-3, batch_size=6, weight_decay=0.0,
                           clip_grad=5.0, seed=0, log=lambda _: None)
    assert [e["video_warmup_epoch"] for e in history] == list(range(1, 9))
    assert history[-1]["loss"] < history[0]["loss"]  # six clips: it must at least fit them
    assert not torch.equal(video["patch_embed.weight"], model.video.patch_embed.weight)
    for k, v in model.state_dict().items():
        if not k.startswith("video."):
            assert torch.equal(rest[k], v), k


def test_short_training_run_saves_resumes_and_evaluates(small_data, tmp_path):
    out = tmp_path / "run"
    args = ["--estimator", "diagonal", "--data", str(small_data), "--val-data", str(small_data),
            "--out", str(out), "--epochs", "1", "--batch-size", "6", "--on-error", "skip"]
    train(build_parser().parse_args(args))
    assert (out / "best.pt").is_file() and (out / "resume.pt").is_file()
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1] and "val" in log[0]
    with pytest.raises(ValueError, match="already holds a run"):
        train(build_parser().parse_args(args))
    resumed = train(build_parser().parse_args(args[:-4] + ["--epochs", "2", "--resume",
                                                           "--on-error", "skip"]))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [1, 2] and resumed["epochs"] == 2

    model, report = load_checkpoint(out / "best.pt")
    assert model.cfg.selector.estimator == "diagonal"  # the run's choice, kept in the checkpoint
    assert all(s.estimator == "diagonal" for s in model.selectors)
    assert report.metadata["answers"][:6] == ["left", "right", "up", "down", "in", "out"]
    data = ClipTextDataset(small_data, 8, 64, Tokenizer.default(), 40,
                           report.metadata["answers"], on_error="skip")
    r = evaluate_retrieval(model, data, k=3)
    assert r["num_videos"] == 6 and r["num_texts"] == 6
    assert 0.0 <= r["t2v"]["R@1"] <= 1.0 and 1.0 <= r["v2t"]["MedR"] <= 6.0
    q = evaluate_qa(model, data)
    assert q["num_questions"] == 12 and set(q["by_question"]) <= {
        "which way does the camera move?", "what is shown?"}


def test_demo_names_resolve_and_bad_names_are_clear():
    assert resolve_data("demo").name == "val" and resolve_data("demo:calib").name == "calib"
    with pytest.raises(AssetError, match="unknown demo split"):
        resolve_data("demo:test")
    with pytest.raises(AssetError, match="data directory not found"):
        resolve_data("/nonexistent/dir")
    with pytest.raises(AssetError, match="checkpoint not found"):
        resolve_checkpoint("/nonexistent/best.pt")
