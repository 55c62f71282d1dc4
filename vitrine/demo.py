"""`vitrine demo`: the main job end to end on the built-in synthetic world.

Generates the default world (once; reused when its settings match), processes it on a local Dask
cluster, trains the DICM on it with the image descriptor in its own process (the AMS image service),
trains it again with 4 workers in `auto` mode with one worker slowed 4x (all-reduce, then GBA over
the parameter server once the straggler shows; the switch is tagged in MLflow), says where everything went,
makes the first run's registered model the champion and serves it (`vitrine serve`, one scored request
and its `curl` line, then the server stops), and ends with the dashboard and the MLflow UI open on the runs (until
Ctrl-C; `--no-dashboard` to skip). Each capability Vitrine gains is added here as a step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vitrine import paths, tracking


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate the default world, process it, show where the results are")
    p.add_argument("--name", default="demo", help="dataset name under data/raw and data/processed")
    p.add_argument("--scale", type=float, default=1.0, help="world size multiplier (1.0 = ~100k impressions)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="Dask worker processes")
    p.add_argument("--epochs", type=int, default=8, help="training epochs (the default world is small: 8 epochs of ~74k rows)")
    p.add_argument("--dist-workers", type=int, default=4, help="workers of the distributed (auto mode) run")
    p.add_argument("--dashboard", action=argparse.BooleanOptionalAction, default=True,
                   help="end with the dashboard (and the MLflow UI) open on the demo's runs, until Ctrl-C")
    p.add_argument("--port", type=int, default=8501, help="dashboard port (taken: any free one)")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from pipeline.build import PipelineConfig, run_pipeline
    from pipeline.cli import summarize
    from pipeline.synth.world import WorldConfig

    raw = prepare_world(args.name, WorldConfig(scale=args.scale, seed=args.seed))
    out = paths.processed_dir(args.name)
    print(f"== 2. Dask pipeline -> {out}")
    manifest = run_pipeline(PipelineConfig(raw=str(raw), out=str(out), workers=args.workers, overwrite=True))
    print(summarize(manifest))
    print(f"== 3. DICM training on {out}, the image descriptor in its own process (AMS image service)")
    from trainer.cli import summarize as train_summary
    from trainer.train import TrainConfig, train

    result = train(TrainConfig(dataset=str(out), epochs=args.epochs, seed=args.seed, image_service="spawn"))
    print(train_summary(result))
    print(f"== 4. the same model with {args.dist_workers} workers in auto mode, worker 1 slowed 4x: all-reduce "
          f"first, GBA over the parameter server once the straggler shows (the switch is tagged in MLflow); "
          f"PICASSO's packing and its caches of hot rows and image embeddings on")
    dist = train(TrainConfig(dataset=str(out), epochs=1, seed=args.seed, mode="auto", workers=args.dist_workers,
                             global_batch=1024, straggler="1:4", image_service="spawn", threads=1,
                             packing=True, cache_rows=0.05, cache_images=0.05))
    print(train_summary(dist))
    for step, old, new, why in dist.get("switches", []):
        print(f"   switched {old} -> {new} at step {step}: {why}")
    if "cache_hit_rate" in dist:
        print(f"   worker caches (GBA phase): rows {dist['cache_hit_rate']:.1%} of lookups, image embeddings "
              f"{dist.get('image_cache_hit_rate', 0.0):.1%} of unique images")
    print()
    print("Where to look:")
    print(f"  dataset        {out}  (manifest.json, train/ valid/ test/, images/pixels.npy)")
    print(f"  quarantine     {out / 'quarantine'}")
    print(f"  MLflow store   {tracking.tracking_uri()}")
    print(f"  MLflow runs    pipeline {manifest.get('mlflow_run_id')} (experiment {tracking.PIPELINE_EXPERIMENT}), "
          f"training {result.get('run_id')} and {dist.get('run_id')} (auto mode) (experiment {tracking.TRAIN_EXPERIMENT})")
    print(f"  checkpoints    {result['run_dir']}")
    serve_champion(result.get("run_id"), raw, manifest)
    if not args.dashboard:
        print(f"  MLflow UI      .venv/bin/mlflow ui --backend-store-uri {tracking.tracking_uri()} --host 127.0.0.1")
        print("  dashboard      .venv/bin/vitrine dashboard   (then open http://127.0.0.1:8501)")
        return 0
    return _serve_dashboard(args.port)


def prepare_world(name: str, world) -> Path:
    """Step 1: the synthetic world under data/raw/NAME, drawn again only when its settings changed (a
    second demo reuses it: drawing the default world is the slowest part of a rerun)."""
    from pipeline.synth.world import drawn_with, generate

    raw = paths.raw_dir(name)
    if drawn_with(raw, world):
        print(f"== 1. synthetic world: reusing {raw} (same settings)")
    else:
        print(f"== 1. synthetic world -> {raw}")
        summary = generate(world, raw, overwrite=True, progress=True)
        print(f"   {summary['impressions']} impressions, {summary['items']} items, ctr {summary['ctr']:.3f}, "
              f"oracle AUC {summary['oracle_auc']:.4f}")
    return raw


def serve_champion(run_id: str | None, raw: Path, manifest: dict) -> None:
    """Step 5: make the single-process run's model the champion of the demo's registered model, serve
    it with `vitrine serve` (its own process, 127.0.0.1, a free port), score one impression of the
    log's last day with the request a user would send, and stop the server."""
    import json
    import sys
    import tempfile
    import time
    import urllib.request

    import pandas as pd

    from serving.server import curl_line
    from trainer import registry
    from vitrine.errors import UserError
    from vitrine.procs import Spawned

    if not run_id:
        return
    (version,) = registry.versions_of_run(run_id) or (None,)
    if version is None:
        return
    registry.promote(version.name, version.version)
    uri = f"models:/{version.name}@{registry.CHAMPION}"
    print(f"== 5. serving: version {version.version} of {version.name} is the champion; `vitrine serve --model {uri}`")
    log = pd.concat([pd.read_parquet(f) for f in sorted((raw / "impressions").glob("*.parquet"))], ignore_index=True)
    last = log.sort_values(["timestamp", "impression_id"]).iloc[-1]
    clicks = log[(log.user_id == last.user_id) & (log.click == 1) & (log.timestamp < last.timestamp)]
    record = {"user_id": int(last.user_id), "item_id": int(last.item_id),
              "timestamp": pd.Timestamp(last.timestamp).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "behaviors": [int(x) for x in clicks.sort_values(["timestamp", "impression_id"]).item_id.tail(5)]}
    with tempfile.TemporaryDirectory() as tmp:
        ready = Path(tmp) / "ready"
        try:
            server = Spawned([sys.executable, "-m", "vitrine", "serve", "--model", uri, "--port", "0",
                              "--ready-file", str(ready)], ready, Path(tmp) / "serve.log", "model server",
                             start_timeout_s=180)
        except UserError as exc:
            print(f"   the server did not start: {exc}")
            return
        try:
            port = int(server.info["port"])
            body = json.dumps({"dataframe_records": [record]}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            t0 = time.perf_counter()
            with urllib.request.urlopen(req, timeout=30) as resp:
                answer = json.loads(resp.read())
            ms = (time.perf_counter() - t0) * 1e3
            print(f"   {curl_line('127.0.0.1', port, [record])}")
            print(f"   -> {json.dumps(answer)}   ({ms:.1f} ms; the user's clicked items, newest last, in behaviors)")
            print(f"   the server is stopped now; start it yourself with `.venv/bin/vitrine serve --model {uri}`"
                  f" (models: `.venv/bin/vitrine model list`)")
        finally:
            server.stop(30)


def _serve_dashboard(port: int) -> int:
    """The dashboard and the MLflow UI on 127.0.0.1 over the demo's store, until Ctrl-C."""
    from app import server
    from vitrine.errors import UserError

    print("== 6. the dashboard")
    logs = paths.data_root()
    server.interrupt_on_sigterm()  # a `kill` of the demo stops both servers, as Ctrl-C does
    ui_url, ui = server.start_mlflow_ui(tracking.tracking_uri(), log=logs / "mlflow-ui.log")
    dash = None
    try:
        try:
            address, dash = server.start("127.0.0.1", port, mlflow_url=ui_url, log=logs / "dashboard.log")
        except UserError:  # the port is taken (another dashboard?): any free one will do
            address, dash = server.start("127.0.0.1", 0, mlflow_url=ui_url, log=logs / "dashboard.log")
        print(f"  MLflow UI      {ui_url}")
        print(f"\nOpen the dashboard: {address}   (runs, jobs, live job, data, images; Ctrl-C stops it)", flush=True)
        dash.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, whenever it comes: both servers stop below
        print("\nstopping the dashboard")
    finally:
        for proc in (dash, ui):
            if proc is not None:
                server.stop(proc)
    return 0
