"""Export toolchain for TW-BERT: ONNX export, explicit precision, TensorRT engines, parity.

Heavy optional dependencies (onnx, modelopt, tensorrt, pycuda) are imported lazily where used,
so `import twbert_export` works with only the base install.
"""

__version__ = "0.1.0"
