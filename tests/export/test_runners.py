"""The PyTorch runner of validation: it reuses each clip's stem across the texts it meets, and
gives what the full forward gives on every (text, video) pair."""

import numpy as np
import pytest
import torch

from model import TWBertConfig
from twbert_export.data.calibration import FeedSet
from twbert_export.artifact.contract import BatchRange, IOContract
from twbert_export.validation.metrics import retrieval_metrics, softmax
from twbert_export.validation.runners import make_torch_runner
from twbert_export.validation.parity import run_validation, validation_batch


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model, IOContract.for_model(tiny_model.cfg, "retrieval", BatchRange(1, 2, 2))


def feeds(cfg: TWBertConfig, n_videos: int, texts_per_video: int) -> FeedSet:
    rng = np.random.default_rng(0)
    size, frames, L = cfg.video.image_size, cfg.selector.frames, cfg.max_text_len
    video = rng.standard_normal((n_videos, frames, 3, size, size)).astype(np.float32)
    n = n_videos * texts_per_video
    ids = rng.integers(1000, 2000, (n, L)).astype(np.int64)
    ids[:, 0] = 101
    mask = np.ones((n, L), np.int64)
    mask[1::2, L // 2:] = 0  # every other text padded
    return FeedSet(video=video, input_ids=ids * mask, attention_mask=mask,
                   video_index=np.repeat(np.arange(n_videos), texts_per_video),
                   texts=[f"text {i}" for i in range(n)], answers=[None] * n,
                   video_paths=[f"v{i}.mp4" for i in range(n_videos)])


@pytest.mark.parametrize("selection", ["hard", "perturbed"])
def test_validation_computes_each_stem_once_and_matches_full_forward(tiny, selection):
    model, contract = tiny
    val = feeds(model.cfg, n_videos=3, texts_per_video=2)
    with make_torch_runner(model, contract, selection) as runner:
        paired, metrics = run_validation(runner, val, contract)
        assert runner.stems.computed == 3  # 3 clips x 6 texts = 18 pairs, 3 stems

    # The full forward on every pair, in the same batches (the perturbed rule draws its noise
    # per batch), the pairs video-major as validation runs them.
    n_texts, batch = len(val), validation_batch(contract)
    outputs: dict[str, list[np.ndarray]] = {}
    with torch.no_grad(), model.selection(selection):
        for start in range(0, 3 * n_texts, batch):
            rows = np.arange(start, min(start + batch, 3 * n_texts))
            torch.manual_seed(0)
            out = model(torch.from_numpy(val.video[rows // n_texts]),
                        torch.from_numpy(val.input_ids[rows % n_texts]),
                        torch.from_numpy(val.attention_mask[rows % n_texts]))
            for name, value in out.items():
                outputs.setdefault(name, []).append(value.numpy())
    full = {name: np.concatenate(parts) for name, parts in outputs.items()}
    paired_rows = val.video_index * n_texts + np.arange(n_texts)
    for name in contract.output_names:
        np.testing.assert_allclose(paired[name], full[name][paired_rows], rtol=0, atol=1e-5,
                                   err_msg=name)
    itc = full["itc_sim"].reshape(3, n_texts).T
    itm = softmax(full["itm_logits"].astype(np.float64))[:, 1].reshape(3, n_texts).T
    assert metrics == retrieval_metrics(itc, itm, val.video_index)


def test_without_reuse_every_call_computes_its_stems(tiny):
    """What a benchmark times: the whole forward pass, every call."""
    model, contract = tiny
    feed = feeds(model.cfg, n_videos=1, texts_per_video=2).feed(slice(0, 2))
    with make_torch_runner(model, contract, reuse_stems=False) as runner:
        first = runner.infer(feed)
        second = runner.infer(feed)
        assert runner.stems.computed == 4
    for name in first:
        np.testing.assert_array_equal(first[name], second[name])
