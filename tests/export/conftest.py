"""The export tests' fixtures: the session-scoped demo artifact (`artifact`) and its
validation clips (`small_val`) are in tests/conftest.py, shared with tests/trt (the TensorRT-RTX
build of the same artifact's graphs)."""
