"""Benchmark results for the Benchmarks page: the local JSON results of this machine's runs, and the
reference results shipped with the repository.

Reference results are the Markdown files tracked in `benchmarks/results/` (raw JSON output stays
local, `.gitignore`). Each is shown with the machine and date it was measured on, read from the file
itself: the date from a `YYYY-MM-DD` prefix of its name, else a line `Date: ...`, else the latest date
the file mentions (a log of dated entries); the machine from a line `Machine: ...`, else the first
sentence that mentions the machine. A new reference file should start its name with its date and
carry a `Machine:` line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from app import settings

_DATE = re.compile(r"\b(20\d\d-[01]\d-[0-3]\d)\b")
_FIELD = re.compile(r"^\s*(?:[-*]\s*)?\**(machine|date)\**\s*:\**\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class Reference:
    path: Path
    title: str
    date: str  # YYYY-MM-DD, or "date not stated"
    machine: str  # as the file says it, or "machine not stated"
    text: str


def reference_dir() -> Path:
    """The checkout's own results folder (`VITRINE_BENCH_RESULTS` moves only the local results)."""
    return settings.ROOT / "benchmarks" / "results"


def _machine(text: str) -> str | None:
    for key, value in _FIELD.findall(text):
        if key.lower() == "machine":
            return value
    # the phrase that names the machine: "the 2-core development machine (no GPU)"
    flat = re.sub(r"\s+", " ", re.sub(r"^#.*$", "", text, flags=re.MULTILINE))
    m = re.search(r"\b(?:the|a|an|this|one)\s+(?:[\w+-]+\s+){0,4}?(?:machine|box)\b(?:\s*\([^)]{0,60}\))?",
                  flat, re.IGNORECASE)
    return m.group(0) if m else None


def _date(path: Path, text: str) -> str | None:
    m = _DATE.match(path.name)
    if m:
        return m.group(1)
    for key, value in _FIELD.findall(text):
        if key.lower() == "date" and _DATE.search(value):
            return _DATE.search(value).group(1)
    dates = _DATE.findall(text)
    return max(dates) if dates else None


def read_reference(path: Path) -> Reference:
    text = path.read_text(encoding="utf-8", errors="replace")
    heading = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")), path.stem)
    return Reference(path, heading, _date(path, text) or "date not stated", _machine(text) or "machine not stated",
                     text)


def references(folder: Path | None = None) -> list[Reference]:
    """The shipped reference results, newest first."""
    folder = folder or reference_dir()
    files = sorted(folder.glob("*.md")) if folder.is_dir() else []
    out = [read_reference(p) for p in files]
    return sorted(out, key=lambda r: (r.date[:1].isdigit(), r.date, r.path.name), reverse=True)


def local_results(folder: Path | None = None) -> list[Path]:
    """This machine's benchmark output: the JSON files of the results folder."""
    folder = folder or settings.bench_results_dir()
    return sorted(folder.glob("*.json")) if folder.is_dir() else []
