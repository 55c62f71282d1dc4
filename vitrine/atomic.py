"""Directories that appear whole or not at all.

A job builds its output in a hidden sibling `.NAME.tmp-PID` and renames it into place at the end,
so a killed process never leaves a half-written dataset where a reader (or a rerun) would find it.
Temp dirs of processes that no longer exist are swept on the next run.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vitrine.errors import UserError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` siblings left by dead processes."""
    removed = []
    if not out.parent.exists():
        return removed
    for kind in ("tmp", "old"):
        for p in out.parent.glob(f".{out.name}.{kind}-*"):
            try:
                pid = int(p.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False, what: str = "output") -> Iterator[Path]:
    """Yield a temp dir to fill; on success it replaces `out`. On error it is removed.

    An existing `out` is refused unless `overwrite`; with `overwrite` the old one is removed only
    after the new one is complete.
    """
    out = Path(out).resolve()
    if out.exists() and not overwrite:
        raise UserError(f"{what} {out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a file via a temp file and rename, so readers see the old or the new content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
