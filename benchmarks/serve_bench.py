"""`vitrine serve` latency and throughput: MLflow's scoring protocol over HTTP, raw IDs in.

What is measured, and how:

1. A model. `--model URI` serves an existing one (its tracking store: MLFLOW_TRACKING_URI or the
   data root's). Without it, a short run (`--steps`, default 40, batch 1024) is trained on
   `--dataset` (default data/processed/demo: run `make demo` or `vitrine pipeline` first) into a
   throw-away data root under data/bench/serve (its own MLflow store), registered and promoted, and
   `models:/vitrine-<dataset>@champion` is served. The model's shape (embedding tables, behaviour
   length L = 50 on the demo world, the image table) is what matters for latency, not its quality.
2. The server: `vitrine serve --model URI --host 127.0.0.1 --port <free>` as a separate process
   (its default one torch thread per request; `--server mlflow` for MLflow's own scoring server),
   started and stopped by this script.
3. Requests: rows of known users and items of the dataset (its vocabularies), a timestamp, and a
   full behaviour list of L item IDs (the most work a row can be), sent as JSON `dataframe_records`
   over one keep-alive HTTP/1.1 connection, one request at a time. Batch 1: `--requests` (default
   1000) requests after 50 warm-up ones; batch 256: `--requests // 5` requests after 10 warm-up.
   Latency is the client's wall time from sending a request to having read the whole answer.
   Throughput: rows per second over each series (sequential requests), and, at batch 1, requests
   per second with `--clients` (default 4) connections at once (threads of this script).

Target (issue 23): p99 latency below 20 ms at batch 1 on this machine; the script exits 1 when it is
missed, after printing the table. `--out` (default benchmarks/results/serve.md) gets the table with
the machine, the date and the commit.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TARGET_P99_MS = 20.0


def train_model(dataset: Path, steps: int, data_root: Path) -> str:
    """A short tracked run in a throw-away data root; returns its champion URI."""
    os.environ["VITRINE_DATA"] = str(data_root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from trainer import registry
    from trainer.serving import default_model_name
    from trainer.train import TrainConfig, train

    manifest = json.loads((dataset / "manifest.json").read_text())
    name = default_model_name(manifest.get("name") or dataset.name)
    train(TrainConfig(dataset=str(dataset), run_dir=str(data_root / "runs" / f"bench-{int(time.time())}"),
                      batch_size=1024, epochs=1, max_steps=steps, progress=False, eval_batch_size=4096))
    registry.promote(name)
    return f"models:/{name}@champion"


def requests_for(dataset: Path, n_rows: int, max_len: int, rng: np.random.Generator) -> list[dict]:
    manifest = json.loads((dataset / "manifest.json").read_text())
    cols = ((manifest.get("source") or {}).get("impressions") or {}).get("columns") or {}
    ucol, icol, tcol = cols.get("user", "user_id"), cols.get("item", "item_id"), cols.get("timestamp", "timestamp")
    users = pd.read_parquet(dataset / "vocab" / "user_id.parquet")["id"].to_numpy()
    items = pd.read_parquet(dataset / "vocab" / "item_id.parquet")["id"].to_numpy()
    start = pd.Timestamp(manifest["split_bounds"]["test_start"])
    out = []
    for _ in range(n_rows):
        ts = start + pd.Timedelta(seconds=int(rng.integers(0, 86_400)))
        out.append({ucol: users[rng.integers(len(users))].item(), icol: items[rng.integers(len(items))].item(),
                    tcol: ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "behaviors": [x.item() for x in items[rng.integers(0, len(items), max_len)]]})
    return out


class Client:
    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def post(self, body: bytes) -> float:
        t0 = time.perf_counter()
        self.conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        dt = time.perf_counter() - t0
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {data[:500]!r}")
        return dt


def series(port: int, pool: list[dict], batch: int, n: int, warm: int, rng) -> dict:
    c = Client(port)
    bodies = []
    for _ in range(n + warm):
        idx = rng.integers(0, len(pool), batch)
        bodies.append(json.dumps({"dataframe_records": [pool[i] for i in idx]}).encode())
    for b in bodies[:warm]:
        c.post(b)
    t0 = time.perf_counter()
    lat = np.array([c.post(b) for b in bodies[warm:]])
    wall = time.perf_counter() - t0
    return {"batch": batch, "requests": n, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "rows_per_s": batch * n / wall, "req_per_s": n / wall}


def concurrent(port: int, pool: list[dict], clients: int, n: int, rng) -> dict:
    bodies = [json.dumps({"dataframe_records": [pool[int(rng.integers(len(pool)))]]}).encode() for _ in range(n)]
    lats: list[list[float]] = [[] for _ in range(clients)]

    def work(k: int) -> None:
        c = Client(port)
        for b in bodies[k::clients]:
            lats[k].append(c.post(b))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.array(x) for x in lats])
    return {"batch": 1, "clients": clients, "requests": n, "p50_ms": float(np.percentile(lat, 50) * 1e3),
            "p99_ms": float(np.percentile(lat, 99) * 1e3), "rows_per_s": n / wall, "req_per_s": n / wall}


def machine() -> str:
    import psutil

    mem = psutil.virtual_memory().total / 2**30
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:  # noqa: BLE001
        gpu = "no GPU"
    return f"{os.cpu_count()}-core {platform.machine()}, {mem:.0f} GB, {gpu}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model URI to serve (default: train a short run, see above)")
    ap.add_argument("--dataset", default=str(ROOT / "data" / "processed" / "demo"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--server", default="vitrine", choices=("vitrine", "mlflow"), help="`vitrine serve --server`")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve.md"))
    args = ap.parse_args()
    dataset = Path(args.dataset).resolve()
    if not (dataset / "manifest.json").is_file():
        print(f"serve_bench: no processed dataset at {dataset}; run `make demo` or pass --dataset", file=sys.stderr)
        return 2
    if args.model is None:
        data_root = ROOT / "data" / "bench" / "serve"
        shutil.rmtree(data_root, ignore_errors=True)
        print(f"training a {args.steps}-step model on {dataset} (store: {data_root}) ...", flush=True)
        uri = train_model(dataset, args.steps, data_root)
        os.environ["VITRINE_DATA"] = str(data_root)  # the server reads the model from this store
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        uri = args.model
    from vitrine.errors import UserError
    from vitrine.procs import Spawned

    os.environ["PYTHONPATH"] = str(ROOT)
    ready = Path(f"/tmp/vitrine-serve-bench-{os.getpid()}.ready")
    try:
        server = Spawned([sys.executable, "-m", "vitrine", "serve", "--model", uri, "--port", "0",
                          "--ready-file", str(ready), "--server", args.server], ready,
                         Path(f"/tmp/vitrine-serve-bench-{os.getpid()}.log"), "model server", start_timeout_s=300)
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 1
    port = int(server.info["port"])
    try:
        manifest = json.loads((dataset / "manifest.json").read_text())
        max_len = max((int(f.get("max_len", 0)) for f in manifest["fields"]), default=0)
        rng = np.random.default_rng(0)
        pool = requests_for(dataset, 4096, max_len, rng)
        load_before = os.getloadavg()[0]
        rows = [series(port, pool, 1, args.requests, 50, rng), series(port, pool, 256, max(args.requests // 5, 20), 10, rng),
                concurrent(port, pool, args.clients, args.requests, rng)]
        load_after = os.getloadavg()[0]
    finally:
        server.stop(30)
        ready.unlink(missing_ok=True)
    head = "| batch | clients | requests | p50 ms | p99 ms | rows/s | requests/s |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r.get('clients', 1)} | {r['requests']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['rows_per_s']:,.0f} | {r['req_per_s']:,.0f} |")
    ok = rows[0]["p99_ms"] < TARGET_P99_MS
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    meta = (f"`python benchmarks/serve_bench.py`, {time.strftime('%Y-%m-%d')} at {commit}, {machine()}; model {uri}, "
            f"`--server {args.server}`, behaviours L={max_len}; load average {load_before:.1f} before, {load_after:.1f} after")
    verdict = (f"p99 at batch 1: {rows[0]['p99_ms']:.1f} ms, target < {TARGET_P99_MS:.0f} ms: "
               f"{'met' if ok else 'MISSED'}")
    table = "\n".join(lines)
    print(f"\n{meta}\n\n{table}\n\n{verdict}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# vitrine serve: latency and throughput\n\n{meta}\n\n{table}\n\n{verdict}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
