"""TensorRT engines from the precision-explicit ONNX files of an artifact.

- `version`: the one TensorRT version parser, and which releases we build for.
- `targets`: device presets (Orin Nano 8GB, Orin NX 8GB / 16GB, AGX Orin, Thor, data-centre),
  detection, and the one machine-info reader (GPU, L4T / JetPack, power mode, clock lock).
- `commands`: trtexec / `build_on_device.sh` / DEPLOY.md, the device kit of every export.
- `engine_manifest`: the sidecar manifest of an engine and the preflight that reads it.
- `build`: the TensorRT build (strongly typed on TensorRT >= 10, precision flags on 8.5/8.6).
- `runtime`: a TensorRT runner with the interface of the ONNX Runtime and PyTorch runners.
- `cli`: `python export.py build ...`.
- `rtx`: TensorRT for RTX (NVIDIA's parser and ahead-of-time builder, on the CPU) on every
  shipped graph: the export's `rtx` stage, TensorRT's own type audit (docs/rtx.md).
- `rtx_runtime`: a runner for the TensorRT-RTX engines (GPU only).

Importing any of these imports neither tensorrt, tensorrt_rtx_bindings, pycuda, cuda-python
nor torch: a Jetson with only TensorRT and numpy runs `build` and `runtime`, and a machine
without TensorRT still writes the device kit.
"""
