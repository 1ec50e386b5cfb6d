"""TW-BERT reference model in PyTorch (the network modules import only torch)."""

from .config import (CrossConfig, SelectorConfig, TextConfig, TWBertConfig, VideoConfig,
                     parse_schedule)
from .twbert import TWBert
from .checkpoint import CheckpointError, LoadReport, load_checkpoint, save_checkpoint, to_authors_state_dict

__all__ = ["TWBert", "TWBertConfig", "VideoConfig", "TextConfig", "CrossConfig",
           "SelectorConfig", "parse_schedule", "CheckpointError", "LoadReport", "load_checkpoint",
           "save_checkpoint", "to_authors_state_dict"]
