"""Page speed of the dashboard with 500 runs in the tracking store, measured in a real browser.

Fills a temporary MLflow store with 500 runs shaped like Vitrine's (pipeline and training runs with
their params, tags, final metrics and step histories), a job registry with a few finished jobs and a
small processed dataset's manifest, starts the dashboard on it (`app.server.start`), and times each
page in headless Chromium: from navigation until the page's ready marker (written last by every
page) is in the DOM and Streamlit reports the script idle. Each page is loaded in a new session
three times; the Runs page is also timed right after its Refresh button empties the caches (the
uncached MLflow search). Prints a table, writes benchmarks/results/dashboard_bench.json, and exits
non-zero when any page takes 2 s or more.

    .venv/bin/python benchmarks/dashboard_bench.py [--runs 500] [--rounds 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_S = 2.0
PAGES = [("runs", ""), ("launch", "launch"), ("jobs", "jobs"), ("live", "live"), ("data", "data"),
         ("images", "images"), ("benchmarks", "benchmarks")]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def fill_store(uri: str, n_runs: int, seed: int = 0, steps: int = 50) -> None:
    """`n_runs` runs, 1 in 10 a pipeline run, the rest training runs with 50-point step curves."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    rng = random.Random(seed)
    client = MlflowClient(uri)
    tracking.setup()
    exp_p = tracking.experiment_id(tracking.PIPELINE_EXPERIMENT)
    exp_t = tracking.experiment_id(tracking.TRAIN_EXPERIMENT)
    from pipeline.config import PipelineConfig
    from trainer.config import TrainConfig
    from vitrine.config import as_params

    t0 = int(time.time() * 1000) - n_runs * 60_000
    for i in range(n_runs):
        start = t0 + i * 60_000
        if i % 10 == 0:
            run = client.create_run(exp_p, start_time=start, run_name=f"pipeline world{i}",
                                    tags={"vitrine.job": "pipeline", "vitrine.dataset": f"/data/processed/world{i}"})
            params = [Param(k, v) for k, v in as_params(PipelineConfig(raw=f"/data/raw/world{i}")).items()]
            metrics = [Metric(k, v, start + 5000, 0) for k, v in
                       {"rows_in": 99258, "rows_out": 99258, "rows_quarantined": 0, "events_per_s": 18000 + i,
                        "elapsed_s": 5.4, "train_rows": 74397, "valid_rows": 12358, "test_rows": 12503}.items()]
            client.log_batch(run.info.run_id, metrics=metrics, params=params)
            client.set_terminated(run.info.run_id, "FINISHED", end_time=start + 6000)
            continue
        features = rng.choice(["ids", "ids+images", "ids+ad_image", "ids+behavior_images"])
        cfg = TrainConfig(dataset=f"/data/processed/world{i - i % 10}", features=features, seed=i % 3)
        run = client.create_run(exp_t, start_time=start, run_name=f"dicm-{features}-attentive-s{i % 3}-{i:04d}",
                                tags={"vitrine.job": "train", "vitrine.dataset": cfg.dataset, "vitrine.mode": "single",
                                      "vitrine.run_dir": f"/data/runs/r{i}"})
        params = [Param(k, v) for k, v in as_params(cfg).items()]
        metrics = []
        loss = 0.45
        for s in range(1, steps + 1):
            loss = loss * 0.995 + rng.uniform(-0.004, 0.004)
            ts = start + s * 200
            metrics += [Metric("loss", loss, ts, s * 10), Metric("samples_per_s", 25000 + rng.uniform(-2000, 2000), ts, s * 10),
                        Metric("lr", 1e-3, ts, s * 10)]
        auc = 0.6 + rng.uniform(0, 0.03)
        end = start + steps * 200 + 1000
        for k, v in {"valid_auc": auc, "valid_gauc": auc - 0.02, "valid_logloss": 0.4, "test_auc": auc,
                     "test_gauc": auc - 0.02, "test_logloss": 0.41, "test_cold_auc": auc - 0.03,
                     "test_oracle_auc": 0.78}.items():
            metrics.append(Metric(k, v, end, steps * 10))
        for j in range(0, len(metrics), 1000):
            client.log_batch(run.info.run_id, metrics=metrics[j:j + 1000], params=params if j == 0 else [])
        client.set_terminated(run.info.run_id, "FINISHED", end_time=end)


def fill_registry(n_jobs: int = 12) -> None:
    """Finished jobs in the registry, as the CLI leaves them."""
    from vitrine import jobs

    for i in range(n_jobs):
        kind = ("generate", "pipeline", "train")[i % 3]
        job = jobs.register_current(kind, [kind, "--seed", str(i)])
        jobs.record_exit(job.id, 0 if i % 4 else 1)
        os.environ.pop(jobs.ENV, None)


