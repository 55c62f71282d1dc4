"""When the image service applies the gradients the workers push: the update policy.

The service sums each push per unique image (`Push`); a policy decides which pushes make one
optimizer step of the descriptor head (`Update`). Two policies exist now and the distributed
trainer adds GBA through the same `add` hook:

- `Immediate`: every push is one step, as it arrives (single-process training, async PS).
- `Sync(n)`: the pushes of all `n` workers for one step (same token) make one step, their gradients
  summed per image and divided by `n`. Each worker's gradient is d(mean loss over its local batch);
  the mean over the global batch of n equal local batches is their average, so a `Sync(n)` step
  equals the step a single process would take on the concatenated global batch.

A push carries a future that completes once the step containing it has been applied, so a worker
that waits on it (synchronous training) reads the new head in its next `embed`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Push:
    ids: Tensor  # (U,) int64, sorted unique image ids
    grads: Tensor  # (U, d) summed per id
    token: int | None
    worker: int = 0
    done: torch.futures.Future = field(default_factory=torch.futures.Future)


@dataclass
class Update:
    ids: Tensor  # (U,) unique ids of the step
    grads: Tensor  # (U, d) the gradient to back-propagate through the head
    pushes: list[Push]


def merge_pushes(pushes: list[Push], scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Union of the pushes' ids with their gradients summed per id, times `scale`."""
    ids = torch.cat([p.ids for p in pushes])
    grads = torch.cat([p.grads for p in pushes])
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    out = torch.zeros((unique.numel(), grads.shape[1]), dtype=grads.dtype)
    out.index_add_(0, inverse, grads)
    if scale != 1.0:
        out *= scale
    return unique, out


class UpdatePolicy:
    """Collects pushes and returns the updates that are ready to apply, in order."""

    name = "policy"

    def add(self, push: Push) -> list[Update]:
        raise NotImplementedError

    def pending(self) -> int:
        """Pushes held back, waiting for the rest of their step."""
        return 0

    def describe(self) -> dict:
        return {"policy": self.name}


class Immediate(UpdatePolicy):
    name = "immediate"

    def add(self, push: Push) -> list[Update]:
        return [Update(push.ids, push.grads, [push])]


class Sync(UpdatePolicy):
    """One step per token once `n` pushes carry it; a worker pushes once per token."""

    name = "sync"

    def __init__(self, n: int):
        if n < 1:
            raise ValueError(f"sync policy needs n >= 1 workers (got {n})")
        self.n = n
        self._held: dict[int | None, list[Push]] = {}

    def add(self, push: Push) -> list[Update]:
        held = self._held.setdefault(push.token, [])
        if any(p.worker == push.worker for p in held):
            raise ValueError(f"worker {push.worker} pushed twice for token {push.token}; in the sync policy "
                             f"each of the {self.n} workers pushes once per step")
        held.append(push)
        if len(held) < self.n:
            return []
        del self._held[push.token]
        ids, grads = merge_pushes(held, scale=1.0 / self.n)
        return [Update(ids, grads, held)]

    def pending(self) -> int:
        return sum(len(v) for v in self._held.values())

    def describe(self) -> dict:
        return {"policy": self.name, "workers": self.n}


def make_policy(name: str, workers: int = 1) -> UpdatePolicy:
    if name == "immediate":
        return Immediate()
    if name == "sync":
        return Sync(workers)
    raise ValueError(f"unknown update policy {name!r}; use immediate or sync")
