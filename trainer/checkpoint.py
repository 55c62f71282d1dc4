"""Checkpoints that a killed process cannot leave half-written.

A checkpoint is one `torch.save` file written to a temporary name and renamed over the previous one,
so at any moment `checkpoint.pt` is either the last complete checkpoint or absent. It holds all that
`--resume` needs to continue to the same result: model, optimizer and scheduler state, the image
service's head and optimizer, the position in the data (epoch, batch), RNG state, the config and the
MLflow run id.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitrine.errors import UserError

NAME = "checkpoint.pt"


def save(run_dir: Path, state: dict[str, Any]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / NAME
    tmp = run_dir / f".{NAME}.tmp-{os.getpid()}"
    import torch  # here, not at the top: a killed job's report needs NAME only, and fast

    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / NAME
    if not path.exists():
        raise UserError(f"no checkpoint at {path}; --resume takes the run directory of an earlier `vitrine train`")
    try:
        import torch

        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a file that is not ours
        raise UserError(f"{path} is not a readable checkpoint ({exc})") from None
