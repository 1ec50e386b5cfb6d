"""The one atomic writer (twbert_export.util.atomic_path), which model/'s checkpoint, training and
demo writers use too."""

import pytest

from twbert_export.util import atomic_path


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

