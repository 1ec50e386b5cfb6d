"""Fixtures shared by the model, export and trt tests."""

from pathlib import Path

import pytest
import torch

from clipdata import copy_clips
from model import TWBert, TWBertConfig


@pytest.fixture(scope="session")
def tiny_cfg() -> TWBertConfig:
    return TWBertConfig.tiny(num_answers=7)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg) -> TWBert:
    torch.manual_seed(0)
    model = TWBert(tiny_cfg).eval()
    # Wake the temporal branches (zero-initialised like TimeSformer) so every path is exercised.
    with torch.no_grad():
        for block in model.video.blocks:
            torch.nn.init.trunc_normal_(block.temporal_fc.weight, std=0.02)
    return model


@pytest.fixture(scope="session")
def small_val(tmp_path_factory) -> Path:
    return copy_clips(tmp_path_factory.mktemp("val") / "data", 6)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, small_val):
    """The demo checkpoint exported at every precision: (artifact directory, report). Its
    export runs every stage, TensorRT-RTX's build of each graph included (tests/trt/test_rtx.py
    reads that)."""
    from twbert_export.export.pipeline import ExportOptions, run_export

    out = tmp_path_factory.mktemp("engines") / "demo"
    result = run_export(ExportOptions(ckpt="demo", precisions=("fp16", "int8w", "int8"),
                                      val_data=str(small_val), out=str(out),
                                      calib_cache=False))
    return out, result.report


# -- tiers ------------------------------------------------------------------------------------------
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After a default run (pyproject's `-m 'not slow'`), say how to run what it left out."""
    deselected = len(terminalreporter.stats.get("deselected", []))
    if config.option.markexpr == "not slow" and deselected:
        terminalreporter.write_line(
            f"fast tier only: {deselected} slow test{'s' * (deselected != 1)} deselected. Run "
            "them with `python -m pytest -m slow`; `bash .ci/run` runs both tiers from a fresh "
            "environment.")
