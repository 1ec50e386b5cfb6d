"""Fixtures shared by the model and export tests."""

import pytest
import torch

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


# -- tiers ------------------------------------------------------------------------------------------
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """After a default run (pyproject's `-m 'not slow'`), say how to run what it left out."""
    deselected = len(terminalreporter.stats.get("deselected", []))
    if config.option.markexpr == "not slow" and deselected:
        terminalreporter.write_line(
            f"fast tier only: {deselected} slow test{'s' * (deselected != 1)} deselected. Run "
            "them with `python -m pytest -m slow`; `bash .ci/run` runs both tiers from a fresh "
            "environment.")
