"""GBA against all-reduce and plain async under a straggler: speed and test AUC (issue 5, item 9).

What runs: the default synthetic world (zipf 1.05, seed 0; generated and processed once, cached under
data/bench/ams/zipf-1.05, shared with ams_bench.py), `vitrine train` with 4 workers, global batch
1024 (256 per worker), Adam lr 1e-3, images on (the image service in its own process), three epochs
over the train split (`--epochs`), one PS shard, each configuration once per training seed
(`--seeds`, default 0 1 2). Worker 1 is slowed 1x (no straggler), 2x and 4x (`--straggler 1:F`: its
steps take F times as long as the median of the other workers', see trainer/distributed/stragglers.py). Modes:

- `ar`: synchronous all-reduce; `async`: PS, each local gradient applied at once; `gba`: PS, N = 4
  gradients per update, threshold 2, decay 0.5;
- at the largest factor also `ar->gba`: ar switched to gba halfway (`--switch-at`), and `auto`
  (starts in ar, switches to gba once slowest/median > 1.5 for 5 steps).

Reported per configuration, as means over the seeds: training seconds (the job's own
`train_seconds`: the training loop, without the start-up of the processes and without evaluation),
samples per second (train rows / training seconds: every mode sees the same rows), test AUC, and the
AUC difference to ar paired by seed with its standard error; global steps; the mean number of
gradients the PS shard 0 and the image service decayed for staleness; worker 1's pace (its tokens over
the median of the others', in PS phases: about 1/F when the straggler really is F times slower); the
mode switches of the first seed. `--only ar gba "gba img-decay 1"` adds a row beyond the targets at the largest factor: GBA with
the image service's pushes never decayed (`--image-gba-decay 1`; the shards still decay theirs).
Then the noise floor: how far ar's AUC moves between seeds, and between runs of the same seed (ar's
arithmetic ignores the straggler, so those should be 0: before the image service's fixed embedding
blocks (2026-12-07) they moved by sd 0.004 at 5 epochs; benchmarks/results/distributed_history.md
("AR's run-to-run reproducibility") says what is still unexplained).

Targets (exit 1 on a miss, after the table), on the means: at the largest factor, when it is 4x or
more, GBA's samples/s >= 2.4 x AR's; at every factor GBA's test AUC within 0.002 of AR's and not
below async's; the switched and auto runs' AUC within 0.002 of AR's (at the largest factor).

Caveats: this box has 2 cores for 4 workers, the PS shard and the image service, so a worker that
sleeps (the straggler) frees CPU for the others: the figures are what this machine shows, not what
4 machines would. On this world (74k train rows, 12.5k test rows) two seeds of the same mode end up
to 0.01 AUC apart, so a 0.002 band needs many more seeds than three to be judged either way: read
the standard errors beside the differences.

    python benchmarks/gba_bench.py                 # the full table (about 30 minutes here)
    python benchmarks/gba_bench.py --quick         # smoke run: factor 4 only, 20 steps, seed 0
    python benchmarks/gba_bench.py --gba-threshold 1   # GBA decaying gradients 2+ steps stale
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def run(ds: Path, out: Path, mode: str, factor: float, seed: int, args, extra: list[str]) -> dict:
    run_dir = out / f"{re.sub(r'[^a-z0-9]+', '-', mode).strip('-')}-x{factor:g}-s{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    argv = [sys.executable, "-m", "vitrine", "train", "--dataset", str(ds), "--run-dir", str(run_dir),
            "--workers", str(args.workers), "--global-batch", str(args.global_batch), "--epochs", str(args.epochs),
            "--seed", str(seed), "--threads", "1", "--no-progress", "--no-track", "--image-service", "spawn",
            "--checkpoint-every", "100000", "--log-every", "1000"]
    if args.max_steps:
        argv += ["--max-steps", str(args.max_steps)]
    if factor > 1:
        argv += ["--straggler", f"1:{factor:g}"]
    for flag in ("gba_threshold", "gba_decay"):  # GBA's own settings: the same for every row of a table
        if getattr(args, flag, None) is not None:
            argv += [f"--{flag.replace('_', '-')}", f"{getattr(args, flag):g}"]
    argv += extra
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{mode} x{factor:g} seed {seed} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    res = json.loads((run_dir / "result.json").read_text())
    res["wall_s"] = wall
    res["run_dir"] = str(run_dir)
    return res


def straggler_pace(result: dict) -> float | None:
    """Worker 1's tokens over the median of the other workers' in the run's PS phases: how slow the
    straggler really was (1/FACTOR when its steps take FACTOR times as long); None without PS phases."""
    tokens = {int(k.rsplit("_", 1)[1]): v for k, v in result.items() if k.startswith("worker_tokens_")}
    others = [v for r, v in tokens.items() if r != 1]
    if 1 not in tokens or not others or statistics.median(others) <= 0:
        return None
    return tokens[1] / statistics.median(others)


def paired(results: dict, mode: str, factor: float, seeds: list[int], ref: str = "ar") -> tuple[float, float]:
    """Mean over seeds of (mode's test AUC - ref's, same seed) and its standard error."""
    d = [results[(mode, factor, s)]["test_auc"] - results[(ref, factor, s)]["test_auc"] for s in seeds]
    se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return statistics.fmean(d), se


def main() -> int:
    from ams_bench import ensure_dataset
    from report import finish

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--factors", type=float, nargs="+", default=[1, 2, 4])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--max-steps", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", nargs="+", default=None, metavar="MODE",
                    help="run only these rows (e.g. ar gba); targets that need a row left out are not judged")
    ap.add_argument("--quick", action="store_true", help="factor 4 only, 20 steps, one seed (targets still checked)")
    ap.add_argument("--gba-threshold", type=int, default=None,
                    help="GBA's staleness threshold for every run (default: the trainer's, 2)")
    ap.add_argument("--gba-decay", type=float, default=None,
                    help="GBA's decay beyond the threshold for every run (default: the trainer's, 0.5)")
    ap.add_argument("--work", default=str(ROOT / "data" / "bench" / "ams"))
    args = ap.parse_args()
    if args.only and "ar" not in args.only:
        ap.error("--only needs ar among its rows: every row is compared with it")
    if args.quick:
        args.factors, args.max_steps, args.seeds = [4], 20, [0]
    ds = ensure_dataset(Path(args.work), 1.05)
    rows = json.loads((ds / "manifest.json").read_text())["splits"]["train"]["rows"] * args.epochs
    out = ROOT / "data" / "bench" / "gba"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, float, int], dict] = {}
    top = max(args.factors)
    plans = []
    for factor in args.factors:
        plan = [("ar", ["--mode", "ar"]), ("async", ["--mode", "async"]), ("gba", ["--mode", "gba"])]
        if factor == top:
            steps = args.max_steps or -(-rows // args.global_batch)
            plan += [("ar->gba", ["--mode", "ar", "--switch-at", f"{steps // 2}:gba"]), ("auto", ["--mode", "auto"])]
            if args.only and "gba img-decay 1" in args.only:
                # Not a target row, and only on request: GBA with the image service's pushes never decayed
                # (the shards still decay theirs); benchmarks/results/distributed_history.md ("The 4x AUC
                # gap, looked at again") says why it was measured.
                plan.append(("gba img-decay 1", ["--mode", "gba", "--image-gba-decay", "1"]))
        plans += [(mode, factor, extra) for mode, extra in plan if not args.only or mode in args.only]
    for seed in args.seeds:  # seed-major: a run cut short still has whole seeds to compare
        for mode, factor, extra in plans:
            print(f"seed {seed}: running {mode} with the straggler at {factor:g}x ...", flush=True)
            results[(mode, factor, seed)] = run(ds, out, mode, factor, seed, args, extra)
    samples = rows if not args.max_steps else args.max_steps * args.global_batch
    seeds = args.seeds

    def mean(mode: str, factor: float, key: str) -> float:
        return statistics.fmean(results[(mode, factor, s)][key] for s in seeds)

    print()
    from trainer.config import TrainConfig

    gba = (TrainConfig.gba_threshold if args.gba_threshold is None else args.gba_threshold,
           TrainConfig.gba_decay if args.gba_decay is None else args.gba_decay)
    print(f"Means over seeds {', '.join(map(str, seeds))}; AUC - ar is paired by seed, +- its standard error. "
          f"GBA threshold {gba[0]}, decay {gba[1]:g}.")
    print()
    print("| straggler | mode | train s | samples/s | vs ar | test AUC | AUC - ar | steps | decayed PS/images | "
          f"worker 1's pace | switches (seed {seeds[0]}) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, factor, _ in plans:
        secs, ar_secs = mean(mode, factor, "train_seconds"), mean("ar", factor, "train_seconds")
        d, se = paired(results, mode, factor, seeds)
        first = results[(mode, factor, seeds[0])]
        sw = "; ".join(f"{x[1]}->{x[2]}@{x[0]}" for x in first.get("switches", [])) or "-"
        decayed = ("/".join(f"{statistics.fmean(results[(mode, factor, s)].get(k, 0) for s in seeds):.1f}"
                            for k in ("tokens_decayed", "image_tokens_decayed"))
                   if "tokens_decayed" in first else "-")
        paces = [p for s in seeds if (p := straggler_pace(results[(mode, factor, s)])) is not None]
        pace = statistics.fmean(paces) if paces else None
        print(f"| {factor:g}x | {mode} | {secs:.1f} | {samples / secs:,.0f} | {ar_secs / secs:.2f}x | "
              f"{mean(mode, factor, 'test_auc'):.4f} | {d:+.4f} +- {se:.4f} | {first['steps']} | {decayed} | "
              f"{'-' if pace is None else f'{pace:.2f}'} | {sw} |")
    if len(seeds) > 1:
        # ar's arithmetic does not depend on the straggler, so its runs at one seed should agree exactly
        # (a difference here is AR's own run-to-run noise: benchmarks/results/distributed_history.md,
        # "AR's run-to-run reproducibility", says what was fixed and what is unexplained). Across seeds
        # they differ by everything a seed draws.
        per_seed = [statistics.fmean(results[("ar", f, s)]["test_auc"] for f in args.factors) for s in seeds]
        same_seed = max(max(results[("ar", f, s)]["test_auc"] for f in args.factors)
                        - min(results[("ar", f, s)]["test_auc"] for f in args.factors) for s in seeds)
        print(f"\nNoise floor: ar's test AUC (mean over factors) per seed {min(per_seed):.4f} .. {max(per_seed):.4f} "
              f"(sd {statistics.stdev(per_seed):.4f}); ar's runs at one seed up to {same_seed:.4f} apart.")
    misses = []
    ran = {(m, f) for m, f, _ in plans}
    if ("gba", top) in ran and top >= 4:  # the target is stated for a 4x straggler; at 2x the ideal is 2x
        speed = mean("ar", top, "train_seconds") / mean("gba", top, "train_seconds")
        if speed < 2.4:
            misses.append(f"gba at {top:g}x is {speed:.2f}x as fast as ar (target >= 2.4x)")
    for factor in args.factors:
        if ("gba", factor) not in ran:
            continue
        d, se = paired(results, "gba", factor, seeds)
        if abs(d) > 0.002:
            misses.append(f"gba AUC - ar AUC at {factor:g}x: {d:+.4f} +- {se:.4f} over {len(seeds)} seeds "
                          "(target within 0.002)")
        d, se = paired(results, "gba", factor, seeds, ref="async") if ("async", factor) in ran else (0.0, 0.0)
        if d < 0:
            misses.append(f"gba AUC - async AUC at {factor:g}x: {d:+.4f} +- {se:.4f} (target >= 0)")
    for mode in [m for m in ("ar->gba", "auto") if (m, top) in ran]:
        d, se = paired(results, mode, top, seeds)
        if abs(d) > 0.002:
            misses.append(f"{mode} AUC - ar AUC at {top:g}x: {d:+.4f} +- {se:.4f} (target within 0.002)")
    return finish("gba_bench", {f"{m}@{f:g}#{s}": r for (m, f, s), r in results.items()}, misses)


if __name__ == "__main__":
    sys.exit(main())
