"""The job registry and the control channel with real processes: jobs launched detached and
followed to their exit code, CLI-started jobs registering themselves, stops (graceful, forced,
enforced by the wrapper), the control channel under concurrent writers, and the capability checks
behind `vitrine job switch/straggler`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from vitrine import control, jobs
from vitrine.errors import UserError

VITRINE = [sys.executable, "-m", "vitrine"]
TINY_WORLD = ["--users", "40", "--items", "20", "--days", "3", "--no-progress"]

# A stand-in for a CLI job that ignores SIGTERM (a real process using the real registry API).
STUBBORN = """
import os, signal, sys, time
sys.path.insert(0, {root!r})
from vitrine import jobs
job = jobs.register_current("train", ["train", "--stubborn"])
jobs.set_capabilities({caps!r})
signal.signal(signal.SIGTERM, signal.SIG_IGN if {ignore!r} else signal.SIG_DFL)
print(job.id, flush=True)
time.sleep(600)
"""


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("VITRINE_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("VITRINE_JOB_ID", raising=False)
    return tmp_path / "data"


def _env(data_root: Path) -> dict[str, str]:
    env = {**os.environ, "VITRINE_DATA": str(data_root), "PYTHONPATH": str(ROOT)}
    env.pop("VITRINE_JOB_ID", None)
    return env


def _until(pred, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(every)


def _stubborn(data_root: Path, ignore_term: bool = True, caps: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", STUBBORN.format(root=str(ROOT), caps=list(caps), ignore=ignore_term)],
                            env=_env(data_root), stdout=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip()
    assert job_id, "the stand-in job did not register"
    return proc, job_id


def test_launched_job_runs_detached_and_records_its_exit(data_root, tmp_path):
    out = tmp_path / "world"
    job = jobs.launch(["generate", "--out", str(out), *TINY_WORLD], "generate")
    assert job.status == "running" and job.launcher == "dashboard" and job.wrapper_pid
    assert os.getpgid(job.wrapper_pid) == job.wrapper_pid  # its own session: outlives whoever launched it
    done = _until(lambda: (j := jobs.get(job.id)).status != "running" and j, 180, "the generate job to end")
    assert done.status == "finished" and done.exit_code == 0, done.tail()
    rec = json.loads((done.dir / "job.json").read_text())
    assert rec["argv"][0] == "generate" and rec["pid"] and rec["create_time"] and rec["pgid"] == rec["pid"]
    assert "world written to" in done.tail()
    assert done.progress["done"] == done.progress["total"] == 4 and done.progress["stage"] == "done"
    assert (out / "world.json").exists()
    assert [j.id for j in jobs.list_jobs()] == [job.id]


def test_a_job_outlives_the_process_that_launched_it(data_root, tmp_path):
    """What a dashboard restart looks like: the launcher exits at once, another process follows the job."""
    code = ("import sys; sys.path.insert(0, {root!r}); from vitrine import jobs\n"
            "print(jobs.launch(['generate', '--out', {out!r}, *{args!r}], 'generate').id)")
    launcher = subprocess.run([sys.executable, "-c", code.format(root=str(ROOT), out=str(tmp_path / "w"), args=TINY_WORLD)],
                              env=_env(data_root), capture_output=True, text=True, timeout=60, check=True)
    job_id = launcher.stdout.strip()
    done = _until(lambda: (j := jobs.get(job_id)).status != "running" and j, 180, "the orphaned job to end")
    assert done.status == "finished" and done.exit_code == 0, done.tail()


def test_a_failing_job_is_failed_with_its_message(data_root, tmp_path):
    job = jobs.launch(["pipeline", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o")], "pipeline")
    done = _until(lambda: (j := jobs.get(job.id)).status != "running" and j, 120, "the pipeline job to end")
    assert done.status == "failed" and done.exit_code == 2
    assert "does not exist" in done.tail() and "Traceback" not in done.tail()


def test_cli_jobs_register_themselves(data_root, tmp_path):
    env = _env(data_root)
    ok = subprocess.run([*VITRINE, "generate", "--out", str(tmp_path / "w"), *TINY_WORLD], env=env,
                        capture_output=True, text=True, timeout=180)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run([*VITRINE, "pipeline", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    listed = {j.kind: j for j in jobs.list_jobs()}
    assert listed["generate"].status == "finished" and listed["generate"].launcher == "cli"
    assert listed["generate"].argv[:2] == ["generate", "--out"] and listed["generate"].log is None
    assert listed["pipeline"].status == "failed" and listed["pipeline"].exit_code == 2
    assert len(jobs.list_jobs()) == 2


def test_a_registry_that_cannot_be_written_costs_a_warning_not_the_command(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs").write_text("a file where the registry should be")
    done = subprocess.run([*VITRINE, "generate", "--out", str(tmp_path / "w"), *TINY_WORLD], env=_env(data),
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and (tmp_path / "w" / "world.json").exists()
    assert "warning: could not record this job" in done.stderr


def test_sigkilled_cli_job_is_lost_and_a_recycled_pid_is_not_running(data_root):
    proc, job_id = _stubborn(data_root, ignore_term=False)
    assert jobs.get(job_id).status == "running"
    proc.kill()
    proc.wait()
    assert jobs.get(job_id).status == "lost"
    # A live pid with another create time is some other process, not the job.
    d = jobs.job_dir(job_id)
    rec = json.loads((d / "job.json").read_text())
    rec.update(pid=os.getpid(), create_time=1.0)
    (d / "job.json").write_text(json.dumps(rec))
    assert jobs.get(job_id).status == "lost"


def test_stop_forces_a_job_that_ignores_sigterm_and_spares_its_process_group(data_root):
    proc, job_id = _stubborn(data_root, ignore_term=True)
    job = jobs.get(job_id)
    assert job.pgid is None  # it shares this test's process group: only its own tree may be signalled
    t = time.monotonic()
    stopped = jobs.stop(job, timeout=1.0)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert time.monotonic() - t >= 1.0
    assert stopped.status == "stopped" and not stopped.running
    assert [c["cmd"] for c in control.ControlReader(stopped.dir).poll()] == ["stop"]
    with pytest.raises(UserError, match="not running"):
        jobs.stop(stopped)


def test_stop_ends_a_launched_job_and_its_output_is_not_left_half_written(data_root, tmp_path):
    out = tmp_path / "big"
    job = jobs.launch(["generate", "--out", str(out), "--scale", "20", "--no-progress"], "generate")
    _until(lambda: (jobs.get(job.id).progress or {}).get("stage") in ("images", "impressions"), 120,
           "the generator to start drawing")
    stopped = jobs.stop(jobs.get(job.id), timeout=20)
    assert stopped.status == "stopped" and stopped.exit_code == -signal.SIGTERM
    assert not out.exists()


def test_the_wrapper_enforces_a_stop_timeout_on_its_own(data_root, tmp_path):
    """A stop command alone (no signal, the sender gone): the wrapper kills the job after its timeout."""
    job = jobs.launch(["generate", "--out", str(tmp_path / "big"), "--scale", "20", "--no-progress"], "generate")
    _until(lambda: jobs.get(job.id).pid, 60, "the wrapper to start the job")
    control.send(job.id, {"cmd": "stop", "timeout": 0.5})
    done = _until(lambda: (j := jobs.get(job.id)).exit_code is not None and j, 60, "the wrapper to kill the job")
    assert done.exit_code == -signal.SIGKILL


def test_progress_is_throttled_but_never_hides_a_stage_or_the_end(data_root, monkeypatch):
    job = jobs.register_current("train", ["train"])
    try:
        path = job.dir / "progress.json"
        jobs.report_progress(1, 100, stage="a")
        for i in range(2, 50):
            jobs.report_progress(i, 100, stage="a")
        assert json.loads(path.read_text())["done"] == 1  # within 0.5 s of the last write
        jobs.report_progress(50, 100, stage="b")
        assert json.loads(path.read_text())["stage"] == "b"
        jobs.report_progress(100, 100, stage="b", loss=0.5)
        assert json.loads(path.read_text()) | {"time": 0} == {"done": 100, "total": 100, "stage": "b", "loss": 0.5,
                                                              "time": 0}
    finally:
        jobs.record_exit(job.id, 0)
        monkeypatch.delenv("VITRINE_JOB_ID", raising=False)
    jobs.report_progress(1, 2)  # not a job: a no-op


def test_control_channel_numbers_concurrent_commands_and_reads_each_once(data_root):
    job = jobs.register_current("train", ["train"])
    os.environ.pop("VITRINE_JOB_ID", None)
    code = ("import sys; sys.path.insert(0, {root!r}); from vitrine import control\n"
            "for i in range(25): control.send({d!r}, {{'cmd': 'switch', 'mode': 'gba'}})")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(root=str(ROOT), d=str(job.dir))]) for _ in range(4)]
    reader = control.ControlReader(job.dir)
    seen = []
    for p in procs:
        assert p.wait(timeout=60) == 0
    seen += reader.poll()
    assert sorted(c["seq"] for c in seen) == list(range(1, 101))
    assert reader.poll() == []
    with open(job.dir / control.FILE, "a") as fh:
        fh.write('{"cmd": "stop", "seq": 101')  # a writer caught mid-line
    assert reader.poll() == []
    with open(job.dir / control.FILE, "a") as fh:
        fh.write("}\n")
    assert [c["cmd"] for c in reader.poll()] == ["stop"]
    jobs.record_exit(job.id, 0)


@pytest.mark.parametrize("command, message", [
    ({"cmd": "switch", "mode": "fast"}, "mode must be one of ar, gba, async, auto"),
    ({"cmd": "straggler", "spec": "1"}, "expected RANK:FACTOR"),
    ({"cmd": "straggler", "spec": "random:2:3"}, r"probability P must be in \(0, 1\]"),
    ({"cmd": "straggler", "spec": "0:0.5"}, "FACTOR .* must be >= 1"),
    ({"cmd": "reboot"}, "unknown control command"),
])
def test_bad_commands_are_refused_with_the_reason(command, message):
    with pytest.raises(UserError, match=message):
        control.validate(command)


def test_switch_and_straggler_need_the_jobs_capability(data_root):
    env = _env(data_root)
    proc, plain = _stubborn(data_root, ignore_term=False)
    proc2, able = _stubborn(data_root, ignore_term=False, caps=("stop", "switch", "straggler"))
    try:
        with pytest.raises(UserError, match="does not accept 'switch'"):
            jobs.send_command(jobs.get(plain), {"cmd": "switch", "mode": "gba"})
        refused = subprocess.run([*VITRINE, "job", "switch", plain, "gba"], env=env, capture_output=True, text=True,
                                 timeout=60)
        assert refused.returncode == 2 and "does not accept 'switch'" in refused.stderr
        assert jobs.get(able).capabilities == ["stop", "straggler", "switch"]
        jobs.send_command(jobs.get(able), {"cmd": "switch", "mode": "gba"})
        done = subprocess.run([*VITRINE, "job", "straggler", able, "random:0.1:4"], env=env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        cmds = control.ControlReader(jobs.job_dir(able)).poll()
        assert [(c["cmd"], c.get("mode") or c.get("spec")) for c in cmds] == [("switch", "gba"), ("straggler", "random:0.1:4")]
        listed = subprocess.run([*VITRINE, "job", "list"], env=env, capture_output=True, text=True, timeout=60)
        assert plain in listed.stdout and able in listed.stdout and "running" in listed.stdout
    finally:
        for p in (proc, proc2):
            p.kill()
            p.wait()
    assert jobs.capability_problem(jobs.get(able), "switch") == f"job {able} is lost, not running"


def test_job_ids_cannot_leave_the_registry(data_root):
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(UserError, match="bad job id"):
            jobs.get(bad)
    with pytest.raises(UserError, match="list of strings"):
        jobs.launch("generate --out x", "generate")  # type: ignore[arg-type]
