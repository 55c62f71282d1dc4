"""The fault table: SIGKILL one process of a real job mid-run, then resume it as the job says.

For each case (a process kind x a mode) it starts `vitrine train` on a small synthetic world, waits for
a checkpoint past step K, checks that every listening socket of the job is on 127.0.0.1, SIGKILLs the
chosen process, and measures: seconds until every process of
the job is gone (or, for a tolerated PS worker, whether the job went on), the one line the job
printed, processes or listening ports left behind, the MLflow run's status. Then it runs the command
the job printed (`vitrine train --resume RUN`) and compares the resumed run with an uninterrupted run
of the same settings: steps, and (single, ar, float64) the largest parameter difference.

    python benchmarks/fault_table.py [--cases worker:ar,shard:gba,...] [--out benchmarks/results/faults.md]

Exits non-zero when a case misses the contract (docs/DISTRIBUTED.md, "Failure model"):
stop within 10 s, one line with the resume command, nothing left behind, no RUNNING run, and the
resumed run equal to the uninterrupted one (single/ar to 1e-9; PS modes: the same step count).
`tests/test_faults.py` runs a few cases of the same harness.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STOP_LIMIT_S = 10.0
EXACT = ["--dtype", "float64", "--optimizer", "adam", "--lr", "0.01", "--seed", "3", "--threads", "1",
         "--no-progress", "--epochs", "1", "--max-steps", "16", "--checkpoint-every", "3", "--log-every", "2"]


@dataclass
class Case:
    victim: str  # launcher | coordinator | worker | shard | service
    mode: str  # single | ar | async | gba | auto
    features: str = "ids"
    workers: int = 3

    @property
    def name(self) -> str:
        return f"{self.victim}:{self.mode}" + ("+images" if self.features != "ids" else "")


@dataclass
class Outcome:
    case: Case
    went_on: bool = False  # a tolerated worker: the job finished by itself
    stop_s: float = float("nan")
    line: str = ""
    resume_cmd: str = ""
    left: list[str] = field(default_factory=list)  # processes or ports still there
    listening: int = 0  # listening sockets of the running job (all on 127.0.0.1, else a problem)
    mlflow_status: str = ""
    steps: int = -1
    resumed_steps: int = -1
    reference_steps: int = -1
    max_diff: float = float("nan")
    problems: list[str] = field(default_factory=list)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _argv(case: Case, ds: Path, run_dir: Path) -> list[str]:
    argv = [sys.executable, "-m", "vitrine", "train", "--dataset", str(ds), "--run-dir", str(run_dir), *EXACT,
            "--mode", case.mode, "--features", case.features]
    if case.mode != "single":
        argv += ["--workers", str(case.workers), "--global-batch", str(64 * case.workers)]
    else:
        argv += ["--batch-size", "192"]
    if case.mode in ("gba", "async", "auto"):
        argv += ["--max-staleness", "0"]
    if case.features != "ids":
        argv += ["--image-service", "spawn"]
    return argv


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _victim(case: Case, job: subprocess.Popen):
    import psutil

    if case.victim == "launcher":
        return psutil.Process(job.pid)
    for p in _tree(job.pid)[1:]:
        try:
            cmd = " ".join(p.cmdline())
            rank = p.environ().get("RANK")
        except psutil.Error:
            continue
        if case.victim == "shard" and "trainer.ps.server" in cmd:
            return p
        if case.victim == "service" and " images serve" in cmd:
            return p
        if case.victim == "coordinator" and rank == "0" and " train " in cmd:
            return p
        if case.victim == "worker" and rank == "2" and " train " in cmd:
            return p
    return None


def _step(run_dir: Path) -> int:
    import torch

    try:
        return int(torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"])
    except Exception:  # noqa: BLE001 - not there yet, or being replaced
        return -1


def _listening(procs: list) -> list[str]:
    import psutil

    out = []
    for p in procs:
        try:
            out += [f"{c.laddr.ip}:{c.laddr.port} (pid {p.pid})" for c in p.net_connections(kind="tcp")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return out


def _mlflow_status(run_dir: Path) -> str:
    path = run_dir / "mlflow_run_id"
    if not path.exists():
        return "-"
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    return MlflowClient(tracking.setup()).get_run(path.read_text().strip()).info.status


def expected_steps(ds: Path, case: Case) -> int:
    """Global steps of the whole job: EXACT's epochs x batches per epoch, at most its --max-steps."""
    import pyarrow.parquet as pq

    rows = pq.ParquetDataset(str(ds / "train")).read(columns=["label"]).num_rows
    batch = 192 if case.mode == "single" else 64 * case.workers
    total = int(EXACT[EXACT.index("--epochs") + 1]) * -(-rows // batch)
    return min(total, int(EXACT[EXACT.index("--max-steps") + 1]))


def _logged_twice(run_dir: Path) -> list[tuple[str, int]]:
    """(metric, step) pairs the resumed MLflow run holds more than once."""
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    client = MlflowClient(tracking.setup())
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    out = []
    for key in ("loss", "valid_auc"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        out += [(key, s) for s in sorted(set(steps)) if steps.count(s) > 1]
    return out


def run_case(case: Case, ds: Path, work: Path, kill_after_step: int = 4, timeout_s: float = 300,
             reference: bool = True) -> Outcome:
    """One case, with the resume and (`reference`) the uninterrupted run to compare it with; without
    it the resumed run's step count is checked against the job's planned total."""
    import psutil

    out = Outcome(case)
    run_dir = work / f"{case.victim}-{case.mode}"
    job = subprocess.Popen(_argv(case, ds, run_dir), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        victim = None
        while victim is None:
            if job.poll() is not None or time.monotonic() > deadline:
                out.problems.append("the job ended (or hung) before the kill: " + job.communicate()[0][-2000:])
                return out
            if _step(run_dir) >= kill_after_step:
                victim = _victim(case, job)
            time.sleep(0.1)
        procs = [p for p in _tree(job.pid) if p.pid != victim.pid]
        # Every socket of the running job listens on 127.0.0.1: stores, RPC agents, gloo, service, shards.
        wide = [a for a in _listening(_tree(job.pid)) if not a.startswith("127.0.0.1:")]
        if wide:
            out.problems.append(f"sockets not bound to 127.0.0.1: {wide}")
        out.listening = len(_listening(_tree(job.pid)))
        t0 = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        text = job.communicate(timeout=timeout_s)[0]
        gone, alive = psutil.wait_procs(procs, timeout=max(STOP_LIMIT_S * 3 - (time.monotonic() - t0), 0.1))
        out.stop_s = time.monotonic() - t0
        out.left = [f"pid {p.pid} {' '.join(p.cmdline())[:80]}" for p in alive if p.is_running()]
        out.left += _listening(alive)
        for p in alive:
            p.kill()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    tolerated = case.victim == "worker" and case.mode in ("async", "gba", "auto")
    if tolerated:
        out.went_on = job.returncode == 0
        if not out.went_on:
            out.problems.append(f"the job did not go on without worker 2 (exit {job.returncode}): {text[-1500:]}")
        out.steps = json.loads((run_dir / "result.json").read_text())["steps"] if out.went_on else -1
        out.mlflow_status = _mlflow_status(run_dir)
        if out.mlflow_status != "FINISHED":
            out.problems.append(f"MLflow run {out.mlflow_status}")
        return out
    m = re.search(r"`(vitrine train --resume [^`]+)`", text)
    lines = [ln for ln in text.splitlines() if "--resume" in ln]
    out.line = lines[-1].strip() if lines else text.strip().splitlines()[-1] if text.strip() else ""
    if out.stop_s > STOP_LIMIT_S:
        out.problems.append(f"stopped after {out.stop_s:.1f} s")
    if "Traceback" in text:
        out.problems.append("a traceback reached the terminal")
    if out.left:
        out.problems.append(f"left behind: {out.left}")
    out.mlflow_status = _mlflow_status(run_dir)
    if out.mlflow_status not in ("FAILED", "KILLED"):
        out.problems.append(f"MLflow run {out.mlflow_status}")
    if m is None:
        out.problems.append(f"no resume command in the output: {text[-1500:]}")
        return out
    out.resume_cmd = m.group(1) if m else f"vitrine train --resume {run_dir}"
    out.steps = _step(run_dir)
    argv = [sys.executable, "-m", "vitrine", *out.resume_cmd.split()[1:], "--no-progress"]
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        out.problems.append(f"resume failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")
        return out
    import torch

    a = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    out.resumed_steps = int(a["step"])
    hist = [h["step"] for h in a["history"]]
    if len(hist) != len(set(hist)):
        out.problems.append(f"an epoch was evaluated twice: {hist}")
    twice = _logged_twice(run_dir)
    if twice:
        out.problems.append(f"steps logged twice to MLflow: {twice[:5]}")
    if not reference:
        out.reference_steps = expected_steps(ds, case)
        if out.resumed_steps != out.reference_steps:
            out.problems.append(f"resumed to step {out.resumed_steps}, the job has {out.reference_steps}")
        return out
    ref_dir = work / f"{case.victim}-{case.mode}-reference"
    ref = subprocess.run(_argv(case, ds, ref_dir), env=_env(), capture_output=True, text=True, timeout=timeout_s)
    if ref.returncode != 0:
        out.problems.append(f"reference failed: {(ref.stdout + ref.stderr)[-2000:]}")
        return out
    b = torch.load(ref_dir / "checkpoint.pt", weights_only=False)
    out.reference_steps = int(b["step"])
    if out.resumed_steps != out.reference_steps:
        out.problems.append(f"resumed to step {out.resumed_steps}, the uninterrupted run {out.reference_steps}")
    out.max_diff = max(float((a["model"][k].double() - b["model"][k].double()).abs().max()) for k in b["model"])
    if case.mode in ("single", "ar") and not out.max_diff <= 1e-9:
        out.problems.append(f"resumed model differs from the uninterrupted one by {out.max_diff:.3g}")
    return out


def table(outcomes: list[Outcome]) -> str:
    rows = ["| killed | mode | sockets (all 127.0.0.1) | what happened | s to stop | resumed steps (uninterrupted) | "
            "max param diff | MLflow | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for o in outcomes:
        what = "job went on" if o.went_on else (o.line[:90].replace("|", "/") or "-")
        stop = "-" if o.went_on else f"{o.stop_s:.1f}"
        steps = f"{o.steps} (job finished)" if o.went_on else f"{o.resumed_steps} ({o.reference_steps})"
        diff = "-" if o.max_diff != o.max_diff else f"{o.max_diff:.1e}"
        rows.append(f"| {o.case.victim} | {o.case.mode}{' +images' if o.case.features != 'ids' else ''} | "
                    f"{o.listening} | {what} | "
                    f"{stop} | {steps} | {diff} | {o.mlflow_status} | {'ok' if not o.problems else 'MISS'} |")
    return "\n".join(rows)


ALL = ("launcher:single coordinator:ar worker:ar shard:ar launcher:ar coordinator:gba worker:gba shard:gba "
       "launcher:gba service:gba+images coordinator:async worker:async shard:auto service:ar+images "
       "coordinator:auto+images")


def parse_cases(spec: str) -> list[Case]:
    out = []
    for part in spec.split():
        victim, _, mode = part.partition(":")
        mode, _, images = mode.partition("+")
        out.append(Case(victim, mode, "ids+images" if images else "ids", 1 if mode == "single" else 3))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=ALL, help="space-separated VICTIM:MODE[+images]")
    ap.add_argument("--work", default="/tmp/vitrine-faults")
    ap.add_argument("--out", default=None, help="also write the table here (Markdown)")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import shutil

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.setdefault("VITRINE_DATA", str(work / "data"))
    ds = _world(work)
    outcomes = []
    for case in parse_cases(a.cases):
        o = run_case(case, ds, work)
        print(f"{case.name}: {'ok' if not o.problems else 'MISS: ' + '; '.join(o.problems)}", flush=True)
        outcomes.append(o)
    text = table(outcomes)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0 if all(not o.problems for o in outcomes) else 1


def _world(work: Path) -> Path:
    """The tests' small world (300 users, 150 items, 5 days)."""
    from pipeline.build import PipelineConfig, run_pipeline
    from pipeline.synth.world import WorldConfig, generate

    generate(WorldConfig(users=300, items=150, days=5, seed=5), work / "raw", progress=False)
    run_pipeline(PipelineConfig(raw=str(work / "raw"), out=str(work / "ds"), progress=False, max_behaviors=20,
                                track=False))
    return work / "ds"


if __name__ == "__main__":
    sys.exit(main())
