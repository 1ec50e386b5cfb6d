"""Checkpoints: our export format, and the authors' training files.

Our format ("twbert-export") carries everything needed to rebuild the model: the config, the
weights and free-form JSON metadata.
  - `.pt` / `.pth`: `torch.save` of a plain dict {"format", "format_version", "config",
    "state_dict", "metadata"}; it loads with `torch.load(weights_only=True)`.
  - `.safetensors`: the weights, with format, version, config and metadata as JSON strings in
    the file's metadata header.

The authors' training checkpoints store the weights of their modules under their names
(`visual_encoder.model.` for TimeSformer and the selectors, `text_encoder.bert.` (retrieval) or
`text_encoder.` (QA) for BERT, `crossmodal_encoder.`, the heads at the top level), next to
training-only state (momentum copies `*_m.*`, queues, the MLM head), which is skipped. `AUTHORS_NAME_MAP` is
the one place their names are translated to ours; `_skip_reason` says which of their tensors we
drop and why. Loading never prints: `load_checkpoint` returns a `LoadReport`.

This module is tooling, not network definition: it may use safetensors (imported lazily, so that
`import model` needs only torch) and the project's one atomic writer,
`twbert_export.util.atomic_path` (a module of the standard library only).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from twbert_export.util import atomic_path  # standard library only: the one atomic writer

from .config import AUTHORS_SELECT_RATIO, TWBertConfig, authors_schedule, schedule_for_frames
from .twbert import TEMPERATURE_RANGE, TWBert

FORMAT_NAME = "twbert-export"
FORMAT_VERSION = 1
TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIX = ".safetensors"
# Longest name list an error message or summary spells out before it says "... and N more".
LIST_LIMIT = 20

CheckpointFormat = Literal["twbert-export", "authors-retrieval", "authors-qa"]
AuthorsLayout = Literal["retrieval", "qa"]

# The text encoder is `BertForMaskedLM` (weights under `.bert.`) in the retrieval model and a bare
# `BertModel` in the QA model.
AUTHORS_TEXT_PREFIX: dict[str, str] = {"retrieval": "text_encoder.bert.", "qa": "text_encoder."}

# Authors' name -> our name, for modules (".weight" / ".bias" follow) and bare parameters.
# "{i}" / "{s}" stand for a block / selector number; "<text>." for the layout's text prefix.
AUTHORS_NAME_MAP: tuple[tuple[str, str], ...] = (
    # TimeSformer: divided space-time blocks (temporal attention first, then spatial, then MLP)
    ("visual_encoder.model.patch_embed.proj", "video.patch_embed"),
    ("visual_encoder.model.cls_token", "video.cls_token"),
    ("visual_encoder.model.pos_embed", "video.pos_embed"),
    ("visual_encoder.model.time_embed", "video.time_embed"),
    ("visual_encoder.model.blocks.{i}.temporal_norm1", "video.blocks.{i}.temporal_norm"),
    ("visual_encoder.model.blocks.{i}.temporal_attn.qkv", "video.blocks.{i}.temporal_attn.qkv"),
    ("visual_encoder.model.blocks.{i}.temporal_attn.proj", "video.blocks.{i}.temporal_attn.proj"),
    ("visual_encoder.model.blocks.{i}.temporal_fc", "video.blocks.{i}.temporal_fc"),
    ("visual_encoder.model.blocks.{i}.norm1", "video.blocks.{i}.spatial_norm"),
    ("visual_encoder.model.blocks.{i}.attn.qkv", "video.blocks.{i}.spatial_attn.qkv"),
    ("visual_encoder.model.blocks.{i}.attn.proj", "video.blocks.{i}.spatial_attn.proj"),
    ("visual_encoder.model.blocks.{i}.norm2", "video.blocks.{i}.mlp_norm"),
    ("visual_encoder.model.blocks.{i}.mlp.fc1", "video.blocks.{i}.mlp.fc1"),
    ("visual_encoder.model.blocks.{i}.mlp.fc2", "video.blocks.{i}.mlp.fc2"),
    ("visual_encoder.model.norm", "video.norm"),
    # Frame selectors: PredictorLG's Sequential slots, in_conv = (LayerNorm, Linear),
    # out_conv = (Linear, GELU, Linear)
    ("visual_encoder.model.visual_token_selector{s}.score_predictor.in_conv.0", "selector{s}.scorer.norm"),
    ("visual_encoder.model.visual_token_selector{s}.score_predictor.in_conv.1",
     "selector{s}.scorer.frame_proj"),
    ("visual_encoder.model.visual_token_selector{s}.score_predictor.out_conv.0",
     "selector{s}.scorer.fuse_proj"),
    ("visual_encoder.model.visual_token_selector{s}.score_predictor.out_conv.2",
     "selector{s}.scorer.score_out"),
    # BERT text encoder, Hugging Face names (only its first six layers are the text path)
    ("<text>.embeddings.word_embeddings", "text.embeddings.word"),
    ("<text>.embeddings.position_embeddings", "text.embeddings.position"),
    ("<text>.embeddings.token_type_embeddings", "text.embeddings.token_type"),
    ("<text>.embeddings.LayerNorm", "text.embeddings.norm"),
    ("<text>.encoder.layer.{i}.attention.self.query", "text.layers.{i}.q_proj"),
    ("<text>.encoder.layer.{i}.attention.self.key", "text.layers.{i}.k_proj"),
    ("<text>.encoder.layer.{i}.attention.self.value", "text.layers.{i}.v_proj"),
    ("<text>.encoder.layer.{i}.attention.output.dense", "text.layers.{i}.attn_out"),
    ("<text>.encoder.layer.{i}.attention.output.LayerNorm", "text.layers.{i}.attn_norm"),
    ("<text>.encoder.layer.{i}.intermediate.dense", "text.layers.{i}.ffn_in"),
    ("<text>.encoder.layer.{i}.output.dense", "text.layers.{i}.ffn_out"),
    ("<text>.encoder.layer.{i}.output.LayerNorm", "text.layers.{i}.ffn_norm"),
    # Cross-modal encoder: `linears[0..7]` by role (the table in model/cross.py)
    ("crossmodal_encoder.layers.{i}.self_attn.linears.0", "cross.layers.{i}.attn.shared_q"),
    ("crossmodal_encoder.layers.{i}.self_attn.linears.1", "cross.layers.{i}.attn.shared_k"),
    ("crossmodal_encoder.layers.{i}.self_attn.linears.2", "cross.layers.{i}.attn.shared_v"),
    ("crossmodal_encoder.layers.{i}.self_attn.linears.3", "cross.layers.{i}.attn.word_q"),
    ("crossmodal_encoder.layers.{i}.self_attn.linears.4", "cross.layers.{i}.attn.word_k"),
    ("crossmodal_encoder.layers.{i}.self_attn.linears.5", "cross.layers.{i}.attn.word_v"),
    ("crossmodal_encoder.layers.{i}.self_attn.linears.6", "cross.layers.{i}.attn.stream_out"),
    ("crossmodal_encoder.layers.{i}.self_attn.linears.7", "cross.layers.{i}.attn.frame_out"),
    ("crossmodal_encoder.layers.{i}.self_attn.norm", "cross.layers.{i}.attn.trajectory_norm"),
    # SublayerConnection 0 wraps the attention, 1 the FFN; each holds its pre-norm.
    ("crossmodal_encoder.layers.{i}.sublayer.0.norm", "cross.layers.{i}.attn_norm"),
    ("crossmodal_encoder.layers.{i}.sublayer.1.norm", "cross.layers.{i}.ffn_norm"),
    ("crossmodal_encoder.layers.{i}.feed_forward.w_1", "cross.layers.{i}.ffn_in"),
    ("crossmodal_encoder.layers.{i}.feed_forward.w_2", "cross.layers.{i}.ffn_out"),
    ("crossmodal_encoder.norm", "cross.norm"),
    # Heads: ITC projections, ITM, the ITC temperature; the QA classifier is
    # Sequential(Linear, ReLU, Linear).
    ("vision_proj", "vision_proj"),
    ("text_proj", "text_proj"),
    ("itm_head", "itm_head"),
    ("temp", "temp"),
    ("classifier.0", "qa_head.fc1"),
    ("classifier.2", "qa_head.fc2"),
)

SKIP_MOMENTUM = "momentum copy (training-only: targets of the distilled ITC loss)"
SKIP_QUEUE = "ITC feature queue (training-only)"
SKIP_MLM_HEAD = "masked-language-model head (pre-training only)"
SKIP_HF_BUFFER = "Hugging Face index buffer (our embeddings compute positions themselves)"
SKIP_POOLER = "BERT pooler (not used by TW-BERT)"
SKIP_VIT_HEAD = "TimeSformer classification head (not used by TW-BERT)"
SKIP_TEXT_LAYERS = ("BERT layers past the text encoder's first {layers} (unused by the text path; "
                    "they only initialised the cross-modal encoder)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is refused, or does not fit the model."""


