"""The one atomic writer (twbert_export.util.atomic_path), which model/'s checkpoint, training and
demo writers use too, and what a stopping signal removes (util.stop_on_signals)."""

import subprocess
import sys
from pathlib import Path

import pytest

from twbert_export.util import atomic_path

REPO = Path(__file__).resolve().parents[2]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("the writer died")
    assert path.read_text() == "old"
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent  # one file system: the rename is atomic
        tmp.write_text("new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]



# -- stopping on SIGINT / SIGTERM: the handler exits the process, so each case runs in its own --
STOPPED_WRITER = """
import os, signal, sys
from pathlib import Path
from twbert_export import util

util.stop_on_signals()
target, scratch = Path(sys.argv[1]), Path(sys.argv[2])
scratch.mkdir()
(scratch / "part.onnx").write_text("half")
with util.removed_if_stopped(scratch), util.atomic_path(target) as tmp:
    tmp.write_text("new, half written")
    if sys.argv[3] == "deferred":
        with util.signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            print("the deferred step ran to its end", flush=True)
    else:
        os.kill(os.getpid(), signal.SIGINT)
    print("not reached", flush=True)
"""


@pytest.mark.parametrize("mode, code, line", [("now", 130, "interrupted"),
                                              ("deferred", 143, "terminated")])
def test_a_stopping_signal_removes_what_was_being_written_and_exits_with_one_line(
        tmp_path, mode, code, line):
    target = tmp_path / "manifest.json"
    target.write_text("old")
    script = tmp_path / "writer.py"
    script.write_text(STOPPED_WRITER)
    done = subprocess.run([sys.executable, str(script), str(target), str(tmp_path / "scratch"),
                           mode], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == code
    assert done.stderr.strip() == line  # no traceback
    assert done.stdout.splitlines() == (["the deferred step ran to its end"]
                                        if mode == "deferred" else [])
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "writer.py"]
