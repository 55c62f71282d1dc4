"""A worker ends when the process that launched it is gone.

Our launcher (or torchrun's agent) watches the workers; nothing watches the launcher. If it is killed
(SIGKILL leaves it no time to clean up), its workers would train on without anyone to report to, the
coordinator's MLflow run would stay RUNNING and the AR workers would block in their next collective.
So each worker polls its parent: once the parent is gone, the coordinator marks its MLflow run FAILED
and prints one line saying how to continue, and every worker exits at once (the last checkpoint is
complete: checkpoints are written to a temporary name and renamed). The PS shards and the image
service watch their parent the same way (`exit_with_parent`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path


def watch_launcher(run_dir: Path, coordinator: bool, poll_s: float = 0.5) -> None:
    parent = os.getppid()

    def loop() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        try:
            if coordinator:
                from trainer.distributed.launch import fail_run, how_to_continue

                fail_run(run_dir)
                print(f"the launcher of this job (pid {parent}) is gone; the job stopped. {how_to_continue(run_dir)}",
                      file=sys.stdout, flush=True)
        finally:
            os._exit(1)

    threading.Thread(target=loop, name="launcher-watchdog", daemon=True).start()
