"""A job's processes watch each other, so a killed one is reported and its MLflow run ends FAILED.

A worker ends when the process that launched it is gone.

Our launcher (or torchrun's agent) watches the workers; nothing watches the launcher. If it is killed
(SIGKILL leaves it no time to clean up), its workers would train on without anyone to report to, the
coordinator's MLflow run would stay RUNNING and the AR workers would block in their next collective.
So each worker polls its parent: once the parent is gone, the coordinator prints one line saying how
to continue and marks its MLflow run FAILED, and every worker exits at once (the last checkpoint is
complete: checkpoints are written to a temporary name and renamed). The PS shards and the image
service watch their parent the same way (`exit_with_parent`).

The coordinator may also learn it first from a failed collective (a peer's watchdog was quicker): the
trainer calls `report_if_orphaned` on its way out, so the line is printed either way, once.

A single-process job has no launcher, so a small guardian process watches it instead (`guarded`): it
holds the read end of a pipe whose write end only the job holds. The job writes "done" when it ends
its own way (finished, stopped, or failed with its own message and its run marked); end of file
without it means the job was killed (SIGKILL, the OOM killer): the guardian prints the line, marks the
run FAILED and removes a run directory the job created but never checkpointed. It starts with the
standard library only, imports MLflow at the lowest priority while the job runs (so the report is
quick), and ignores the terminal's signals (Ctrl-C reaches the job, which ends its own way).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

RUN_ID_FILE = "mlflow_run_id"  # written by the coordinator once its MLflow run exists

_WATCH: dict = {}  # parent pid, run directory, coordinator?, and whether the line went out
_LOCK = threading.Lock()


def watch_launcher(run_dir: Path, coordinator: bool, poll_s: float = 0.5) -> None:
    _WATCH.update(parent=os.getppid(), run_dir=Path(run_dir), coordinator=coordinator, reported=False)

    def loop() -> None:
        while os.getppid() == _WATCH["parent"]:
            time.sleep(poll_s)
        try:
            report_if_orphaned()
        finally:
            os._exit(1)

    threading.Thread(target=loop, name="launcher-watchdog", daemon=True).start()


def report_if_orphaned() -> bool:
    """If this worker's launcher is gone: the coordinator says so (once) and marks its run FAILED.
    Returns whether the launcher is gone."""
    if not _WATCH or os.getppid() == _WATCH["parent"]:
        return False
    with _LOCK:
        if _WATCH["coordinator"] and not _WATCH["reported"]:
            _WATCH["reported"] = True
            print(f"the launcher of this job (pid {_WATCH['parent']}) is gone; the job stopped. "
                  f"{how_to_continue(_WATCH['run_dir'])}", file=sys.stdout, flush=True)
            fail_run(_WATCH["run_dir"])
    return True


def how_to_continue(run_dir: Path) -> str:
    from trainer import checkpoint

    if not (run_dir / checkpoint.NAME).exists():
        return "It left no checkpoint: start it again."
    return f"Continue from the last checkpoint with `vitrine train --resume {run_dir}`"


def fail_run(run_dir: Path) -> None:
    """Mark the job's MLflow run FAILED: its coordinator may have been killed before it could."""
    path = run_dir / RUN_ID_FILE
    if not path.exists():
        return
    try:
        from vitrine import tracking
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking.setup())
        run_id = path.read_text().strip()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception as exc:  # noqa: BLE001 - the job's own failure is the message; this is a note
        print(f"could not mark the MLflow run FAILED: {str(exc).splitlines()[0]}", file=sys.stderr)


DONE = b"done\n"


@contextlib.contextmanager
def guarded(run_dir: Path, created: bool):
    """Run a single-process job under a guardian (see the module's docstring). `created`: the job made
    `run_dir`, so a kill before its first checkpoint removes it (a failed start leaves nothing)."""
    guardian = subprocess.Popen([sys.executable, "-m", "trainer.watchdog", str(os.getpid()), str(run_dir),
                                 "created" if created else "resumed"], stdin=subprocess.PIPE)
    try:
        yield guardian
    finally:
        try:
            guardian.stdin.write(DONE)
            guardian.stdin.close()
        except OSError:
            pass
        guardian.wait()


def _warm() -> None:
    """Import what reporting a kill needs (MLflow: seconds on a busy machine) while the job runs, at the
    lowest priority, so the report itself is quick; the guardian's start stays stdlib-only."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        import mlflow.tracking  # noqa: F401

        from vitrine import tracking  # noqa: F401
    except Exception:  # noqa: BLE001 - a warm-up only; the report imports what it needs anyway
        pass


def _guard(pid: int, run_dir: Path, created: bool) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    threading.Thread(target=_warm, name="warm-mlflow", daemon=True).start()
    if sys.stdin.buffer.read() == DONE:
        return 0
    import shutil

    from trainer import checkpoint

    print(f"vitrine train (pid {pid}) was killed; the job stopped. {how_to_continue(run_dir)}", flush=True)
    fail_run(run_dir)
    if created and not (run_dir / checkpoint.NAME).exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    return 1


if __name__ == "__main__":
    sys.exit(_guard(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "created"))
