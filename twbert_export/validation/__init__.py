"""Parity: runners with one interface, and the comparisons and gates that judge a file.

- `runners`: PyTorch (hard or perturbed selection) and ONNX Runtime behind one runner interface
  (activate, infer on a dict of numpy arrays, deactivate); batching within the contract.
- `artifact_runner`: an artifact directory's manifest, tokenizer and answers, and the runner for
  one of its files (.onnx on ONNX Runtime, .engine on TensorRT).
- `metrics`: retrieval and QA metrics, the ITC-shortlist re-ranking, ranking differences.
- `parity`: runs over the validation rows, per-output errors, frame-selection agreement, gates.
- `composed`: the four split graphs composed back into the whole model's I/O (`ComposedSplit`),
  and their validation.
- `select_pieces`: the `select` graph run in pieces cut from its own nodes (validation only).
- `files`: PyTorch against ONNX Runtime on a set of files (the export's validate stage and the
  `validate` subcommand).
- `reference`: the reference data an artifact ships, and `validate --engine` on a device.

Imports: `util`, `artifact`, `data`, and `trt` (lazily, for engine runners).
"""