@dataclass
class LoadReport:
    """What `load_checkpoint` did. Names of tensors found in the file (skipped, unexpected,
    mismatched) are the file's names; missing ones are our model's names."""

    path: str
    format: CheckpointFormat
    loaded: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # Which frame schedule the model got and why, e.g. "F@8-6-4 from the checkpoint's 8-frame
    # time table" (the export prints it on its load line).
    schedule_reason: str = ""

    @property
    def complete(self) -> bool:
        """Every weight of the model came from the file and nothing in it was left unexplained."""
        return not (self.missing or self.unexpected or self.mismatched)

    def skipped_by_reason(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name, reason in self.skipped:
            groups.setdefault(reason, []).append(name)
        return groups

    def summary(self) -> str:
        lines = [f"{self.path}: {self.format} checkpoint, {self.loaded} tensors loaded"]
        if self.schedule_reason:
            lines.append(f"schedule: {self.schedule_reason}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} tensors:")
            for reason, names in self.skipped_by_reason().items():
                lines.append(f"  {len(names)} {reason}, e.g. {names[0]}")
        lines += _problem_lines(self, str)
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# -- saving ---------------------------------------------------------------------------------------
def save_checkpoint(model: TWBert, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
                    overwrite: bool = False) -> Path:
    """Write `model` (config + weights + JSON `metadata`) to a `.pt` or `.safetensors` file.

    The file appears whole or not at all (`atomic_path`: a temporary file in the same directory,
    flushed to disk, then `os.replace`). An existing file is only replaced with `overwrite=True`. Returns the path.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(f"checkpoint path {path} must end in .pt, .pth or .safetensors")
    metadata = _plain_json(dict(metadata or {}), "metadata")
    config = _plain_json(model.cfg.to_dict(), "model config")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path ending in {suffix or '.pt'}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    # CPU, contiguous copies: a file written from a GPU model loads on a CPU-only machine.
    state_dict = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}

    if suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file  # lazy: the network modules need only torch

        header = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                  "config": json.dumps(config), "metadata": json.dumps(metadata)}
        with atomic_path(path) as tmp:
            save_file(state_dict, str(tmp), metadata=header)
    else:
        payload = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config,
                   "state_dict": state_dict, "metadata": metadata}
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
    return path


def _plain_json(value: dict[str, Any], what: str) -> dict[str, Any]:
    """A JSON round trip: proves `value` is JSON-able and leaves only plain types (tuples become
    lists), which `torch.load(weights_only=True)` and the safetensors header both accept."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable: {e}") from None


