"""The one TensorRT version parser (twbert_export/trt/version.py) and the rules built on it."""

import pytest

from twbert_export.trt.version import (UnsupportedTensorRT, check_supported, needs_legacy_graph,
                                       parse_version)


@pytest.mark.parametrize("text, parsed", [
    ("10.3.0.30", (10, 3, 0)),  # tensorrt.__version__ on JetPack 6.1
    ("8.5.2-1+cuda11.4", (8, 5, 2)),  # dpkg's libnvinfer-bin on JetPack 5.1
    ("8.6", (8, 6, 0)), ("11", (11, 0, 0)),  # --parser / TRT_VERSION
    ("36.4.3", (36, 4, 3)),  # an L4T release
    (" 10.13.0.35\n", (10, 13, 0)),
])
def test_every_version_string_we_meet_parses(text, parsed):
    assert parse_version(text) == parsed


@pytest.mark.parametrize("text", ["", "banana", "v10.3", None])
def test_a_string_without_a_version_is_bad_input(text):
    with pytest.raises(ValueError, match="cannot read a TensorRT version"):
        parse_version(text)


@pytest.mark.parametrize("text, ok", [("8.4.1", False), ("8.5.2", True), ("8.6.2", True),
                                      ("9.3.0", False), ("10.3.0", True), ("11.4.1", True)])
def test_supported_releases(text, ok):
    if ok:
        assert check_supported(text) == parse_version(text)
    else:
        with pytest.raises(UnsupportedTensorRT):
            check_supported(text)
        assert issubclass(UnsupportedTensorRT, ValueError)  # bad input: exit 2


@pytest.mark.parametrize("text, legacy", [("8.5.2", True), ("8.6.2.3", True), ("10.0.0", False),
                                          ("11.4.1", False)])
def test_8x_needs_the_opset17_graph(text, legacy):
    assert needs_legacy_graph(text) == legacy
