"""The artifact model (manifest.json / report.json) and the ModelOpt version gate."""

import json

import pytest
from trtdata import artifact_manifest

import export
from twbert_export.precision import modelopt_compat
from twbert_export.artifact.manifest import (DEFAULT_FLAVOUR, FORMAT_VERSION, TRT8_FLAVOUR,
                                    ArtifactFormatError, Manifest, PrecisionResult, Report)


def test_manifest_round_trips_through_its_json(tmp_path):
    manifest = artifact_manifest()
    manifest.write(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert loaded == manifest
    assert json.loads((tmp_path / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    assert loaded.precisions == ["fp32", "fp16", "int8"]
    assert loaded.file("int8").path == "model.int8.onnx"
    assert loaded.entry_for(tmp_path / "model.fp16.engine").precision == "fp16"
    assert loaded.entry_for(tmp_path / "other.onnx") is None


def test_a_trt8_twin_is_an_entry_of_its_own_found_through_the_manifest(tmp_path):
    """The TensorRT 8.x files are entries of flavour trt8: listed by flavour, found from their
    default-flavour file, and an engine built from one maps back to it (its precision, its hash,
    its own parity verdict)."""
    artifact_manifest().write(tmp_path)
    loaded = Manifest.load(tmp_path)
    assert [e.precision for e in loaded.entries(TRT8_FLAVOUR)] == ["fp32", "fp16", "int8"]
    assert [e.flavour for e in loaded.entries()] == [DEFAULT_FLAVOUR] * 3
    twin = loaded.twin(loaded.file("fp16"), TRT8_FLAVOUR)
    assert twin == loaded.file("fp16", flavour=TRT8_FLAVOUR)
    assert twin.path == "model.fp16.trt8.onnx" and twin.sha256 != loaded.file("fp16").sha256
    engine = loaded.entry_for(tmp_path / "model.fp16.trt8.engine")
    assert (engine.precision, engine.flavour) == ("fp16", TRT8_FLAVOUR)
    assert loaded.precisions == ["fp32", "fp16", "int8"]  # a twin adds no precision
    assert loaded.passed("int8", TRT8_FLAVOUR) is True and loaded.passed("int8", "other") is None
    older = artifact_manifest(trt8=False)
    data = older.to_dict()
    del data["flavour_parity"]  # a format-2 manifest from before the trt8 flavour
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    assert Manifest.load(tmp_path) == older
    assert Manifest.load(tmp_path).twin(older.file("fp16"), TRT8_FLAVOUR) is None


def test_a_precision_comes_from_the_manifest_not_the_file_name(tmp_path):
    manifest = artifact_manifest(("fp32", "int8"))
    manifest.files[1] = manifest.files[1].__class__("model", "int8", "quantized.onnx", "1" * 64, 9)
    manifest.write(tmp_path)
    assert Manifest.load(tmp_path).entry_for(tmp_path / "quantized.engine").precision == "int8"


def test_an_older_manifest_is_refused_naming_the_version(tmp_path):
    data = artifact_manifest().to_dict()
    data["format_version"] = 1
    data["files"] = {f["precision"]: f for f in data["files"]}  # version 1 keyed by precision
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactFormatError, match="'format_version' is 1.*re-export"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.pop("contract"), "'contract' is missing"),
    (lambda d: d["files"][1].update(sha256=5), r"files\[1\]: field 'sha256' should be str"),
    (lambda d: d["files"][0].update(precision="fp8"), "'precision' is 'fp8'"),
    (lambda d: d["files"][2].pop("bytes"), r"files\[2\]: field 'bytes' is missing"),
    (lambda d: d["parity"].update(fp16={"passed": "yes"}), "parity.fp16: field 'passed'"),
    (lambda d: d["files"][4].update(flavour="trt7"), r"files\[4\]: field 'flavour' is 'trt7'"),
    (lambda d: d["flavour_parity"]["trt8"].update(int8={}),
     "flavour_parity.trt8.int8: field 'passed' is missing"),
])
def test_a_hand_edited_manifest_error_names_the_field(tmp_path, edit, field):
    data = artifact_manifest().to_dict()
    edit(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactFormatError, match=field):
        Manifest.load(tmp_path)


def test_a_broken_manifest_is_one_line_and_exit_2(tmp_path, capsys):
    data = artifact_manifest().to_dict()
    del data["files"][1]["path"]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    (tmp_path / "model.fp16.onnx").write_bytes(b"")
    assert export.main(["validate", "--model", str(tmp_path / "model.fp16.onnx")]) == 2
    err = capsys.readouterr().err
    assert "field 'path' is missing" in err and "Traceback" not in err


def test_report_round_trips_with_one_entry_per_precision_and_flavour(tmp_path):
    comparison = {"passed": True, "gates": [{"name": "g", "passed": True, "detail": ""}],
                  "outputs": {"itm_logits": {"max_abs": 1e-6}}, "selection": {},
                  "metric_drops_pt": None, "gate": {"max_abs": 1e-4}}
    report = Report(precisions={
        "fp32": PrecisionResult.from_comparison(comparison),
        "fp16": PrecisionResult.from_comparison({**comparison, "passed": False},
                                                conversion={"kept_fp32_range": ["n"]})},
        flavours={TRT8_FLAVOUR: {
            "fp32": PrecisionResult.from_comparison({**comparison, "passed": False})}},
        task_metrics={}, validation_data={"num_videos": 2}, total_seconds=1.5)
    report.write(tmp_path)
    loaded = Report.load(tmp_path)
    assert loaded == report and loaded.failed == ["fp16", "fp32 (trt8)"]
    assert loaded.result("fp32").passed and not loaded.result("fp32", TRT8_FLAVOUR).passed
    assert loaded.result("fp16", TRT8_FLAVOUR) is None
    assert set(json.loads((tmp_path / "report.json").read_text())) >= {"precisions"}
    assert "precision" not in json.loads((tmp_path / "report.json").read_text())


def test_modelopt_patches_apply_only_on_tested_versions(monkeypatch):
    """On an untested ModelOpt no internal is replaced and the stage line says so."""
    from modelopt.onnx import utils
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter
    from modelopt.onnx.quantization import graph_utils
    from onnxruntime.quantization import calibrate

    def internals():
        return (PrecisionConverter.__dict__.get("_cleanup_no_consumer_nodes"),
                utils.infer_shapes, graph_utils.get_extended_model_outputs,
                calibrate.create_calibrator)

    before = internals()
    monkeypatch.setattr(modelopt_compat, "modelopt_version", lambda: "0.99.0")
    assert not modelopt_compat.patches_apply()
    assert modelopt_compat.untested_note() == "ModelOpt 0.99.0 untested: its own path"
    with (modelopt_compat.linear_dead_node_cleanup(), modelopt_compat.light_shape_inference(),
          modelopt_compat.matmul_shapes_from({}), modelopt_compat.calibrator_from({}) as made):
        assert internals() == before and made == []
    monkeypatch.setattr(modelopt_compat, "modelopt_version", lambda: "0.47.3")
    assert modelopt_compat.patches_apply() and modelopt_compat.untested_note() == ""
    with modelopt_compat.light_shape_inference():
        assert utils.infer_shapes is not before[1]
    assert internals() == before
