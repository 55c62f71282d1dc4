"""DICM quality on the default synthetic world: do images pay, and which aggregator is best?

Trains every `--features` variant (with the default aggregator) and every aggregator (with
`ids+images`) over several seeds on the default world, and reports test AUC, GAUC, cold-start AUC
(mean and spread over seeds), the world's oracle AUC and training samples per second.

Targets (issue 3): `ids+images` beats `ids` by at least 0.01 test AUC, and by more on cold-start
items; `attentive` or `multi_query` is at least as good as `sum`; training runs at no fewer than
5,000 samples/s with the default model (behaviours up to 50, batch 1024); MLflow step logging slows
training by at most 5%. Prints a table, writes
benchmarks/results/dicm_quality.json, exits 1 on a missed target.

    python benchmarks/dicm_quality.py [--seeds 0 1 2] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_IMAGE_GAIN = 0.01
MIN_SAMPLES_PER_S = 5000
MAX_LOGGING_OVERHEAD = 0.05


def ensure_dataset(work: Path) -> Path:
    from pipeline.build import PipelineConfig, run_pipeline
    from pipeline.synth.world import WorldConfig, generate

    raw, ds = work / "raw", work / "ds"
    if not (raw / "world.json").exists():
        generate(WorldConfig(), raw, overwrite=True, progress=False)
    if not (ds / "manifest.json").exists():
        run_pipeline(PipelineConfig(raw=str(raw), out=str(ds), overwrite=True, progress=False, track=False))
    return ds


def _timed_steps(trainer, steps: int, logger=None) -> float:
    """Samples/s over `steps` training steps after 5 warm-up steps; logs as the trainer does."""
    it = trainer.train_loader.epoch(0)
    for _ in range(5):
        trainer.train_step(next(it))
    n, t0 = 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        loss = trainer.train_step(batch)
        n += int(batch["label"].shape[0])
        if logger is not None and trainer.step % trainer.cfg.log_every == 0:
            logger.log_metrics({"loss": loss, "samples_per_s": 0.0, "lr": 0.001}, step=trainer.step)
    return n / (time.perf_counter() - t0)


def speed(ds: Path, steps: int = 60) -> float:
    """Samples/s of the default model (L=50, batch 1024)."""
    from trainer.train import TrainConfig, Trainer

    return _timed_steps(Trainer(TrainConfig(dataset=str(ds), progress=False, track=False)), steps)


def logging_overhead(ds: Path, steps: int = 60, rounds: int = 3) -> tuple[float, float]:
    """Median samples/s without and with MLflow step logging as the trainer does it (every
    `log_every` steps, asynchronous), in alternating rounds so drift hits both alike."""
    from trainer.train import TrainConfig, Trainer
    from trainer.tracking import RunLogger

    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for track in (False, True):
            trainer = Trainer(TrainConfig(dataset=str(ds), progress=False, track=False))
            logger = RunLogger(None, trainer.cfg, run_name="logging-overhead") if track else None
            rates[track].append(_timed_steps(trainer, steps, logger))
            if logger is not None:
                logger.close()
    return statistics.median(rates[False]), statistics.median(rates[True])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=8, help="epochs per run (the default world is small)")
    ap.add_argument("--work", default=str(ROOT / "data" / "bench" / "dicm"))
    ap.add_argument("--speed-only", action="store_true", help="only the speed and logging-overhead measurements")
    args = ap.parse_args()

    from trainer.train import TrainConfig, train

    work = Path(args.work)
    ds = ensure_dataset(work)
    runs = [("ids", "attentive"), ("ids+ad_image", "attentive"), ("ids+behavior_images", "attentive"),
            ("ids+images", "attentive"), ("ids+images", "sum"), ("ids+images", "max"), ("ids+images", "multi_query")]
    results: dict[str, list[dict]] = {}
    if args.speed_only:
        sps = speed(ds)
        untracked, tracked = logging_overhead(ds)
        print(f"training speed {sps:,.0f} samples/s; with MLflow step logging {untracked:,.0f} -> {tracked:,.0f} "
              f"samples/s ({1 - tracked / untracked:+.1%})")
        ok = sps >= MIN_SAMPLES_PER_S and 1 - tracked / untracked <= MAX_LOGGING_OVERHEAD
        return 0 if ok else 1
    for features, agg in runs:
        key = f"{features} / {agg}"
        for seed in args.seeds:
            kw = dict(dataset=str(ds), features=features, aggregator=agg, seed=seed, progress=False, track=False,
                      run_dir=str(work / "runs" / f"{features}-{agg}-{seed}".replace("+", "_")))
            if args.epochs:
                kw["epochs"] = args.epochs
            import shutil

            shutil.rmtree(kw["run_dir"], ignore_errors=True)
            t0 = time.perf_counter()
            r = train(TrainConfig(**kw))
            r["seconds"] = time.perf_counter() - t0
            results.setdefault(key, []).append(r)
            print(f"{key:32s} seed {seed}: test AUC {r['test_auc']:.4f} cold {r['test_cold_auc']:.4f} "
                  f"({r['seconds']:.0f} s)", flush=True)

    sps = speed(ds)
    untracked, tracked = logging_overhead(ds)
    overhead = 1 - tracked / untracked

    def stat(key: str, metric: str) -> tuple[float, float]:
        vals = [r[metric] for r in results[key]]
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    header = ["variant", "test AUC", "GAUC", "cold-start AUC", "oracle AUC"]
    print()
    print(f"DICM on the default synthetic world, {len(args.seeds)} seeds (mean ± sd)")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    table = {}
    for key in results:
        auc, gauc, cold = stat(key, "test_auc"), stat(key, "test_gauc"), stat(key, "test_cold_auc")
        oracle = results[key][0].get("test_oracle_auc", float("nan"))
        table[key] = {"auc": auc, "gauc": gauc, "cold_auc": cold, "oracle_auc": oracle}
        print(f"| {key} | {auc[0]:.4f} ± {auc[1]:.4f} | {gauc[0]:.4f} ± {gauc[1]:.4f} | "
              f"{cold[0]:.4f} ± {cold[1]:.4f} | {oracle:.4f} |")
    print(f"training speed, default model (L=50, batch 1024): {sps:,.0f} samples/s")
    print(f"MLflow step logging (as the trainer does it): {untracked:,.0f} -> {tracked:,.0f} samples/s "
          f"({overhead:+.1%} slowdown)")

    failures = []
    ids, img = table["ids / attentive"], table["ids+images / attentive"]
    gain, cold_gain = img["auc"][0] - ids["auc"][0], img["cold_auc"][0] - ids["cold_auc"][0]
    if gain < MIN_IMAGE_GAIN:
        failures.append(f"ids+images beats ids by {gain:.4f} test AUC (target >= {MIN_IMAGE_GAIN})")
    if cold_gain <= gain:
        failures.append(f"cold-start gain {cold_gain:.4f} is not larger than the overall gain {gain:.4f}")
    best_att = max(table["ids+images / attentive"]["auc"][0], table["ids+images / multi_query"]["auc"][0])
    if best_att < table["ids+images / sum"]["auc"][0]:
        failures.append(f"best attentive/multi_query AUC {best_att:.4f} < sum {table['ids+images / sum']['auc'][0]:.4f}")
    if sps < MIN_SAMPLES_PER_S:
        failures.append(f"training speed {sps:,.0f} samples/s < {MIN_SAMPLES_PER_S:,}")
    if overhead > MAX_LOGGING_OVERHEAD:
        failures.append(f"MLflow logging slows training by {overhead:.1%} (target <= {MAX_LOGGING_OVERHEAD:.0%})")
    print(f"image gain: {gain:+.4f} AUC overall, {cold_gain:+.4f} on cold-start items")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dicm_quality.json").write_text(json.dumps(
        {"table": table, "samples_per_s": sps, "logging_overhead": overhead, "image_gain": gain, "cold_gain": cold_gain, "failures": failures,
         "seeds": args.seeds}, indent=2, default=float))
    for f in failures:
        print("MISSED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
