import pytest
import torch

from model import TWBert, TWBertConfig


def random_inputs(cfg: TWBertConfig, batch: int, text_len: int = 12, seed: int = 0):
    """Random normalised frames and token ids; sample 1 (if any) has padded words."""
    g = torch.Generator().manual_seed(seed)
    size = cfg.video.image_size
    video = torch.randn(batch, cfg.selector.frames, 3, size, size, generator=g)
    ids = torch.randint(1000, 2000, (batch, text_len), generator=g)
    ids[:, 0] = 101
    mask = torch.ones(batch, text_len, dtype=torch.long)
    if batch > 1:
        mask[1, text_len // 2:] = 0
        ids[1, text_len // 2:] = 0
    return video, ids, mask


@pytest.fixture(scope="session")
def make_inputs():
    return random_inputs


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
