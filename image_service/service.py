"""The image service (AMS): embeds store rows with the descriptor and trains the descriptor's head
from the gradients the trainer sends back. This is the in-process implementation of the API in
docs/ARCHITECTURE.md; the remote one wraps the same object behind torch.distributed.rpc.

Protocol, per training step:

    res = service.embed(ids)                       # ids: any integer array of store rows
    emb = res.embeddings.requires_grad_()          # (U, out_dim), one row per unique id
    full = emb[res.inverse]                        # (n, out_dim), in the order of `ids`
    ... model forward on `full`, loss.backward() ...
    service.backward(res.unique_ids, emb.grad)     # or (ids, grad of `full`): summed per id

`embed` returns plain tensors (no autograd graph leaves the service). `backward` recomputes the head
on the cached trunk features of the unique ids (like XDL, rather than keeping activations between
the calls), back-propagates the per-id summed gradients and applies one optimizer step at once
(policy "immediate"); every step increments `version`. An empty `backward` is a no-op.
"""

from __future__ import annotations

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
from image_service.store import ImageStore
from vitrine.errors import UserError


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
        "embed_requests": 0,
        "backward_requests": 0,
        "ids_requested": 0,  # ids received by embed (with repeats)
        "unique_ids_computed": 0,  # head forwards in embed (after dedup)
        "backward_ids": 0,  # ids received by backward (with repeats)
        "backward_unique_ids": 0,  # head recomputations in backward
        "bytes_in": 0,  # nbytes of the tensors received (ids, gradients)
        "bytes_out": 0,  # nbytes of the tensors returned (embeddings, inverse, unique ids)
        "embed_seconds": 0.0,
        "backward_seconds": 0.0,
    }


class ImageService:
    """Descriptor server over one processed dataset's image store."""

    def __init__(self, dataset_dir: Path | str, cfg: DescriptorConfig | None = None, cache_dir: Path | None = None):
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
        self.version = 0
        self.last_token: int | None = None
        self.counters: dict[str, float] = _new_counters()
        self._lock = threading.Lock()

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
    def embed(self, image_ids: Any) -> EmbedResult:
        """Embeddings of the unique ids among `image_ids`, each computed once, and the inverse map."""
        t0 = time.perf_counter()
        ids = self._ids(image_ids)
        unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
        with self._lock:
            with torch.no_grad():
                emb = self.head(self._features[unique]) if unique.numel() else torch.empty(
                    (0, self.out_dim), dtype=self.dtype)
            version = self.version
            c = self.counters
            c["requests"] += 1
            c["embed_requests"] += 1
            c["ids_requested"] += ids.numel()
            c["unique_ids_computed"] += unique.numel()
            c["bytes_in"] += ids.nbytes
            c["bytes_out"] += emb.nbytes + inverse.nbytes + unique.nbytes
            c["embed_seconds"] += time.perf_counter() - t0
        return EmbedResult(emb, inverse, unique, version)

    def backward(self, image_ids: Any, grad_embeddings: Any, token: int | None = None) -> None:
        """d(loss)/d(embedding) for each id (repeats allowed, summed per id); one optimizer step.

        `token` identifies the batch (GBA); the "immediate" policy applies every gradient at once
        and only records it.
        """
        t0 = time.perf_counter()
        ids = self._ids(image_ids)
        grad = torch.as_tensor(grad_embeddings)
        if grad.shape != (ids.numel(), self.out_dim):
            raise ValueError(f"backward got {ids.numel()} ids but gradients of shape {tuple(grad.shape)}; "
                             f"expected ({ids.numel()}, {self.out_dim})")
        if not bool(torch.isfinite(grad).all()):
            raise ValueError("backward got non-finite gradients; the head is left unchanged")
        if ids.numel():
            unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
            summed = torch.zeros((unique.numel(), self.out_dim), dtype=self.dtype)
            summed.index_add_(0, inverse, grad.to(self.dtype))
        with self._lock:
            if ids.numel():
                with torch.enable_grad():
                    self.optimizer.zero_grad(set_to_none=True)
                    out = self.head(self._features[unique])
                    out.backward(summed)
                    self.optimizer.step()
                self.version += 1
            self.last_token = token
            c = self.counters
            c["requests"] += 1
            c["backward_requests"] += 1
            c["backward_ids"] += ids.numel()
            c["backward_unique_ids"] += unique.numel() if ids.numel() else 0
            c["bytes_in"] += ids.nbytes + grad.nbytes
            c["backward_seconds"] += time.perf_counter() - t0

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
