"""`vitrine generate` and `vitrine pipeline`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitrine.config import add_dataclass_args, from_args


def register(sub: argparse._SubParsersAction) -> None:
    from pipeline.config import PipelineConfig
    from pipeline.synth.world import WorldConfig

    g = sub.add_parser("generate", help="write a synthetic world (impressions, items, users, images, ground truth)")
    g.add_argument("--out", required=True, help="raw directory to create, e.g. data/raw/demo")
    g.add_argument("--overwrite", action="store_true", help="replace an existing directory")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    add_dataclass_args(g, WorldConfig)
    g.set_defaults(func=_generate)

    p = sub.add_parser("pipeline", help="process a raw source into a training set on Dask")
    add_dataclass_args(p, PipelineConfig)
    p.set_defaults(func=_pipeline)


def _generate(args: argparse.Namespace) -> int:
    from pipeline.synth.world import WorldConfig, generate

    cfg = from_args(WorldConfig, args)
    summary = generate(cfg, Path(args.out), overwrite=args.overwrite, progress=args.progress)
    print(json.dumps({k: summary[k] for k in summary if k != "config"}, indent=2, default=str))
    print(f"world written to {Path(args.out).resolve()}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from pipeline.build import PipelineConfig, run_pipeline

    cfg = from_args(PipelineConfig, args)
    m = run_pipeline(cfg)
    print(summarize(m))
    return 0


def summarize(m: dict) -> str:
    c = m["counts"]
    lines = [
        f"dataset   {Path(m['config']['out']).resolve()}",
        f"rows      {c['rows_in']} in, {c['rows_out']} out, {c['quarantined']} quarantined {c['quarantine_reasons'] or ''}",
        f"split     {(m.get('split_bounds') or {}).get('rule', '-')}",
        "splits    " + ", ".join(f"{k} {v['rows']} (ctr {v['positives'] / max(v['rows'], 1):.3f})" for k, v in m["splits"].items()),
    ]
    if m.get("images"):
        lines.append(f"images    {m['images']['shape']} {m['images']['status_counts']}")
    b = m.get("behavior_images") or {}
    if b:
        lines.append(f"behaviour images: {b['behavior_image_occurrences']} occurrences of {b['behavior_unique_images']} unique; "
                     f"per batch of {b['batch_size']}: dedup x{b['batch_dedup_ratio']}")
    lines.append(f"time      {m['elapsed_s']} s ({m['events_per_s']:.0f} events/s)")
    for w in m.get("warnings") or ():
        lines.append(f"warning   {w}")
    if m.get("mlflow_run_id"):
        lines.append(f"mlflow    run {m['mlflow_run_id']} in experiment vitrine-pipeline")
    return "\n".join(lines)
