"""Starting a multi-process job on this machine: the image service and one process per worker.

`vitrine train --mode ar --workers N` (without RANK in the environment) lands here. The launcher
starts the job's image service (sync policy over the N workers) unless `--image-service HOST:PORT`
names one, then N copies of the same `vitrine train` command with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set, which is exactly what `torchrun` would give them; across machines run that command
under torchrun yourself (docs/DISTRIBUTED.md). Rank 0 is the coordinator (logs to MLflow, evaluates,
checkpoints); its output is the job's output, the others' goes to RUN_DIR/worker-<rank>.log. If a
worker fails the others are stopped; SIGTERM is passed on to every worker, which stop together after
the same step (the stop flag rides on the all-reduce).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vitrine.errors import UserError


def launch(cfg, run_dir: Path) -> dict[str, Any]:
    from image_service.client import SpawnedService
    from image_service.server import free_port
    from vitrine.config import to_argv

    spawned = None
    address = cfg.image_service
    if cfg.features != "ids" and cfg.image_service in ("local", "spawn"):
        # Workers are separate processes: the descriptor can only be shared as a service.
        spawned = SpawnedService(cfg.dataset, cfg.descriptor_config(), run_dir / "image_service",
                                 policy="sync", workers=cfg.workers)
        address = spawned.address
    worker_cfg = replace(cfg, image_service=address, run_dir=str(run_dir))
    argv = [sys.executable, "-m", "vitrine", "train", *to_argv(worker_cfg)]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port("127.0.0.1")),
           "WORLD_SIZE": str(cfg.workers), "VITRINE_LAUNCHED": "1"}
    procs: list[subprocess.Popen] = []
    logs = []
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    try:
        for rank in range(cfg.workers):
            wenv = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            if rank == 0:
                procs.append(subprocess.Popen(argv, env=wenv))
            else:
                log = open(run_dir / f"worker-{rank}.log", "wb")
                logs.append(log)
                procs.append(subprocess.Popen(argv, env=wenv, stdout=log, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL))
        failed = None
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.poll() not in (None, 0) and failed is None:
                    failed = (rank, p.returncode)
                    for q in procs:
                        if q.poll() is None:
                            q.terminate()
            time.sleep(0.1)
        if failed is None:
            failed = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0), None)
        if failed is not None:
            rank, code = failed
            where = "above" if rank == 0 else str(run_dir / f"worker-{rank}.log")
            raise UserError(f"worker {rank} of {cfg.workers} exited with code {code} (its output: {where}); "
                            f"the job stopped. Continue from the last checkpoint with `vitrine train --resume {run_dir}`")
    finally:
        signal.signal(signal.SIGTERM, previous)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        if spawned is not None:
            spawned.stop()
    import json

    return json.loads((run_dir / "result.json").read_text())
