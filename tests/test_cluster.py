"""The path a user takes to a real cluster: a separately started scheduler and worker processes on
127.0.0.1, reached with `vitrine pipeline --scheduler`. The output must equal a LocalCluster run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from conftest import ROOT, make_raw

BIN = Path(sys.executable).parent


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, f"{proc.args[0]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def test_pipeline_on_a_separately_started_scheduler(tmp_path, dask_address):
    raw = tmp_path / "raw"
    make_raw(raw, n=1500)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sched_file = tmp_path / "scheduler.json"
    procs = []
    try:
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(sched_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path))
        _wait_for(sched_file, procs[0])
        address = json.loads(sched_file.read_text())["address"]
        procs.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1",
             "--host", "127.0.0.1", "--no-dashboard"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path))
        from distributed import Client

        with Client(address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)
            assert len(c.scheduler_info()["workers"]) == 2

        out = tmp_path / "remote"
        done = subprocess.run(
            [str(BIN / "vitrine"), "pipeline", "--raw", str(raw), "--out", str(out), "--scheduler", address,
             "--no-progress"],
            env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "1500 in, 1500 out" in done.stdout
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)

    local = tmp_path / "local"
    from pipeline.build import PipelineConfig, run_pipeline

    run_pipeline(PipelineConfig(raw=str(raw), out=str(local), scheduler=dask_address, progress=False))
    for split in ("train", "valid", "test"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / split), pd.read_parquet(local / split))
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["scheduler"] == address
