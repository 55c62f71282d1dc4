"""Copies of a state at epoch ends, for evaluating an asynchronous job at the right step.

In a PS phase the coordinator evaluates while the other workers train on. The parameter-server shards
and the image service each keep copies of their state at the global steps where `step + offset` is a
multiple of `every` (an epoch's last step; `offset`: batches handed out but never applied before a
resume), and hand the copy of a step to the evaluation. Both keep them here, under their own lock.

A copy is kept until a later step's is asked for: the coordinator asks for epoch ends in order, and it
may be more than an epoch behind (its evaluation outlasting an epoch of the others' steps), with each
of those epochs' ends still to be evaluated.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from vitrine.errors import UserError

T = TypeVar("T")


class SnapshotMissing(UserError, LookupError):
    """A step of which no copy was kept; the caller evaluates the live state instead."""


class EpochSnapshots(Generic[T]):
    def __init__(self, owner: str):
        self.owner = owner  # how a refusal names the holder, e.g. "PS shard 0 has no snapshot"
        self.every, self.offset = 0, 0
        self._kept: dict[int, T] = {}

    def configure(self, every: int, offset: int = 0) -> None:
        """From now on copy at `step + offset` multiple of `every` (0: never); earlier copies go."""
        self.every, self.offset = max(0, int(every)), int(offset)
        self._kept.clear()

    def clear(self) -> None:
        self._kept.clear()

    def stepped(self, step: int, copy: Callable[[], T]) -> None:
        """The holder's step may have moved to `step`: copy the state if it is an epoch end."""
        if self.every and (step + self.offset) % self.every == 0 and step not in self._kept:
            self._kept[step] = copy()

    def take(self, step: int, now: int) -> T:
        """The copy of `step` (the holder is at step `now`); copies of earlier steps are let go."""
        for old in [k for k in self._kept if k < step]:
            del self._kept[old]
        if step not in self._kept:
            kept = ", ".join(f"step {k}" for k in sorted(self._kept)) or "none"
            raise SnapshotMissing(f"{self.owner} at step {step} (it is at step {now}, snapshots every "
                                  f"{self.every or '-'} steps, kept: {kept})")
        return self._kept[step]
