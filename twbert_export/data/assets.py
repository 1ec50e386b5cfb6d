"""Names of the project's embedded demo assets, resolved to paths (torch-free).

    --ckpt demo          the trained tiny demo checkpoint
    --data demo          the demo validation split (same as demo:val)
    --data demo:train    the training split; demo:calib the calibration split

Any other value is taken as a path. The demo data and checkpoint live in the source checkout
(`calibration/demo/`, `checkpoints/demo/`); `python -m model.data.make_demo` and
`python -m model.train` (commands in `checkpoints/demo/README.md`) remake them.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = REPO_ROOT / "calibration" / "demo"
DEMO_CHECKPOINT = REPO_ROOT / "checkpoints" / "demo" / "best.pt"
DEMO_SPLITS = ("train", "val", "calib")


class AssetError(ValueError):
    """A named asset or path that does not exist."""


def resolve_data(spec: str | Path) -> Path:
    """'demo' / 'demo:SPLIT' -> the demo split's directory; anything else -> that directory."""
    text = str(spec)
    if text == "demo" or text.startswith("demo:"):
        split = text.partition(":")[2] or "val"
        if split not in DEMO_SPLITS:
            raise AssetError(f"unknown demo split {split!r}; choose one of "
                             f"{', '.join('demo:' + s for s in DEMO_SPLITS)}")
        path = DEMO_DATA / split
        if not (path / "annotations.jsonl").is_file():
            raise AssetError(f"demo data not found at {path}; make it with "
                             f"`python -m model.data.make_demo --out {DEMO_DATA}`")
        return path
    path = Path(text)
    if not path.is_dir():
        raise AssetError(f"data directory not found: {path} (expected DIR/annotations.jsonl "
                         "plus the videos it names, or 'demo', 'demo:train', 'demo:calib')")
    if not (path / "annotations.jsonl").is_file():
        raise AssetError(f"{path} has no annotations.jsonl (one JSON object per line with "
                         "\"video\" and \"caption\" and/or \"question\"/\"answer\")")
    return path


def resolve_checkpoint(spec: str | Path) -> Path:
    """'demo' -> the demo checkpoint; anything else -> that file."""
    path = DEMO_CHECKPOINT if str(spec) == "demo" else Path(spec)
    if not path.is_file():
        hint = ("; see checkpoints/demo/README.md to remake it" if str(spec) == "demo"
                else " (pass a .pt / .safetensors checkpoint, or 'demo')")
        raise AssetError(f"checkpoint not found: {path}{hint}")
    return path
