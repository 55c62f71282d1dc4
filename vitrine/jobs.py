"""The job registry: every generate / pipeline / train / serve process, wherever it was started.

Jobs must outlive the page that started them, and two browser tabs (or a restarted dashboard, or
`vitrine job list` in a terminal) must see the same jobs, so the registry is a directory on disk,
`DATA/jobs/<job_id>/`, never the memory of a process:

| file | written by | content |
|---|---|---|
| `job.json` | the launcher, then updated under a lock | id, kind, argv, pid + its create time, pgid, host, started, capabilities, stop request |
| `log.txt` | the job (stdout + stderr) | only for jobs launched here; a CLI job logs to its terminal |
| `exit_code` | the wrapper (launched jobs) or `vitrine.cli.main` (CLI jobs) | the exit status, once it ended |
| `progress.json` | the job, through `report_progress` | done, total, and whatever the job adds |
| `mlflow_run.json` | the job, through `record_mlflow_run` | its MLflow run id and tracking URI; `closed` once the registry ended a dead job's run |
| `control.jsonl` | `vitrine.control.send` | commands to the job |

A launched job runs under a small wrapper (`python -m vitrine.jobs _run JOB -- ARGV`) that is the
job's parent: it records the child's pid, waits for it and writes `exit_code`, so the status
survives the dashboard. The job itself leads its own process group, so a stop reaches its workers.

Status is derived, never stored: `running` (the recorded pid is alive with the recorded create time,
so a recycled pid is not mistaken for the job), `finished` (exit 0), `failed` (non-zero exit),
`stopped` (a stop was requested and the process is gone), `lost` (gone without an exit code, e.g.
a CLI job killed with SIGKILL) and `unknown` (started on another host, no exit code yet). A finished
job's progress reads done = total, whatever its last throttled report said.

A job killed before it could close its MLflow run (SIGKILL, the machine's OOM killer) would leave the
run RUNNING forever: when such a job is next seen (`vitrine job list`, the dashboard), the registry
ends the run it recorded KILLED (killed, stopped or lost) or FAILED (a non-zero exit), once.

This module is imported by `vitrine.cli.main` for every job, so it imports nothing heavy.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vitrine import control, paths
from vitrine.errors import UserError
from vitrine.paths import JOB_ID_RE, job_dir, jobs_root

KINDS = ("generate", "pipeline", "train", "serve")
ENV = "VITRINE_JOB_ID"
STOP_TIMEOUT_S = 30.0
PROGRESS_MIN_INTERVAL_S = 0.5
_ID_RE = JOB_ID_RE
_ROOT = Path(__file__).resolve().parents[1]

# Launched wrappers are children of this process: keep their Popen objects so they are reaped
# (an unreaped child is a zombie, which looks alive to a pid check).
_children: list[subprocess.Popen] = []


# -- where: jobs_root() and job_dir(job_id) live in vitrine.paths (vitrine.control needs them too) ----
def _new_id(kind: str) -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(3)}"


# -- files -------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: Any) -> None:
    """Temp file + rename, so a reader sees the old or the new content, never half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=1, default=str)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@contextmanager
def _locked(d: Path) -> Iterator[None]:
    with open(d / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _update(d: Path, **fields: Any) -> dict[str, Any]:
    """Read-modify-write job.json under the job's lock (launcher, wrapper and job all write it)."""
    with _locked(d):
        data = _read_json(d / "job.json") or {}
        data.update(fields)
        _write_json(d / "job.json", data)
    return data


def _create_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


# -- the record --------------------------------------------------------------------------------------
@dataclass
class Job:
    id: str
    dir: Path
    kind: str
    argv: list[str]
    pid: int | None = None
    create_time: float | None = None
    pgid: int | None = None
    wrapper_pid: int | None = None
    wrapper_create_time: float | None = None
    started: float = 0.0
    host: str = ""
    launcher: str = "cli"
    log: str | None = None
    cwd: str | None = None
    capabilities: list[str] = field(default_factory=list)
    stop_requested: float | None = None
    exit_code: int | None = None
    ended: float | None = None
    progress: dict[str, Any] | None = None
    status: str = "unknown"

    @property
    def command_line(self) -> str:
        return "vitrine " + shlex.join(self.argv)

    @property
    def running(self) -> bool:
        return self.status == "running"

    def tail(self, lines: int = 40, max_bytes: int = 64_000) -> str:
        """The log's last lines as a terminal would show them (a progress bar's `\\r` redraws
        collapse to their last state)."""
        if not self.log:
            return ""
        try:
            with open(self.log, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max_bytes))
                data = fh.read().decode("utf-8", "replace")
        except OSError:
            return ""
        out = []
        for line in data.split("\n"):
            segs = [s for s in line.split("\r") if s.strip()]
            out.append(segs[-1] if segs else "")
        while out and not out[-1]:
            out.pop()
        return "\n".join(out[-lines:])


