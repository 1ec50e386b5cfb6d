from pathlib import Path

import pytest

from clipdata import copy_clips


@pytest.fixture(scope="session")
def small_val(tmp_path_factory) -> Path:
    return copy_clips(tmp_path_factory.mktemp("val") / "data", 6)
