"""Where Vitrine keeps its data by default.

Everything generated lives under one data root so that a checkout stays clean and a user can move
it: `$VITRINE_DATA` when set, else `./data` in the current directory (the repository root when the
README's commands are used).
"""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    return Path(os.environ.get("VITRINE_DATA", "data")).resolve()


def raw_dir(name: str) -> Path:
    return data_root() / "raw" / name


def processed_dir(name: str) -> Path:
    return data_root() / "processed" / name
