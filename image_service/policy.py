"""When the image service applies the gradients the workers push: the update policy.

The service sums each push per unique image (`Push`); a policy decides which pushes make one
optimizer step of the descriptor head (`Update`). Two policies exist now and the distributed
trainer adds GBA through the same `add` hook:

- `Immediate`: every push is one step, as it arrives (single-process training, async PS).
- `Sync(n)`: the pushes of all `n` workers for one step (same token) make one step, their gradients
  summed per image and divided by `n`. Each worker's gradient is d(mean loss over its local batch);
  the mean over the global batch of n equal local batches is their average, so a `Sync(n)` step
  equals the step a single process would take on the concatenated global batch.
- `GBA(cfg)`: any `n` pushes that still count make one step (`vitrine.gba`): the token is the global
  step its batch was issued at (the parameter server issues and checks the tokens themselves), a push
  staler than the threshold is decayed or dropped, and the rows are summed with their weights and
  divided by `n`. Pushes do not wait for the step (non-blocking workers).

A push carries a future that completes once the step containing it has been applied, so a worker
that waits on it (synchronous training) reads the new head in its next `embed`.

Every policy counts the job's global steps (`step`), as the parameter-server shards do: one per
update under `sync` and `gba`, one per `n` pushes under `immediate` (the async PS's bookkeeping). The
service keys its evaluation snapshots by it, so that an evaluation reads the head of the same step
as the model it evaluates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vitrine.gba import staleness

if TYPE_CHECKING:
    from vitrine.gba import GBAConfig


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
    step = 0  # global steps completed (see the module's docstring)

    def add(self, push: Push) -> list[Update]:
        raise NotImplementedError

    def pending(self) -> int:
        """Pushes held back, waiting for the rest of their step."""
        return 0

    def flush(self) -> list[Update]:
        """The updates of what is held back, before the policy is replaced."""
        return []

    def describe(self) -> dict:
        return {"policy": self.name}


class Immediate(UpdatePolicy):
    name = "immediate"

    def __init__(self, n: int = 1, step: int = 0):
        self.n, self.step, self._pushes = max(1, int(n)), int(step), 0

    def add(self, push: Push) -> list[Update]:
        self._pushes += 1
        if self._pushes % self.n == 0:
            self.step += 1
        return [Update(push.ids, push.grads, [push])]


class Sync(UpdatePolicy):
    """One step per token once `n` pushes carry it; a worker pushes once per token."""

    name = "sync"

    def __init__(self, n: int, step: int = 0):
        if n < 1:
            raise ValueError(f"sync policy needs n >= 1 workers (got {n})")
        self.n = n
        self.step = int(step)
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
        # Summed in worker order, not arrival order: float sums depend on the order, and a step that
        # depended on which worker came first would make a synchronous run irreproducible.
        held.sort(key=lambda p: p.worker)
        ids, grads = merge_pushes(held, scale=1.0 / self.n)
        self.step += 1
        return [Update(ids, grads, held)]

    def pending(self) -> int:
        return sum(len(v) for v in self._held.values())

    def flush(self) -> list[Update]:
        out = [Update(*merge_pushes(held, scale=1.0 / self.n), held) for held in self._held.values()]
        self._held = {}
        self.step += len(out)
        return out

    def describe(self) -> dict:
        return {"policy": self.name, "workers": self.n}


class GBA(UpdatePolicy):
    """Global-batch aggregation over the pushes' step tokens; see `vitrine.gba` for the rules."""

    name = "gba"

    def __init__(self, cfg: "GBAConfig", step: int = 0):
        from vitrine.gba import Aggregator

        self.cfg = cfg
        self.step = step
        self.agg: Aggregator[Push] = Aggregator(cfg)
        self.stats = self.agg.stats

    def add(self, push: Push) -> list[Update]:
        if push.token is None:
            raise ValueError("the gba policy needs each push's token (the global step its batch was issued at)")
        _, batch = self.agg.add(staleness(self.step, push.token), push)
        if batch is None:
            # Dropped, or non-blocking: the worker goes on; the step lands when the global batch is complete.
            push.done.set_result(-1)
            return []
        return [self._update(batch, [push])]

    def pending(self) -> int:
        return self.agg.pending()

    def flush(self) -> list[Update]:
        """A partial global batch: its weighted sum / N, as if the missing gradients were zero."""
        batch = self.agg.take()
        return [self._update(batch, [])] if batch else []

    def _update(self, batch: list, answer: list[Push]) -> Update:
        """One step from a batch of (weight, staleness, push): weighted rows summed per id, / N.
        `answer`: the pushes whose futures the step completes (the others were answered on arrival)."""
        ids, grads = merge_pushes([Push(p.ids, p.grads * w if w != 1.0 else p.grads, p.token, p.worker)
                                   for w, _, p in batch], scale=1.0 / self.cfg.n)
        self.step += 1
        return Update(ids, grads, answer)

    def describe(self) -> dict:
        return {"policy": self.name, "n": self.cfg.n, "threshold": self.cfg.threshold, "decay": self.cfg.decay,
                **self.stats.as_dict()}


def make_policy(name: str, workers: int = 1, threshold: int = 2, decay: float = 0.5, step: int = 0) -> UpdatePolicy:
    if name == "immediate":
        return Immediate(workers, step)
    if name == "sync":
        return Sync(workers, step)
    if name == "gba":
        from vitrine.gba import GBAConfig

        return GBA(GBAConfig(n=workers, threshold=threshold, decay=decay), step=step)
    raise ValueError(f"unknown update policy {name!r}; use immediate, sync or gba")
