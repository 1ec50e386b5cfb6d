"""The INT8 calibration set checks (twbert_export/data/calibration.py) on clips that went through a
real codec, as a user's clips do."""

from pathlib import Path

import numpy as np
import pytest

from model.data.make_demo import X264_OPTIONS
from twbert_export.data.assets import DEMO_DATA
from twbert_export.data.calibration import (MIN_DISTANT_PIXEL_CORRELATION, CalibrationDataError,
                                            check_calibration_set, distant_pixel_correlation,
                                            load_feeds)
from twbert_export.artifact.contract import IOContract
from twbert_export.data.preprocess import Tokenizer

from clipdata import write_data_dir


@pytest.fixture(scope="module")
def contract(tiny_cfg) -> IOContract:
    return IOContract.for_model(tiny_cfg)  # the demo checkpoint's: 8 frames of 64 px


@pytest.fixture(scope="module")
def codec_noise(tmp_path_factory) -> Path:
    """20 clips of white noise stored as the demo clips are: 112 px, 32 frames, libx264 CRF 23."""
    rng = np.random.default_rng(0)
    clips = [(f"noise_{i:02d}.mp4", rng.integers(0, 256, (32, 112, 112, 3), dtype=np.uint8),
              "static noise") for i in range(20)]
    return write_data_dir(tmp_path_factory.mktemp("noise"), clips, options=X264_OPTIONS)


def test_noise_through_a_codec_is_refused(codec_noise, contract):
    feeds = load_feeds(codec_noise, contract, Tokenizer.default())
    # The codec and the resize blur the noise: adjacent pixels correlate as the old check
    # wanted of real video (> 0.3), which is why the check looks further apart.
    assert distant_pixel_correlation(feeds.video, 1) > 0.3
    with pytest.raises(CalibrationDataError, match="random noise"):
        check_calibration_set(feeds)


def test_the_demo_calibration_clips_pass_by_a_clear_margin(contract):
    feeds = load_feeds(DEMO_DATA / "calib", contract, Tokenizer.default(), texts_per_video=1)
    check_calibration_set(feeds)
    distance = contract.image_size // 8
    assert distant_pixel_correlation(feeds.video, distance) > 3 * MIN_DISTANT_PIXEL_CORRELATION
