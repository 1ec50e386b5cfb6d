"""The clips and texts: one torch-free data path, shared by calibration, validation and predict.

- `preprocess`: decode, sample, resize and normalise a video (PyAV, numpy); WordPiece
  tokenisation (tokenizers); annotation files.
- `calibration`: data sets preprocessed into feeds (`FeedSet`), their identity, and the checks
  of a calibration set (count, noise).
- `assets`: the demo checkpoint and data that ship with the repository (`--ckpt demo`,
  `--val-data demo`).

Imports: `util` and `artifact` (the contract).
"""