def fill_dataset(root: Path) -> None:
    """A processed dataset's manifest (no shards): enough for the Data page's summary."""
    d = root / "processed" / "bench"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({
        "format_version": 1, "name": "bench", "created": "2026-11-24T10:00:00Z",
        "fields": [{"name": "user_id", "kind": "categorical", "vocab": "user_id", "vocab_size": 2002, "group": "user"}],
        "label": "label", "splits": {s: {"rows": 0, "positives": 0, "shards": []} for s in ("train", "valid", "test")},
        "counts": {"rows_in": 0, "rows_out": 0, "quarantined": 0, "quarantine_reasons": {}, "users": 0, "items": 0,
                   "cold_items": 0},
        "frequency": {}}))


def _idle(page) -> None:
    page.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=stApp]');"
        " return a && a.getAttribute('data-test-script-state') !== 'running'"
        " && a.getAttribute('data-test-script-state') !== 'initial'; }", timeout=60_000)


def time_load(page, url: str, marker: str) -> float:
    t = time.perf_counter()
    page.goto(url)
    page.wait_for_selector(f'.vitrine-ready[data-page="{marker}"]', state="attached", timeout=60_000)
    _idle(page)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--keep", type=Path, default=None, help="build the store here and keep it (default: a temp dir)")
    args = ap.parse_args()
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="vitrine-dash-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["VITRINE_DATA"] = str(tmp / "data")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from vitrine import tracking

    uri = tracking.tracking_uri()
    t = time.perf_counter()
    if not (tmp / "data" / "mlflow" / "mlflow.db").exists():
        fill_store(uri, args.runs)
        fill_registry()
        fill_dataset(tmp / "data")
    print(f"store: {args.runs} runs in {uri} (filled in {time.perf_counter() - t:.1f} s)", flush=True)

    from playwright.sync_api import expect, sync_playwright

    from app import server

    results_dir = tmp / "bench-results"  # the Benchmarks page reads a small result file, not this run's
    results_dir.mkdir(exist_ok=True)
    (results_dir / "example.json").write_text(json.dumps({"rows": [{"name": "a", "x": 1.0}, {"name": "b", "x": 2.0}],
                                                          "failures": []}))
    t = time.perf_counter()
    address, proc = server.start("127.0.0.1", 0, None, uri, log=tmp / "dashboard.log",
                                 env={"VITRINE_BENCH_RESULTS": str(results_dir)})
    start_s = time.perf_counter() - t
    rows = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            first = time_load(page, f"{address}/", "runs")  # cold: warm-up may still run, caches empty
            for name, path in PAGES:
                times = [time_load(page, f"{address}/{path}", name) for _ in range(args.rounds)]
                rows.append({"page": name, "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)})
            # Comparing runs on the Runs page: choosing the first, then a second run, until their
            # curves are drawn.
            times = []
            for _ in range(args.rounds):
                time_load(page, f"{address}/", "runs")
                for n in (1, 2):
                    page.get_by_role("combobox", name="Runs to compare").click()
                    option = page.get_by_role("option").filter(has_not_text="Select all").first
                    t = time.perf_counter()
                    option.click()
                    page.keyboard.press("Escape")
                    tags = page.locator("[data-testid=stMultiSelect]").filter(has_text="Runs to compare") \
                        .locator("[data-tag]")
                    expect(tags).to_have_count(n, timeout=60_000)
                    page.wait_for_selector("[data-testid=stVegaLiteChart]", timeout=60_000)
                    _idle(page)
                    times.append(time.perf_counter() - t)
            rows.append({"page": "runs: compare 1, then 2 runs", "median_s": round(statistics.median(times), 3),
                         "max_s": round(max(times), 3)})
            # The Runs page with its caches emptied: the uncached search over every run.
            times = []
            for _ in range(args.rounds):
                page.goto(f"{address}/")
                page.wait_for_selector('.vitrine-ready[data-page="runs"]', state="attached", timeout=60_000)
                _idle(page)
                t = time.perf_counter()
                page.get_by_role("button", name="Refresh").click()
                page.wait_for_function("() => document.querySelector('[data-testid=stApp]')"
                                       ".getAttribute('data-test-script-state') === 'running'", timeout=10_000)
                _idle(page)
                times.append(time.perf_counter() - t)
            rows.append({"page": "runs (caches emptied)", "median_s": round(statistics.median(times), 3),
                         "max_s": round(max(times), 3)})
            browser.close()
    finally:
        server.stop(proc)
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    failures = [f"{r['page']}: {r['max_s']:.2f} s >= {TARGET_S} s" for r in rows if r["max_s"] >= TARGET_S]
    print(f"\n{'page':30} {'median s':>9} {'max s':>7}")
    for r in rows:
        print(f"{r['page']:30} {r['median_s']:9.2f} {r['max_s']:7.2f}")
    print(f"\nserver start {start_s:.1f} s; first load of the app (cold) {first:.2f} s; target: every page < {TARGET_S} s")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dashboard_bench.json").write_text(json.dumps(
        {"pages": rows, "runs": args.runs, "rounds": args.rounds, "target_s": TARGET_S, "server_start_s": round(start_s, 2),
         "first_load_s": round(first, 3), "failures": failures}, indent=2))
    if failures:
        print("MISSED: " + "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
