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


# a run directory's own name (it also names the MLflow run and is printed in `--resume` commands)
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]{0,199}$")


def check_run_dir_name(path: str, flag: str = "--run-dir") -> None:
    """A run directory's last part must be a plain name: letters, digits and `. _ + = @ , -`, no `..`
    (so the `--resume` line printed for it can be pasted into a shell as it is)."""
    name = Path(str(path)).name
    if not RUN_NAME_RE.match(name) or ".." in name:
        raise UserError(f"{flag} {str(path)!r}: its name {name!r} may hold only letters, digits and . _ + = @ , - "
                        "(no '..', spaces or shell characters)")


def check_inside(path: str | None, root: Path, flag: str, cwd: Path | None = None) -> None:
    """`path` (absolute, or relative to `cwd`) must lie inside `root` and may not use `..`: what the
    dashboard's Launch form asks of every path it is given (a terminal user may use any path). Links
    inside the root are followed as the owner of the root placed them."""
    if not path:
        return
    p = Path(str(path)).expanduser()
    if ".." in p.parts:
        raise UserError(f"{flag} {str(path)!r}: '..' is not allowed; give a path inside the data root {root}")
    # Lexically: a link the owner of the data root put inside it (logs kept on another disk) is theirs.
    full = Path(os.path.abspath(p if p.is_absolute() else (cwd or Path.cwd()) / p))
    if not any(full.is_relative_to(r) for r in (Path(os.path.abspath(root)), Path(root).resolve())):
        raise UserError(f"{flag} {str(path)!r} is outside the data root {Path(root).resolve()}; the dashboard "
                        "reads and writes only there")
