"""Every patch of NVIDIA ModelOpt's internals, in one place, each applied only on the ModelOpt
versions it was tested with (TESTED_VERSIONS). On any other version each context below yields
without touching ModelOpt: ModelOpt then runs its own path (slower, never wrong: the INT8 scales
are still checked to be ours, `precision.int8.check_scales`), and `untested_note()` gives the
line the stage prints.

The patches and why (what each saves on the base preset: docs/benchmarks.md, "Export-time
measurements behind the code"; each is tested to give the bytes ModelOpt's own path gives:
tests/export/test_fp16_ranges.py, tests/export/test_pipeline.py):
- `linear_dead_node_cleanup`: AutoCast's dead-node pass is quadratic in the node count;
- `light_shape_inference`: ModelOpt's shape inference serialises the weights on every call;
- `calibrator_from`: ModelOpt runs ONNX Runtime's calibrator even when a calibration cache
  gives every scale;
- `matmul_shapes_from`: ModelOpt's GEMV check runs the model once more, for shapes only.
`quiet_modelopt` patches nothing of ModelOpt (standard logging and stdout only), so it applies
on every version.
"""

from __future__ import annotations

import contextlib
import io
import logging
from importlib import metadata

import numpy as np

from ..util import infer_shapes, infer_shapes_in_file, require

# ModelOpt releases (major.minor) the patches below were tested on.
TESTED_VERSIONS = ("0.47",)


def modelopt_version() -> str | None:
    try:
        return metadata.version("nvidia-modelopt")
    except metadata.PackageNotFoundError:
        return None


def patches_apply() -> bool:
    """Whether the installed ModelOpt is one the patches were tested on."""
    version = modelopt_version()
    return version is not None and ".".join(version.split(".")[:2]) in TESTED_VERSIONS


def untested_note() -> str:
    """For the stage line: empty on a tested ModelOpt."""
    return "" if patches_apply() else f"ModelOpt {modelopt_version()} untested: its own path"


@contextlib.contextmanager
def quiet_modelopt():
    """ModelOpt logs every node at INFO (to a stdout handler it made at import) and prints
    progress bars and NVML errors on GPU-less machines: one line per stage is ours to print."""
    ort = require("onnxruntime", "to run the precision conversion")
    ort.set_default_logger_severity(3)
    logging.disable(logging.WARNING)
    sink = io.StringIO()
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        logging.disable(logging.NOTSET)


@contextlib.contextmanager
def linear_dead_node_cleanup():
    """AutoCast's last pass drops nodes whose outputs nothing reads
    (`PrecisionConverter._cleanup_no_consumer_nodes`, ModelOpt 0.47) by scanning every node
    for each output: quadratic in the node count (most of AutoCast's time on the base preset's
    INT8 graph). Within this context the same rule runs from one set of the consumed names
    (tests/export/test_fp16_ranges.py checks the output is byte-identical). A ModelOpt without
    that method runs unchanged."""
    if not patches_apply():
        yield
        return
    from modelopt.onnx.autocast.precisionconverter import PrecisionConverter

    name = "_cleanup_no_consumer_nodes"
    original = PrecisionConverter.__dict__.get(name)
    if original is None:
        yield
        return

    def cleanup_no_consumer_nodes(self) -> None:
        graph = self.model.graph
        # ModelOpt's test per output: a graph output, or an input of some node of this graph.
        needed = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(out in needed for out in n.output)]
        for node in dead:
            graph.node.remove(node)

    setattr(PrecisionConverter, name, cleanup_no_consumer_nodes)
    try:
        yield
    finally:
        setattr(PrecisionConverter, name, original)


