"""The image service as its own process: an `ImageService` behind torch.distributed.rpc.

The server is rank 0, named "images", of a *dynamic* RPC group (TensorPipe, `world_size=None`)
whose rendezvous store it hosts at HOST:PORT. Any number of trainer processes join it later and leave
when they are done (`image_service.client.connect`), each taking a unique rank from the store, so
the workers of several training jobs can share one service. Every function below is what a worker
calls with `rpc_sync`/`rpc_async(SERVICE_NAME, fn, args)`; the wire carries only image ids (int32,
unique per request), embeddings and their gradients, never pixels or trunk features.

- `rpc_embed(ids, occurrences)`: joins the request merger (concurrent requests are computed as one
  union) and answers (embeddings in the order of `ids`, version).
- `rpc_backward(ids, grads, token, worker)`: hands the push to the update policy and answers the
  head's version once the step containing the push is applied (at once under `immediate`; when all
  workers of the step have pushed under `sync`).
- `rpc_keep_snapshots(every)`, `rpc_embed_at(ids, step)`: the head as of a global step, for a
  training job's evaluations while its workers go on training (not merged with training requests).
- `rpc_info`, `rpc_counters`, `rpc_state_dict`, `rpc_load_state_dict`, `rpc_checkpoint` and
  `rpc_trunk_features` (to export the model, never during training).

The service's own checkpoint (`STATE_DIR/checkpoint.pt`, written atomically when a trainer asks,
i.e. at the trainer's checkpoints) is loaded when a restarted service finds it, so a job can resume.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.rpc as rpc
from torch import Tensor

from image_service.descriptor import DescriptorConfig
from image_service.merge import EmbedMerger
from image_service.policy import make_policy
from image_service.service import ImageService
from vitrine import rpc_group
from vitrine.config import help_meta as _h
from vitrine.errors import UserError
from vitrine.procs import write_ready

SERVICE_NAME = "images"
CHECKPOINT = "checkpoint.pt"


class RequestTooLarge(UserError, ValueError):
    """A request with more ids than the service accepts in one call."""


@dataclass
class ServeConfig:
    dataset: str = field(default="data/processed/demo", metadata=_h("processed dataset whose image store to serve"))
    host: str = field(default="127.0.0.1", metadata=_h(
        "address to listen on (the RPC rendezvous store and the RPC agent); nothing listens elsewhere"))
    port: int = field(default=29400, metadata=_h("port of the rendezvous store; 0 = pick a free one"))
    state_dir: str | None = field(default=None, metadata=_h(
        "where the service keeps its checkpoint (default data/image_service/<dataset name>)"))
    policy: str = field(default="immediate", metadata=_h("update policy of the descriptor head",
                                                         choices=("immediate", "sync", "gba")))
    workers: int = field(default=1, metadata=_h("workers per step: the sync policy waits for this many pushes, "
                                                "and the merger closes a group once this many requests wait"))
    gba_threshold: int = field(default=2, metadata=_h("gba policy: staleness (steps) with full weight"))
    gba_decay: float = field(default=0.5, metadata=_h("gba policy: weight factor per step beyond the threshold"))
    merge_window_ms: float = field(default=2.0, metadata=_h(
        "how long the first embed request of a group waits for others to merge with"))
    max_request_ids: int = field(default=1_000_000, metadata=_h("largest number of ids one request may carry"))
    threads: int = field(default=0, metadata=_h("torch threads of the service process (0 = all cores: the "
                                                "workers wait while it computes)"))
    rpc_timeout_s: float = field(default=120.0, metadata=_h("timeout of RPC calls"))
    ready_file: str | None = field(default=None, metadata=_h(
        "write {address, pid} here (atomically) once the service accepts calls"))
    exit_with_parent: bool = field(default=False, metadata=_h(
        "stop when the process that started this one is gone (a job's own service must not outlive it)"))

    def check(self) -> None:
        if not 0 <= self.port < 65536:
            raise UserError(f"--port must be in 0..65535 (got {self.port})")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1 (got {self.workers})")
        if self.max_request_ids < 1:
            raise UserError(f"--max-request-ids must be >= 1 (got {self.max_request_ids})")
        if self.merge_window_ms < 0:
            raise UserError(f"--merge-window-ms must be >= 0 (got {self.merge_window_ms})")


class _Server:
    """What the RPC functions of this process act on (one per process)."""

    def __init__(self, cfg: ServeConfig, dcfg: DescriptorConfig):
        self.cfg = cfg
        self.service = ImageService(cfg.dataset, dcfg, policy=make_policy(cfg.policy, cfg.workers, cfg.gba_threshold,
                                                                               cfg.gba_decay))
        self.merger = EmbedMerger(self._compute, window_s=cfg.merge_window_ms / 1000, expect=cfg.workers)
        self.state_dir = Path(cfg.state_dir) if cfg.state_dir else None
        self.checkpoint_step: int | None = None
        self.stop = threading.Event()
        self.latency = {"embed": [], "backward": []}

    def _compute(self, ids: Tensor) -> tuple[Tensor, int]:
        return self.service.compute(ids)

    def check_size(self, n: int, what: str) -> None:
        if n > self.cfg.max_request_ids:
            raise RequestTooLarge(f"{what} request of {n} ids refused: the image service accepts at most "
                                  f"{self.cfg.max_request_ids} per call (--max-request-ids); split the batch "
                                  f"or restart the service with a larger limit")

    def load_own_checkpoint(self) -> bool:
        if self.state_dir is None or not (self.state_dir / CHECKPOINT).exists():
            return False
        st = torch.load(self.state_dir / CHECKPOINT, map_location="cpu", weights_only=False)
        self.service.load_state_dict(st["service"])
        self.checkpoint_step = st.get("step")
        return True

    def save_own_checkpoint(self, step: int | None) -> int:
        state = self.service.state_dict()
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_dir / f".{CHECKPOINT}.tmp-{os.getpid()}"
            torch.save({"service": state, "step": step, "saved": time.time()}, tmp)
            os.replace(tmp, self.state_dir / CHECKPOINT)
        self.checkpoint_step = step
        return int(state["version"])


_SERVER: _Server | None = None


def _server() -> _Server:
    if _SERVER is None:
        raise RuntimeError("this process is not running the image service")
    return _SERVER


def _refusal(exc: BaseException) -> dict[str, str]:
    """Bad input is answered, not raised: RPC rebuilds remote exceptions with lost types and a
    traceback in the message, so the client could not tell "unknown id" from "service died"."""
    return {"__refused__": type(exc).__name__, "message": str(exc)}


def _answers_refusals(fn):
    """For plain RPC functions: bad input (UserError, ValueError, TypeError) becomes a refusal value."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, TypeError) as exc:
            return _refusal(exc)
    return wrapper