# -- loading --------------------------------------------------------------------------------------
def load_checkpoint(path: str | os.PathLike, *, preset: str | None = None, schedule: str | None = None,
                    select_layers: str | tuple[int, int] | None = None, strict: bool = True,
                    trust_pickle: bool = False, map_location: str | torch.device = "cpu"
                    ) -> tuple[TWBert, LoadReport]:
    """Build a TWBert from our checkpoint or the authors' training checkpoint; eval mode.

    Our files carry their config; `schedule` / `select_layers` may change the frame schedule,
    since no weight depends on it (only whether selectors exist does). The authors' files carry
    no usable config: it is `preset` (default "base") with the values the tensors' shapes fix
    (answer count, time-embedding length, vocabulary and positions), and without `schedule` the
    schedule the authors' code gives the frame count their time table was trained with
    (`config.authors_schedule`: keep int(T * 0.72), then int(K1 * 0.72)).
    `report.schedule_reason` says which schedule was chosen and why.

    The ITC temperature is used as stored (as the authors do at inference); a stored value
    outside TEMPERATURE_RANGE is clamped into it, with a warning and a note in the report.

    strict=True raises CheckpointError on missing, unexpected or mis-shaped tensors; strict=False
    loads what fits and lists the rest in the report. Files that need full unpickling are refused
    unless `trust_pickle=True`. The model is returned on `map_location`.
    """
    path = Path(path)
    contents, header = _read_checkpoint_file(path, trust_pickle)
    if header is not None and header.get("format") == FORMAT_NAME:
        model, report = _load_export(path, _export_from_safetensors(path, contents, header),
                                     preset, schedule, select_layers, strict)
    elif isinstance(contents, dict) and isinstance(contents.get("format"), str) \
            and contents["format"] == FORMAT_NAME:
        model, report = _load_export(path, contents, preset, schedule, select_layers, strict)
    else:
        model, report = _load_authors(path, contents, preset, schedule, select_layers, strict)
    _check_temperature(model, report)
    return model.to(map_location).eval(), report


