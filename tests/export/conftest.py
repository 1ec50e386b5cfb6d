from pathlib import Path

import pytest

from clipdata import copy_clips
from twbert_export.export.pipeline import ExportOptions, run_export


@pytest.fixture(scope="session")
def small_val(tmp_path_factory) -> Path:
    return copy_clips(tmp_path_factory.mktemp("val") / "data", 6)


@pytest.fixture(scope="session")
def artifact(tmp_path_factory, small_val):
    """The demo checkpoint exported at every precision: (artifact directory, report)."""
    out = tmp_path_factory.mktemp("engines") / "demo"
    result = run_export(ExportOptions(ckpt="demo", precisions=("fp16", "int8"),
                                      val_data=str(small_val), out=str(out),
                                      calib_cache=False))
    return out, result.report
