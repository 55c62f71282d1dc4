"""The image service (AMS): embeds store rows with the descriptor and trains the descriptor's head
from the gradients the trainer sends back. This is the in-process implementation of the API in
docs/ARCHITECTURE.md; the remote one wraps the same object behind torch.distributed.rpc.

Protocol, per training step:

    res = service.embed(ids)                       # ids: any integer array of store rows
    emb = res.embeddings.requires_grad_()          # (U, out_dim), one row per unique id
    full = emb[res.inverse]                        # (n, out_dim), in the order of `ids`
    ... model forward on `full`, loss.backward() ...
    service.backward(res.unique_ids, emb.grad)     # or (ids, grad of `full`): summed per id

`embed_at(ids, step)` embeds with the head as it was after global step `step` (`keep_snapshots`):
in the asynchronous modes the head goes on training while the job's coordinator evaluates a model
taken from the parameter server at one step, and an evaluation that mixed that model with a head
several steps newer measured neither.

`embed` returns plain tensors (no autograd graph leaves the service). `backward` sums the gradients
per unique id and hands them to the update policy (`image_service.policy`: `immediate` applies each
push at once, `sync` waits for all workers of a step). Applying an update recomputes the head on the
cached trunk features of the update's unique ids (like XDL, rather than keeping activations between
the calls: the head is small and a kept activation would pin memory for every in-flight batch of
every worker), back-propagates and takes one optimizer step; every step increments `version`. An
empty `backward` is a no-op. `backward` returns a future that completes when the push's step has
been applied (already complete under `immediate`).

The same object serves in-process (tests, `--image-service local`) and behind torch.distributed.rpc
(`image_service.server`); the remote server merges concurrent embed requests before calling
`compute`, so an image wanted by several workers at once is computed once.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from image_service.descriptor import DescriptorConfig, TrunkFeatures, build_head, config_dict, load_or_compute
from image_service.policy import Immediate, Push, Update, UpdatePolicy
from image_service.store import ImageStore
from vitrine.errors import UserError
from vitrine.snapshots import EpochSnapshots

EMBED_BLOCK = 128  # rows per head call when embedding (see `ImageService._head_in_blocks`)


class UnknownImageIds(UserError, IndexError):
    """Image ids outside the store (0..n-1); the message lists them."""


@dataclass
class EmbedResult:
    embeddings: Tensor  # (U, out_dim), row u = embedding of unique_ids[u]
    inverse: Tensor  # (n,) int64: request position -> row of `embeddings`
    unique_ids: Tensor  # (U,) int64, sorted
    version: int  # the head's version that computed them

    def expand(self) -> Tensor:
        """Embeddings in request order, (n, out_dim)."""
        return self.embeddings[self.inverse]


def _new_counters() -> dict[str, float]:
    return {
        "requests": 0,  # embed + backward calls
        "merged_computes": 0,  # head forwards for embed requests (one per merged group)
        "embed_requests": 0,
        "backward_requests": 0,
        "ids_requested": 0,  # ids received by embed (with repeats)
        "unique_ids_computed": 0,  # head forwards in embed (after dedup)
        "backward_ids": 0,  # ids received by backward (with repeats)
        "backward_unique_ids": 0,  # head recomputations in applied updates
        "updates": 0,  # optimizer steps of the head
        "bytes_in": 0,  # nbytes of the tensors received (ids, gradients)
        "bytes_out": 0,  # nbytes of the tensors returned (embeddings, inverse, unique ids)
        "embed_seconds": 0.0,
        "backward_seconds": 0.0,
    }


def _nbytes(x: Any) -> int:
    """Size of ids as the caller sent them (int32 from our clients), not after widening to int64."""
    return int(x.nbytes) if isinstance(x, (Tensor, np.ndarray)) else 8 * len(np.asarray(x).reshape(-1))


class ImageService:
    """Descriptor server over one processed dataset's image store."""

    def __init__(self, dataset_dir: Path | str, cfg: DescriptorConfig | None = None, cache_dir: Path | None = None,
                 policy: UpdatePolicy | None = None):
        self.cfg = cfg = cfg or DescriptorConfig()
        self.dataset_dir = Path(dataset_dir)
        store = ImageStore(self.dataset_dir)
        self.n_images = len(store)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else self.dataset_dir / "cache"
        trunk = load_or_compute(cfg, store, self.cache_dir)
        self.dtype = cfg.torch_dtype
        self._features = torch.from_numpy(trunk.standardised(np.float64)).to(self.dtype)
        # Keep what made the features (key, stats, info), not a second copy of them.
        self.trunk: TrunkFeatures = dataclasses.replace(trunk, features=None)
        self.head = build_head(self._features.shape[1], cfg)
        if cfg.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self.head.parameters(), lr=cfg.lr)
        else:
            self.optimizer = torch.optim.SGD(self.head.parameters(), lr=cfg.lr)
        self.policy: UpdatePolicy = policy or Immediate()
        self.pixel_bytes = int(np.prod(store.shape[1:])) * store.get([0]).dtype.itemsize if self.n_images else 0
        self.version = 0
        self.last_token: int | None = None
        self.counters: dict[str, float] = _new_counters()
        self._lock = threading.RLock()
        self._stepped = threading.Condition(self._lock)  # notified whenever the policy's step may have moved
        self.snapshots: EpochSnapshots[nn.Module] = EpochSnapshots("the image service has no snapshot of its head")

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def _ids(self, image_ids: Any) -> Tensor:
        ids = torch.as_tensor(np.asarray(image_ids) if not isinstance(image_ids, Tensor) else image_ids)
        if ids.numel() == 0:
            return torch.empty(0, dtype=torch.int64)
        if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"image ids must be integers, got dtype {ids.dtype}")
        ids = ids.reshape(-1).to(torch.int64)
        if ids.numel():
            bad = (ids < 0) | (ids >= self.n_images)
            if bool(bad.any()):
                unknown = torch.unique(ids[bad]).tolist()
                shown = ", ".join(map(str, unknown[:10])) + (f" ... ({len(unknown)} in all)" if len(unknown) > 10 else "")
                raise UnknownImageIds(
                    f"unknown image ids for the store of {self.dataset_dir} "
                    f"({self.n_images} images, valid 0..{self.n_images - 1}): {shown}"
                )
        return ids

    def trunk_features(self, image_ids: Any) -> Tensor:
        """Standardised trunk features of `image_ids` (n, trunk_dim), the head's input (a copy)."""
        return self._features[self._ids(image_ids)].clone()

    def head_module(self) -> nn.Module:
        """The trainable projection (for logging the model; train it only through `backward`)."""
        return self.head

    # -- API -------------------------------------------------------------------------------------
    def embed(self, image_ids: Any, occurrences: int | None = None) -> EmbedResult:
        """Embeddings of the unique ids among `image_ids`, each computed once, and the inverse map.

        `occurrences`: how many ids the caller's batch held before it deduplicated them itself (the
        clients do), so that the dedup ratio counts the batch's repeats too."""
        t0 = time.perf_counter()
        ids = self._ids(image_ids)
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        emb, version = self.compute(unique)
        self.count_embed(_nbytes(image_ids), emb.nbytes + inverse.nbytes + unique.nbytes,
                         ids.numel() if occurrences is None else int(occurrences), time.perf_counter() - t0)
        return EmbedResult(emb, inverse, unique, version)

    def count_embed(self, bytes_in: int, bytes_out: int, occurrences: int, seconds: float) -> None:
        """Account one embed request: bytes as received and as answered (the wire's, for a remote call)."""
        with self._lock:
            c = self.counters
            c["requests"] += 1
            c["embed_requests"] += 1
            c["ids_requested"] += occurrences
            c["bytes_in"] += bytes_in
            c["bytes_out"] += bytes_out
            c["embed_seconds"] += seconds

    def compute(self, unique_ids: Tensor) -> tuple[Tensor, int]:
        """Head forward on already unique, checked ids: (embeddings, version). One merged group."""
        with self._lock:
            with torch.no_grad():
                emb = self._head_in_blocks(self._features[unique_ids])
            self.counters["unique_ids_computed"] += unique_ids.numel()
            self.counters["merged_computes"] += 1
            return emb, self.version

    def keep_snapshots(self, every: int, offset: int = 0) -> None:
        """From now on, copy the head each time the policy's global step plus `offset` is a multiple of
        `every` (0: stop), for `embed_at` (`vitrine.snapshots`)."""
        with self._lock:
            self.snapshots.configure(every, offset)
            self._after_step()

    def _after_step(self) -> None:
        """Lock held, after anything that may advance the policy's step."""
        self.snapshots.stepped(self.policy.step, lambda: copy.deepcopy(self.head).requires_grad_(False))
        self._stepped.notify_all()

    def embed_at(self, image_ids: Any, step: int, wait_s: float = 60.0) -> EmbedResult:
        """Embeddings from the head as it was after global step `step`, waiting (at most `wait_s`) for
        the service to get there. For evaluation: nothing is counted as training traffic."""
        ids = self._ids(image_ids)
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        with self._stepped:
            self._stepped.wait_for(lambda: self.policy.step >= step, timeout=wait_s)
            head = self.snapshots.take(step, self.policy.step)
        with torch.no_grad():
            emb = self._head_in_blocks(self._features[unique], head)
        return EmbedResult(emb, inverse, unique, -1)

    def _head_in_blocks(self, feats: Tensor, head: nn.Module | None = None) -> Tensor:
        """The head over blocks of exactly `EMBED_BLOCK` rows, the last one padded with zeros. The
        rounding of a matrix product depends on how many rows it multiplies (an image embedded alone
        and inside a group of 800 differ in the last bits), so with one call per merged group an
        image's embedding depended on which requests the service happened to merge, i.e. on timing,
        and the same synchronous run could end in different bits. With every call of one shape, an
        embedding depends only on the image and the head."""
        n = feats.shape[0]
        if not n:
            return torch.empty((0, self.out_dim), dtype=self.dtype)
        pad = -n % EMBED_BLOCK
        if pad:
            feats = torch.cat([feats, feats.new_zeros((pad, feats.shape[1]))])
        head = self.head if head is None else head
        return torch.cat([head(block) for block in feats.split(EMBED_BLOCK)])[:n]

    def backward(self, image_ids: Any, grad_embeddings: Any, token: int | None = None,
                 worker: int = 0, wire_bytes: int | None = None) -> torch.futures.Future:
        """d(loss)/d(embedding) for each id (repeats allowed, summed per id), handed to the policy.

        `token` identifies the step (the sync policy groups the workers' pushes by it; GBA will read
        its staleness from it); `worker` tells the pushes of one step apart. Returns a future done
        once the push's update has been applied. `wire_bytes`: what the request weighed on the wire,
        counted instead of the in-memory tensors when the server calls."""
        t0 = time.perf_counter()
        ids = self._ids(image_ids)
        grad = torch.as_tensor(grad_embeddings)
        if grad.shape != (ids.numel(), self.out_dim):
            raise ValueError(f"backward got {ids.numel()} ids but gradients of shape {tuple(grad.shape)}; "
                             f"expected ({ids.numel()}, {self.out_dim})")
        if not bool(torch.isfinite(grad).all()):
            raise ValueError("backward got non-finite gradients; the head is left unchanged")
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        summed = torch.zeros((unique.numel(), self.out_dim), dtype=self.dtype)
        summed.index_add_(0, inverse, grad.to(self.dtype))
        push = Push(unique, summed, token, worker)
        with self._lock:
            c = self.counters
            c["requests"] += 1
            c["backward_requests"] += 1
            c["backward_ids"] += ids.numel()
            c["bytes_in"] += _nbytes(image_ids) + grad.nbytes if wire_bytes is None else wire_bytes
            self.last_token = token
            if ids.numel():
                updates = self.policy.add(push)
            else:
                updates = []
                push.done.set_result(self.version)
            for update in updates:
                self._apply(update)
            self._after_step()
            c["backward_seconds"] += time.perf_counter() - t0
        return push.done

    def flush(self) -> int:
        """Apply what the policy holds back (a partial GBA batch as its sum / N) and keep the policy, with
        its figures: a PS phase's end, when the shards apply theirs. Returns the version."""
        with self._lock:
            for update in self.policy.flush():
                self._apply(update)
            self._after_step()
            return self.version

    def set_policy(self, policy: UpdatePolicy) -> int:
        """Switch the update policy (the trainer switching modes). Pushes the old policy still holds are
        applied first (a partial GBA batch as its sum / N), so nothing pushed is lost."""
        with self._lock:
            self.flush()
            self.policy = policy
            self._after_step()
            return self.version

    def _apply(self, update: Update) -> None:
        """One optimizer step of the head from an update's per-id gradients (lock held)."""
        with torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            out = self.head(self._features[update.ids])
            out.backward(update.grads)
            self.optimizer.step()
        self.version += 1
        self.counters["backward_unique_ids"] += update.ids.numel()
        self.counters["updates"] = self.counters.get("updates", 0) + 1
        for p in update.pushes:
            p.done.set_result(self.version)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Head, optimizer state and version (plus the config and trunk cache key, for checks)."""
        with self._lock:
            return {
                "head": {k: v.clone() for k, v in self.head.state_dict().items()},
                "optimizer": self.optimizer.state_dict(),
                "version": self.version,
                "config": config_dict(self.cfg),
                "trunk_key": self.trunk.key,
            }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        saved = d.get("config", {})
        for k in ("trunk", "head", "out_dim", "optimizer"):
            if k in saved and saved[k] != config_dict(self.cfg)[k]:
                raise UserError(f"image-service checkpoint has {k}={saved[k]!r} but this service has "
                                f"{config_dict(self.cfg)[k]!r}")
        if d.get("trunk_key") not in (None, self.trunk.key):
            warnings.warn("image-service checkpoint was trained on other trunk features "
                          "(another weights file, seed or dataset); loading its head anyway", stacklevel=2)
        with self._lock:
            self.head.load_state_dict(d["head"])
            self.optimizer.load_state_dict(d["optimizer"])
            self.version = int(d["version"])

    def __repr__(self) -> str:
        return (f"ImageService({str(self.dataset_dir)!r}, trunk={self.cfg.trunk}, images={self.n_images}, "
                f"version={self.version}, cache={'hit' if self.trunk.from_cache else 'computed'})")
