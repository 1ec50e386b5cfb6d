"""The export job: checkpoint -> ONNX -> rewrite -> lint -> precision -> TensorRT 8.x twins ->
validate -> artifact directory.

- `pipeline`: `run_export`, the stages in order.
- `job`: what the stages hand each other (options, the loaded checkpoint, the files converted,
  the stage log).
- `load`: the options checked, the checkpoint loaded, the data sets preprocessed.
- `onnx_export`, `rewrite`: the graph out of PyTorch (dynamo, opset 19) and cleaned for TensorRT.
- `split`: the four split graphs cut at the model's own stages.
- `convert`: the lint, precision and TensorRT 8.x stages over every graph.
- `legacy`: the TensorRT 8.5 / 8.6 twin of a file (opset 17, reduce axes as attributes).
- `verify`, `write`: the validate stage and the artifact's manifest, report and device kit.

Imports: every lower package (`util`, `artifact`, `data`, `precision`, `trt`, `validation`);
nothing imports this one but `bench` and the command line.
"""