def _proc(pid: int | None, create_time: float | None):
    """The live psutil.Process of (pid, create_time), or None (gone, zombie or a recycled pid)."""
    if not pid:
        return None
    import psutil

    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.01:
            return None
        if p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _status(job: Job) -> str:
    if job.exit_code is not None:
        if job.stop_requested is not None:
            return "stopped"
        return "finished" if job.exit_code == 0 else "failed"
    if job.host and job.host != socket.gethostname():
        return "unknown"
    if _proc(job.pid, job.create_time) or _proc(job.wrapper_pid, job.wrapper_create_time):
        return "running"
    return "stopped" if job.stop_requested is not None else "lost"


def _load(d: Path) -> Job | None:
    data = _read_json(d / "job.json")
    if data is None or "kind" not in data:
        return None
    names = Job.__dataclass_fields__
    job = Job(dir=d, **{k: v for k, v in data.items() if k in names and k not in ("dir", "status", "exit_code",
                                                                                  "ended", "progress")})
    job.id = d.name
    exit_file = d / "exit_code"
    try:
        job.exit_code = int(exit_file.read_text().strip())
        job.ended = exit_file.stat().st_mtime
    except (OSError, ValueError):
        pass
    job.progress = _read_json(d / "progress.json")
    job.status = _status(job)
    if job.status == "finished" and job.progress and job.progress.get("total"):
        # It ran to the end: its last report may have been throttled away (111/112 for a finished job).
        job.progress = {**job.progress, "done": job.progress["total"]}
    if job.status in ("failed", "stopped", "lost"):
        _close_dead_run(job)
    return job


def _close_dead_run(job: Job) -> None:
    """End the MLflow run a dead job left RUNNING (KILLED, or FAILED for a non-zero exit), once."""
    path = job.dir / RUN_FILE
    rec = _read_json(path)
    if not rec or rec.get("closed") or not rec.get("run_id"):
        return
    killed = job.status in ("stopped", "lost") or (job.exit_code is not None and job.exit_code < 0)
    status = "KILLED" if killed else "FAILED"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(rec.get("tracking_uri") or None)
        run = client.get_run(rec["run_id"])
        ended = run.info.status
        if ended == "RUNNING":
            client.set_tag(rec["run_id"], "vitrine.error",
                           f"the job's process ended ({job.status}) without closing this run; ended {status} by the "
                           f"job registry (job {job.id})")
            client.set_terminated(rec["run_id"], status)
            ended = status
    except Exception:  # noqa: BLE001 - the store may be unreachable now; try again next time
        return
    with _locked(job.dir):
        _write_json(path, {**rec, "closed": ended, "closed_at": time.time()})


def _reap() -> None:
    for p in list(_children):
        if p.poll() is not None:
            _children.remove(p)


def list_jobs(limit: int | None = None) -> list[Job]:
    """Every job in the registry, newest first (ids start with their start time)."""
    _reap()
    root = jobs_root()
    if not root.is_dir():
        return []
    out: list[Job] = []
    dirs = sorted((p for p in root.iterdir() if p.is_dir() and _ID_RE.match(p.name)), key=lambda p: p.name,
                  reverse=True)
    for d in dirs:
        # Ids order jobs to the second; within a second, job.json's start time decides.
        if limit is not None and len(out) >= limit and d.name[:15] != out[-1].id[:15]:
            break
        job = _load(d)
        if job is not None:
            out.append(job)
    out.sort(key=lambda j: (j.id[:15], j.started), reverse=True)
    return out[:limit] if limit is not None else out


def get(job_id: str) -> Job:
    _reap()
    d = job_dir(job_id)
    job = _load(d) if d.is_dir() else None
    if job is None:
        raise UserError(f"no job {job_id!r} in {jobs_root()} (`vitrine job list` shows the jobs)")
    return job


