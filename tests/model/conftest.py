import pytest
import torch

from model import TWBertConfig


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
