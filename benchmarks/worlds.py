"""The synthetic worlds the benchmarks train on, generated and processed once and reused after.

A world is regenerated when its settings change and reprocessed when the generated files or the
pipeline's settings change; the stamp leaves out the folders, which only say where this checkout is,
so a second checkout (a git worktree sharing data/) reuses what the first one built.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path


def settings(cfg) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def _portable(pipeline: dict) -> dict:
    return {k: v for k, v in pipeline.items() if k not in ("raw", "out")}


def ensure_world(root: Path, world, what: str, log=print) -> Path:
    """`root`/raw generated from `world` (a WorldConfig) and `root`/ds processed from it; returns ds."""
    from pipeline.build import PipelineConfig, run_pipeline
    from pipeline.synth.world import drawn_with, generate

    raw, ds, stamp = root / "raw", root / "ds", root / "ds.json"
    meta = raw / "world.json"
    if not drawn_with(raw, world):
        log(f"generating {what} -> {raw}", flush=True)
        generate(world, raw, overwrite=True, progress=False)
    pcfg = PipelineConfig(raw=str(raw), out=str(ds), workers=2, track=False, progress=False, overwrite=True)
    want = {"world_sha256": hashlib.sha256(meta.read_bytes()).hexdigest(), "pipeline": _portable(settings(pcfg))}
    have = json.loads(stamp.read_text()) if stamp.exists() else {}
    have["pipeline"] = _portable(have.get("pipeline", {}))
    if not ((ds / "manifest.json").exists() and have == want):
        log(f"processing it -> {ds}", flush=True)
        run_pipeline(pcfg)
        stamp.write_text(json.dumps(want, indent=2))
    return ds
