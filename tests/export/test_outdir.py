"""What an export may replace at --out, and the final move: nothing we did not write is ever
deleted, whatever appears at --out while the export runs (twbert_export/artifact/outdir.py)."""

import hashlib
import json
import os
import socket
import subprocess
import sys

import pytest

from twbert_export.artifact import outdir
from twbert_export.artifact.manifest import FORMAT, MANIFEST_FILE
from twbert_export.artifact.input_checks import OutputDirError


def write_artifact_files(path, onnx="old"):
    """An artifact's model.fp32.onnx (content `onnx`) and the manifest.json listing it."""
    (path / "model.fp32.onnx").write_text(onnx)
    (path / MANIFEST_FILE).write_text(json.dumps({
        "format": FORMAT, "format_version": 2,
        "files": [{"path": "model.fp32.onnx", "sha256": hashlib.sha256(onnx.encode()).hexdigest()}]}))


def make_artifact(path, marker="old"):
    """A directory that is an artifact of ours, as far as --force is concerned."""
    path.mkdir()
    write_artifact_files(path, marker)
    return path


def finished_work(out, onnx="new"):
    """A claimed scratch directory holding a finished artifact."""
    work = outdir.claim(out, force=True)
    write_artifact_files(work, onnx)
    return work


def a_dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(params=[True, False], ids=["exchange", "rename-aside"])
def swap(request, monkeypatch, tmp_path_factory):
    """Both ways of replacing an artifact: the atomic swap, and the fallback without it."""
    if request.param:
        a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
        (a / "in-a").touch()
        if not outdir.exchange(a, b):
            pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")
        assert (b / "in-a").exists() and not (a / "in-a").exists()
    else:
        monkeypatch.setattr(outdir, "exchange", lambda a, b: False)
    return request.param


# -- what claim accepts --------------------------------------------------------------------------
def test_force_replaces_only_an_artifact_of_ours(tmp_path):
    thesis = tmp_path / "u"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("x")
    with pytest.raises(OutputDirError, match="not an export artifact"):
        outdir.claim(thesis, force=True)
    foreign_manifest = tmp_path / "v"
    foreign_manifest.mkdir()
    (foreign_manifest / MANIFEST_FILE).write_text('{"format": "someone-elses"}')
    with pytest.raises(OutputDirError, match="not an export artifact"):
        outdir.claim(foreign_manifest, force=True)
    ours = make_artifact(tmp_path / "ours")
    with pytest.raises(OutputDirError, match="--force"):
        outdir.claim(ours, force=False)
    work = outdir.claim(ours, force=True)
    assert work.parent == tmp_path and work.name.startswith(".ours.partial-")
    empty = tmp_path / "empty"
    empty.mkdir()
    outdir.claim(empty, force=False)  # nothing in it to lose
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "empty", "ours", "u", "v"]
    assert (thesis / "thesis.tex").read_text() == "x"


