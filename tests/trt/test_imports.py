"""The device-kit modules import with none of tensorrt, pycuda, cuda-python or torch."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCKED = ("tensorrt", "pycuda", "cuda", "torch")


def test_trt_modules_import_without_tensorrt_pycuda_cuda_or_torch():
    code = (
        "import sys\n"
        f"BLOCKED = {BLOCKED!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED: raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import twbert_export.trt.targets, twbert_export.trt.commands, "
        "twbert_export.trt.engine_manifest, twbert_export.trt.cli, twbert_export.trt.build, "
        "twbert_export.trt.runtime\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in BLOCKED]\n"
        "assert not loaded, loaded\n"
        "from twbert_export.trt.cli import build_main\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
