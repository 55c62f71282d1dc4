"""Vitrine's ID model against DeepCTR-Torch's DIN on the same processed dataset, split and epochs.

For each seed, back to back: `vitrine train --features ids` (Vitrine's defaults otherwise, run
in this process) and DeepCTR-Torch's DIN (benchmarks/peer_din.py, run as a subprocess in the
benchmark's own environment, benchmarks/.peer-venv: the peer is never one of Vitrine's
dependencies). Both train on the dataset's `train` split for the same epochs at batch 1024 with
Adam (lr 1e-3) and score every row of its `test` split; test AUC, GAUC and log loss come from
vitrine/metrics.py for both, on the same rows (the DIN predictions are joined to the test shards by
impression id; Vitrine's own evaluation covers the same split, and the row counts are checked).
Samples/s: training rows x epochs over the training loop's wall seconds, evaluation left out on
both sides. Both sides run with the same number of torch threads (--threads, default 1: on a
shared 2-core machine two threads per process mostly wait on each other).

FuxiCTR's DIN is not run: see benchmarks/results/peer.md for why.

Targets (issue 22): Vitrine's mean test AUC >= DIN's + 0.003 on every dataset, at >= 1.5x DIN's
samples/s. Prints a table, writes benchmarks/results/peer.json, exits 1 on a missed target.

    python benchmarks/peer_bench.py                # default world, seeds 0 1 2, 4 epochs
    python benchmarks/peer_bench.py --quick        # a small world, seed 0: a smoke run
    python benchmarks/peer_bench.py --dataset DS   # any processed dataset

The peer environment is made on first use (plain venv; torch 2.14.1, deepctr-torch, pandas,
pyarrow, scikit-learn, requests from the package index) unless --peer-python names another.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MIN_AUC_MARGIN = 0.003
MIN_SPEEDUP = 1.5
PEER_VENV = ROOT / "benchmarks" / ".peer-venv"
# deepctr-torch 0.3.0 imports `requests` (a version check at import) without declaring it.
PEER_PACKAGES = ["torch==2.14.1", "deepctr-torch", "pandas", "pyarrow", "scikit-learn", "requests"]


def peer_python(given: str | None) -> Path:
    if given:
        return Path(given)
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        print(f"making the peer environment {PEER_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return py


def world_dataset(quick: bool) -> Path:
    from pipeline.synth.world import WorldConfig
    from worlds import ensure_world

    if quick:
        return ensure_world(ROOT / "data" / "bench" / "peer" / "quick", WorldConfig(users=600, items=400, days=6),
                            "the small world")
    return ensure_world(ROOT / "data" / "bench" / "peer" / "default", WorldConfig(), "the default world")


def run_vitrine(ds: Path, seed: int, epochs: int, threads: int, work: Path, extra: dict) -> dict:
    from trainer.train import TrainConfig, train

    name = "vitrine" + "".join(f"-{k}{v}" for k, v in extra.items())
    run_dir = work / "runs" / f"{name}-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    r = train(TrainConfig(dataset=str(ds), features="ids", seed=seed, epochs=epochs, threads=threads,
                          progress=False, track=False, run_dir=str(run_dir), **extra))
    rows = r["train_samples"]  # steps x batch: the last short batch counts as whole
    from trainer.dataset import open_dataset

    n_train = open_dataset(ds).manifest["splits"]["train"]["rows"]
    samples = min(rows, n_train * epochs)
    return {"auc": r["test_auc"], "gauc": r["test_gauc"], "logloss": r["test_logloss"], "n": r["test_n"],
            "samples_per_s": samples / r["train_seconds"], "train_seconds": r["train_seconds"]}


def run_din(py: Path, ds: Path, seed: int, epochs: int, threads: int, embed_dim: int, work: Path) -> dict:
    import numpy as np
    import pandas as pd

    from trainer.dataset import open_dataset
    from vitrine import metrics

    out = work / f"din-{seed}.npz"
    cmd = [str(py), str(ROOT / "benchmarks" / "peer_din.py"), "--dataset", str(ds), "--epochs", str(epochs),
           "--seed", str(seed), "--threads", str(threads), "--embed-dim", str(embed_dim), "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"DIN run failed ({' '.join(cmd)}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    info = json.loads(out.with_suffix(".json").read_text())
    pred = np.load(out)
    d = open_dataset(ds)
    test = pd.concat([pd.read_parquet(d.dir / s["file"], columns=["impression_id", d.label, "group_id", "cold_item"])
                      for s in d.manifest["splits"]["test"]["shards"]], ignore_index=True)
    p_by_id = pd.Series(pred["p"], index=pred["impression_id"])
    if len(p_by_id) != len(test) or not p_by_id.index.is_unique:
        raise SystemExit(f"DIN scored {len(p_by_id)} test rows, the split has {len(test)}")
    pr = p_by_id.reindex(test["impression_id"]).to_numpy()
    m = metrics.evaluate(test[d.label].to_numpy(), pr, test["group_id"].to_numpy(), test["cold_item"].to_numpy())
    return {"auc": m["auc"], "gauc": m["gauc"], "logloss": m["logloss"], "n": m["n"],
            "samples_per_s": info["samples_per_s"], "train_seconds": info["train_seconds"], "info": info}


def mean_sd(vals: list[float]) -> tuple[float, float]:
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a small world and seed 0 only (a smoke run)")
    ap.add_argument("--dataset", action="append", default=[],
                    help="a processed dataset (repeatable); default: the synthetic world")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="default 0 1 2 (0 with --quick)")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on both sides")
    ap.add_argument("--din-embed-dim", type=int, default=12, help="DIN's embedding size (Vitrine's default: 12)")
    ap.add_argument("--also-no-id-dropout", action="store_true",
                    help="also run Vitrine with --id-dropout 0 (reported, not a target)")
    ap.add_argument("--peer-python", help="a python with deepctr-torch (default: benchmarks/.peer-venv)")
    args = ap.parse_args()
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])

    py = peer_python(args.peer_python)
    datasets = [Path(d) for d in args.dataset] or [world_dataset(args.quick)]
    variants = [("vitrine ids", {})] + ([("vitrine ids, id_dropout 0", {"id_dropout": 0.0})]
                                        if args.also_no_id_dropout else [])
    results: dict[str, dict[str, list[dict]]] = {}
    for ds in datasets:
        work = ROOT / "data" / "bench" / "peer" / "runs" / ds.resolve().parent.name
        work.mkdir(parents=True, exist_ok=True)
        res = results.setdefault(str(ds), {})
        for seed in seeds:  # back to back, so drift in the machine's load hits both sides alike
            for label, extra in variants:
                t0 = time.perf_counter()
                r = run_vitrine(ds, seed, args.epochs, args.threads, work, extra)
                res.setdefault(label, []).append(r)
                print(f"{ds.parent.name} seed {seed} {label:26s} AUC {r['auc']:.4f} GAUC {r['gauc']:.4f} "
                      f"logloss {r['logloss']:.4f} {r['samples_per_s']:8,.0f} samples/s "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            t0 = time.perf_counter()
            r = run_din(py, ds, seed, args.epochs, args.threads, args.din_embed_dim, work)
            res.setdefault("DeepCTR-Torch DIN", []).append(r)
            print(f"{ds.parent.name} seed {seed} {'DeepCTR-Torch DIN':26s} AUC {r['auc']:.4f} GAUC {r['gauc']:.4f} "
                  f"logloss {r['logloss']:.4f} {r['samples_per_s']:8,.0f} samples/s "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

    failures = []
    table = {}
    print()
    print(f"Peer benchmark: {len(seeds)} seed(s) {seeds}, {args.epochs} epochs, batch 1024, Adam 1e-3, "
          f"{args.threads} torch thread(s) each; mean ± sd over seeds")
    print("| dataset | model | test AUC | GAUC | logloss | samples/s |")
    print("|---|---|---|---|---|---|")
    for ds, res in results.items():
        table[ds] = {}
        for label, rs in res.items():
            row = {k: mean_sd([r[k] for r in rs]) for k in ("auc", "gauc", "logloss", "samples_per_s")}
            row["per_seed"] = [{k: r[k] for k in ("auc", "gauc", "logloss", "samples_per_s", "n")} for r in rs]
            table[ds][label] = row
            print(f"| {Path(ds).parent.name} | {label} | {row['auc'][0]:.4f} ± {row['auc'][1]:.4f} | "
                  f"{row['gauc'][0]:.4f} ± {row['gauc'][1]:.4f} | {row['logloss'][0]:.4f} ± {row['logloss'][1]:.4f} | "
                  f"{row['samples_per_s'][0]:,.0f} |")
        ns = {r["n"] for rs in res.values() for r in rs}
        if len(ns) != 1:
            failures.append(f"{ds}: the sides scored different numbers of test rows {sorted(ns)}")
        v, din = table[ds]["vitrine ids"], table[ds]["DeepCTR-Torch DIN"]
        margin = v["auc"][0] - din["auc"][0]
        speedup = v["samples_per_s"][0] / din["samples_per_s"][0]
        print(f"{Path(ds).parent.name}: Vitrine - DIN = {margin:+.4f} test AUC (target >= +{MIN_AUC_MARGIN}), "
              f"{speedup:.2f}x DIN's samples/s (target >= {MIN_SPEEDUP}x)")
        if margin < MIN_AUC_MARGIN:
            failures.append(f"{ds}: Vitrine's test AUC is DIN's {margin:+.4f} (target >= +{MIN_AUC_MARGIN})")
        if speedup < MIN_SPEEDUP:
            failures.append(f"{ds}: Vitrine trains at {speedup:.2f}x DIN's samples/s (target >= {MIN_SPEEDUP}x)")
        table[ds]["margin"], table[ds]["speedup"] = margin, speedup

    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / ("peer-quick.json" if args.quick else "peer.json")).write_text(json.dumps(
        {"table": table, "seeds": seeds, "epochs": args.epochs, "threads": args.threads,
         "din_embed_dim": args.din_embed_dim, "machine": f"{os.cpu_count()} cores, {platform.machine()}",
         "failures": failures, "date": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=2, default=float))
    for f in failures:
        print("MISSED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
