"""Which embedding optimizer trains best? (issue 20, item 1: the default is the one that does)

Trains the default model (`--features ids+images`, attentive, 8 epochs) on the default world, as
`benchmarks/dicm_quality.py` does (one torch thread: two threads on two
busy cores run several times slower), once per seed with each embedding optimizer: `dense` (Adam over
whole tables, the trainer before row-wise optimizers), `lazy_adam` and `rowwise_adagrad`, each at its own
learning rate (`TABLE_LR` in trainer/row_optim.py). Prints test
AUC, GAUC and cold-start AUC per seed, the mean difference to `dense` paired by seed with its
standard error, and samples/s; writes benchmarks/results/embedding_optim.json.

Target (exit 1 on a miss): the default (`TrainConfig().embedding_optimizer`) is within 0.002 mean
test AUC of `dense` or above it.

    python benchmarks/embedding_optim_bench.py [--seeds 0 1 2] [--epochs 8] [--features ids+images]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MAX_DROP = 0.002
# Dense Adam at --lr; each row-wise optimizer at its own default rate (trainer/row_optim.py TABLE_LR:
# a row moves only when a batch touches it, and Adagrad's steps shrink as its accumulator grows).
CANDIDATES = {"dense": {}, "lazy_adam": {}, "rowwise_adagrad": {}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--features", default="ids+images")
    ap.add_argument("--optimizers", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--work", default=str(ROOT / "data" / "bench" / "dicm"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "embedding_optim.json"))
    a = ap.parse_args(argv)

    from dicm_quality import ensure_dataset
    from trainer.train import TrainConfig, train

    ds = ensure_dataset(Path(a.work))
    results: dict[str, list[dict]] = {}
    for seed in a.seeds:  # round-robin, so a slow spell of the machine hits every optimizer alike
        for name in a.optimizers:
            run_dir = Path(a.work) / "runs" / f"embopt-{name}-{a.features.replace('+', '_')}-{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = TrainConfig(dataset=str(ds), features=a.features, seed=seed, epochs=a.epochs, progress=False,
                              track=False, run_dir=str(run_dir), embedding_optimizer=name, threads=1,
                              **CANDIDATES[name])
            t0 = time.perf_counter()
            r = train(cfg)
            r["seconds"] = time.perf_counter() - t0
            results.setdefault(name, []).append(r)
            print(f"{name:16s} seed {seed}: test AUC {r['test_auc']:.4f} GAUC {r['test_gauc']:.4f} "
                  f"cold {r['test_cold_auc']:.4f} {r['samples_per_s']:,.0f} samples/s", flush=True)
    rows = ["| embedding optimizer | test AUC per seed | mean | vs dense (paired, +- s.e.) | cold-start AUC | samples/s |",
            "|---|---|---|---|---|---|"]
    base = results.get("dense")
    for name, rs in results.items():
        aucs = [r["test_auc"] for r in rs]
        diff = ""
        if base is not None and name != "dense":
            d = [x - y["test_auc"] for x, y in zip(aucs, base)]
            se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
            diff = f"{statistics.mean(d):+.4f} +- {se:.4f}"
        rows.append(f"| {name} | {' '.join(f'{x:.4f}' for x in aucs)} | {statistics.mean(aucs):.4f} | {diff} | "
                    f"{statistics.mean(r['test_cold_auc'] for r in rs):.4f} | "
                    f"{statistics.median(r['samples_per_s'] for r in rs):,.0f} |")
    print("\n".join(rows))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({k: [{m: r.get(m) for m in ("test_auc", "test_gauc", "test_cold_auc",
                                                                    "samples_per_s", "seconds")} for r in v]
                                       for k, v in results.items()}, indent=2))
    default = TrainConfig.__dataclass_fields__["embedding_optimizer"].default
    if base is None or default not in results or default == "dense":
        return 0
    drop = statistics.mean(r["test_auc"] for r in base) - statistics.mean(r["test_auc"] for r in results[default])
    if drop > MAX_DROP:
        print(f"MISS: the default {default} is {drop:.4f} test AUC below dense (target <= {MAX_DROP})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
