"""The export job end to end on the demo checkpoint (tiny preset), on the CPU."""

import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import export
from twbert_export.artifact.manifest import TRT8_FLAVOUR, Manifest, Report
from twbert_export.data.calibration import CalibrationDataError, MIN_CALIBRATION_CLIPS, load_feeds
from twbert_export.artifact.contract import IOContract
from twbert_export.artifact.input_checks import OutputDirError, UserError
from twbert_export.export.job import StageLog
from twbert_export.export.pipeline import ExportOptions, run_export
from twbert_export.validation.files import validate_onnx
from twbert_export.precision import to_int8
from twbert_export.data.preprocess import Tokenizer
from twbert_export.util import file_sha256, human_size

from blocked_imports import run_without
from clipdata import copy_clips, write_data_dir

REPO = Path(__file__).resolve().parents[2]


def test_artifact_directory_holds_everything_a_device_needs(artifact):
    out, report = artifact
    names = {p.name for p in out.iterdir()}
    assert {"model.fp32.onnx", "model.fp16.onnx", "model.int8.onnx", "manifest.json",
            "report.json", "report.md", "reference", "tokenizer.json"} <= names
    manifest = Manifest.load(out)
    for p in ("fp32", "fp16", "int8"):
        entry = manifest.file(p)
        assert entry.path == f"model.{p}.onnx" and entry.sha256 == file_sha256(out / entry.path)
        twin = manifest.twin(entry, TRT8_FLAVOUR)  # the TensorRT 8.x graph of every file
        assert twin.sha256 == file_sha256(out / twin.path) and twin.path in names
    assert manifest.calibration["clips"] >= MIN_CALIBRATION_CLIPS
    assert manifest.contract.inputs[0].shape[0] == "batch"
    assert manifest.parity == {p: True for p in ("fp32", "fp16", "int8w", "int8")}
    # int8w has no TensorRT 8.x form (legacy.NO_TWIN): no twin, no trt8 verdict
    assert manifest.flavour_parity == {TRT8_FLAVOUR: {p: True for p in ("fp32", "fp16", "int8")}}
    assert Report.load(out).to_dict() == json.loads(json.dumps(report.to_dict(), default=str))
    assert not any(n.startswith(".") for n in names), "no scratch files left behind"


def test_gates_pass_with_documented_numbers(artifact):
    _, report = artifact
    fp32, fp16 = report.precisions["fp32"], report.precisions["fp16"]
    assert fp32.outputs["itm_logits"]["max_abs"] <= 1e-4
    assert all(s["divergent"] == 0 for s in fp32.selection.values())
    assert all(s["identical"] / s["samples"] >= 0.99 for s in fp16.selection.values())
    assert fp32.conversion is None and fp16.conversion["kept_fp32_selection"]
    metrics = report.task_metrics
    assert {"torch-hard", "torch-perturbed", "onnx-fp32", "onnx-fp16", "onnx-int8"} <= set(metrics)
    assert metrics["onnx-fp32"]["t2v"] == metrics["torch-hard"]["t2v"]