def _check_temperature(model: TWBert, report: LoadReport) -> None:
    stored = model.temp.item()
    if not torch.isfinite(model.temp):
        raise CheckpointError(f"{report.path} stores a non-finite ITC temperature ({stored})")
    if model.clamp_temperature_():
        low, high = TEMPERATURE_RANGE
        message = (f"{report.path}: ITC temperature {stored:g} is outside [{low:g}, {high:g}], the "
                   f"range the authors' training keeps it in; using {model.temp.item():g}")
        report.notes.append(message)
        # Python shows a warning once per message and line: loading the file again stays quiet.
        warnings.warn(message)


def _read_checkpoint_file(path: Path, trust_pickle: bool) -> tuple[Any, dict[str, str] | None]:
    """-> (contents, safetensors header or None). Contents is whatever the file holds."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return _read_safetensors(path)
    if path.stat().st_size == 0:
        raise _unreadable(path, "the file is empty")
    return _read_torch_file(path, trust_pickle), None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open  # lazy: the network modules need only torch

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # safetensors raises its own error type for every kind of damage
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or not a "
                              f"safetensors file): {_short_reason(e)}") from None
    return tensors, header


def _read_torch_file(path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused_global(str(e))
        if refused is None:
            raise _unreadable(path, _short_reason(e)) from None
        name, blocked_module = refused
        if not trust_pickle:
            what = (f"it calls {name}, from module {blocked_module}, which PyTorch's safe loader "
                    "blocks outright" if blocked_module else
                    f"it stores an object of class {name}")
            raise CheckpointError(
                f"{path} was blocked: it needs full unpickling ({what}), which can run arbitrary "
                "code. Refusing to load it. If you trust where the file comes from, pass "
                "--trust-checkpoint (Python: trust_pickle=True); never for files from unknown "
                "sources.") from None
    except Exception as e:  # damaged files surface as RuntimeError, EOFError, KeyError, ...
        raise _unreadable(path, _short_reason(e)) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as e:
        raise CheckpointError(f"{path} stores objects of a class that cannot be imported here "
                              f"({_short_reason(e)})") from None
    except Exception as e:
        raise _unreadable(path, _short_reason(e)) from None


def _refused_global(message: str) -> tuple[str, str | None] | None:
    """(name, blocked module or None) of what a weights-only load refused; None for other
    failures such as a text file's "Unsupported operand". Wordings: "Unsupported global: GLOBAL
    argparse.Namespace was not an allowed global" (torch 2.4+), "Unsupported class
    argparse.Namespace" (earlier), and for modules torch never allows (os, subprocess, ...)
    "Trying to load unsupported GLOBAL posix.system whose module posix is blocked" (torch 2.6+)."""
    match = re.search(r"unsupported GLOBAL ([\w.]+) whose module ([\w.]+) is blocked", message,
                      re.IGNORECASE)
    if match:
        return match.group(1), match.group(2)
    match = re.search(r"Unsupported (?:global|class):?\s+(?:GLOBAL\s+)?([\w.]+)", message)
    return (match.group(1), None) if match else None


def _unreadable(path: Path, reason: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a readable PyTorch checkpoint (truncated or not a "
                           f"checkpoint file): {reason}")


def _short_reason(e: BaseException) -> str:
    """One line of an exception: torch's messages run to paragraphs of advice."""
    if isinstance(e, EOFError):
        return "the file ends early"
    text = str(e).strip()
    text = text.split("WeightsUnpickler error:", 1)[-1].strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    if not first or isinstance(e, KeyError):  # a bare KeyError says only the key
        return f"unpickling failed ({type(e).__name__} {first})".replace(" )", ")")
    return first[:200]