def _async_answers_refusals(fn):
    """The same for `async_execution` functions, which must always return a future. (Built on its
    own: wrapping `_answers_refusals` here made RPC try to pickle the returned future.)"""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, TypeError) as exc:
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(_refusal(exc))
            return fut
    return rpc.functions.async_execution(wrapper)


def _to_ids(ids: Tensor) -> Tensor:
    return torch.as_tensor(ids).reshape(-1).to(torch.int64)


# -- the RPC API (module-level functions: RPC pickles them by qualified name) ------------------------
@_async_answers_refusals
def rpc_embed(ids: Tensor, occurrences: int) -> torch.futures.Future:
    t0 = time.perf_counter()
    srv = _server()
    srv.check_size(int(ids.numel()), "embed")
    svc = srv.service
    wanted = svc._ids(_to_ids(ids))  # names unknown ids
    unique, inverse = torch.unique(wanted, sorted=True, return_inverse=True)
    fut = srv.merger.submit(unique)

    def answer(f: torch.futures.Future) -> tuple[Tensor, int]:
        emb, version = f.value()
        if unique.numel() != wanted.numel() or not torch.equal(unique, wanted):
            emb = emb[inverse]  # a client that did not deduplicate gets the rows in its order
        svc.count_embed(ids.nbytes, emb.nbytes, int(occurrences), time.perf_counter() - t0)
        return emb, version

    return fut.then(answer)


@_answers_refusals
def rpc_embed_at(ids: Tensor, step: int) -> tuple[Tensor, Tensor, Tensor]:
    srv = _server()
    srv.check_size(int(ids.numel()), "embed")
    res = srv.service.embed_at(_to_ids(ids), int(step))
    return res.embeddings, res.inverse, res.unique_ids


def rpc_keep_snapshots(every: int, offset: int) -> None:
    _server().service.keep_snapshots(every, offset)


