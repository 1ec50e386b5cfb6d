"""Bad input to the command line: one line and exit 2, never a traceback; whatever else goes
wrong is one line and exit 3 (exit 1 means only that a gate failed); Ctrl-C is one line and 130."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import export
from twbert_export.artifact.manifest import Manifest
from twbert_export.artifact.input_checks import ModelFileMismatch, check_onnx_file

from clipdata import copy_clips, write_video

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def a_video(small_val: Path) -> str:
    return str(sorted((small_val / "videos").glob("*.mp4"))[0])


@pytest.fixture
def artifact_copy(artifact, tmp_path) -> Path:
    out, _ = artifact
    copy = tmp_path / "artifact"
    shutil.copytree(out, copy)
    return copy


# -- predict ------------------------------------------------------------------------------------
def test_predict_refuses_an_empty_text_and_a_question_to_a_retrieval_artifact(artifact,
                                                                              small_val, capsys):
    out, _ = artifact
    args = ["predict", "--model", str(out / "model.fp32.onnx"), "--video", a_video(small_val)]
    for text in ("", "   "):
        assert export.main(args + ["--text", text]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert "--text is empty" in line
    assert export.main(args + ["--question", "which way does the camera move?"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "exported for retrieval" in line


# -- a model file from another export -------------------------------------------------------------
def with_frames(model: onnx.ModelProto, frames: int) -> onnx.ModelProto:
    """The same graph declaring another frame count, as another schedule's export would."""
    other = onnx.ModelProto()
    other.CopyFrom(model)
    video = next(i for i in other.graph.input if i.name == "video")
    video.type.tensor_type.shape.dim[1].dim_value = frames
    return other


def another_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 224, 224])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 224, 224])
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["logits"])],
                              "classifier", [x], [y])
    return helper.make_model(graph)


def test_a_model_file_from_another_export_is_refused_by_predict_and_validate(
        artifact_copy, small_val, capsys):
    model_path = artifact_copy / "model.fp32.onnx"
    original = onnx.load(str(model_path))
    predict = ["predict", "--model", str(model_path), "--video", a_video(small_val),
               "--text", "a cat"]
    validate = ["validate", "--model", str(model_path)]
    validate_onnx = ["validate", "--onnx", str(model_path), "--val-data", str(small_val)]
    for foreign, named in [(with_frames(original, 6), "video dim 1 is 6, the contract's 8"),
                           (another_model(), "inputs ['pixel_values']")]:
        onnx.save(foreign, str(model_path))
        for args in (predict, validate, validate_onnx):
            assert export.main(args) == 2
            (line,) = error_lines(capsys.readouterr().err)
            assert named in line and "another model" in line
    # The right inputs, other bytes: not the file the manifest lists.
    original.doc_string = "edited"
    onnx.save(original, str(model_path))
    for args in (predict, validate, validate_onnx):
        assert export.main(args) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert "not the file the artifact's manifest.json lists" in line


def test_the_artifacts_own_files_fit_their_contract(artifact):
    out, _ = artifact
    manifest = Manifest.load(out)
    for entry in manifest.files:
        check_onnx_file(out / entry.path, manifest.contract_of(entry.graph), entry.sha256)
    with pytest.raises(ModelFileMismatch, match="not a readable ONNX file"):
        check_onnx_file(out / "manifest.json", manifest.contract)