# -- our format -----------------------------------------------------------------------------------
def _export_from_safetensors(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]
                             ) -> dict[str, Any]:
    try:
        return {"format": FORMAT_NAME, "format_version": int(header.get("format_version", "0")),
                "config": json.loads(header["config"]), "state_dict": tensors,
                "metadata": json.loads(header.get("metadata", "{}"))}
    except KeyError as e:
        raise CheckpointError(f"{path} has a damaged {FORMAT_NAME} header: no {e} entry") from None
    except ValueError as e:  # a bad version number or JSON
        raise CheckpointError(f"{path} has a damaged {FORMAT_NAME} header: {e}") from None


def _load_export(path: Path, contents: dict[str, Any], preset: str | None, schedule: str | None,
                 select_layers: str | tuple[int, int] | None, strict: bool
                 ) -> tuple[TWBert, LoadReport]:
    version = contents.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} is {FORMAT_NAME} format version {version!r}; this code "
                              f"reads version {FORMAT_VERSION}")
    state_dict = contents.get("state_dict")
    if not _is_state_dict(state_dict):
        raise CheckpointError(f"{path} has no state_dict of named tensors")
    try:
        cfg = TWBertConfig.from_dict(contents.get("config"))
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} has an invalid model config: {e}") from None
    trained = cfg.selector.schedule
    cfg = _override_schedule(path, cfg, schedule, select_layers)
    metadata = contents.get("metadata") or {}
    report = LoadReport(path=str(path), format=FORMAT_NAME,
                        metadata=dict(metadata) if isinstance(metadata, dict) else {"value": metadata})
    report.schedule_reason = (f"F@{trained}, the checkpoint's own" if schedule is None else
                              f"F@{cfg.selector.schedule} as requested (trained at F@{trained})")
    if preset is not None:
        report.notes.append(f"preset {preset!r} ignored: the file carries its own config")
    model = TWBert(cfg)
    _apply_state_dict(model, {name: (name, t) for name, t in state_dict.items()}, report, strict,
                      file_name_of=lambda name: name)
    return model, report


def _override_schedule(path: Path, cfg: TWBertConfig, schedule: str | None,
                       select_layers: str | tuple[int, int] | None) -> TWBertConfig:
    if schedule is None and select_layers is None:
        return cfg
    try:
        return cfg.with_schedule(schedule or cfg.selector.schedule, select_layers)
    except ValueError as e:
        raise CheckpointError(f"the frame schedule does not fit the model in {path}: {e}") from None


# -- the authors' format --------------------------------------------------------------------------
def _load_authors(path: Path, contents: Any, preset: str | None, schedule: str | None,
                  select_layers: str | tuple[int, int] | None, strict: bool
                  ) -> tuple[TWBert, LoadReport]:
    state_dict, extras = _unwrap_state_dict(path, contents)
    layout = _detect_layout(path, state_dict)
    cfg, schedule_reason = _authors_config(path, state_dict, layout, preset, schedule, select_layers)
    report = LoadReport(path=str(path), format=f"authors-{layout}", metadata=extras,
                        schedule_reason=schedule_reason)
    model = TWBert(cfg)
    renamed: dict[str, tuple[str, torch.Tensor]] = {}
    for name, tensor in state_dict.items():
        reason = _skip_reason(name, layout, cfg.text.layers)
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        ours = _authors_to_ours(name, layout)
        if ours is None:
            report.unexpected.append(name)
        else:
            renamed[ours] = (name, tensor)
    _apply_state_dict(model, renamed, report, strict,
                      file_name_of=lambda ours: _ours_to_authors(ours, layout) or ours)
    return model, report