def test_exported_graphs_are_tensorrt_shaped(artifact):
    out, _ = artifact
    fp32 = onnx.load(str(out / "model.fp32.onnx"))
    ops = {n.op_type for n in fp32.graph.node}
    assert not ops & {"TopK", "Sort", "RandomNormal", "RandomNormalLike", "RandomUniform",
                      "RandomUniformLike", "Multinomial"}
    assert fp32.opset_import[0].version >= 17
    int8 = onnx.load(str(out / "model.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in int8.graph.node)
    # Nothing in the selection path is quantized or lowered to FP16.
    for model in (int8, onnx.load(str(out / "model.fp16.onnx"))):
        sel = [n for n in model.graph.node if n.name.startswith("/model/selector")]
        assert sel and not any(n.op_type == "QuantizeLinear" for n in sel)
        casts = [n for n in sel if n.op_type == "Cast"
                 and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT16 for a in n.attribute)]
        assert not casts


def test_reference_data_loads_in_polygraphy(artifact):
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    out, _ = artifact
    results = RunResults.load(str(out / "reference" / "outputs.json"))
    inputs = load_json(str(out / "reference" / "inputs.json"))
    assert len(results[0][1]) == len(inputs) >= 1
    assert set(inputs[0]) == {"video", "input_ids", "attention_mask"}


def test_existing_directory_needs_force(artifact, small_val):
    out, _ = artifact
    before = (out / "manifest.json").read_text()
    with pytest.raises(OutputDirError, match="--force"):
        run_export(ExportOptions(ckpt="demo", precisions=("fp32",), val_data=str(small_val),
                                 out=str(out)))
    assert (out / "manifest.json").read_text() == before


def test_cli_exit_codes_for_bad_input(tmp_path, capsys):
    assert export.main(["--ckpt", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert export.main(["--ckpt", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert export.main(["--precision", "fp8"]) == 2
    assert export.main(["--batch", "8:1:1"]) == 2
    assert export.main(["--val-clips", "0"]) == 2


def test_gate_fails_on_a_planted_perturbation(artifact, small_val, tmp_path, capsys):
    import onnx_graphsurgeon as gs

    out, _ = artifact
    graph = gs.import_onnx(onnx.load(str(out / "model.fp32.onnx")))
    logits = next(t for t in graph.outputs if t.name == "itm_logits")
    producer = logits.inputs[0]
    shifted = gs.Variable("itm_logits_unshifted", dtype=np.float32)
    producer.outputs = [shifted]
    graph.layer(op="Add", inputs=[shifted, gs.Constant("shift", np.array([1e-3, 0], np.float32))],
                outputs=[logits])
    planted = tmp_path / "model.fp32.onnx"
    onnx.save(gs.export_onnx(graph.cleanup().toposort()), str(planted))
    report = validate_onnx("demo", planted, str(small_val), task="retrieval",
                           precision_name="fp32")
    failed = [g for g in report["precisions"]["fp32"]["gates"] if not g["passed"]]
    assert [g["name"] for g in failed] == ["itm_logits max abs error"]
    code = export.main(["validate", "--onnx", str(planted), "--val-data", str(small_val),
                        "--precision", "fp32"])
    assert code == 1
    assert "FAIL  itm_logits max abs error" in capsys.readouterr().out


def test_calibration_refuses_random_and_too_small_data(artifact, tmp_path):
    out, _ = artifact
    contract = Manifest.load(out).contract
    tok = Tokenizer.default()
    rng = np.random.default_rng(0)
    noise = write_data_dir(tmp_path / "noise", [
        (f"n{i}.mp4", rng.integers(0, 256, (12, 64, 64, 3), dtype=np.uint8), "static noise")
        for i in range(MIN_CALIBRATION_CLIPS)])
    with pytest.raises(CalibrationDataError, match="random noise"):
        to_int8(out / "model.fp32.onnx", tmp_path / "x.onnx", load_feeds(noise, contract, tok))
    few = copy_clips(tmp_path / "few", 4, split="calib")
    with pytest.raises(CalibrationDataError, match=f"at least {MIN_CALIBRATION_CLIPS}"):
        to_int8(out / "model.fp32.onnx", tmp_path / "x.onnx", load_feeds(few, contract, tok))


def test_int8_without_modelopts_own_runs_writes_the_same_graph(artifact, tmp_path,
                                                                monkeypatch):
    """ModelOpt given our maxima as a calibration cache, as it comes (its own one-clip
    calibration run, a run of the model for the GEMV check, shape inference on the whole model)
    and without running anything, shape inference on the graph alone
    (`modelopt_compat.calibrator_from`, `matmul_shapes_from`, `light_shape_inference`): the same
    bytes, on the demo's FP32 graph
    (attention products excluded, a GEMV, the selection path excluded)."""
    import filecmp
    import shutil

    from modelopt.onnx.quantization import graph_utils, quantize
    from onnxruntime.quantization import calibrate

    from twbert_export.precision import modelopt_compat as compat
    from twbert_export import precision
    from twbert_export.data.assets import resolve_data
    from twbert_export.precision.int8 import _RowReader

    out, _ = artifact
    src = out / "model.fp32.onnx"
    contract = Manifest.load(out).contract
    calib = load_feeds(resolve_data("demo:calib"), contract, Tokenizer.default(), limit=16)
    ranges = precision.ActivationRanges(src, calib)
    ranges.over(2)
    quantized_inputs = ranges.narrowed(ranges.int8_inputs | set(ranges.inputs))  # as to_int8
    with quantized_inputs:
        absmax = dict(quantized_inputs.over(len(calib)))
    cache = precision.write_scale_cache(tmp_path / "scales.cache", absmax)

    def quantized(name: str) -> Path:
        work, dst = tmp_path / f"{name}.in.onnx", tmp_path / f"{name}.onnx"
        shutil.copyfile(src, work)
        with compat.quiet_modelopt():
            quantize(str(work), quantize_mode="int8",
                     calibration_data_reader=_RowReader(calib, np.arange(1)),
                     calibration_method="max",
                     calibration_eps=["cpu"], calibration_cache_path=str(cache),
                     op_types_to_quantize=precision.INT8_OP_TYPES,
                     nodes_to_exclude=list(precision.SELECTION_NODES), high_precision_dtype="fp32",
                     disable_mha_qdq=True, output_path=str(dst), log_level="ERROR")
        return dst

    theirs = quantized("theirs")
    originals = (calibrate.create_calibrator, graph_utils.get_extended_model_outputs,
                 onnx.shape_inference.infer_shapes_path)
    assert calibrate.create_calibrator.__name__ == "_create_calibrator_with_extra_options"
    with (compat.calibrator_from(absmax) as made,
          compat.matmul_shapes_from(ranges.shapes), compat.light_shape_inference(),
          monkeypatch.context() as no_runs):
        no_runs.setattr(graph_utils, "create_inference_session", None)  # a run would fail
        ours = quantized("ours")
    assert (calibrate.create_calibrator, graph_utils.get_extended_model_outputs,
            onnx.shape_inference.infer_shapes_path) == originals
    assert len(made) == 1 and type(made[0]).__name__ == "KnownRanges"
    assert filecmp.cmp(ours, theirs, shallow=False)
    assert precision.check_scales(onnx.load(str(ours)), absmax) > 0


@pytest.mark.slow  # four AutoCast runs: about 40 s
def test_autocast_with_light_shape_inference_writes_the_same_graph(artifact):
    """AutoCast (as to_fp16 runs it) with ModelOpt's shape inference and with ours, which
    leaves the weights out and infers AutoCast's types into its model in place: the same
    bytes, on the demo's FP32 graph and on its INT8 graph (Q/DQ pairs, FP16 around them)."""
    from modelopt.onnx import utils
    from modelopt.onnx.autocast import convert_to_mixed_precision

    from twbert_export.precision import modelopt_compat as compat
    from twbert_export import precision

    def autocast(src: Path, exclude: list[str] | None) -> bytes:
        with compat.quiet_modelopt():
            return convert_to_mixed_precision(
                str(src), low_precision_type="fp16", keep_io_types=True,
                nodes_to_exclude=list(precision.SELECTION_NODES), op_types_to_exclude=exclude,
                data_max=np.inf, providers=["cpu"]).SerializeToString()

    out, _ = artifact
    for src, exclude in ((out / "model.fp32.onnx", None),
                         (out / "model.int8.onnx", precision.QDQ_OPS)):
        theirs = autocast(src, exclude)
        original, original_types = utils.infer_shapes, utils.infer_types
        with compat.light_shape_inference():
            assert utils.infer_shapes is not original
            assert utils.infer_types is not original_types  # AutoCast's, in place
            ours = autocast(src, exclude)
        assert utils.infer_shapes is original and utils.infer_types is original_types
        assert ours == theirs, src.name


def test_gates_hold_on_awkward_real_clips(artifact, tmp_path):
    """Static clips, clips shorter than T, odd aspect ratios and over-long captions, made from
    demo frames: the FP16 gates hold (ties of static clips count as near-ties at most)."""
    from twbert_export.data.preprocess import read_frames

    out, _ = artifact
    src = sorted((copy_clips(tmp_path / "src", 4)).glob("videos/*.mp4"))
    frames = [np.stack(read_frames(p, 32)) for p in src]
    long_caption = "the camera pans left over a cat " * 12
    clips = [("static.mp4", np.repeat(frames[0][:1], 16, axis=0), "a still photograph"),
             ("short.mp4", frames[1][:3], long_caption),
             ("wide.mp4", np.ascontiguousarray(frames[2][:, 20:76, :, :]), "a wide view"),
             ("tall.mp4", np.ascontiguousarray(frames[3][:, :, 30:70, :]), "a tall view")]
    awkward = write_data_dir(tmp_path / "awkward", clips)
    report = validate_onnx("demo", out / "model.fp16.onnx", str(awkward))
    result = report["precisions"]["fp16"]
    assert result["passed"], [g for g in result["gates"] if not g["passed"]]


def test_predict_ranks_videos_and_answers_questions(artifact, small_val, capsys):
    out, _ = artifact
    videos = sorted(str(p) for p in (small_val / "videos").glob("*.mp4"))[:3]
    caption = json.loads((small_val / "annotations.jsonl").read_text().splitlines()[0])["caption"]
    args = ["predict", "--model", str(out / "model.fp16.onnx"), "--text", caption, "--json"]
    for v in videos:
        args += ["--video", v]
    assert export.main(args) == 0
    ranking = json.loads(capsys.readouterr().out)["ranking"]
    assert sorted(r["video"] for r in ranking) == sorted(videos)
    assert all(0.0 <= r["match_probability"] <= 1.0 for r in ranking)
    assert export.main(["predict", "--model", str(out / "model.fp16.onnx"), "--video",
                        str(out / "missing.mp4"), "--text", "x"]) == 2
    assert "missing.mp4" in capsys.readouterr().err


def test_predict_needs_no_torch(artifact, small_val):
    out, _ = artifact
    video = sorted((small_val / "videos").glob("*.mp4"))[0]
    code = (
        "import runpy\n"
        f"sys.argv = ['export.py', 'predict', '--model', {str(out / 'model.fp32.onnx')!r}, "
        f"'--video', {str(video)!r}, '--text', 'a cat']\n"
        f"runpy.run_path({str(REPO / 'export.py')!r}, run_name='__main__')\n")
    proc = run_without(("torch",), code)
    assert proc.returncode == 0, proc.stderr
    assert "match" in proc.stdout


def test_import_twbert_export_needs_no_heavy_dependency():
    heavy = ("torch", "onnx", "onnxruntime", "modelopt", "tensorrt", "polygraphy")
    proc = run_without(heavy, "import twbert_export, twbert_export.artifact.contract, "
                              "twbert_export.data.preprocess, twbert_export.trt.lint, "
                              "twbert_export.validation.metrics, twbert_export.data.assets, "
                              "twbert_export.validation.reference\n")
    assert proc.returncode == 0, proc.stderr


def test_stage_lines_size_the_file_being_written_not_the_one_it_replaces(tmp_path):
    """With --force the final directory still holds the previous run's files while the new
    artifact is assembled aside: the size shown is the new file's."""
    final, work = tmp_path / "out", tmp_path / "work"
    final.mkdir()
    work.mkdir()
    (final / "model.onnx").write_bytes(b"x" * 10)
    (work / "model.onnx").write_bytes(b"x" * 5000)
    log = StageLog(total=2, stream=io.StringIO())
    log.line("export", 1.0, final / "model.onnx", "", work / "model.onnx")
    log.line("validate", 1.0, final / "model.onnx", "", work / "not-yet.json")
    assert [r["size"] for r in log.rows] == [human_size(5000), ""]
    assert log.rows[0]["path"].endswith("model.onnx")


def test_predict_and_bench_take_engines_and_say_what_is_missing(artifact, small_val, capsys,
                                                                tmp_path):
    """An .engine goes to the TensorRT runner: here, without TensorRT, one clear line and exit 2.
    The bench's trt-* backends need the engine `export.py build` writes."""
    import shutil

    from twbert_export.bench import artifact_bench as bench

    out, _ = artifact
    copy = tmp_path / "artifact"
    shutil.copytree(out, copy)
    engine = copy / "model.fp16.engine"
    video = sorted(str(p) for p in (small_val / "videos").glob("*.mp4"))[0]
    args = ["predict", "--model", str(engine), "--video", video, "--text", "a cat"]
    assert export.main(args) == 2
    assert "not found" in capsys.readouterr().err
    engine.write_bytes(b"not an engine")
    assert export.main(args) == 2
    assert "tensorrt" in capsys.readouterr().err.lower()
    engine.unlink()
    assert bench.main(["--artifact", str(copy), "--backends", "trt-fp16"]) == 2
    assert "export.py build" in capsys.readouterr().err


def test_bench_op_profile_breaks_ort_latency_down_by_op_type(artifact, tmp_path, capsys):
    from twbert_export.bench import artifact_bench as bench

    out, _ = artifact
    saved = tmp_path / "ops.json"
    assert bench.main(["--artifact", str(out), "--backends", "torch,ort-fp32", "--batch", "1",
                       "--repeat", "2", "--op-profile", "--json", str(saved)]) == 0
    assert "ort-fp32, batch 1:" in capsys.readouterr().out
    (profile,) = json.loads(saved.read_text())["op_profile"]  # torch is not profiled
    ops = {r["op_type"]: r for r in profile["ops"]}
    assert ops["MatMul"]["nodes"] >= 10 and ops["MatMul"]["ms_per_run"] > 0
    assert abs(sum(r["share"] for r in profile["ops"]) - 1) < 1e-6
    assert bench.main(["--artifact", str(out), "--backends", "torch", "--op-profile"]) == 2


# -- validation against the shipped reference (what `validate --engine` runs on a device) -------
def test_reference_validation_reproduces_the_hosts_verdicts(artifact, capsys):
    """The shipped validation set re-run through ONNX Runtime (the runner a device swaps for
    TensorRT) gives exactly the host's per-output errors, selections and task metrics."""
    out, report = artifact
    manifest = Manifest.load(out)
    trt8_host_runs = {"int8": "onnx-int8.trt8"}  # the trt8 twin's run in the host's metrics
    for entry in [*map(manifest.file, ("fp32", "fp16", "int8")),
                  manifest.file("int8", flavour=TRT8_FLAVOUR)]:
        p = entry.precision
        assert export.main(["validate", "--model", str(out / entry.path), "--json"]) == 0
        printed = capsys.readouterr().out
        device = json.loads(printed[:printed.rindex("}") + 1])
        host = report.result(p, entry.flavour)
        assert device["precisions"][p]["outputs"] == host.outputs
        assert device["precisions"][p]["selection"] == host.selection
        assert device["precisions"][p]["gates"] == host.gates
        host_run = trt8_host_runs[p] if entry.flavour == TRT8_FLAVOUR else f"onnx-{p}"
        assert device["task_metrics"][f"{Path(entry.path).stem} (this run)"] == \
            report.task_metrics[host_run]


def test_reference_validation_fails_a_planted_perturbation(artifact, tmp_path, capsys):
    import shutil

    out, _ = artifact
    copy = tmp_path / "artifact"
    shutil.copytree(out, copy)
    npz = copy / "reference" / "validation.npz"
    with np.load(npz) as f:
        arrays = dict(f)
    arrays["reference.itm_logits"] = arrays["reference.itm_logits"] + 1e-3
    with open(npz, "wb") as f:
        np.savez(f, **arrays)
    assert export.main(["validate", "--model", str(copy / "model.fp32.onnx")]) == 1
    assert "fp32  FAIL  itm_logits max abs error" in capsys.readouterr().out


def test_reference_validation_refuses_missing_or_foreign_reference(artifact, tmp_path, capsys):
    import shutil

    out, _ = artifact
    copy = tmp_path / "artifact"
    shutil.copytree(out, copy)
    meta_path = copy / "reference" / "validation.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "schedule": "16-8-4"}))
    assert export.main(["validate", "--model", str(copy / "model.fp16.onnx")]) == 2
    assert "F@16-8-4" in capsys.readouterr().err
    meta_path.write_text(json.dumps(meta))
    engine = copy / "model.fp16.engine"
    engine.write_bytes(b"not an engine")
    assert export.main(["validate", "--engine", str(engine)]) == 2
    assert "tensorrt" in capsys.readouterr().err.lower()
    (copy / "reference" / "validation.npz").unlink()
    assert export.main(["validate", "--model", str(copy / "model.fp16.onnx")]) == 2
    assert "re-export" in capsys.readouterr().err


def test_reference_validation_needs_no_torch(artifact):
    out, _ = artifact
    code = (
        "import runpy\n"
        f"sys.argv = ['export.py', 'validate', '--model', {str(out / 'model.fp16.onnx')!r}]\n"
        f"runpy.run_path({str(REPO / 'export.py')!r}, run_name='__main__')\n")
    proc = run_without(("torch", "modelopt", "onnx_graphsurgeon"), code)
    assert proc.returncode == 0, proc.stderr
    assert "fp16  PASS  selector 1 identical" in proc.stdout
