import json
import shutil
from pathlib import Path

import pytest
from clipdata import copy_clips

from twbert_export.data.assets import DEMO_DATA


@pytest.fixture(scope="session")
def small_data(tmp_path_factory) -> Path:
    """Six demo validation clips (12 annotation lines) in their own data directory, plus one
    line naming a corrupt video."""
    out = copy_clips(tmp_path_factory.mktemp("small") / "data", 6)
    lines = (out / "annotations.jsonl").read_text().splitlines()
    (out / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    broken = json.dumps({"video": "videos/broken.mp4", "caption": "nothing to see"})
    (out / "annotations.jsonl").write_text("\n".join(lines + [broken]) + "\n")
    shutil.copy(DEMO_DATA / "answers.json", out.parent / "answers.json")
    return out
