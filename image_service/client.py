"""The worker's handle on the image service: in-process (`LocalClient`) or over RPC (`RemoteClient`).

Both do the same on the worker's side: deduplicate the batch's image ids, send the unique ids as
int32, get back one embedding per unique id, rebuild the batch's order locally, and send back one
gradient row per unique id. So the wire carries, per unique image and step, 4 + 4*d bytes each way
(d = the embedding size), whatever the number of times the image appears in the batch. Both count
that traffic in a `TrafficMeter`, beside what a plain parameter server would have moved for the same
batches: the unique images' raw pixels, or their trunk features (float32), pulled by the worker.

`SpawnedService` starts `vitrine images serve` as a child process on a port it binds (127.0.0.1 unless
told otherwise) and waits until it answers; `RemoteClient(address)` joins a running service's RPC group
(`vitrine.rpc_group`). An address where nothing answers fails at once with `ImageServiceUnavailable`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from image_service.descriptor import DescriptorConfig, build_head
from image_service.service import EmbedResult, ImageService
from vitrine import rpc_group
from vitrine.errors import UserError
from vitrine.procs import Spawned
from vitrine.rpc_group import parse_address  # noqa: F401 - also imported from here (trainer.config)

ID_WIRE_DTYPE = torch.int32


class ImageServiceUnavailable(UserError, ConnectionError):
    """The remote image service does not answer (not started, died, or unreachable)."""


@dataclass
class TrafficMeter:
    """Training traffic between this worker and the image service (evaluation is not counted)."""

    steps: int = 0
    samples: int = 0
    embed_calls: int = 0
    backward_calls: int = 0
    occurrences: int = 0  # image ids in the batches, repeats included
    unique: int = 0  # unique ids per batch, summed over batches
    bytes_sent: int = 0  # worker -> service: ids, gradients
    bytes_received: int = 0  # service -> worker: embeddings
    plain_pixel_bytes: int = 0  # a plain PS: the unique images' pixels pulled per batch
    plain_trunk_bytes: int = 0  # a plain PS: the unique images' trunk features (float32) per batch
    embed_s: float = 0.0
    backward_s: float = 0.0

    def summary(self) -> dict[str, float]:
        """The per-sample and per-image figures that go to MLflow."""
        s = max(self.samples, 1)
        ams = self.bytes_sent + self.bytes_received
        return {
            "ams_bytes_per_sample": ams / s,
            "ams_bytes_per_unique_image": ams / max(self.unique, 1),
            "ams_dedup_ratio": self.occurrences / max(self.unique, 1),
            "plain_pixels_bytes_per_sample": self.plain_pixel_bytes / s,
            "plain_trunk_bytes_per_sample": self.plain_trunk_bytes / s,
            "ams_bytes_saved_per_sample": (self.plain_trunk_bytes - ams) / s,
            "ams_embed_ms": 1000 * self.embed_s / max(self.embed_calls, 1),
            "ams_backward_ms": 1000 * self.backward_s / max(self.backward_calls, 1),
        }


def _dedup(image_ids: Any) -> tuple[Tensor, Tensor, int]:
    ids = torch.as_tensor(np.asarray(image_ids) if not isinstance(image_ids, Tensor) else image_ids)
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"image ids must be integers, got dtype {ids.dtype}")
    ids = ids.reshape(-1).to(torch.int64)
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    return unique, inverse, int(ids.numel())


class _Client:
    """The part both clients share: dedup, metering, the API the trainer calls."""

    n_images: int
    out_dim: int
    trunk_dim: int
    pixel_bytes: int
    descriptor: DescriptorConfig

    def __init__(self) -> None:
        self.meter = TrafficMeter()
        self.cache = None  # an ImageCache while a PS phase caches hot images

    # the transport: unique int32 ids in, (U, d) embeddings + version out; and the push
    def _embed_unique(self, ids: Tensor, occurrences: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def _push(self, ids: Tensor, grads: Tensor, token: int | None, wait: bool = True) -> int:
        raise NotImplementedError

    def wait_pushes(self) -> None:
        """Block until every push sent with `wait=False` has been received (remote clients)."""

    def _embed_at(self, ids: Tensor, step: int) -> Tensor:
        raise NotImplementedError

    def keep_snapshots(self, every: int, offset: int = 0) -> None:
        """Have the service copy its head whenever its global step plus `offset` is a multiple of
        `every` (for `embed(..., at_step=)`)."""
        raise NotImplementedError

    def flush(self) -> int:
        """Have the service apply the pushes its policy holds back (the end of a PS phase)."""
        raise NotImplementedError

    def embed(self, image_ids: Any, train: bool = True, at_step: int | None = None) -> EmbedResult:
        """With `cache` set (a `trainer.ps.cache.ImageCache`, PICASSO's caching), training lookups of
        hot images are served from the worker's copy while it is fresh enough; evaluation never is.
        `at_step` (evaluation only): the head as it was after that global step (`keep_snapshots`)."""
        unique, inverse, n = _dedup(image_ids)
        if at_step is not None:
            if train:
                raise ValueError("embed(at_step=...) reads a past head: for evaluation only (train=False)")
            return EmbedResult(self._embed_at(unique.to(ID_WIRE_DTYPE), int(at_step)), inverse, unique, -1)
        m = self.meter
        occurrences = [n]  # the service counts the batch's occurrences once, however many calls the cache makes

        def fetch(ids: Tensor) -> tuple[Tensor, int]:
            wire = ids.to(ID_WIRE_DTYPE)
            emb, version = self._embed_unique(wire, occurrences.pop() if occurrences else 0)
            if train:
                m.bytes_sent += wire.nbytes
                m.bytes_received += emb.nbytes
            return emb, version

        t0 = time.perf_counter()
        emb, version = self.cache.embed(unique, fetch) if train and self.cache is not None else fetch(unique)
        if train:
            m.embed_s += time.perf_counter() - t0
            m.embed_calls += 1
            m.occurrences += n
            m.unique += unique.numel()
            m.plain_pixel_bytes += unique.numel() * self.pixel_bytes
            m.plain_trunk_bytes += unique.numel() * self.trunk_dim * 4
        return EmbedResult(emb, inverse, unique, version)

    def backward(self, unique_ids: Tensor, grads: Tensor, token: int | None = None, wait: bool = True) -> int:
        """Push d(loss)/d(embedding) for `unique_ids` (as returned by `embed`); returns the version
        of the head after the step that used it, or -1 with `wait=False` (the asynchronous modes:
        the worker goes on while the service applies it; `wait_pushes` drains them)."""
        unique, inverse, n = _dedup(unique_ids)
        if n != unique.numel():  # repeats: sum them here, the wire carries one row per image
            summed = torch.zeros((unique.numel(), grads.shape[1]), dtype=grads.dtype)
            grads = summed.index_add_(0, inverse, grads)
        wire = unique.to(ID_WIRE_DTYPE)
        grads = grads.detach().contiguous()
        t0 = time.perf_counter()
        version = self._push(wire, grads, token, wait)
        m = self.meter
        m.backward_s += time.perf_counter() - t0
        m.backward_calls += 1
        m.bytes_sent += wire.nbytes + grads.nbytes
        return version

    def count_samples(self, n: int) -> None:
        self.meter.samples += n
        self.meter.steps += 1

    def head_module(self) -> nn.Module:
        """A copy of the descriptor head with the service's current weights (to export the model)."""
        head = build_head(self.trunk_dim, self.descriptor)
        head.load_state_dict(self.state_dict()["head"])
        return head

    def close(self) -> None:
        pass


class LocalClient(_Client):
    """The service in this process (tests, small runs): same protocol, no network."""

    def __init__(self, service: ImageService):
        super().__init__()
        self.service = service
        self.n_images, self.out_dim = service.n_images, service.out_dim
        self.trunk_dim = int(service._features.shape[1])
        self.pixel_bytes = service.pixel_bytes
        self.descriptor = service.cfg
        self.address = "local"

    def _embed_unique(self, ids: Tensor, occurrences: int) -> tuple[Tensor, int]:
        t0 = time.perf_counter()
        emb, version = self.service.compute(self.service._ids(ids))
        self.service.count_embed(ids.nbytes, emb.nbytes, occurrences, time.perf_counter() - t0)
        return emb, version

    def _embed_at(self, ids: Tensor, step: int) -> Tensor:
        return self.service.embed_at(ids, step).embeddings

    def keep_snapshots(self, every: int, offset: int = 0) -> None:
        self.service.keep_snapshots(every, offset)

    def flush(self) -> int:
        return self.service.flush()

    def _push(self, ids: Tensor, grads: Tensor, token: int | None, wait: bool = True) -> int:
        return self.service.backward(ids, grads, token=token, wire_bytes=ids.nbytes + grads.nbytes).wait()

    @property
    def counters(self) -> dict[str, float]:
        return dict(self.service.counters)

    def state_dict(self) -> dict[str, Any]:
        return self.service.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.service.load_state_dict(state)

    def checkpoint(self, step: int) -> int:
        return self.service.version  # the trainer's checkpoint holds the state

    def head_module(self) -> nn.Module:
        return self.service.head_module()

    def trunk_features(self, ids: Any) -> Tensor:
        return self.service.trunk_features(ids)


# -- remote -------------------------------------------------------------------------------------------
def _join_service_group(address: str, prefix: str, timeout_s: float) -> tuple[str, int]:
    """Join the service's RPC group (`vitrine.rpc_group`); nothing answering is one clear line."""
    host, port = parse_address(address)
    try:
        return rpc_group.join((host, port), prefix, timeout_s)
    except rpc_group.GroupUnreachable as exc:
        raise ImageServiceUnavailable(
            f"no image service answers at {address} ({exc.reason}); start one with "
            f"`vitrine images serve --dataset DIR --port {port}` or train with --image-service spawn") from None


def _refusal_types() -> dict[str, type[Exception]]:
    from image_service.server import RequestTooLarge
    from image_service.service import UnknownImageIds
    from vitrine.snapshots import SnapshotMissing

    return {"UnknownImageIds": UnknownImageIds, "SnapshotMissing": SnapshotMissing, "RequestTooLarge": RequestTooLarge,
            "ValueError": ValueError, "TypeError": TypeError, "UserError": UserError}


_REFUSALS = _refusal_types()


class RemoteClient(_Client):
    """A running service over torch.distributed.rpc."""

    def __init__(self, address: str, timeout_s: float = 120.0, name_prefix: str = "trainer",
                 worker: int | None = None):
        """`worker`: the key the service's sync policy orders this client's pushes by (a trainer passes
        its rank in the job). It sums one step's pushes in that order, so a synchronous run is
        reproducible; the default, the RPC rank, depends on which process joined the group first."""
        super().__init__()
        self.address = address
        self.name, rpc_rank = _join_service_group(address, name_prefix, timeout_s)
        self.rank = rpc_rank if worker is None else int(worker)
        self._open = True
        info = self.info()
        self.n_images, self.out_dim = int(info["n_images"]), int(info["out_dim"])
        self.trunk_dim, self.pixel_bytes = int(info["trunk_dim"]), int(info["pixel_bytes"])
        self.descriptor = descriptor_from_info(info)

    def _call(self, fn, *args):
        import torch.distributed.rpc as rpc

        from image_service.server import SERVICE_NAME

        try:
            out = rpc.rpc_sync(SERVICE_NAME, fn, args=args)
        except Exception as exc:
            if "On WorkerInfo" in str(exc):  # raised by the service's code: it is alive
                raise RuntimeError(f"the image service at {self.address} failed: {exc}") from None
            self._open = False
            raise ImageServiceUnavailable(
                f"the image service at {self.address} stopped answering ({str(exc).splitlines()[0]}). "
                f"Restart it (`vitrine images serve ...` resumes from its own checkpoint) and continue the "
                f"job with `vitrine train --resume RUN_DIR`") from None
        if isinstance(out, dict) and "__refused__" in out:
            raise _REFUSALS.get(out["__refused__"], UserError)(out["message"])
        return out

    def info(self) -> dict[str, Any]:
        from image_service import server

        return self._call(server.rpc_info)

    @property
    def counters(self) -> dict[str, float]:
        from image_service import server

        return self._call(server.rpc_counters)

    def _embed_unique(self, ids: Tensor, occurrences: int) -> tuple[Tensor, int]:
        from image_service import server

        return self._call(server.rpc_embed, ids, occurrences)

    def _embed_at(self, ids: Tensor, step: int) -> Tensor:
        from image_service import server

        return self._call(server.rpc_embed_at, ids, step)[0]

    def keep_snapshots(self, every: int, offset: int = 0) -> None:
        from image_service import server

        self._call(server.rpc_keep_snapshots, every, offset)

    def flush(self) -> int:
        from image_service import server

        return self._call(server.rpc_flush)

    def _push(self, ids: Tensor, grads: Tensor, token: int | None, wait: bool = True) -> int:
        from image_service import server

        if wait:
            return self._call(server.rpc_backward, ids, grads, token, self.rank)
        import torch.distributed.rpc as rpc

        from image_service.server import SERVICE_NAME

        self._pending = [f for f in getattr(self, "_pending", []) if not f.done()]
        self._pending.append(rpc.rpc_async(SERVICE_NAME, server.rpc_backward, args=(ids, grads, token, self.rank)))
        return -1

    def wait_pushes(self) -> None:
        for f in getattr(self, "_pending", []):
            try:
                out = f.wait()
            except Exception as exc:
                raise ImageServiceUnavailable(f"the image service at {self.address} stopped answering "
                                              f"({str(exc).splitlines()[0]})") from None
            if isinstance(out, dict) and "__refused__" in out:
                raise _REFUSALS.get(out["__refused__"], UserError)(out["message"])
        self._pending = []

    def state_dict(self) -> dict[str, Any]:
        from image_service import server

        return self._call(server.rpc_state_dict)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from image_service import server

        self._call(server.rpc_load_state_dict, state)

    def set_policy(self, name: str, workers: int = 1, threshold: int = 2, decay: float = 0.5, step: int = 0) -> int:
        from image_service import server

        return self._call(server.rpc_set_policy, name, workers, threshold, decay, step)

    def checkpoint(self, step: int) -> int:
        from image_service import server

        return self._call(server.rpc_checkpoint, step)

    def trunk_features(self, ids: Any) -> Tensor:
        from image_service import server

        return self._call(server.rpc_trunk_features, torch.as_tensor(np.asarray(ids), dtype=torch.int64))

    def close(self) -> None:
        if self._open is None:
            return
        rpc_group.leave(graceful=bool(self._open))
        self._open = None


# -- starting a service for one job --------------------------------------------------------------------
class SpawnedService(Spawned):
    """`vitrine images serve` as this job's child process; `address` once it answers."""

    def __init__(self, dataset: str | Path, descriptor: DescriptorConfig, state_dir: Path,
                 start_timeout_s: float = 600.0, **serve_options: Any):
        """`serve_options`: `image_service.server.ServeConfig` fields (policy, workers, ...)."""
        from image_service.server import ServeConfig
        from vitrine.config import to_argv

        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        ready = state_dir / "ready.json"
        serve = ServeConfig(**{"port": 0, "exit_with_parent": True, **serve_options, "dataset": str(dataset),
                               "state_dir": str(state_dir), "ready_file": str(ready)})
        argv = [sys.executable, "-m", "vitrine", "images", "serve", *to_argv(serve), *to_argv(descriptor)]
        super().__init__(argv, ready, state_dir / "service.log", "image service", start_timeout_s)
        self.address = self.info["address"]


def descriptor_from_info(info: dict[str, Any]) -> DescriptorConfig:
    d = info["descriptor"]
    return DescriptorConfig(**{k: (tuple(v) if k == "head" else v) for k, v in d.items()
                               if k in {f.name for f in fields(DescriptorConfig)}})