# -- --out --------------------------------------------------------------------------------------
def test_out_naming_the_current_directory_or_a_file_is_refused_and_nothing_is_touched(
        tmp_path, monkeypatch, capsys):
    (tmp_path / "thesis.tex").write_text("x")
    monkeypatch.chdir(tmp_path)
    for out, message in ((".", "current directory"), ("..", "current directory"),
                         ("thesis.tex", "is a file")):
        assert export.main(["--precision", "fp32", "--out", out, "--force"]) == 2
        (line,) = error_lines(capsys.readouterr().err)
        assert message in line
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "x"


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write, root included (root ignores the mode: make it immutable)."""
    path = tmp_path / "read-only"
    path.mkdir()
    path.chmod(0o555)
    immutable = os.access(path, os.W_OK) and subprocess.run(
        ["chattr", "+i", str(path)], capture_output=True).returncode == 0
    if os.access(path, os.W_OK):
        pytest.skip("cannot make a directory read-only here (root without chattr)")
    yield path
    if immutable:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    path.chmod(0o755)


def test_read_only_out_is_refused_with_one_line(read_only_dir, capsys):
    assert export.main(["--precision", "fp32", "--out", str(read_only_dir / "demo")]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert f"cannot write in {read_only_dir}" in line


# -- everything else ----------------------------------------------------------------------------
def test_an_unexpected_error_is_one_line_and_exit_3_with_the_traceback_in_a_file(
        monkeypatch, tmp_path, capsys):
    import twbert_export.retrieval.predict

    def broken(argv):
        raise RuntimeError("something nobody expected\nover two lines")

    monkeypatch.setattr(twbert_export.retrieval.predict, "main", broken)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(export.DEBUG_ENV, raising=False)
    assert export.main(["predict"]) == export.EXIT_INTERNAL_ERROR == 3
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("internal error: RuntimeError: something nobody expected over two")
    (saved,) = tmp_path.glob("twbert-export-*.traceback")
    assert str(saved) in line and "Traceback" in saved.read_text()
    monkeypatch.setenv(export.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="nobody expected"):
        export.main(["predict"])


def start_export(out: Path, tmp_path: Path) -> subprocess.Popen:
    """An export in its own process, returned once its scratch directory beside `out` exists."""
    env = {**os.environ, "TWBERT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([PYTHON, str(REPO / "export.py"), "--precision", "fp32", "--out",
                             str(out)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("[1/"), "the load stage line"
    deadline = time.monotonic() + 60
    while not list(out.parent.glob(f".{out.name}.partial-{proc.pid}")):
        assert time.monotonic() < deadline and proc.poll() is None, "no scratch directory"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("signum, code, line", [(signal.SIGINT, 130, "interrupted"),
                                                (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_or_sigterm_during_an_export_is_one_line_and_removes_the_partial_artifact(
        tmp_path, signum, code, line):
    out = tmp_path / "demo"
    proc = start_export(out, tmp_path)
    try:
        proc.send_signal(signum)  # during the ONNX export
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code
    assert stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in stderr
    assert not out.exists() and not list(tmp_path.glob(".demo.partial-*"))


def test_the_partial_artifact_a_killed_export_left_is_removed_by_the_next_one(tmp_path):
    from twbert_export.artifact import outdir

    out = tmp_path / "demo"
    proc = start_export(out, tmp_path)
    proc.kill()  # SIGKILL: no clean-up runs
    proc.communicate(timeout=60)
    (left,) = tmp_path.glob(f".demo.partial-{proc.pid}")
    with pytest.warns(outdir.StalePartialRemoved, match=f"process {proc.pid}"):
        work = outdir.claim(out, force=False)  # what the next export into tmp_path does first
    assert not left.exists() and work.exists()


def test_force_refuses_a_directory_that_is_not_an_artifact_and_touches_nothing(tmp_path,
                                                                               capsys):
    user_dir = tmp_path / "u"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("x")
    assert export.main(["--force", "--precision", "fp32", "--out", str(user_dir)]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "not an export artifact" in line
    assert [p.name for p in tmp_path.iterdir()] == ["u"]
    assert [p.name for p in user_dir.iterdir()] == ["thesis.tex"]
    assert (user_dir / "thesis.tex").read_text() == "x"


def test_validate_val_clips_bounds_the_validation_set(artifact, small_val, capsys):
    out, _ = artifact
    args = ["validate", "--onnx", str(out / "model.fp32.onnx"), "--val-data", str(small_val)]
    assert export.main(args + ["--val-clips", "2", "--json"]) == 0
    printed = capsys.readouterr().out
    report = json.loads(printed[:printed.rindex("}") + 1])
    assert report["validation_data"]["num_videos"] == 2
    assert export.main(args + ["--val-clips", "0"]) == 2
    (line,) = error_lines(capsys.readouterr().err)
    assert "--val-clips must be >= 1" in line


def test_predict_warns_in_one_line_about_a_one_frame_video(artifact, tmp_path):
    out, _ = artifact
    still = tmp_path / "still.mp4"
    write_video(still, np.full((1, 64, 64, 3), 128, np.uint8))
    proc = subprocess.run([PYTHON, str(REPO / "export.py"), "predict", "--model",
                           str(out / "model.fp32.onnx"), "--video", str(still), "--text", "a cat"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "still.mp4" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ")
    assert "1 frame, fewer than the 8 the model samples; frames are repeated" in warnings[0]


# -- data sets are checked before the export ----------------------------------------------------
def broken_data(kind: str, tmp_path: Path) -> Path:
    data = copy_clips(tmp_path / kind, 4)
    ann = data / "annotations.jsonl"
    if kind == "bad-json":
        ann.write_text(ann.read_text() + '{"video": "videos/x.mp4", "caption": \n')
    elif kind == "missing-video":
        next((data / "videos").glob("*.mp4")).unlink()
    elif kind == "not-a-video":
        next((data / "videos").glob("*.mp4")).write_text("not a video")
    return data


@pytest.mark.parametrize("option, kind, message", [
    ("--val-data", "bad-json", "invalid JSON"),
    ("--val-data", "missing-video", "file not found"),
    ("--calib-data", "not-a-video", "cannot decode video"),
    ("--calib-data", "few-clips", "4 calibration clips; INT8 calibration needs at least 16"),
])
def test_bad_data_fails_before_the_export_starts(tmp_path, capsys, option, kind, message):
    data = broken_data(kind, tmp_path)
    assert export.main(["--precision", "int8", option, str(data),
                        "--out", str(tmp_path / "demo")]) == 2
    captured = capsys.readouterr()
    (line,) = error_lines(captured.err)
    assert message in line
    assert captured.out == "", "no stage ran, not even the checkpoint's load"
    assert not (tmp_path / "demo").exists()


# -- issue 23: bad input that was an internal error, or said too little --------------------------
def one_error_and_a_hint(stderr: str) -> str:
    """The error line of a refusal that printed exactly one `error:` and one `hint:` line."""
    assert "Traceback" not in stderr and "internal error" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), \
        lines
    return lines[0]


def run_export_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """export.py in a process of its own: its stdout holds the stage lines a user sees."""
    return subprocess.run([PYTHON, str(REPO / "export.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)


def test_out_is_checked_before_the_checkpoint_loads_and_a_broken_manifest_is_named(tmp_path):
    """Issue 23 item 13: a `[1/8] load` line preceded the refusal, and an unparsable
    manifest.json was reported as "no twbert-export manifest.json"."""
    out = tmp_path / "demo"
    out.mkdir()
    (out / "manifest.json").write_text('{"format": "twbert-export-artifact", ')
    (out / "model.fp32.onnx").write_text("x")
    proc = run_export_cli("--force", "--precision", "fp32", "--out", str(out))
    assert proc.returncode == 2
    line = one_error_and_a_hint(proc.stderr)
    assert "manifest.json is not readable JSON" in line and "JSONDecodeError" in line
    assert proc.stdout == "", "refused before the checkpoint's load line"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.fp32.onnx"]
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


@pytest.mark.slow  # 16 noise clips and the checkpoint's load: about 15 s
def test_random_noise_calibration_is_refused_before_the_export_starts(tmp_path):
    """Issue 23 item 13: the refusal came at the INT8 stage, after the export."""
    from model.data.make_demo import X264_OPTIONS
    from clipdata import write_data_dir

    rng = np.random.default_rng(0)
    clips = [(f"noise_{i:02d}.mp4", rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8),
              "static noise") for i in range(16)]
    noise = write_data_dir(tmp_path / "noise", clips, options=X264_OPTIONS)
    proc = run_export_cli("--precision", "int8", "--calib-data", str(noise), "--out",
                          str(tmp_path / "demo"), "--val-clips", "2")
    assert proc.returncode == 2
    assert "look like random noise" in one_error_and_a_hint(proc.stderr)
    stages = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("[")]
    assert stages == ["load"], "nothing after the checkpoint's load ran"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["noise"]  # no partial artifact


def test_serve_with_one_port_for_two_endpoints_is_refused_before_anything_loads(tmp_path,
                                                                                capsys):
    """Issue 23 item 8: Triton printed 402 lines of usage, serve waited 120 s, then exit 3."""
    assert export.main(["serve", "--artifact", str(tmp_path / "absent"), "--http-port", "18000",
                        "--grpc-port", "18000"]) == 2
    line = one_error_and_a_hint(capsys.readouterr().err)
    assert "--http-port and --grpc-port are both 18000" in line


def test_a_directory_given_as_a_video_is_named_as_a_directory(tmp_path):
    """Issue 23 item 13: it was reported as "file not found"."""
    from twbert_export.data.preprocess import VideoDecodeError, load_video, probe_video

    for read in (probe_video, lambda path: load_video(path, 8, 64)):
        with pytest.raises(VideoDecodeError, match="a directory, not a video file"):
            read(tmp_path)


def test_predict_refuses_a_directory_as_video_and_clip_with_text_with_a_hint(artifact, small_val,
                                                                             tmp_path, capsys):
    """Issue 23 item 13: predict printed no hint, a directory was "file not found", and
    `predict --index --text` ignored --clip without a word."""
    out, _ = artifact
    assert export.main(["predict", "--model", str(out / "model.fp32.onnx"), "--video",
                        str(small_val / "videos"), "--text", "a cat"]) == 2
    line = one_error_and_a_hint(capsys.readouterr().err)
    assert "a directory, not a video file" in line
    index = tmp_path / "index"
    assert export.main(["index", "--artifact", str(out), "--videos", str(small_val),
                        "--out", str(index)]) == 0
    capsys.readouterr()
    assert export.main(["predict", "--index", str(index), "--artifact", str(out), "--text",
                        "a cat", "--clip", "videos/val_00000.mp4"]) == 2
    line = one_error_and_a_hint(capsys.readouterr().err)
    assert "--clip names the clips a --question is about" in line


def test_index_into_an_index_json_of_the_wrong_shape_is_bad_input(artifact, small_val, tmp_path,
                                                                   capsys):
    """Issue 23 item 8: valid JSON of another shape was an AttributeError, exit 3."""
    out, _ = artifact
    index = tmp_path / "index"
    index.mkdir()
    for content in ("[1, 2, 3]", '{"format": "twbert-clip-index", "format_version": 1, '
                                 '"clips": [1], "artifact": "a", "stem_shape": [1], '
                                 '"stem_dtype": "float16"}'):
        (index / "index.json").write_text(content)
        assert export.main(["index", "--artifact", str(out), "--videos", str(small_val),
                            "--out", str(index)]) == 2
        line = one_error_and_a_hint(capsys.readouterr().err)
        assert f"{index / 'index.json'} is not" in line and "clip index" in line
        assert (index / "index.json").read_text() == content
        assert [p.name for p in index.iterdir()] == ["index.json"]


def test_build_without_tensorrt_refuses_with_an_error_and_a_hint(artifact, capsys):
    """Issue 23 left `build` as the one command whose refusal printed no `hint:` line."""
    from twbert_export.util import MissingDependency

    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the build would run, not refuse")
    except (ImportError, MissingDependency):
        pass
    out, _ = artifact
    assert export.main(["build", "--onnx", str(out / "model.fp16.onnx")]) == 2
    line = one_error_and_a_hint(capsys.readouterr().err).lower()
    assert "no nvidia gpu found" in line or "tensorrt" in line


def test_build_of_a_missing_file_refuses_with_an_error_and_a_hint(tmp_path, capsys):
    assert export.main(["build", "--onnx", str(tmp_path / "absent.onnx")]) == 2
    assert "ONNX file not found" in one_error_and_a_hint(capsys.readouterr().err)
