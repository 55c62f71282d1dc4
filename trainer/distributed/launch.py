"""Starting a multi-process job on this machine: image service, parameter-server shards, workers.

`vitrine train --mode ar|async|gba|auto --workers N` (without RANK in the environment) lands here.
The launcher starts the job's image service (unless `--image-service HOST:PORT` names one) and its
`--ps-shards` PS shards (every multi-process job has them, so any job can switch modes), all in one
RPC group, then N copies of the same `vitrine train` command with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (the launcher hosts the rendezvous store there, as torchrun's agent does), plus the
PS key and the RPC group's address; across machines see docs/DISTRIBUTED.md. Rank 0 is the coordinator (logs to MLflow,
evaluates, checkpoints); its output is the job's output, the others' goes to RUN_DIR/worker-<rank>.log.

If rank 0 fails, or any worker fails in `ar` mode, the others are stopped. In the PS modes (async,
gba, auto) a worker other than 0 may die and the job goes on without it (its token is lost, nothing
waits for it). SIGTERM is passed on to every worker; they stop together after the same step.
"""

from __future__ import annotations

import os
import secrets
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
    from vitrine.config import to_argv

    from trainer.train import PS_KEY_ENV, RPC_GROUP_ENV

    spawned = None
    shards: list = []
    address = cfg.image_service
    if cfg.features != "ids" and cfg.image_service in ("local", "spawn"):
        # Workers are separate processes: the descriptor can only be shared as a service.
        policy = {"async": "immediate", "gba": "gba"}.get(cfg.mode, "sync")
        threshold, decay = cfg.image_gba()
        spawned = SpawnedService(cfg.dataset, cfg.descriptor_config(), run_dir / "image_service",
                                 policy=policy, workers=cfg.workers, gba_threshold=threshold, gba_decay=decay)
        address = spawned.address
    key = secrets.token_hex(4)
    worker_cfg = replace(cfg, image_service=address, run_dir=str(run_dir))
    argv = [sys.executable, "-m", "vitrine", "train", *to_argv(worker_cfg)]
    procs: list[subprocess.Popen] = []
    try:
        # The launcher hosts the rendezvous store, as torchrun's agent does: bound to port 0 here, the port
        # is ours from the start. Picking a free number for worker 0 to bind later lost a race in CI
        # (EADDRINUSE): the image service and the shards open sockets in between.
        import torch.distributed as dist

        store = dist.TCPStore(  # held until the function returns: the workers' store lives here
            "127.0.0.1", 0, world_size=cfg.workers, is_master=True, wait_for_workers=False)
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
               "TORCHELASTIC_USE_AGENT_STORE": "True", "WORLD_SIZE": str(cfg.workers), "VITRINE_LAUNCHED": "1"}
        # Without images there is no service to host the RPC group: shard 0 hosts it on a port it binds.
        shards = start_shards(cfg, run_dir, key, address if cfg.features != "ids" else "127.0.0.1:0",
                              host_group=cfg.features == "ids")
        group = shards[0].info["group"]  # the service's address, or the port shard 0 bound
    except BaseException:
        if spawned is not None:
            spawned.stop()
        raise
    env.update({PS_KEY_ENV: key, RPC_GROUP_ENV: group})
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
        tolerated: set[int] = set()
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if p.poll() in (None, 0) or failed is not None or rank in tolerated:
                    continue
                if rank != 0 and cfg.mode in ("async", "gba", "auto"):
                    tolerated.add(rank)  # a PS job goes on without it; rank 0 logs what was lost
                    print(f"worker {rank} exited with code {p.returncode}; the job goes on without it "
                          f"(its log: {run_dir / f'worker-{rank}.log'})", flush=True)
                    continue
                failed = (rank, p.returncode)
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
            time.sleep(0.1)
        if failed is None:
            failed = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode != 0 and r not in tolerated), None)
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
        for shard in shards:
            shard.stop()
        if spawned is not None:
            spawned.stop()
    import json

    return json.loads((run_dir / "result.json").read_text())


def start_shards(cfg, run_dir: Path, key: str, group: str, host_group: bool) -> list:
    """The job's PS shards, shard 0 first (it hosts the RPC group when there is no image service)."""
    from vitrine.procs import Spawned

    out = []
    try:
        for s in range(cfg.ps_shards):
            ready = run_dir / f"ps{s}.ready.json"
            argv = [sys.executable, "-m", "trainer.ps.server", "--shard", str(s), "--shards", str(cfg.ps_shards),
                    "--key", key, "--group", group, "--world", str(cfg.workers), "--optimizer", cfg.optimizer,
                    "--lr", repr(cfg.lr), "--lr-decay", repr(cfg.lr_decay), "--lr-decay-steps", str(cfg.lr_decay_steps),
                    "--ready-file", str(ready)]
            if host_group and s == 0:
                argv.append("--host-group")
            out.append(Spawned(argv, ready, run_dir / f"ps{s}.log", f"parameter-server shard {s}", 120.0))
            if s == 0:
                group = out[0].info["group"]  # shard 0 is up (Spawned waits): where the others join
    except BaseException:
        for sh in out:
            sh.stop()
        raise
    return out
