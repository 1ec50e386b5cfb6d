"""Scale check: the base preset (the paper's model size) exports and matches PyTorch in FP32 on
one real clip. Slow: minutes and a few GB on two CPU cores."""

import resource
import time

import numpy as np
import pytest
import torch
from clipdata import copy_clips

from model import TWBert, TWBertConfig
from twbert_export.data.calibration import load_feeds
from twbert_export.artifact.contract import BatchRange, IOContract
from twbert_export.export.onnx_export import export_onnx
from twbert_export.data.preprocess import Tokenizer
from twbert_export.export.rewrite import rewrite
from twbert_export.validation.runners import make_torch_runner, ort_runner
from twbert_export.validation.parity import output_errors


@pytest.mark.slow
def test_base_preset_exports_and_matches_pytorch_on_one_clip(tmp_path):
    start = time.perf_counter()
    cfg = TWBertConfig.base("20-14-8")
    torch.manual_seed(0)
    model = TWBert(cfg).eval()
    contract = IOContract.for_model(cfg, "retrieval", BatchRange(1, 1, 2))
    raw, fp32 = tmp_path / "raw.onnx", tmp_path / "model.fp32.onnx"
    export_onnx(model, contract, raw)
    rewrite(raw, fp32, contract)
    raw.unlink()
    clip = copy_clips(tmp_path / "clip", 1)
    feeds = load_feeds(clip, contract, Tokenizer.default())
    feed = feeds.feed(slice(0, 1))
    with make_torch_runner(model, contract) as ref_runner:
        ref = ref_runner.infer(feed)
    del model
    with ort_runner(fp32) as runner:
        out = runner.infer(feed)
    errors = output_errors(out, ref)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nbase F@20-14-8 export + FP32 parity: {seconds:.0f} s, peak RSS {peak_gb:.1f} GB, "
          f"itm max abs {errors['itm_logits']['max_abs']:.2e}")
    assert errors["itm_logits"]["max_abs"] <= 1e-4
    assert errors["itc_sim"]["max_abs"] <= 1e-3  # similarity / temperature: 14x the logit scale
    assert errors["frame_indices_1"]["mismatched"] == 0
    assert errors["frame_indices_2"]["mismatched"] == 0
    assert np.isfinite(out["itm_logits"]).all()
