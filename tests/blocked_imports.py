"""Run Python code in a fresh interpreter where some top-level packages cannot be imported,
to prove that a code path does without them (e.g. torch on a Jetson)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_without(blocked: tuple[str, ...], code: str) -> subprocess.CompletedProcess:
    prelude = (
        "import sys\n"
        f"BLOCKED = {tuple(blocked)!r}\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED: raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, Block())\n")
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True,
                          cwd=REPO)
