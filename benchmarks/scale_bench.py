"""Embeddings at scale: does a step cost the same for any vocabulary? (issue 20, item 6)

For worlds of 10^3, 10^5, 10^6 and 10^7 users (scale worlds from `vitrine generate`, a tenth as many
items, 1,000 images shared by all; `docs/DATA.md`, "Scale worlds"; the user vocabulary is the users
seen in train, about 65% of them), it trains the same model with the same batch (1,024 rows per worker, `--features ids`, one torch thread
per process) in single mode and in ar and gba with 2 workers, and measures:

- samples/s in steady state: the median of the job's windowed `samples_per_s` step metric (MLflow)
  after the first `--warmup` steps (a PS phase's start loads the whole model into the shard once;
  that is a one-off, not a step's cost);
- bytes moved per step: ar, what one worker puts into the step's all-reduce and all-gathers
  (`ar_exchange_bytes_per_step`); gba, what the coordinator pulls and pushes per step
  (`ps_pulled_bytes_per_step + ps_pushed_bytes_per_step`); single, none;
- peak RSS per process kind (launcher, worker, PS shard), sampled every 0.2 s.

Targets (exit 1 on a miss): in every mode, samples/s at the largest vocabulary >= 75% of the
reference's, and bytes per step within 10% of the reference's. The reference is the smallest world
whose users are as active as the largest's (two impressions per user: 10^5 users by default): a
10^3-user world cannot be that sparse and still fill 40 batches, so its users have ~100 impressions
each, behaviour sequences of 20 clicks instead of about one, and a batch touches a different mix of
rows; it is shown for comparison, not judged against. The PS-mode worker's RSS is reported, not
a target here: a worker still holds a replica of every table (any job may switch to all-reduce, and
the coordinator evaluates the whole model), so it grows with the vocabulary.

    python benchmarks/scale_bench.py                      # 10^3 .. 10^7 (about an hour on 2 cores)
    python benchmarks/scale_bench.py --vocabs 1000 100000 --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIN_SPEED_RATIO = 0.75
MAX_BYTES_DRIFT = 0.10
MODES = ("single", "ar", "gba")


def ensure_world(work: Path, users: int) -> Path:
    """A processed scale world with `users` users (generated and processed once, then reused)."""
    from pipeline.build import PipelineConfig, run_pipeline
    from pipeline.synth.world import drawn_with, generate

    raw, ds = work / f"raw-{users}", work / f"ds-{users}"
    cfg = world_config(users)
    if not drawn_with(raw, cfg):
        shutil.rmtree(ds, ignore_errors=True)
        generate(cfg, raw, overwrite=True, progress=False)
    if not (ds / "manifest.json").exists():
        # Every ID seen once is kept (min_count 1), so the vocabulary is about the users with an
        # impression in train; small valid and test splits keep the final evaluation short.
        run_pipeline(PipelineConfig(raw=str(raw), out=str(ds), min_count=1, valid_frac=0.01, test_frac=0.02,
                                    max_behaviors=20, track=False, progress=False, overwrite=True))
    return ds


def world_config(users: int):
    """About two impressions per user (so most users reach the vocabulary) and a tenth as many items;
    1,000 drawn images shared by all items (docs/DATA.md, "Scale worlds")."""
    from pipeline.synth.world import WorldConfig

    return WorldConfig(users=users, items=max(10_000, users // 10), impressions=max(100_000, 2 * users),
                       drawn_images=1000, seed=0)


class PeakRSS:
    """Peak resident memory per process kind of a job's process tree, sampled in a thread."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                try:
                    cmd = " ".join(p.cmdline())
                    rank = p.environ().get("RANK")
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                kind = ("ps shard" if "trainer.ps.server" in cmd else f"worker {rank}" if rank is not None
                        else "launcher" if p.pid == self.pid else "other")
                self.peak[kind] = max(self.peak.get(kind, 0), rss)
            time.sleep(0.2)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def run(ds: Path, mode: str, steps: int, work: Path) -> dict:
    run_dir = work / "runs" / f"{ds.name}-{mode}"
    shutil.rmtree(run_dir, ignore_errors=True)
    argv = [sys.executable, "-m", "vitrine", "train", "--dataset", str(ds), "--run-dir", str(run_dir),
            "--features", "ids", "--mode", mode, "--max-steps", str(steps), "--epochs", "1", "--log-every", "5",
            "--checkpoint-every", str(10 * steps), "--no-progress", "--seed", "0"]
    argv += ["--batch-size", "1024", "--threads", "1"] if mode == "single" else \
        ["--workers", "2", "--global-batch", "2048", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    job = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rss = PeakRSS(job.pid)
    out = job.communicate()[0]
    peak = rss.stop()
    if job.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{out[-3000:]}")
    result = json.loads((run_dir / "result.json").read_text())
    return {"result": result, "rss": peak, "wall_s": time.perf_counter() - t0,
            "run_id": (run_dir / "mlflow_run_id").read_text().strip()}


def steady_samples_per_s(run_id: str, warmup: int) -> float:
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    hist = MlflowClient(tracking.setup()).get_metric_history(run_id, "samples_per_s")
    values = [m.value for m in sorted(hist, key=lambda m: m.step) if m.step > warmup]
    return statistics.median(values) if values else float("nan")


def bytes_per_step(mode: str, result: dict) -> float:
    if mode == "ar":
        return float(result.get("ar_exchange_bytes_per_step", float("nan")))
    if mode == "gba":
        return float(result.get("ps_pulled_bytes_per_step", float("nan")) + result.get("ps_pushed_bytes_per_step", 0.0))
    return 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[1_000, 100_000, 1_000_000, 10_000_000])
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the steady-state samples/s")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs per row, round-robin over the rows; a row shows the median (and the range)")
    ap.add_argument("--work", default="/tmp/vitrine-scale")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VITRINE_DATA", str(work / "data"))
    worlds = {}
    for users in a.vocabs:
        ds = ensure_world(work, users)
        fields = json.loads((ds / "manifest.json").read_text())["fields"]
        worlds[users] = (ds, {f["vocab"]: int(f["vocab_size"]) for f in fields if f.get("vocab")})
    runs: dict[tuple[int, str], list[dict]] = {}
    for _ in range(a.repeats):  # round-robin: a slow spell of the machine touches every row alike
        for users, (ds, sizes) in worlds.items():
            for mode in a.modes:
                r = run(ds, mode, a.steps, work)
                one = {"samples_per_s": steady_samples_per_s(r["run_id"], a.warmup),
                       "bytes_per_step": bytes_per_step(mode, r["result"]), "rss": r["rss"], "wall_s": r["wall_s"]}
                runs.setdefault((users, mode), []).append(one)
                print(json.dumps({"users": users, "mode": mode, **one}), flush=True)
    rows = []
    for (users, mode), rs in runs.items():
        sizes = worlds[users][1]
        med = sorted(rs, key=lambda r: r["samples_per_s"])[len(rs) // 2]
        rows.append({"users": users, "user_rows": sizes.get("user_id", -1), "rows": sum(sizes.values()),
                     "mode": mode, "per_user": round(world_config(users).impressions / users, 3), **med,
                     "samples_per_s_runs": [r["samples_per_s"] for r in rs]})
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    misses = check(rows)
    for m in misses:
        print("MISS:", m)
    return 1 if misses else 0


def table(rows: list[dict]) -> str:
    out = ["| user rows | all table rows | mode | samples/s | bytes/step | peak RSS MB (per process kind) |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        rss = ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in sorted(r["rss"].items()))
        runs = r.get("samples_per_s_runs", [])
        spread = f" [{min(runs):,.0f}..{max(runs):,.0f}]" if len(runs) > 1 else ""
        out.append(f"| {r['user_rows']:,} | {r['rows']:,} | {r['mode']} | {r['samples_per_s']:,.0f}{spread} | {r['bytes_per_step']:,.0f} | {rss} |")
    return "\n".join(out)


def check(rows: list[dict]) -> list[str]:
    misses = []
    for mode in MODES:
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["users"])
        if len(mine) < 2:
            continue
        hi = mine[-1]
        lo = next(r for r in mine if r["per_user"] == hi["per_user"])  # the reference (see the docstring)
        if lo is hi:
            continue
        ratio = hi["samples_per_s"] / lo["samples_per_s"]
        if not ratio >= MIN_SPEED_RATIO:
            misses.append(f"{mode}: samples/s at {hi['users']:,} users is {ratio:.2f}x that at {lo['users']:,} "
                          f"(target >= {MIN_SPEED_RATIO})")
        if lo["bytes_per_step"] > 0:
            drift = hi["bytes_per_step"] / lo["bytes_per_step"] - 1
            if abs(drift) > MAX_BYTES_DRIFT:
                misses.append(f"{mode}: bytes per step {drift:+.1%} from {lo['users']:,} to {hi['users']:,} users "
                              f"(target within {MAX_BYTES_DRIFT:.0%})")
    return misses


if __name__ == "__main__":
    sys.exit(main())
