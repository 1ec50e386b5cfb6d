"""Static check of the TensorRT code (twbert_export/trt and split_trt.py): mypy against NVIDIA's
`tensorrt-stubs` (TensorRT 10.x API).

What it covers: every `trt.*` name, method and argument count/type we use exists in TensorRT 10.13's
Python API as the stubs describe it. What it does not: TensorRT 8.6 / 11.x differences (the code
branches on the version for those), behaviour, and anything a GPU decides.

The stub wheel is not installed: it ships a bare `tensorrt/` directory that would make
`import tensorrt` succeed as an empty package (and it depends on the `tensorrt` placeholder that
downloads from NVIDIA). It is downloaded once with `pip download --no-deps`, unpacked into a
temporary directory and given to mypy through MYPYPATH. Its `tensorrt.pyi` has a few lines that
are not valid Python (parameters named `in`, a parameter without default after defaulted ones, in
plugin and scale-layer APIs we do not use); `patch_stub_syntax` repairs exactly those.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

STUBS = "tensorrt-stubs==10.13.0.35.1"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def stub_wheel() -> Path:
    cache = Path(os.environ.get("TWBERT_CACHE") or Path.home() / ".cache" / "twbert-export")
    target = cache / "stubs"
    name, version = STUBS.split("==")
    found = sorted(target.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", STUBS,
                           "-d", str(target)],
                          check=False, capture_output=True, text=True, timeout=300)
    found = sorted(target.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if proc.returncode or not found:
        pytest.skip(f"could not download {STUBS} (offline?): {proc.stderr.strip()[-300:]}")
    return found[0]


def patch_stub_syntax(text: str) -> str:
    """Rename parameters called `in` (a keyword) and give `add_scale_nd`'s trailing
    `channel_axis` a placeholder default (it follows defaulted parameters)."""
    text = re.sub(r"([(,]\s*)in:", r"\1in_:", text)
    return text.replace("power: Weights = None, channel_axis: int)",
                        "power: Weights = None, channel_axis: int = ...)")


def test_patch_repairs_only_what_is_broken():
    broken = ("def f(self, in: list[int], out: list[int]) -> int: ...\n"
              "def g(self, shift: W = None, power: Weights = None, channel_axis: int) -> I: ...\n")
    with pytest.raises(SyntaxError):
        ast.parse(broken)
    fixed = patch_stub_syntax(broken)
    ast.parse(fixed)
    assert "in_: list[int], out: list[int]" in fixed and "channel_axis: int = ..." in fixed
    assert patch_stub_syntax("def h(self, index: int) -> None: ...") == \
        "def h(self, index: int) -> None: ..."


def test_trt_module_type_checks_against_tensorrt_stubs(tmp_path):
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed (it comes with the [test] extra)")
    with zipfile.ZipFile(stub_wheel()) as wheel:
        wheel.extractall(tmp_path)
    stub = tmp_path / "tensorrt_bindings" / "tensorrt.pyi"
    stub.write_text(patch_stub_syntax(stub.read_text(encoding="utf-8")), encoding="utf-8")
    ast.parse(stub.read_text(encoding="utf-8"))  # any other syntax error: fail here, clearly
    env = {**os.environ, "MYPYPATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", "tests/trt/mypy.ini",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "twbert_export/trt",
         "twbert_export/retrieval/split_trt.py"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout


def test_stand_in_names_exist_in_tensorrt_stubs(tmp_path):
    """The strict TensorRT stand-ins (tests/trtapi.py) answer only to names in trtapi.API;
    every one of those must exist in NVIDIA's stubs, or the unit tests would accept a call the
    real bindings refuse."""
    from trtapi import API, stub_members

    with zipfile.ZipFile(stub_wheel()) as wheel:
        wheel.extractall(tmp_path)
    package = tmp_path / "tensorrt_bindings"
    members = stub_members(patch_stub_syntax((package / "tensorrt.pyi").read_text("utf-8")))
    module_names = set(re.search(r"__all__ = \[(.*?)\]", (package / "__init__.pyi").read_text(
        "utf-8"), re.S).group(1).replace("'", "").replace(" ", "").split(",")) | {"__version__"}
    missing = sorted(f"tensorrt.{n}" for n in API["tensorrt"] - module_names)
    for cls, names in API.items():
        if cls != "tensorrt":
            missing += sorted(f"{cls}.{n}" for n in names - members.get(cls, set()))
    assert not missing, f"not in tensorrt-stubs {STUBS.split('==')[1]}: {missing}"