def _unwrap_state_dict(path: Path, contents: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A raw state dict, or a training checkpoint holding it under "model" / "state_dict".
    Returns it (without a DDP "module." prefix) and a JSON-able account of the other entries."""
    extras: dict[str, Any] = {}
    state_dict = contents
    if isinstance(contents, dict) and not _is_state_dict(contents):
        key = next((k for k in ("model", "state_dict") if k in contents), None)
        state_dict = contents.get(key) if key else None
        if isinstance(state_dict, torch.nn.Module):  # a whole pickled model (trusted files only)
            state_dict = state_dict.state_dict()
        # Scalars such as the epoch go to the report; larger entries (optimizer, config) by name.
        for k, value in contents.items():
            if k == key:
                continue
            if isinstance(value, (int, float, str, bool)):
                extras[str(k)] = value
            else:
                extras.setdefault("other_entries", []).append(str(k))
    if not _is_state_dict(state_dict):
        found = (f"entries {_listing(sorted(map(str, contents)))}" if isinstance(contents, dict)
                 else f"a {type(contents).__name__}")
        raise CheckpointError(f"{path} holds no TW-BERT state dict (a dict of named tensors, raw or "
                              f"under 'model' / 'state_dict'); found {found}")
    if all(name.startswith("module.") for name in state_dict):  # saved from a DDP wrapper
        state_dict = {name[len("module."):]: t for name, t in state_dict.items()}
    return dict(state_dict), extras


def _is_state_dict(value: Any) -> bool:
    return (isinstance(value, dict) and len(value) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()))


def _detect_layout(path: Path, state_dict: dict[str, torch.Tensor]) -> AuthorsLayout:
    if any(name.startswith(AUTHORS_TEXT_PREFIX["retrieval"]) for name in state_dict):
        return "retrieval"
    if any(name.startswith(AUTHORS_TEXT_PREFIX["qa"]) for name in state_dict):
        return "qa"
    sample = sorted(state_dict)[:5]
    raise CheckpointError(f"{path} is neither a {FORMAT_NAME} file nor an authors' TW-BERT "
                          f"checkpoint (no 'text_encoder.' tensors); first names: {sample}")


# How the load line names the authors' own schedule rule (`config.authors_schedule`).
AUTHORS_RULE = (f"the authors' rule (keep int(T*{AUTHORS_SELECT_RATIO}), then "
                f"int(K1*{AUTHORS_SELECT_RATIO}): their select_ratio)")


def _authors_config(path: Path, state_dict: dict[str, torch.Tensor], layout: AuthorsLayout,
                    preset: str | None, schedule: str | None,
                    select_layers: str | tuple[int, int] | None) -> tuple[TWBertConfig, str]:
    """The preset, corrected by the sizes the file's tensors fix, and why it has its schedule.

    The authors size the time table by the frame count they train with (TimeSformer's
    `num_frames`, set from their `num_frm`), so without `schedule` its length is T, the
    selector weights say whether there is selection, and the frames kept are those their code
    keeps (`config.authors_schedule`: select_ratio 0.72), not the paper's table."""
    text = AUTHORS_TEXT_PREFIX[layout]

    def rows(name: str) -> int | None:
        tensor = state_dict.get(name)
        return None if tensor is None or tensor.ndim == 0 else tensor.shape[0]

    def frames(name: str) -> int | None:
        tensor = state_dict.get(name)
        return tensor.shape[1] if tensor is not None and tensor.ndim == 3 else None

    time_table_frames = frames("visual_encoder.model.time_embed")
    preset = preset or "base"
    requested = schedule is not None
    has_selectors = any(_is_selector_name(name) for name in state_dict)
    try:
        if not requested:
            # Their rule (`authors_schedule`), on the frames their time table was trained with,
            # else on the preset's frame count.
            frames_trained = time_table_frames or TWBertConfig.preset(preset).selector.frames
            schedule = authors_schedule(frames_trained, has_selectors)
        cfg = TWBertConfig.preset(preset, schedule, select_layers)
        inferred_text = {"vocab_size": rows(f"{text}embeddings.word_embeddings.weight"),
                         "max_positions": rows(f"{text}embeddings.position_embeddings.weight"),
                         "type_vocab_size": rows(f"{text}embeddings.token_type_embeddings.weight")}
        inferred_video = {"time_embed_frames": time_table_frames}
        cfg = dataclasses.replace(
            cfg,
            text=dataclasses.replace(cfg.text, **{k: v for k, v in inferred_text.items() if v}),
            video=dataclasses.replace(cfg.video, **{k: v for k, v in inferred_video.items() if v}),
            num_answers=rows("classifier.2.weight") or 0,
        )
    except ValueError as e:
        raise CheckpointError(f"cannot build the model for {path}: {e}") from None
    chosen = f"F@{cfg.selector.schedule}"
    if requested:
        reason = f"{chosen} as requested"
        if time_table_frames and time_table_frames != cfg.selector.frames:
            reason += f" (the checkpoint's {time_table_frames}-frame time table is interpolated)"
    elif time_table_frames:
        reason = f"{chosen} from the checkpoint's {time_table_frames}-frame time table"
        if not has_selectors:
            reason += " and its lack of frame-selector weights"
        else:
            reason += ", by " + AUTHORS_RULE
    else:
        reason = (f"{chosen}, the {preset} preset's frame count (the checkpoint has no time "
                  "table)" + (", by " + AUTHORS_RULE if has_selectors else ""))
    return cfg, reason


def _skip_reason(name: str, layout: AuthorsLayout, text_layers: int) -> str | None:
    """Why an authors' tensor is deliberately dropped, or None if it is not."""
    top = name.split(".", 1)[0]
    text = AUTHORS_TEXT_PREFIX[layout]
    if top.endswith("_m"):  # visual_encoder_m, text_encoder_m, vision_proj_m, text_proj_m
        return SKIP_MOMENTUM
    if top.endswith("_queue") or top == "queue_ptr":
        return SKIP_QUEUE
    if name.startswith("text_encoder.cls."):
        return SKIP_MLM_HEAD
    if name in (f"{text}embeddings.position_ids", f"{text}embeddings.token_type_ids"):
        return SKIP_HF_BUFFER
    if name.startswith(f"{text}pooler."):
        return SKIP_POOLER
    if name.startswith("visual_encoder.model.head."):
        return SKIP_VIT_HEAD
    layer = re.match(re.escape(f"{text}encoder.layer.") + r"(\d+)\.", name)
    if layer and int(layer.group(1)) >= text_layers:
        return SKIP_TEXT_LAYERS.format(layers=text_layers)
    return None


def _template_regex(template: str) -> re.Pattern[str]:
    """'blocks.{i}.norm1' -> a regex with a named group per placeholder and an optional
    '.weight' / '.bias' tail."""
    pattern, pos = "", 0
    for placeholder in re.finditer(r"\{(\w+)\}", template):
        pattern += re.escape(template[pos:placeholder.start()]) + rf"(?P<{placeholder.group(1)}>\d+)"
        pos = placeholder.end()
    pattern += re.escape(template[pos:])
    return re.compile(rf"^{pattern}(?P<tail>(?:\.weight|\.bias)?)$")


@functools.lru_cache(maxsize=None)
def _name_rules(layout: AuthorsLayout, to_ours: bool) -> tuple[tuple[re.Pattern[str], str], ...]:
    rules = []
    for authors, ours in AUTHORS_NAME_MAP:
        authors = authors.replace("<text>.", AUTHORS_TEXT_PREFIX[layout])
        source, target = (authors, ours) if to_ours else (ours, authors)
        rules.append((_template_regex(source), target))
    return tuple(rules)


def _rename(name: str, rules: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    for pattern, target in rules:
        match = pattern.match(name)
        if match:
            groups = match.groupdict()
            tail = groups.pop("tail")
            return target.format(**groups) + tail
    return None


def _authors_to_ours(name: str, layout: AuthorsLayout) -> str | None:
    return _rename(name, _name_rules(layout, to_ours=True))


def _ours_to_authors(name: str, layout: AuthorsLayout) -> str | None:
    return _rename(name, _name_rules(layout, to_ours=False))


def to_authors_state_dict(model: TWBert, layout: AuthorsLayout = "retrieval") -> dict[str, torch.Tensor]:
    """Our weights under the authors' names (the inverse of the loader's mapping).

    Only what our model holds: no momentum copies, queues or unused BERT layers.
    """
    if layout not in AUTHORS_TEXT_PREFIX:
        raise ValueError(f"layout must be one of {sorted(AUTHORS_TEXT_PREFIX)}, got {layout!r}")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        authors = _ours_to_authors(name, layout)
        if authors is None:
            raise ValueError(f"no authors' name for {name}: add it to AUTHORS_NAME_MAP")
        out[authors] = tensor.detach().clone()
    return out


# -- applying weights -----------------------------------------------------------------------------
def _apply_state_dict(model: TWBert, tensors: dict[str, tuple[str, torch.Tensor]], report: LoadReport,
                      strict: bool, file_name_of: Callable[[str], str]) -> None:
    """Copy `tensors` ({our name: (file name, tensor)}) into `model`, filling the report's missing,
    unexpected and mismatched lists; raise CheckpointError if any is non-empty and `strict`."""
    expected = model.state_dict()
    fitting: dict[str, torch.Tensor] = {}
    for ours, (file_name, tensor) in tensors.items():
        if ours not in expected:
            report.unexpected.append(file_name)
        elif tensor.shape != expected[ours].shape:
            report.mismatched.append((file_name, tuple(expected[ours].shape), tuple(tensor.shape)))
        else:
            fitting[ours] = tensor
    report.missing = [name for name in expected if name not in tensors]
    if strict and not report.complete:
        raise CheckpointError(_mismatch_message(report, model.cfg, file_name_of))
    model.load_state_dict(fitting, strict=False)
    report.loaded = len(fitting)


def _mismatch_message(report: LoadReport, cfg: TWBertConfig, file_name_of: Callable[[str], str]) -> str:
    counts = ", ".join(f"{n} {what}" for n, what in ((len(report.missing), "missing"),
                                                     (len(report.unexpected), "unexpected"),
                                                     (len(report.mismatched), "of another shape")) if n)
    lines = [f"{report.path} ({report.format}) does not fit the model "
             f"(schedule {cfg.selector.schedule}): {counts}"]
    lines += _problem_lines(report, file_name_of)
    lines += _mismatch_advice(report, cfg)
    return "\n".join(lines)


def _mismatch_advice(report: LoadReport, cfg: TWBertConfig) -> list[str]:
    """What to do about a file that does not fit, in terms of the command-line flags (the CLI has
    no loose loading: an export needs every weight)."""
    selection, advice = cfg.selector, []
    selector_weights_unused = (not selection.enabled
                               and any(_is_selector_name(n) for n in report.unexpected))
    if selector_weights_unused:
        advice.append(f"The file has frame-selector weights, which schedule {selection.schedule} "
                      "(no selection) has no place for: give a schedule with selection, "
                      f"e.g. --schedule {schedule_for_frames(selection.frames)}, or leave "
                      "--schedule out to use the file's own.")
    elif selection.enabled and any(_is_selector_name(n) for n in report.missing):
        advice.append("The file has no frame-selector weights: give a schedule without "
                      f"selection, --schedule {selection.frames}.")
    if report.mismatched:
        if report.format == FORMAT_NAME:
            advice.append("The file's tensors do not have the shapes its own config gives: it was "
                          "damaged or edited; write it again with save_checkpoint.")
        else:
            advice.append(f"The file's tensors are sized for another model than the {cfg.dim}-wide "
                          "one built here: the checkpoint is for another model size. Load it with "
                          "the preset of its size (model.train: --preset base|tiny; Python: "
                          "preset=...); the export reads the authors' files as the base model.")
    elif (report.missing or report.unexpected) and not (advice and _only_selector_names(report)):
        advice.append("It is not a complete TW-BERT of this layout. To start training from the "
                      "weights that fit: python -m model.train --init FILE --non-strict.")
    return advice


def _only_selector_names(report: LoadReport) -> bool:
    return all(_is_selector_name(n) for n in (*report.missing, *report.unexpected))


def _is_selector_name(name: str) -> bool:
    return name.startswith("selector") or ".visual_token_selector" in name


def _problem_lines(report: LoadReport, file_name_of: Callable[[str], str]) -> list[str]:
    def with_file_name(ours: str) -> str:
        theirs = file_name_of(ours)
        return ours if theirs == ours else f"{ours} (file name {theirs})"

    lines = []
    if report.missing:
        lines.append("missing: " + _listing([with_file_name(n) for n in report.missing]))
    if report.unexpected:
        lines.append("unexpected: " + _listing(report.unexpected))
    if report.mismatched:
        lines.append("of another shape: " + _listing(
            [f"{name} (model {list(want)}, file {list(got)})" for name, want, got in report.mismatched]))
    return lines


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LIST_LIMIT])
    more = len(names) - LIST_LIMIT
    return f"{shown} ... and {more} more" if more > 0 else shown
