"""What the job registry says about jobs that ended: a finished job is at 100% whatever its last
throttled progress report said, and a `vitrine pipeline` killed with SIGKILL has its MLflow run ended
(KILLED) when its job is next seen, instead of RUNNING forever."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, make_raw
from vitrine import jobs


@pytest.fixture
def fresh_job_env(monkeypatch):
    monkeypatch.delenv("VITRINE_JOB_ID", raising=False)
    yield
    os.environ.pop("VITRINE_JOB_ID", None)


def test_a_finished_job_shows_100_percent(fresh_job_env, capsys):
    from vitrine.cli import main

    job = jobs.register_current("train", ["train", "--mode", "gba"])
    jobs.report_progress(111, 112, epoch=1)
    assert jobs.get(job.id).progress["done"] == 111  # still running: as reported
    jobs.record_exit(job.id, 0)
    os.environ.pop("VITRINE_JOB_ID", None)
    done = jobs.get(job.id)
    assert done.status == "finished" and done.progress["done"] == done.progress["total"] == 112
    assert json.loads((job.dir / "progress.json").read_text())["done"] == 111  # the file is the job's own
    main(["job", "list"])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(job.id))
    assert " 100% " in line, line


def test_a_sigkilled_pipelines_run_is_ended_when_its_job_is_next_seen(tmp_path, fresh_job_env):
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    raw = tmp_path / "raw"
    make_raw(raw, n=2000)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VITRINE_JOB_ID", None)
    before = {d.name for d in jobs.jobs_root().iterdir()} if jobs.jobs_root().is_dir() else set()
    proc = subprocess.Popen([sys.executable, "-m", "vitrine", "pipeline", "--raw", str(raw), "--out",
                             str(tmp_path / "out"), "--workers", "1", "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        rec = None
        while rec is None:
            assert proc.poll() is None, "the pipeline ended before it could be killed"
            assert time.monotonic() < deadline, "the pipeline recorded no MLflow run"
            mine = [d for d in jobs.jobs_root().iterdir() if d.name not in before] if jobs.jobs_root().is_dir() else []
            rec = next((d / jobs.RUN_FILE for d in mine if (d / jobs.RUN_FILE).exists()), None)
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run_id = json.loads(rec.read_text())["run_id"]
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing closed it

    job = jobs.get(rec.parent.name)  # the job is seen (as by `vitrine job list` or the dashboard)
    assert job.status == "lost"
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and "without closing this run" in run.data.tags["vitrine.error"]
    assert json.loads(rec.read_text())["closed"] == "KILLED"  # once: the next look costs nothing
