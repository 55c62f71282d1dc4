"""Where Vitrine keeps its data by default.

Everything generated lives under one data root so that a checkout stays clean and a user can move
it: `$VITRINE_DATA` when set, else `./data` in the current directory (the repository root when the
README's commands are used).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vitrine.errors import UserError

# a job id: a directory name under jobs_root(), never a path
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def data_root() -> Path:
    return Path(os.environ.get("VITRINE_DATA", "data")).resolve()


def raw_dir(name: str) -> Path:
    return data_root() / "raw" / name


def processed_dir(name: str) -> Path:
    return data_root() / "processed" / name


def jobs_root() -> Path:
    """The job registry (vitrine.jobs): one directory per job."""
    return data_root() / "jobs"


def job_dir(job_id: str) -> Path:
    if not JOB_ID_RE.match(job_id or ""):
        raise UserError(f"bad job id {job_id!r}: letters, digits, '.', '_' and '-' only")
    return jobs_root() / job_id