# -- the final move ------------------------------------------------------------------------------
def test_a_directory_that_appeared_during_the_export_is_kept(tmp_path, swap):
    out = tmp_path / "demo"
    work = finished_work(out)
    out.mkdir()  # someone else's, made while the export ran
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="appeared during the export") as refused:
        outdir.move_into_place(work, out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    kept = tmp_path / f"demo.new-{os.getpid()}"
    assert str(kept) in str(refused.value)
    assert (kept / "model.fp32.onnx").read_text() == "new"
    assert not (kept / outdir.PARTIAL_MARKER).exists()


def test_an_artifact_that_appeared_is_replaced_only_with_force(tmp_path, swap):
    out = tmp_path / "demo"
    work = finished_work(out)
    make_artifact(out)
    with pytest.raises(OutputDirError, match="pass --force"):
        outdir.move_into_place(work, out, force=False)
    assert (out / "model.fp32.onnx").read_text() == "old"
    work = finished_work(tmp_path / "demo2")
    outdir.move_into_place(work, out, force=True)
    assert (out / "model.fp32.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", f"demo.new-{os.getpid()}"]
    assert not (out / outdir.PARTIAL_MARKER).exists()


def test_an_artifact_replaced_by_something_else_during_the_export_is_kept(tmp_path, swap):
    """--force was checked against our old artifact at the start; by the end a user's directory
    stands there instead."""
    out = make_artifact(tmp_path / "demo")
    work = outdir.claim(out, force=True)
    (work / "model.fp32.onnx").write_text("new")
    (out / MANIFEST_FILE).unlink()  # no longer ours
    (out / "thesis.tex").write_text("x")
    with pytest.raises(OutputDirError, match="not an export artifact"):
        outdir.move_into_place(work, out, force=True)
    assert (out / "thesis.tex").read_text() == "x"
    assert not list(tmp_path.glob(".demo.old-*"))


def test_an_empty_out_or_none_is_simply_taken(tmp_path):
    for out in (tmp_path / "absent", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        work = finished_work(out)
        outdir.move_into_place(work, out, force=False)
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "model.fp32.onnx"]
        assert not work.exists()


# -- scratch directories left by killed runs -----------------------------------------------------
def test_stale_partial_directories_of_dead_exports_are_removed_and_nothing_else(tmp_path):
    pid = a_dead_pid()
    stale = tmp_path / f".demo.partial-{pid}"
    stale.mkdir()
    (stale / "model.raw.onnx").write_text("half")
    (stale / outdir.PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    unmarked = tmp_path / f".other.partial-{pid}"  # same name pattern, not written by us
    unmarked.mkdir()
    (unmarked / "keep.txt").write_text("x")
    alive = tmp_path / f".live.partial-{os.getpid()}"  # a running export's
    alive.mkdir()
    (alive / outdir.PARTIAL_MARKER).write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    with pytest.warns(outdir.StalePartialRemoved, match=str(pid)):
        work = outdir.claim(tmp_path / "demo", force=False)
    assert not stale.exists()
    assert (unmarked / "keep.txt").exists() and alive.exists() and work.exists()


# -- files added to an artifact since its export (issue 23 item 11) -----------------------------
def add_engine(artifact, onnx="model.fp32.onnx"):
    """What `export.py build` leaves beside an ONNX file on the device."""
    stem = onnx[:-len(".onnx")]
    (artifact / f"{stem}.engine").write_bytes(b"engine built on the device")
    (artifact / f"{stem}.engine.json").write_text('{"onnx": "%s"}' % onnx)
    return [f"{stem}.engine", f"{stem}.engine.json"]


def test_force_keeps_an_engine_whose_onnx_file_is_unchanged_and_the_users_notes(tmp_path, swap):
    """It deleted the built engine without a word."""
    out = make_artifact(tmp_path / "demo", marker="same")
    engine = add_engine(out)
    (out / "notes").mkdir()
    (out / "notes" / "todo.txt").write_text("mine")
    with pytest.warns(outdir.AddedFilesKept, match="model.fp32.engine"):
        work = outdir.claim(out, force=True)  # says up front what happens to the engine
    write_artifact_files(work, "same")  # the same ONNX file again
    (work / "report.md").write_text("new")
    with pytest.warns(outdir.AddedFilesKept, match="moved into the new artifact") as kept:
        outdir.move_into_place(work, out, force=True)
    message = str(kept.list[-1].message)
    assert all(name in message for name in engine + ["notes/todo.txt"])
    assert (out / "report.md").read_text() == "new"
    assert (out / "model.fp32.engine").read_bytes() == b"engine built on the device"
    assert (out / "notes" / "todo.txt").read_text() == "mine"
    assert not (out / outdir.PARTIAL_MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_force_refuses_to_delete_an_engine_the_new_export_no_longer_fits(tmp_path, swap):
    """The ONNX file changed: the engine is stale, and is named rather than deleted; the old
    artifact stays whole and the new one is kept beside it."""
    out = make_artifact(tmp_path / "demo", marker="old")
    add_engine(out)
    with pytest.warns(outdir.AddedFilesKept):
        work = outdir.claim(out, force=True)
    write_artifact_files(work, "changed")
    with pytest.raises(OutputDirError, match="model.fp32.engine, model.fp32.engine.json "
                                             r"\(built from ONNX files this export changed") as e:
        outdir.move_into_place(work, out, force=True)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == [
        MANIFEST_FILE, "model.fp32.engine", "model.fp32.engine.json", "model.fp32.onnx"]
    assert (out / "model.fp32.onnx").read_text() == "old"
    kept = tmp_path / f"demo.new-{os.getpid()}"
    assert str(kept) in str(e.value) and (kept / "model.fp32.onnx").read_text() == "changed"


def test_what_an_export_writes_is_not_taken_for_added_files(tmp_path):
    out = make_artifact(tmp_path / "demo")
    for name in ("report.md", "report.json", "DEPLOY.md", "build_on_device.sh"):
        (out / name).write_text("x")
    (out / "reference").mkdir()
    (out / "reference" / "inputs.json").write_text("[]")
    # `--rtx-engines`: TensorRT-RTX engines of its own files, and their sidecars
    (out / "model.fp32.rtx.engine").write_bytes(b"built on the host's CPU")
    (out / "model.fp32.rtx.engine.json").write_text("{}")
    assert outdir.added_files(out) == []
    (out / "other.fp32.rtx.engine").write_bytes(b"not built from a file of this artifact")
    assert outdir.added_files(out) == ["other.fp32.rtx.engine"]
    (out / "other.fp32.rtx.engine").unlink()
    add_engine(out)
    assert outdir.added_files(out) == ["model.fp32.engine", "model.fp32.engine.json"]
