"""What every benchmark does at the end: keep the figures, say which targets were missed, set the exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def finish(name: str, results: Any, misses: list[str]) -> int:
    """Write benchmarks/results/<name>.json, print the misses (or that all targets were met); 1 on a miss."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2, default=str))
    print()
    if misses:
        print("MISSED:\n- " + "\n- ".join(misses))
        return 1
    print("all targets met")
    return 0
