"""What the export's stages hand each other: the options, the inputs checked, the checkpoint
loaded, the files converted (by graph, precision and flavour), the validation's results, and the
stage log that prints one line per stage."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..artifact.contract import BatchRange, IOContract
from ..artifact.manifest import DEFAULT_FLAVOUR, SPLIT_GRAPHS
from ..artifact.plan import Plan
from ..data.preprocess import Tokenizer
from ..util import current_rss_gb, human_size, stage_peak_rss_gb

# Which graphs an artifact holds (--graphs): the whole model, and beside it the four split graphs
# (`split.py`, docs/split.md) unless asked for the whole model alone.
GRAPH_SETS = ("both", "monolithic")
# Where the split graphs' calibration rows wait between precision steps, inside the scratch
# directory of the artifact (removed with it when a run stops).
SPLIT_FEEDS_DIR = ".split-feeds"


@dataclass
class ExportOptions:
    ckpt: str = "demo"
    precisions: tuple[str, ...] = ("fp16",)
    # A precision per split graph (artifact/plan.py), 'video_stem=int8,text=fp16,...': replaces
    # `precisions`.
    plan: str | None = None
    task: str = "retrieval"
    schedule: str | None = None
    batch: str = "1:1:8"
    max_text_len: int | None = None
    calib_data: str = "demo:calib"
    calib_method: str = "max"
    val_data: str = "demo"
    out: str | None = None
    force: bool = False
    tokenizer: str | None = None
    trust_checkpoint: bool = False
    on_error: str = "fail"
    gates: dict[str, Any] = field(default_factory=dict)
    val_limit: int | None = None
    calib_cache: bool = True
    graphs: str = "both"
    rtx_engines: bool = False  # keep the TensorRT-RTX engines of the rtx stage (trt/rtx.py)
    # The rtx stage (NVIDIA's parser and CPU builder on every graph). The command line always
    # runs it; library callers whose subject is elsewhere (the serving tests' artifact) may not.
    rtx_check: bool = True


class StageLog:
    """One line per stage: number, name, artifact, size, seconds."""

    def __init__(self, total: int, stream=None):
        # None: sys.stdout as it is when a line prints (not the one bound at import, which a
        # test's captured output may have closed since)
        self.total, self.done, self.stream = total, 0, stream
        self.rows: list[dict[str, Any]] = []

    def line(self, name: str, seconds: float, path: Path | None = None, note: str = "",
             written: Path | None = None) -> None:
        """`path` is where the file will be; `written` where it is now, if elsewhere (the
        artifact is assembled aside), for its size."""
        self.done += 1
        written = written or path
        size = human_size(written.stat().st_size) if written and written.is_file() else ""
        shown = _relative(path) if path else ""
        print(f"[{self.done}/{self.total}] {name:<10} {shown:<44} {size:>9} {seconds:7.1f}s"
              f"{'  ' + note if note else ''}", file=self.stream or sys.stdout, flush=True)
        self.rows.append({"stage": name, "path": shown, "size": size, "seconds": seconds,
                          "note": note, "peak_rss_gb": stage_peak_rss_gb(),
                          "rss_after_gb": current_rss_gb()})


def _relative(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class Inputs:
    """The options resolved and checked before anything runs."""
    precisions: list[str]  # in PRECISIONS order, fp32 first
    ckpt_path: Path
    val_dir: Path
    calib_dir: Path | None
    batch: BatchRange
    tokenizer: Tokenizer
    plan: Plan | None = None  # a precision per split graph, or None: every graph in each precision


@dataclass
class Loaded:
    """The checkpoint, parsed once, and the I/O contract the export follows."""
    ckpt_path: Path
    model: Any  # model.TWBert; its weights are moved to `meta` after the export stage
    config: Any  # model.TWBertConfig
    load_report: Any  # model.LoadReport
    contract: IOContract
    ckpt_stat: tuple[int, int]  # (size, mtime_ns) of the file as loaded
    graph_contracts: dict[str, IOContract] = field(default_factory=dict)  # split graphs, if any

    @property
    def answers(self) -> list[str] | None:
        return self.load_report.metadata.get("answers") if self.contract.task == "qa" else None


@dataclass
class Conversion:
    """The ONNX files of an artifact, by (graph, precision), and the precision steps' reports.
    `files` are the default flavour's; `twins` the other flavours' (flavour -> (graph,
    precision) -> file), converted from them."""
    files: dict[tuple[str, str], Path] = field(default_factory=dict)
    reports: dict[str, dict[str, Any]] = field(default_factory=dict)  # precision -> step report
    twins: dict[str, dict[tuple[str, str], Path]] = field(default_factory=dict)
    # (graph, precision) -> step report of each split graph
    graph_reports: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    # Calibration rows of each split graph (split.graph_feeds), made once from the FP32 graphs,
    # and the folder of their memory-mapped arrays (inside the artifact's scratch directory).
    split_feeds: dict[str, Any] | None = None
    split_feeds_dir: Path | None = None
    plan: Plan | None = None  # which graph each precision step converts (None: every graph)

    def drop_split_feeds(self) -> None:
        """The precision steps are done with the split graphs' calibration rows: forget them
        and remove their files (before the artifact is moved into place)."""
        self.split_feeds = None
        if self.split_feeds_dir is not None:
            shutil.rmtree(self.split_feeds_dir, ignore_errors=True)
            self.split_feeds_dir = None

    def needs(self, graph: str, precision: str) -> bool:
        return self.plan is None or self.plan.needs(graph, precision)

    def of(self, graph: str, flavour: str = DEFAULT_FLAVOUR) -> dict[str, Path]:
        """precision -> file of one graph in one flavour."""
        files = self.files if flavour == DEFAULT_FLAVOUR else self.twins.get(flavour, {})
        return {p: f for (g, p), f in files.items() if g == graph}

    def entries(self) -> list[tuple[str, str, str, Path]]:
        """(graph, precision, flavour, file) of every file, the default flavour first."""
        return ([(g, p, DEFAULT_FLAVOUR, f) for (g, p), f in self.files.items()]
                + [(g, p, fl, f) for fl, files in self.twins.items()
                   for (g, p), f in files.items()])

    def split_files(self, precision: str, flavour: str = DEFAULT_FLAVOUR
                    ) -> dict[str, Path] | None:
        """graph -> file of the split graphs at one precision in one flavour, None without
        split graphs."""
        files = self.files if flavour == DEFAULT_FLAVOUR else self.twins.get(flavour, {})
        files = {g: files[(g, precision)] for g in SPLIT_GRAPHS if (g, precision) in files}
        return files if len(files) == len(SPLIT_GRAPHS) else None

    def plan_files(self, plan: Plan, flavour: str = DEFAULT_FLAVOUR) -> dict[str, Path] | None:
        """graph -> file of the split graphs of a plan in one flavour; None when a graph has no
        file in that flavour (int8w has no TensorRT 8.x twin: `legacy.NO_TWIN`)."""
        files = self.files if flavour == DEFAULT_FLAVOUR else self.twins.get(flavour, {})
        if any((g, p) not in files for g, p in plan.graphs):
            return None
        return {g: files[(g, p)] for g, p in plan.graphs}


@dataclass
class Validation:
    # (precision, flavour) -> validate.compare_precision's result
    results: dict[tuple[str, str], dict[str, Any]]
    metrics: dict[str, Any]
    # (precision or plan name, flavour) -> the split graphs' result, composed
    split: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)  # runner -> runs, seconds

    def of(self, flavour: str) -> dict[str, dict[str, Any]]:
        """precision -> result, one flavour."""
        return {p: r for (p, fl), r in self.results.items() if fl == flavour}
