"""What an artifact is, and the rules for writing one.

- `contract`: the one I/O contract (input and output names, dtypes, fixed dims, batch range) that
  export, engine profiles, runners and validation read.
- `manifest`: the typed manifest and report of an artifact directory (`manifest.json`,
  `report.json`): files, graphs, precisions, flavours, parity verdicts.
- `input_checks`: checks of what a user hands us (an ONNX file against the contract, an output
  directory) and the errors that become one line and exit code 2.
- `outdir`: what `--out` may replace and how an artifact is moved into place.

Imports: the standard library, numpy, and `twbert_export.util`. Every other package may import
this one.
"""
