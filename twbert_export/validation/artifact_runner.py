"""An artifact directory as the commands that run one of its files see it: its manifest,
contract, tokenizer and answers, and the runner for the file (ONNX Runtime for an .onnx file,
TensorRT for an .engine built from one). `predict`, `serve` and `validate --engine` share it."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from ..artifact.manifest import RTX_ENGINE_SUFFIX, FileEntry, Manifest
from ..data.preprocess import Tokenizer


class Artifact:
    """An artifact directory: manifest, contract, tokenizer, answers, and a runner for a model."""

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ValueError(f"model not found: {self.model_path}")
        self.dir = self.model_path.parent
        self.manifest = Manifest.load(self.dir)
        self.contract = self.manifest.contract
        answers = self.manifest.answers
        self.answers = json.loads((self.dir / answers).read_text()) if answers else None

    @property
    def entry(self) -> FileEntry | None:
        """The manifest's entry for the ONNX file the model is (or was built from)."""
        return self.manifest.entry_for(self.model_path)

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        """Loaded on first use: validating against reference data needs no tokenizer."""
        return Tokenizer.from_file(self.dir / self.manifest.tokenizer)

    def runner(self, threads: int | None = None) -> Any:
        """ONNX Runtime for an .onnx file, TensorRT for an .engine built by `export.py build`,
        TensorRT-RTX for an .rtx.engine built by the export's rtx stage (--rtx-engines).
        An .onnx file is first checked against the contract and the manifest's hash (raises
        ModelFileMismatch, a ValueError: a file from another export)."""
        if self.model_path.suffix == ".onnx":
            from ..artifact.input_checks import check_onnx_file
            from .runners import ort_runner

            check_onnx_file(self.model_path, self.contract,
                            self.entry.sha256 if self.entry else None)
            return ort_runner(self.model_path, threads=threads)
        if self.model_path.name.endswith(RTX_ENGINE_SUFFIX):  # TensorRT-RTX (trt/rtx.py)
            from ..trt.rtx_runtime import rtx_runner

            return rtx_runner(self.model_path)  # contract and ONNX hash from manifest.json
        if self.model_path.suffix == ".engine":
            from ..trt.runtime import trt_runner

            return trt_runner(self.model_path)  # contract and ONNX hash from manifest.json
        raise ValueError(f"{self.model_path.suffix} models are not supported: pass an .onnx file "
                         "from the artifact directory or an .engine built from one")