# -- starting ----------------------------------------------------------------------------------------
def _check_argv(argv: list[str], kind: str) -> list[str]:
    if kind not in KINDS:
        raise UserError(f"job kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(argv, (list, tuple)) or not all(isinstance(a, str) for a in argv):
        raise UserError("a job's command is a list of strings (never a shell string)")
    return list(argv)


def _new_record(kind: str, argv: list[str], launcher: str) -> tuple[str, Path, dict[str, Any]]:
    job_id = _new_id(kind)
    d = job_dir(job_id)
    d.mkdir(parents=True, exist_ok=False)
    record = {"id": job_id, "kind": kind, "argv": argv, "started": time.time(), "host": socket.gethostname(),
              "launcher": launcher, "cwd": os.getcwd(), "capabilities": []}
    return job_id, d, record


def launch(argv: list[str], kind: str, cwd: str | os.PathLike[str] | None = None) -> Job:
    """Start `vitrine ARGV` as a detached job (its own session, output to log.txt) and register it."""
    argv = _check_argv(argv, kind)
    job_id, d, record = _new_record(kind, argv, "dashboard")
    log = d / "log.txt"
    record.update(log=str(log), cwd=str(Path(cwd).resolve()) if cwd else os.getcwd())
    _write_json(d / "job.json", record)
    env = {**os.environ, ENV: job_id, "VITRINE_DATA": str(paths.data_root()), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vitrine.jobs", "_run", job_id, "--", *argv],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=record["cwd"], start_new_session=True, close_fds=True)
    _children.append(proc)
    _update(d, wrapper_pid=proc.pid, wrapper_create_time=_create_time(proc.pid))
    return get(job_id)


def register_current(kind: str, argv: list[str]) -> Job:
    """Record this process (a job started from the CLI) and export its id to what it starts."""
    argv = _check_argv(argv, kind)
    job_id, d, record = _new_record(kind, argv, "cli")
    pid = os.getpid()
    record.update(pid=pid, create_time=_create_time(pid), pgid=pid if os.getpgid(0) == pid else None, log=None)
    _write_json(d / "job.json", record)
    os.environ[ENV] = job_id
    return _load(d) or Job(id=job_id, dir=d, kind=kind, argv=argv)


def record_exit(job_id: str, code: int) -> None:
    """Write the exit status once (a later writer never overwrites the first)."""
    d = job_dir(job_id)
    if d.is_dir() and not (d / "exit_code").exists():
        fd, tmp = tempfile.mkstemp(prefix=".exit_code.", dir=d)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{int(code)}\n")
        os.replace(tmp, d / "exit_code")


# -- what a running job calls ------------------------------------------------------------------------
_progress_lock = threading.Lock()
_progress_last: dict[str, Any] = {"t": 0.0, "stage": None, "job": None}


def report_progress(done: int, total: int, **info: Any) -> None:
    """Publish progress for the dashboard when running as a job; a no-op otherwise.

    At most ~2 writes a second, but always when `done == total` or when `info["stage"]` changes
    (so a short stage is not hidden behind the throttle). Never raises: a progress display is not
    worth failing a job for.
    """
    job_id = os.environ.get(ENV)
    if not job_id:
        return
    now = time.monotonic()
    with _progress_lock:
        last = _progress_last
        same = last["job"] == job_id and last["stage"] == info.get("stage")
        if same and done < total and now - last["t"] < PROGRESS_MIN_INTERVAL_S:
            return
        last.update(t=now, stage=info.get("stage"), job=job_id)
        try:
            d = job_dir(job_id)
            if d.is_dir():
                _write_json(d / "progress.json", {"done": int(done), "total": int(total), "time": time.time(), **info})
        except (OSError, UserError, TypeError, ValueError):
            pass


RUN_FILE = "mlflow_run.json"


def _record_own(what: str, write) -> None:
    """When this process runs as a job: `write(its job directory)`; a registry that cannot be written
    costs a warning, never the job."""
    job_id = os.environ.get(ENV)
    if not job_id:
        return
    try:
        d = job_dir(job_id)
        if d.is_dir():
            write(d)
    except (OSError, UserError, TypeError, ValueError) as exc:
        print(f"vitrine: warning: could not record the job's {what}: {exc}", file=sys.stderr)


def record_mlflow_run(run_id: str, tracking_uri: str) -> None:
    """Note this job's MLflow run, so that the registry can end it should the job die without closing it."""
    _record_own("MLflow run", lambda d: _write_json(d / RUN_FILE, {"run_id": str(run_id), "tracking_uri": str(tracking_uri),
                                                                     "pid": os.getpid()}))


def set_capabilities(capabilities: list[str]) -> None:
    """Declare which control commands this job obeys (e.g. ["stop", "switch", "straggler"])."""
    _record_own("capabilities", lambda d: _update(d, capabilities=sorted({str(c) for c in capabilities})))


# -- steering ----------------------------------------------------------------------------------------
def capability_problem(job: Job, cmd: str) -> str | None:
    """Why `cmd` cannot be sent to `job` now, or None when it can."""
    if job.status != "running":
        return f"job {job.id} is {job.status}, not running"
    if cmd != "stop" and cmd not in job.capabilities:
        accepts = ", ".join(job.capabilities) or "stop only"
        return f"job {job.id} ({job.kind}) does not accept '{cmd}' (it accepts: {accepts})"
    return None


def send_command(job: Job, command: dict[str, Any]) -> dict[str, Any]:
    """Validate `command`, check the job accepts it, and append it to the job's channel."""
    command = control.validate(command)
    problem = capability_problem(job, command["cmd"])
    if problem:
        raise UserError(problem)
    return control.send(job.dir, command)


def _processes(job: Job) -> list:
    """The job's process and every descendant (collected before signalling: orphans re-parent)."""
    root = _proc(job.pid, job.create_time)
    if root is None:
        return []
    import psutil

    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return [root]


def _signal(job: Job, sig: int) -> None:
    """A job that leads its own process group gets `sig` group-wide (its workers included); a CLI
    job inside someone else's group (a shell's, a test runner's) gets it on its own process tree."""
    if job.pgid and job.pgid == job.pid and _proc(job.pid, job.create_time) is not None:
        try:
            os.killpg(job.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        return
    for p in _processes(job):
        try:
            p.send_signal(sig)
        except Exception:  # noqa: BLE001 - gone in between
            pass


def _alive(job: Job) -> bool:
    return _proc(job.pid, job.create_time) is not None


def stop(job: Job, timeout: float = STOP_TIMEOUT_S, wait: bool = True) -> Job:
    """Ask the job to stop (control command + SIGTERM), then SIGKILL it after `timeout` seconds.

    With `wait=False` this returns at once; a launched job's wrapper still enforces the timeout
    (it reads the stop command), so the escalation does not depend on the caller staying alive.
    """
    job = get(job.id)
    if job.status != "running":
        raise UserError(f"job {job.id} is {job.status}, not running; nothing to stop")
    if not (timeout >= 0):
        raise UserError(f"--timeout must be >= 0 seconds, got {timeout}")
    _update(job.dir, stop_requested=time.time(), stop_timeout=timeout)
    control.send(job.dir, {"cmd": "stop", "timeout": timeout})
    if job.pid is None:
        # Launched a moment ago: the wrapper has not started the command yet; it forwards signals.
        wrapper = _proc(job.wrapper_pid, job.wrapper_create_time)
        if wrapper is not None:
            wrapper.send_signal(signal.SIGTERM)
        job = get(job.id)
    _signal(job, signal.SIGTERM)
    if not wait:
        return get(job.id)
    deadline = time.monotonic() + timeout
    while _alive(job) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(job):
        _signal(job, signal.SIGKILL)
        end = time.monotonic() + 10
        while _alive(job) and time.monotonic() < end:
            time.sleep(0.05)
    # A launched job's wrapper writes exit_code right after the child ends.
    end = time.monotonic() + 5
    while job.wrapper_pid and _proc(job.wrapper_pid, job.wrapper_create_time) and time.monotonic() < end:
        time.sleep(0.05)
    return get(job.id)


# -- the wrapper -------------------------------------------------------------------------------------
def _run(job_id: str, argv: list[str]) -> int:
    """Parent of a launched job: start it in its own process group, record it, forward signals,
    enforce a stop's timeout, and write its exit code."""
    d = job_dir(job_id)
    child: subprocess.Popen | None = None
    pending: list[int] = []

    def forward(sig: int, _frame: Any) -> None:
        if child is None:
            pending.append(sig)
        else:
            try:
                os.killpg(child.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    # Handlers (not SIG_IGN, which a child would inherit) so the wrapper outlives the signal.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    rc = 1
    try:
        child = subprocess.Popen([sys.executable, "-m", "vitrine", *argv], process_group=0)
        _update(d, pid=child.pid, create_time=_create_time(child.pid), pgid=child.pid)
        for sig in pending:
            forward(sig, None)
        reader = control.ControlReader(d)
        kill_at: float | None = None
        while True:
            try:
                rc = child.wait(timeout=0.25)
                break
            except subprocess.TimeoutExpired:
                pass
            for cmd in reader.poll():
                if cmd.get("cmd") == "stop" and kill_at is None:
                    kill_at = float(cmd.get("time", time.time())) + float(cmd.get("timeout", STOP_TIMEOUT_S))
            if kill_at is not None and time.time() >= kill_at:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    finally:
        record_exit(job_id, rc)
    return rc


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "_run" and argv[2] == "--":
        return _run(argv[1], argv[3:])
    print("usage: python -m vitrine.jobs _run JOB_ID -- VITRINE_ARGS...  (used by the job launcher)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