@contextlib.contextmanager
def light_shape_inference():
    """ModelOpt's shape inference (ModelOpt 0.47: `modelopt.onnx.utils.infer_shapes`, and
    `onnx.shape_inference.infer_shapes_path` on its input file, both on the whole model,
    weights included) runs as `util.infer_shapes` / `util.infer_shapes_in_file` within this
    context: the same result without serialising the weights for it. ModelOpt reaches
    `infer_shapes_path` through the `onnx` module, so that attribute is what is replaced; it is
    restored on exit, and within the context any caller gets the same result as ONNX's own.
    ModelOpt's `infer_types` (AutoCast's type inference, ModelOpt 0.47), whose every caller
    replaces its model by the result, infers into the model given instead of a copy: one copy
    of the weights less at each call, and AutoCast's input model no longer kept beside its
    converted one (docs/benchmarks.md, "Scale check")."""
    if not patches_apply():
        yield
        return
    onnx = require("onnx", "for shape inference")
    from modelopt.onnx import utils
    from modelopt.onnx.quantization import graph_utils

    onnx_in_file = onnx.shape_inference.infer_shapes_path

    def light_in_file(model_path, output_path="", **kwargs) -> None:
        if not infer_shapes_in_file(model_path, output_path, **kwargs):
            onnx_in_file(model_path, output_path, **kwargs)

    targets = [(m, "infer_shapes", infer_shapes) for m in (utils, graph_utils)
               if hasattr(m, "infer_shapes")]
    onnx_infer_types = getattr(utils, "infer_types", None)
    if onnx_infer_types is not None:
        def light_infer_types(model, use_standalone_type_inference=False, **kwargs):
            # Every caller (AutoCast's) replaces its model by the result: infer into the model
            # itself rather than into a copy of its weights. Any failure goes to ModelOpt's own
            # fallback, the standalone type inference, as in `infer_types`.
            if not use_standalone_type_inference:
                with contextlib.suppress(Exception):
                    return infer_shapes(model, in_place=True, **kwargs)
            return onnx_infer_types(model, use_standalone_type_inference=True)

        targets.append((utils, "infer_types", light_infer_types))
    targets.append((onnx.shape_inference, "infer_shapes_path", light_in_file))
    originals = [getattr(module, name) for module, name, _ in targets]
    for module, name, replacement in targets:
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for (module, name, _), original in zip(targets, originals):
            setattr(module, name, original)


@contextlib.contextmanager
def calibrator_from(absmax: dict[str, float]):
    """ModelOpt 0.47 runs ONNX Runtime's calibrator even when a calibration cache gives every
    scale: it writes an augmented copy of the model and runs one clip keeping every calibrated
    tensor (the INT8 step's memory peak on the base preset), then replaces the scales
    by the cache's. Within this context the calibrator factory (ModelOpt's, which it installs
    into ONNX Runtime at each `quantize`) gives these maxima as symmetric ranges without running
    anything; the context yields the list of calibrators it made.
    tests/export/test_pipeline.py checks the Q/DQ graph is byte-identical."""
    if not patches_apply():
        yield []
        return
    calibrate = require("onnxruntime.quantization.calibrate", "for INT8 calibration")
    from modelopt.onnx.quantization import ort_patching

    class KnownRanges:
        def collect_data(self, data_reader) -> None:
            pass

        def compute_data(self):
            return calibrate.TensorsData(calibrate.CalibrationMethod.MinMax, {
                name: (np.array(-amax, np.float32), np.array(amax, np.float32))
                for name, amax in absmax.items()})

    made: list[KnownRanges] = []

    def create_calibrator(*args, **kwargs) -> KnownRanges:
        made.append(KnownRanges())
        return made[-1]

    factories = [(ort_patching, "_create_calibrator_with_extra_options"),
                 (calibrate, "create_calibrator")]
    originals = [getattr(module, name) for module, name in factories]
    for module, name in factories:
        setattr(module, name, create_calibrator)
    try:
        yield made
    finally:
        for (module, name), original in zip(factories, originals):
            setattr(module, name, original)


@contextlib.contextmanager
def matmul_shapes_from(shapes: dict[str, tuple[int, ...]]):
    """ModelOpt's GEMV check (`graph_utils.get_extended_model_outputs`, ModelOpt 0.47) runs one
    clip through the model once more keeping every matrix product's result, for their shapes
    only. Within this context it gets the shapes our range passes saw
    (`precision.ranges.ActivationRanges.shapes`: batch 1, and frames and text length are fixed
    per export, so every clip gives the same), as zero-stride arrays; a tensor we did not see
    sends the call to ModelOpt's own run."""
    if not patches_apply():
        yield
        return
    from modelopt.onnx.quantization import graph_utils

    original = graph_utils.get_extended_model_outputs

    def outputs_of(onnx_path, extended_model, *args, **kwargs):
        names = [o.name for o in extended_model.graph.output]
        if not all(name in shapes for name in names):
            return original(onnx_path, extended_model, *args, **kwargs)
        return {name: np.broadcast_to(np.float32(0), shapes[name]) for name in names}

    graph_utils.get_extended_model_outputs = outputs_of
    try:
        yield
    finally:
        graph_utils.get_extended_model_outputs = original
