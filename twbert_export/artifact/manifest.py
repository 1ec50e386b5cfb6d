"""What an artifact directory is: its manifest (manifest.json) and its report (report.json).

The export writes both through this module and every reader (validate, predict, the benchmark,
the scale check, the TensorRT builder and runtime) reads them through it, so "which precision is
this file" has one answer: the manifest's file entry, never the file's name.

An artifact holds one or more graphs (today `model`, the whole network; split deployments add
more beside it), each in one or more precisions, each in one or more flavours: the default
`trt10` (the file TensorRT 10.x / 11.x build) and `trt8`, its opset-17 twin for TensorRT 8.5 / 8.6
(legacy.py). Every ONNX file is one `FileEntry`; parity verdicts and results are kept per
(precision, flavour).

Torch-free: a device with only TensorRT and numpy reads it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contract import IOContract
from ..util import write_json

FORMAT = "twbert-export-artifact"
FORMAT_VERSION = 2  # 2: files as a list of graph/precision/flavour entries; one report key
MANIFEST_FILE, REPORT_FILE = "manifest.json", "report.json"
# Every precision the export writes, in order of conversion (fp32 first: the others start from
# it); the last present is a reader's default. int8w: INT8 weights, FP16 activations
# (precision/weight_only.py).
PRECISIONS = ("fp32", "fp16", "int8w", "int8")
MODEL_GRAPH = "model"  # the whole network as one graph
SPLIT_GRAPHS = ("text", "video_stem", "select", "fuse")  # the split deployment (split.py)
DEFAULT_FLAVOUR = "trt10"
TRT8_FLAVOUR = "trt8"  # the opset-17 twin of a trt10 file, for TensorRT 8.5 / 8.6 (legacy.py)
FLAVOURS = (DEFAULT_FLAVOUR, TRT8_FLAVOUR)
# A TensorRT-RTX engine built from <stem>.onnx (trt/rtx.py): <stem>.rtx.engine
RTX_ENGINE_SUFFIX = ".rtx.engine"


class ArtifactFormatError(ValueError):
    """A manifest or report this version cannot read (older format, or edited by hand)."""


def _read(data: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str,
          optional: bool = False) -> Any:
    """data[key], checked to be of `kind`; the error names the field and the file."""
    if key not in data or data[key] is None:
        if optional:
            return None
        raise ArtifactFormatError(f"{where}: field '{key}' is missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ArtifactFormatError(f"{where}: field '{key}' should be {names}, got "
                                  f"{type(value).__name__} {value!r:.40}")
    return value


def _check_format(data: Any, where: str, expected: str) -> None:
    if not isinstance(data, dict):
        raise ArtifactFormatError(f"{where}: not a JSON object")
    if data.get("format") != expected:
        raise ArtifactFormatError(f"{where}: field 'format' is {data.get('format')!r}, not "
                                  f"{expected!r}")
    version = _read(data, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise ArtifactFormatError(f"{where}: field 'format_version' is {version}, this version of "
                                  f"twbert-export reads {FORMAT_VERSION}: re-export the artifact")


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise ArtifactFormatError(f"{path.parent} has no {path.name}: not an export.py artifact "
                                  "directory")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactFormatError(f"{path}: unreadable ({e})") from None


def is_artifact_dir(directory: str | Path) -> bool:
    """Whether `directory` is an export artifact of ours, of any format version: its
    manifest.json names our format (what --force may replace)."""
    path = Path(directory) / MANIFEST_FILE
    if path.is_symlink() or not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _read_verdicts(verdicts: dict[str, Any], where: str) -> dict[str, bool]:
    """{precision: {"passed": bool}} -> {precision: bool}."""
    return {p: _read(v if isinstance(v, dict) else {}, "passed", bool, f"{where}.{p}")
            for p, v in verdicts.items()}


# -- manifest ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileEntry:
    """One ONNX file of the artifact."""
    graph: str
    precision: str
    path: str  # relative to the artifact directory
    sha256: str
    bytes: int
    flavour: str = DEFAULT_FLAVOUR

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "FileEntry":
        if not isinstance(d, dict):
            raise ArtifactFormatError(f"{where}: not a JSON object")
        entry = cls(graph=_read(d, "graph", str, where),
                    precision=_read(d, "precision", str, where),
                    path=_read(d, "path", str, where), sha256=_read(d, "sha256", str, where),
                    bytes=_read(d, "bytes", int, where), flavour=_read(d, "flavour", str, where))
        if entry.precision not in PRECISIONS:
            raise ArtifactFormatError(f"{where}: field 'precision' is {entry.precision!r}, not "
                                      f"one of {', '.join(PRECISIONS)}")
        if entry.flavour not in FLAVOURS:
            raise ArtifactFormatError(f"{where}: field 'flavour' is {entry.flavour!r}, not one "
                                      f"of {', '.join(FLAVOURS)}")
        return entry

    def to_dict(self) -> dict[str, Any]:
        return {"graph": self.graph, "precision": self.precision, "flavour": self.flavour,
                "path": self.path, "sha256": self.sha256, "bytes": self.bytes}


@dataclass(frozen=True)
class PlanEntry:
    """A per-graph precision plan of the artifact (artifact/plan.py): graph -> precision of the
    split graphs, the whole-model file's precision, and flavour -> whether they passed their
    gates composed."""
    graphs: dict[str, str]
    model: str
    parity: dict[str, bool]

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "PlanEntry":
        if not isinstance(d, dict):
            raise ArtifactFormatError(f"{where}: not a JSON object")
        graphs = _read(d, "graphs", dict, where)
        if sorted(graphs) != sorted(SPLIT_GRAPHS) or not set(graphs.values()) <= set(PRECISIONS):
            raise ArtifactFormatError(f"{where}: field 'graphs' should give each of "
                                      f"{', '.join(SPLIT_GRAPHS)} one of {', '.join(PRECISIONS)}")
        model = _read(d, "model", str, where)
        if model not in PRECISIONS:
            raise ArtifactFormatError(f"{where}: field 'model' is {model!r}, not one of "
                                      f"{', '.join(PRECISIONS)}")
        return cls(graphs=graphs, model=model,
                   parity=_read_verdicts(_read(d, "parity", dict, where), f"{where}.parity"))

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "model": self.model,
                "parity": {fl: {"passed": passed} for fl, passed in self.parity.items()}}


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    sha256: str
    format: str


@dataclass
class Manifest:
    """manifest.json: what the artifact holds and what it was made from."""
    checkpoint: CheckpointInfo
    model_config: dict[str, Any]
    schedule: str
    contract: IOContract
    files: list[FileEntry]
    validation_data: dict[str, Any]
    parity: dict[str, bool]  # precision -> whether its default-flavour file passed on the host
    tools: dict[str, str]
    created: str
    tokenizer: str  # file name in the artifact directory
    calibration: dict[str, Any] | None = None
    answers: str | None = None  # file name of the QA answer list
    # The I/O contract of each split graph (split.split_contracts); empty without split graphs.
    graph_contracts: dict[str, IOContract] = field(default_factory=dict)
    # flavour -> precision -> whether that flavour's file passed, for the flavours beyond the
    # default (optional in the JSON: manifests written before the trt8 flavour have none)
    flavour_parity: dict[str, dict[str, bool]] = field(default_factory=dict)
    # The per-graph precision plan the export was given (artifact/plan.py), by name: its graphs'
    # precisions and, per flavour, whether its split graphs composed passed their gates
    # (optional in the JSON; an export of plain precisions has none).
    plans: dict[str, "PlanEntry"] = field(default_factory=dict)

    # -- lookups ---------------------------------------------------------------------------------
    @property
    def precisions(self) -> list[str]:
        """The precisions of the artifact, in PRECISIONS order."""
        present = {f.precision for f in self.files}
        return [p for p in PRECISIONS if p in present]

    def file(self, precision: str, graph: str = MODEL_GRAPH,
             flavour: str = DEFAULT_FLAVOUR) -> FileEntry | None:
        return next((f for f in self.files if (f.graph, f.precision, f.flavour)
                     == (graph, precision, flavour)), None)

    @property
    def graphs(self) -> list[str]:
        """The graphs the artifact holds, in the order of their first file entry."""
        return list(dict.fromkeys(f.graph for f in self.files))

    @property
    def has_split(self) -> bool:
        return all(g in self.graphs for g in SPLIT_GRAPHS)

    def contract_of(self, graph: str) -> IOContract:
        """The I/O contract of one graph of the artifact."""
        if graph == MODEL_GRAPH:
            return self.contract
        if graph not in self.graph_contracts:
            raise ArtifactFormatError(f"{MANIFEST_FILE}: no contract for graph {graph!r}")
        return self.graph_contracts[graph]

    def entries(self, flavour: str = DEFAULT_FLAVOUR) -> list[FileEntry]:
        """Every file of one flavour, every graph and precision, in manifest order."""
        return [f for f in self.files if f.flavour == flavour]

    def twin(self, entry: FileEntry, flavour: str) -> FileEntry | None:
        """The same graph and precision as `entry`, in another flavour."""
        return self.file(entry.precision, entry.graph, flavour)

    def passed(self, precision: str, flavour: str = DEFAULT_FLAVOUR) -> bool | None:
        """The host's parity verdict of a precision's file of that flavour (None: not judged)."""
        return (self.parity if flavour == DEFAULT_FLAVOUR
                else self.flavour_parity.get(flavour, {})).get(precision)

    def entry_for(self, model_path: str | Path) -> FileEntry | None:
        """The entry of the ONNX file a model (.onnx, or an .engine built beside it: a
        TensorRT-RTX engine is <onnx stem>.rtx.engine) came from."""
        name = Path(model_path).name
        onnx_name = (name[:-len(RTX_ENGINE_SUFFIX)] + ".onnx" if name.endswith(RTX_ENGINE_SUFFIX)
                     else Path(model_path).with_suffix(".onnx").name)
        return next((f for f in self.files if f.path == onnx_name), None)

    # -- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        c = self.checkpoint
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "checkpoint": {"path": c.path, "sha256": c.sha256, "format": c.format},
            "model_config": self.model_config, "schedule": self.schedule,
            "contract": self.contract.to_dict(),
            "files": [f.to_dict() for f in self.files],
            "calibration": self.calibration, "validation_data": self.validation_data,
            "parity": {p: {"passed": passed} for p, passed in self.parity.items()},
            "tools": self.tools, "created": self.created, "tokenizer": self.tokenizer,
            "answers": self.answers,
            "flavour_parity": {fl: {p: {"passed": passed} for p, passed in verdicts.items()}
                               for fl, verdicts in self.flavour_parity.items()},
            **({"graph_contracts": {g: c.to_dict() for g, c in self.graph_contracts.items()}}
               if self.graph_contracts else {}),
            **({"plans": {name: plan.to_dict() for name, plan in self.plans.items()}}
               if self.plans else {})}

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST_FILE) -> "Manifest":
        _check_format(d, where, FORMAT)
        ckpt = _read(d, "checkpoint", dict, where)
        ckpt_where = f"{where} checkpoint"
        files = _read(d, "files", list, where)
        parity = _read_verdicts(_read(d, "parity", dict, where), f"{where} parity")
        by_flavour = _read(d, "flavour_parity", dict, where, optional=True) or {}
        flavour_parity = {fl: _read_verdicts(_read(by_flavour, fl, dict, where),
                                             f"{where} flavour_parity.{fl}")
                          for fl in by_flavour}
        try:
            contract = IOContract.from_dict(_read(d, "contract", dict, where))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactFormatError(f"{where}: field 'contract' is malformed ({e!r})") from None
        graph_contracts = {}
        for graph, c in (_read(d, "graph_contracts", dict, where, optional=True) or {}).items():
            try:
                graph_contracts[graph] = IOContract.from_dict(c)
            except (KeyError, TypeError, ValueError) as e:
                raise ArtifactFormatError(f"{where}: field 'graph_contracts.{graph}' is "
                                          f"malformed ({e!r})") from None
        return cls(
            checkpoint=CheckpointInfo(_read(ckpt, "path", str, ckpt_where),
                                      _read(ckpt, "sha256", str, ckpt_where),
                                      _read(ckpt, "format", str, ckpt_where)),
            model_config=_read(d, "model_config", dict, where),
            schedule=_read(d, "schedule", str, where), contract=contract,
            files=[FileEntry.from_dict(f, f"{where} files[{i}]") for i, f in enumerate(files)],
            validation_data=_read(d, "validation_data", dict, where),
            parity=parity, flavour_parity=flavour_parity,
            tools=_read(d, "tools", dict, where), created=_read(d, "created", str, where),
            tokenizer=_read(d, "tokenizer", str, where),
            calibration=_read(d, "calibration", dict, where, optional=True),
            answers=_read(d, "answers", str, where, optional=True),
            graph_contracts=graph_contracts,
            plans={name: PlanEntry.from_dict(plan, f"{where} plans.{name}")
                   for name, plan in (_read(d, "plans", dict, where, optional=True)
                                      or {}).items()})

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        """The manifest of an artifact directory; ArtifactFormatError (a ValueError) names what
        is missing or malformed."""
        path = Path(directory) / MANIFEST_FILE
        return cls.from_dict(_load_json(path), str(path))

    def write(self, directory: str | Path) -> Path:
        return write_json(Path(directory) / MANIFEST_FILE, self.to_dict())


# -- report --------------------------------------------------------------------------------------
@dataclass
class PrecisionResult:
    """Everything about one precision: the parity comparison with its gate verdicts
    (`validate.compare_precision`) and, for a converted precision, the conversion step's report
    (`precision.PrecisionReport`: nodes kept FP32, calibration, sub-step times)."""
    passed: bool
    gates: list[dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    selection: dict[str, dict[str, Any]]
    metric_drops_pt: dict[str, Any] | None
    gate: dict[str, Any]
    conversion: dict[str, Any] | None = None

    @classmethod
    def from_comparison(cls, comparison: dict[str, Any],
                        conversion: dict[str, Any] | None = None) -> "PrecisionResult":
        return cls(**comparison, conversion=conversion)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "PrecisionResult":
        if not isinstance(d, dict):
            raise ArtifactFormatError(f"{where}: not a JSON object")
        return cls(passed=_read(d, "passed", bool, where), gates=_read(d, "gates", list, where),
                   outputs=_read(d, "outputs", dict, where),
                   selection=_read(d, "selection", dict, where),
                   metric_drops_pt=_read(d, "metric_drops_pt", dict, where, optional=True),
                   gate=_read(d, "gate", dict, where),
                   conversion=_read(d, "conversion", dict, where, optional=True))

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "gates": self.gates, "outputs": self.outputs,
                "selection": self.selection, "metric_drops_pt": self.metric_drops_pt,
                "gate": self.gate, "conversion": self.conversion}


@dataclass
class RtxGraphBuild:
    """One ONNX file through TensorRT-RTX's parser and ahead-of-time builder on the CPU
    (trt/rtx.py): whether it built, the time and engine size, TensorRT's own types of the parsed
    network (its layers' output types, not the ONNX file's) and what the parser and builder said.
    """
    graph: str
    precision: str
    flavour: str
    onnx: str  # file name in the artifact directory
    built: bool
    parse_seconds: float = 0.0
    build_seconds: float = 0.0
    engine_bytes: int = 0
    engine: str | None = None  # file name, when --rtx-engines kept it
    # TensorRT layer type -> output type -> layers: MatMul and Normalization layers
    matmul: dict[str, int] = field(default_factory=dict)
    normalization: dict[str, int] = field(default_factory=dict)
    qdq_layers: int = 0  # Quantize + Dequantize layers (the INT8 of a W8A8 Q/DQ graph)
    selection_layers: int = 0  # layers whose name is on the frame-selection path
    selection_not_fp32: list[str] = field(default_factory=list)  # 'layer (TYPE): HALF', ...
    parser_warnings: list[str] = field(default_factory=list)
    builder_warnings: list[str] = field(default_factory=list)
    note: str = ""  # why it did not build, where that is not a failure (INT8 Q/DQ)

    @property
    def seconds(self) -> float:
        return self.parse_seconds + self.build_seconds

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "RtxGraphBuild":
        if not isinstance(d, dict):
            raise ArtifactFormatError(f"{where}: not a JSON object")
        kinds: dict[str, Any] = {"graph": str, "precision": str, "flavour": str, "onnx": str,
                                 "built": bool, "parse_seconds": (int, float),
                                 "build_seconds": (int, float), "engine_bytes": int,
                                 "matmul": dict, "normalization": dict, "qdq_layers": int,
                                 "selection_layers": int,
                                 "selection_not_fp32": list, "parser_warnings": list,
                                 "builder_warnings": list, "note": str}
        values = {k: _read(d, k, kind, where) for k, kind in kinds.items()}
        return cls(**values, engine=_read(d, "engine", str, where, optional=True))


@dataclass
class RtxCheck:
    """The TensorRT-RTX build check of every shipped graph (trt/rtx.py), or why it did not run.
    `warnings`: each distinct parser/builder warning once, with what it means for us."""
    ran: bool
    version: str | None = None  # TensorRT-RTX, when installed
    reason: str = ""  # why it did not run
    graphs: list[RtxGraphBuild] = field(default_factory=list)
    warnings: dict[str, str] = field(default_factory=dict)  # warning -> explanation

    def to_dict(self) -> dict[str, Any]:
        return {"ran": self.ran, "version": self.version, "reason": self.reason,
                "graphs": [g.to_dict() for g in self.graphs], "warnings": self.warnings}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "RtxCheck":
        if not isinstance(d, dict):
            raise ArtifactFormatError(f"{where}: not a JSON object")
        return cls(ran=_read(d, "ran", bool, where),
                   version=_read(d, "version", str, where, optional=True),
                   reason=_read(d, "reason", str, where),
                   graphs=[RtxGraphBuild.from_dict(g, f"{where}.graphs[{i}]")
                           for i, g in enumerate(_read(d, "graphs", list, where))],
                   warnings=_read(d, "warnings", dict, where))


@dataclass
class Report:
    """report.json: the parity verdicts and how the export went."""
    precisions: dict[str, PrecisionResult]  # of the default-flavour files
    task_metrics: dict[str, Any]
    validation_data: dict[str, Any]
    next_commands: list[str] = field(default_factory=list)
    stages: list[dict[str, Any]] = field(default_factory=list)
    lint_warnings: list[str] = field(default_factory=list)
    skipped_videos: list[Any] = field(default_factory=list)
    total_seconds: float = 0.0
    # flavour -> precision -> result, for the flavours beyond the default (the trt8 files)
    flavours: dict[str, dict[str, PrecisionResult]] = field(default_factory=dict)
    # The split graphs composed, per precision label ('fp16', 'fp16.trt8' for the trt8 twins),
    # against the same reference and gates.
    split: dict[str, PrecisionResult] = field(default_factory=dict)
    # Per validation runner (onnx-fp32, split-fp32, ...): graph executions, rows, seconds.
    validation_runs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # TensorRT-RTX's parser and CPU build of every shipped graph (None: an older report)
    rtx: RtxCheck | None = None

    def result(self, precision: str, flavour: str = DEFAULT_FLAVOUR) -> PrecisionResult | None:
        return (self.precisions if flavour == DEFAULT_FLAVOUR
                else self.flavours.get(flavour, {})).get(precision)

    def results(self) -> list[tuple[str, str, PrecisionResult]]:
        """(precision, flavour, result) of every file judged, the default flavour first."""
        return ([(p, DEFAULT_FLAVOUR, r) for p, r in self.precisions.items()]
                + [(p, fl, r) for fl, by_p in self.flavours.items() for p, r in by_p.items()])

    @property
    def failed(self) -> list[str]:
        """What failed its gates, for messages: 'fp16', 'fp16 (trt8)' for another flavour,
        'fp16 (split)' / 'fp16.trt8 (split)' for the split graphs composed."""
        return ([p if fl == DEFAULT_FLAVOUR else f"{p} ({fl})"
                 for p, fl, r in self.results() if not r.passed]
                + [f"{p} (split)" for p, r in self.split.items() if not r.passed])

    def to_dict(self) -> dict[str, Any]:
        return {"format": "twbert-export-report", "format_version": FORMAT_VERSION,
                "precisions": {p: r.to_dict() for p, r in self.precisions.items()},
                "task_metrics": self.task_metrics, "next_commands": self.next_commands,
                "stages": self.stages, "lint_warnings": self.lint_warnings,
                "validation_data": self.validation_data, "skipped_videos": self.skipped_videos,
                "total_seconds": self.total_seconds,
                "flavours": {fl: {p: r.to_dict() for p, r in by_p.items()}
                             for fl, by_p in self.flavours.items()},
                **({"split": {p: r.to_dict() for p, r in self.split.items()},
                    "validation_runs": self.validation_runs} if self.split else {}),
                **({"rtx": self.rtx.to_dict()} if self.rtx else {})}

    @classmethod
    def from_dict(cls, d: Any, where: str = REPORT_FILE) -> "Report":
        _check_format(d, where, "twbert-export-report")
        precisions = _read(d, "precisions", dict, where)
        flavours = _read(d, "flavours", dict, where, optional=True) or {}
        return cls(
            precisions={p: PrecisionResult.from_dict(r, f"{where} precisions.{p}")
                        for p, r in precisions.items()},
            flavours={fl: {p: PrecisionResult.from_dict(r, f"{where} flavours.{fl}.{p}")
                           for p, r in _read(flavours, fl, dict, where).items()}
                      for fl in flavours},
            task_metrics=_read(d, "task_metrics", dict, where),
            validation_data=_read(d, "validation_data", dict, where),
            next_commands=_read(d, "next_commands", list, where),
            stages=_read(d, "stages", list, where),
            lint_warnings=_read(d, "lint_warnings", list, where),
            skipped_videos=_read(d, "skipped_videos", list, where),
            total_seconds=_read(d, "total_seconds", (int, float), where),
            split={p: PrecisionResult.from_dict(r, f"{where} split.{p}")
                   for p, r in (_read(d, "split", dict, where, optional=True) or {}).items()},
            validation_runs=_read(d, "validation_runs", dict, where, optional=True) or {},
            rtx=(RtxCheck.from_dict(d["rtx"], f"{where} rtx") if d.get("rtx") is not None
                 else None))

    @classmethod
    def load(cls, directory: str | Path) -> "Report":
        path = Path(directory) / REPORT_FILE
        return cls.from_dict(_load_json(path), str(path))

    def write(self, directory: str | Path) -> Path:
        return write_json(Path(directory) / REPORT_FILE, self.to_dict())


def label(precision: str, flavour: str) -> str:
    """'fp16', or 'fp16.trt8' for another flavour: how a result is named in lines and metrics."""
    return precision if flavour == DEFAULT_FLAVOUR else f"{precision}.{flavour}"