@_async_answers_refusals
def rpc_backward(ids: Tensor, grads: Tensor, token: int | None, worker: int) -> torch.futures.Future:
    srv = _server()
    srv.check_size(int(ids.numel()), "backward")
    # Counters (bytes as received: the int32 ids and the gradients) are kept by the service.
    return srv.service.backward(_to_ids(ids), grads, token=token, worker=worker, wire_bytes=ids.nbytes + grads.nbytes)


def rpc_info() -> dict[str, Any]:
    srv = _server()
    svc = srv.service
    return {
        "n_images": svc.n_images, "out_dim": svc.out_dim, "dtype": str(svc.dtype).replace("torch.", ""),
        "trunk_dim": int(svc._features.shape[1]), "pixel_bytes": svc.pixel_bytes,
        "descriptor": asdict(svc.cfg), "dataset": str(svc.dataset_dir), "policy": svc.policy.describe(),
        "version": svc.version, "pid": os.getpid(), "checkpoint_step": srv.checkpoint_step,
        "max_request_ids": srv.cfg.max_request_ids, "merge_window_ms": srv.cfg.merge_window_ms,
    }


def rpc_counters() -> dict[str, float]:
    srv = _server()
    with srv.service._lock:
        c = dict(srv.service.counters)
    c["merger_groups"] = srv.merger.groups
    c["merger_largest_group"] = srv.merger.largest_group
    return c


def rpc_state_dict() -> dict[str, Any]:
    return _server().service.state_dict()


@_answers_refusals
def rpc_load_state_dict(state: dict[str, Any]) -> int:
    svc = _server().service
    svc.load_state_dict(state)
    return svc.version


@_answers_refusals
def rpc_set_policy(name: str, workers: int, threshold: int, decay: float, step: int) -> int:
    """Switch the head's update policy (a training job switching modes); answers the head's version."""
    srv = _server()
    policy = make_policy(name, workers, threshold, decay, step)
    srv.merger.expect = workers
    return srv.service.set_policy(policy)


def rpc_flush() -> int:
    """Apply the pushes the policy holds back; answers the head's version."""
    return _server().service.flush()


def rpc_checkpoint(step: int | None) -> int:
    return _server().save_own_checkpoint(step)


@_answers_refusals
def rpc_trunk_features(ids: Tensor) -> Tensor:
    return _server().service.trunk_features(_to_ids(ids))


# -- the process ------------------------------------------------------------------------------------
def serve(cfg: ServeConfig, dcfg: DescriptorConfig, log=print) -> int:
    """Run the service until SIGTERM/SIGINT (or its parent is gone, with `exit_with_parent`)."""
    global _SERVER
    cfg.check()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.state_dir is None:
        from vitrine import paths

        cfg.state_dir = str(paths.data_root() / "image_service" / Path(cfg.dataset).resolve().name)
    srv = _Server(cfg, dcfg)
    resumed = srv.load_own_checkpoint()
    _SERVER = srv
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: srv.stop.set())
    # The group's store, its RPC agent and the ones of whoever joins from here listen on cfg.host only.
    port = rpc_group.host_group(SERVICE_NAME, cfg.host, cfg.port, "image service",
                                rpc_timeout=cfg.rpc_timeout_s).port
    address = f"{cfg.host}:{port}"
    svc = srv.service
    log(f"image service on {address}: {svc.n_images} images, descriptor {dcfg.trunk} -> {dcfg.out_dim}-d "
        f"({dcfg.dtype}), policy {svc.policy.describe()}, merge window {cfg.merge_window_ms} ms; "
        + (f"resumed from {srv.state_dir / CHECKPOINT} (version {svc.version}, step {srv.checkpoint_step})"
           if resumed else f"fresh head; checkpoints go to {srv.state_dir}"))
    if cfg.ready_file:
        write_ready(cfg.ready_file, {"address": address, "pid": os.getpid(), "version": svc.version})
    sys.stdout.flush()
    parent = os.getppid()
    try:
        while not srv.stop.wait(0.2):
            if cfg.exit_with_parent and os.getppid() != parent:
                log("image service: the job that started it is gone; stopping")
                break
    finally:
        srv.merger.close()
        c = svc.counters
        log(f"image service stopping: {int(c['embed_requests'])} embed and {int(c['backward_requests'])} backward "
            f"calls, {int(c['ids_requested'])} images requested, {int(c['unique_ids_computed'])} computed, "
            f"{int(c['bytes_in'] + c['bytes_out'])} payload bytes; policy {svc.policy.describe()}")
        sys.stdout.flush()
        rpc_group.leave(graceful=False)
        _SERVER = None
    return 0
