"""Starting a multi-process job on this machine and watching it: image service, PS shards, workers.

`vitrine train --mode ar|async|gba|auto --workers N` (without RANK in the environment) lands here.
The launcher starts the job's image service (unless `--image-service HOST:PORT` names one) and its
`--ps-shards` PS shards (every multi-process job has them, so any job can switch modes), all in one
RPC group, then N copies of the same `vitrine train` command with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set (the launcher hosts the rendezvous store, as torchrun's agent does), plus the PS key,
the RPC group's address and the service's address. The run directory records the service as the user
gave it (`spawn`, `local`), never the port of a process that is gone, so `--resume` starts a new one.

The failure model (docs/DISTRIBUTED.md, "Failure model"): the launcher watches every process of the
job. In the PS modes a worker other than the coordinator may die and the job goes on without it (the
token it held goes to another worker). Any other death (the coordinator, an AR worker, a PS shard, the image service) stops
the job at once: every other process is killed, the MLflow run is marked FAILED, and one line names
what died and how to continue. A killed launcher takes the job down too: the shards and the service
exit with their parent, the workers' watchdog (`trainer.watchdog`) ends them and the coordinator
marks its run FAILED. SIGTERM (the dashboard's Stop) is passed on to the workers, who stop together
after the same step and checkpoint.

Rank 0 is the coordinator (logs to MLflow, evaluates, checkpoints); its standard output is the job's
output and its standard error (tracebacks) goes to RUN_DIR/worker-0.log; the other workers write
both to RUN_DIR/worker-<rank>.log.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trainer.watchdog import fail_run, how_to_continue
from vitrine.errors import UserError

PS_KEY_ENV = "VITRINE_PS_KEY"  # the job's PS shards are ps<s>_<key>
RPC_GROUP_ENV = "VITRINE_RPC_GROUP"  # HOST:PORT of the job's RPC group
SERVICE_ENV = "VITRINE_IMAGE_SERVICE_ADDRESS"  # where this launch's image service listens
LAUNCHED_ENV = "VITRINE_LAUNCHED"  # a worker of this launcher (it reports the result)


@dataclass
class _Member:
    """One process of the job, as the launcher watches it."""

    what: str  # "worker 2", "the coordinator (worker 0)", "parameter-server shard 0", "the image service"
    proc: subprocess.Popen
    log: Path
    tolerated: bool = False  # may die without stopping the job (a PS-mode worker other than rank 0)


@dataclass
class JobHelpers:
    """The processes a multi-process job has besides its workers: its PS shards (every such job has
    them, so any job can switch modes) and, with images and no `--image-service HOST:PORT`, its own
    image service, all in one RPC group. Started by our launcher on one machine, or by rank 0 under
    torchrun (`host`: an address every machine of the job reaches)."""

    key: str
    group: str  # HOST:PORT of the RPC group
    service: str | None  # HOST:PORT of the image service this launch started, or None
    shards: list
    spawned: Any = None

    @classmethod
    def start(cls, cfg, run_dir: Path, host: str = "127.0.0.1") -> "JobHelpers":
        from image_service.client import SpawnedService

        spawned, shards = None, []
        address = cfg.image_service
        try:
            if cfg.features != "ids" and cfg.image_service in ("local", "spawn"):
                # Workers are separate processes: the descriptor can only be shared as a service.
                policy = {"async": "immediate", "gba": "gba"}.get(cfg.mode, "sync")
                threshold, decay = cfg.image_gba()
                spawned = SpawnedService(cfg.dataset, cfg.descriptor_config(), run_dir / "image_service", host=host,
                                         policy=policy, workers=cfg.workers, gba_threshold=threshold, gba_decay=decay)
                address = spawned.address
            key = secrets.token_hex(4)
            # Without images there is no service to host the RPC group: shard 0 hosts it on a port it binds.
            shards = start_shards(cfg, run_dir, key, address if cfg.features != "ids" else f"{host}:0",
                                  host_group=cfg.features == "ids")
        except BaseException:
            cls("", "", None, shards, spawned).stop(5.0)
            raise
        return cls(key, shards[0].info["group"], None if spawned is None else address, shards, spawned)

    def env(self) -> dict[str, str]:
        """What a worker needs to find them."""
        return {PS_KEY_ENV: self.key, RPC_GROUP_ENV: self.group, **({SERVICE_ENV: self.service} if self.service else {})}

    def members(self) -> list[_Member]:
        out = [_Member(f"parameter-server shard {s}", sh.proc, sh.log_path) for s, sh in enumerate(self.shards)]
        if self.spawned is not None:
            out.append(_Member("the image service", self.spawned.proc, self.spawned.log_path))
        return out

    def stop(self, timeout_s: float = 15.0) -> None:
        for shard in self.shards:
            shard.stop(timeout_s)
        if self.spawned is not None:
            self.spawned.stop(timeout_s)


def launch(cfg, run_dir: Path) -> dict[str, Any]:
    """Run the job to its end; raises UserError with one line when a process of it dies."""
    from vitrine import rpc_group
    from vitrine.config import to_argv

    threading.Thread(target=_warm_mlflow, daemon=True).start()  # a failure's report should not wait for it
    argv = [sys.executable, "-m", "vitrine", "train", *to_argv(replace(cfg, run_dir=str(run_dir)))]
    helpers = JobHelpers.start(cfg, run_dir)
    try:
        store = rpc_group.listening_store("127.0.0.1", 0, cfg.workers)  # the workers' rendezvous, as torchrun's agent hosts it
    except BaseException:
        helpers.stop(5.0)
        raise
    env = {**os.environ, **rpc_group.bind_env("127.0.0.1"), **helpers.env(), LAUNCHED_ENV: "1",
           "WORLD_SIZE": str(cfg.workers), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    members = helpers.members()
    workers: list[_Member] = []
    logs = []
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum, frame):
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    failure = None
    try:
        for rank in range(cfg.workers):
            wenv = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            log_path = run_dir / f"worker-{rank}.log"
            log = open(log_path, "ab")
            logs.append(log)
            if rank == 0:  # the job's output; its tracebacks go to its log
                p = subprocess.Popen(argv, env=wenv, stderr=log, stdin=subprocess.DEVNULL)
            else:
                p = subprocess.Popen(argv, env=wenv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            what = "the coordinator (worker 0)" if rank == 0 else f"worker {rank}"
            workers.append(_Member(what, p, log_path, tolerated=rank != 0 and cfg.mode in ("async", "gba", "auto")))
        failure = _watch(workers, members)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for w in workers:  # a failed job's workers have nothing left to save: the coordinator checkpoints
            if w.proc.poll() is None:
                w.proc.kill()
            w.proc.wait()
        for log in logs:
            log.close()
        helpers.stop(15.0 if failure is None else 3.0)
    if failure is not None:
        member, code = failure
        fail_run(run_dir)
        from trainer import checkpoint

        if (run_dir / checkpoint.NAME).exists():
            where = f"its log: {member.log}"
        else:  # the run directory goes with the failed start: say what the log said
            where = f"its log ends: {_last_line(member.log)!r}"
        raise UserError(f"{member.what} {_how(code)} ({where}); the job stopped. {how_to_continue(run_dir)}")
    return json.loads((run_dir / "result.json").read_text())


def _watch(workers: list[_Member], helpers: list[_Member], poll_s: float = 0.1) -> tuple[_Member, int] | None:
    """Until every worker has exited: the first fatal death (member, exit code), or None. A helper
    (shard, service) that dies while workers run is fatal; so is a worker that fails, unless it is
    tolerated. Helpers are checked first: a worker that fails because a shard died is not the cause."""
    def dead_helper() -> tuple[_Member, int] | None:
        return next(((h, h.proc.returncode) for h in helpers if h.proc.poll() is not None), None)

    reported: set[int] = set()
    while any(w.proc.poll() is None for w in workers):
        if (dead := dead_helper()) is not None:
            return dead
        for i, w in enumerate(workers):
            code = w.proc.poll()
            if code in (None, 0) or i in reported:
                continue
            if w.tolerated:
                reported.add(i)  # a PS job goes on without it; the coordinator logs what was lost
                print(f"{w.what} exited with code {code}; the job goes on without it (its log: {w.log})",
                      flush=True)
                continue
            time.sleep(0.5)  # a worker often fails because a helper just died: name the cause
            return dead_helper() or (w, code)
        time.sleep(poll_s)
    return next(((w, w.proc.returncode) for w in workers if w.proc.returncode != 0 and not w.tolerated), None)


def _how(code: int) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _warm_mlflow() -> None:
    try:
        import mlflow.tracking  # noqa: F401 - imported ahead: marking a failed run FAILED must be quick
    except Exception:  # noqa: BLE001
        pass


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
                    "--embedding-optimizer", cfg.embedding_optimizer, "--ready-file", str(ready)]
            argv += ["--embedding-lr", repr(cfg.table_lr(cfg.lr))]  # the tables' own rate, resolved here
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
