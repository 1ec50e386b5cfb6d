"""The device-kit modules import with none of tensorrt, pycuda, cuda-python or torch."""

from blocked_imports import run_without

BLOCKED = ("tensorrt", "pycuda", "cuda", "torch")


def test_trt_modules_import_without_tensorrt_pycuda_cuda_or_torch():
    code = (
        "import twbert_export.trt.targets, twbert_export.trt.commands, "
        "twbert_export.trt.engine_manifest, twbert_export.trt.cli, twbert_export.trt.build, "
        "twbert_export.trt.runtime\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in BLOCKED]\n"
        "assert not loaded, loaded\n"
        "from twbert_export.trt.cli import build_main\n"
        "print('ok')\n")
    proc = run_without(BLOCKED, code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
