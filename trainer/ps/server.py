"""A parameter-server shard as its own process, in the job's torch.distributed.rpc group.

The job's RPC group is the image service's dynamic group when there is a service (the shards and the
workers join it, so the service, the shards and the workers are ranks of one RPC world); a job
without images has shard 0 host the group instead. Shard `s` of job KEY is named `ps{s}_{KEY}` (a dash would break: torch stores the group's names joined by dashes), so
several jobs can share one image service. Shard 0 also keeps the token book (`trainer.ps.tokens`).

Run by the job's launcher (`python -m trainer.ps.server ...`), never by hand: it exits with its
parent, and it starts idle, holding nothing until the job loads a state into it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

import torch
import torch.distributed.rpc as rpc
from torch import Tensor

from trainer.ps.shard import ParameterShard
from trainer.ps.tokens import TokenBook
from vitrine.errors import UserError

_SHARD: ParameterShard | None = None
_BOOK: TokenBook | None = None


def shard_name(shard: int, key: str) -> str:
    return f"ps{shard}_{key}"


def _shard() -> ParameterShard:
    if _SHARD is None:
        raise RuntimeError("this process is not a parameter-server shard")
    return _SHARD


def _book() -> TokenBook:
    if _BOOK is None:
        raise RuntimeError("the token book lives on shard 0")
    return _BOOK


# -- RPC functions (module level: RPC pickles them by name) --------------------------------------------
def rpc_pull(rows: dict[str, Tensor], dense: bool, min_step: int) -> tuple[dict[str, Tensor], int]:
    return _shard().pull(rows, dense, min_step)


def rpc_push(token: int, token_step: int, dense: dict[str, Tensor], sparse: dict[str, tuple[Tensor, Tensor]]) -> int:
    return _shard().push(token, token_step, dense, sparse)


def rpc_load(params: dict[str, Tensor], state: dict[str, Any], tables: list[str], step: int) -> None:
    _shard().load(params, state, tables, step)


def rpc_export() -> dict[str, Any]:
    return _shard().export()


def rpc_configure(mode: str, n: int, threshold: int, decay: float, step: int | None) -> int:
    return _shard().configure(mode, n, threshold, decay, step)


def rpc_keep_snapshots(every: int, offset: int) -> None:
    _shard().keep_snapshots(every, offset)


def rpc_snapshot(step: int, wait_s: float) -> dict[str, Any]:
    """The shard's parameters after `step`, or {"missing": why} (a refusal, not an RPC error)."""
    from vitrine.snapshots import SnapshotMissing

    try:
        return {"params": _shard().snapshot(step, wait_s)}
    except SnapshotMissing as exc:
        return {"missing": str(exc)}


def rpc_counters() -> dict[str, Any]:
    return _shard().counters()


def rpc_tokens(method: str, *args: Any) -> Any:
    """The token book's calls: start, request, finish, set_command, set_straggler, report, next_batch."""
    if method not in ("start", "request", "finish", "set_command", "set_straggler", "report", "next_batch"):
        raise ValueError(f"unknown token-book call {method!r}")
    return getattr(_book(), method)(*args)


def rpc_check_workers(timeout_s: float) -> list[int]:
    """Ping every worker that has not finished; one that does not answer is lost (its tokens with it).
    Returns the lost ranks."""
    book = _book()
    with book.cond:
        todo = {r: w.name for r, w in book.workers.items() if r not in book.done and r not in book.lost and w.name}
    for rank, name in todo.items():
        try:
            rpc.rpc_sync(name, os.getpid, timeout=timeout_s)
        except Exception:
            book.mark_lost(rank)
    with book.cond:
        return sorted(book.lost)


# -- the process ------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    global _SHARD, _BOOK
    ap = argparse.ArgumentParser(prog="python -m trainer.ps.server", description=__doc__.splitlines()[0])
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--shards", type=int, required=True)
    ap.add_argument("--key", required=True, help="the job's key (names the shards in a shared RPC group)")
    ap.add_argument("--group", required=True, help="HOST:PORT of the RPC group's rendezvous store (with "
                    "--host-group, port 0 picks a free one, written to the ready file)")
    ap.add_argument("--host-group", action="store_true", help="be rank 0 and host the group (no image service)")
    ap.add_argument("--world", type=int, required=True, help="workers of the job")
    ap.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-decay", type=float, default=1.0)
    ap.add_argument("--lr-decay-steps", type=int, default=1 << 62)
    ap.add_argument("--embedding-optimizer", default="dense", choices=("dense", "lazy_adam", "rowwise_adagrad"))
    ap.add_argument("--embedding-lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ready-file", required=True)
    ap.add_argument("--rpc-timeout-s", type=float, default=300.0)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    _SHARD = ParameterShard(a.shard, a.shards, a.optimizer, a.lr, a.lr_decay, a.lr_decay_steps,
                            a.embedding_optimizer, a.embedding_lr)
    if a.shard == 0:
        _BOOK = TokenBook(_SHARD, a.world)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    from vitrine import rpc_group

    name = shard_name(a.shard, a.key)
    try:
        host, port = rpc_group.parse_address(a.group, "--group", any_port=a.host_group)
        if a.host_group:  # the store and the agent listen on HOST only
            bound = rpc_group.host_group(name, host, port, f"PS shard {a.shard}", rpc_timeout=a.rpc_timeout_s,
                                         num_worker_threads=32).port
            a.group = rpc_group.format_address(host, bound)
        else:
            rpc_group.join((host, port), name=name, timeout_s=a.rpc_timeout_s, num_worker_threads=32)
    except rpc_group.GroupUnreachable as exc:
        print(f"PS shard {a.shard}: error: no RPC group answers at {a.group} ({exc.reason}); the job's "
              f"image service (or PS shard 0, in a job without images) must be running there",
              file=sys.stderr, flush=True)
        return 2
    except UserError as exc:
        print(f"PS shard {a.shard}: error: {exc}", file=sys.stderr, flush=True)
        return 2
    from vitrine.procs import write_ready

    write_ready(a.ready_file, {"name": name, "pid": os.getpid(), "group": a.group})
    print(f"PS shard {a.shard}/{a.shards} ({name}) in the RPC group at {a.group}", flush=True)
    parent = os.getppid()
    while not stop.wait(0.2):
        if os.getppid() != parent:
            break
    c = _SHARD.counters()
    print(f"PS shard {a.shard} stopping at step {c['step']}: {c}", flush=True)
    sys.stdout.flush()
    rpc_group.leave(graceful=False)
    return 0


if __name__ == "__main__":
    # Run the importable module's main, not this __main__ copy: the RPC functions that the workers name
    # are `trainer.ps.server.*`, and they must see the shard that main sets up.
    from trainer.ps import server as _module

    sys.exit(_module.main())
