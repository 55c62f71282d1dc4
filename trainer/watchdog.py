"""A worker ends when the process that launched it is gone.

Our launcher (or torchrun's agent) watches the workers; nothing watches the launcher. If it is killed
(SIGKILL leaves it no time to clean up), its workers would train on without anyone to report to, the
coordinator's MLflow run would stay RUNNING and the AR workers would block in their next collective.
So each worker polls its parent: once the parent is gone, the coordinator prints one line saying how
to continue and marks its MLflow run FAILED, and every worker exits at once (the last checkpoint is
complete: checkpoints are written to a temporary name and renamed). The PS shards and the image
service watch their parent the same way (`exit_with_parent`).

The coordinator may also learn it first from a failed collective (a peer's watchdog was quicker): the
trainer calls `report_if_orphaned` on its way out, so the line is printed either way, once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

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
            from trainer.distributed.launch import fail_run, how_to_continue

            print(f"the launcher of this job (pid {_WATCH['parent']}) is gone; the job stopped. "
                  f"{how_to_continue(_WATCH['run_dir'])}", file=sys.stdout, flush=True)
            fail_run(_WATCH["run_dir"])
    return True
