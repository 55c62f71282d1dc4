"""Shard 0's token book: which batch each worker trains on next, stamped with the global step.

In a PS mode a worker asks for a token before every local batch. A token names a slice of a global
batch (token id k = global batch k // N, slice k % N: the same slices the all-reduce mode gives its
N workers, in the same order) and carries the global step at which it was issued, so the shards can
measure its staleness. Handing out data with the tokens is what lets fast workers take more batches
than slow ones (GBA's point) while every sample is still seen once per epoch; a worker that dies
holding a token loses that slice, nothing else (the paper's "drop the batch and take a new token").

`max_staleness` >= 0 holds a token back until the global step is at most that many steps behind its
batch: 0 gives fully synchronous behaviour over the PS (used to check that GBA equals single-process
training exactly), larger values bounded-staleness asynchrony; -1 (default) never holds back.

The answers also carry the commands of the coordinator: the current straggler setting, "switch to
all-reduce" (every worker finishes its step and meets the others at a barrier), "stop" and "done"
(the data is used up). A command takes effect at a global batch's boundary: the slices left of the
batch begun are handed out first, so the phase ends on whole updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from trainer.distributed.stragglers import peers_median
from trainer.ps.shard import ParameterShard
from vitrine.gba import may_issue


@dataclass
class WorkerView:
    name: str = ""
    step_s: float = 0.0  # the last step's own work and straggler pause (not waiting on others)
    steps: int = 0
    samples: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    last_seen: float = field(default_factory=time.monotonic)
    holding: int | None = None


class TokenBook:
    def __init__(self, shard0: ParameterShard, world: int):
        self.shard = shard0
        self.cond = shard0.cond  # the step advances under the shard's lock; waiting on it needs the same one
        self.world = world
        self.active = False
        self.n = world
        self.next_id = 0
        self.end_id = 0
        self.batch_offset = 0  # global batch number - global step when the phase started
        self.max_staleness = -1
        self.command: str | None = None  # "ar" (switch) | "stop"
        self.command_at = 0  # the token id from which the command holds (a planned switch's batch x N)
        self.straggler: tuple[float, float, float] = (-1.0, 0.0, 1.0)
        self.workers: dict[int, WorkerView] = {}
        self.done: set[int] = set()
        self.lost: set[int] = set()
        self.reissue: list[int] = []  # tokens a lost worker held and never pushed: handed out again first
        self.issued = 0

    def start(self, step: int, first_batch: int, end_batch: int, n: int, max_staleness: int,
              straggler: tuple[float, float, float]) -> None:
        with self.cond:
            self.active = True
            self.n = n
            self.next_id = first_batch * n
            self.end_id = end_batch * n
            self.batch_offset = first_batch - step
            self.max_staleness = max_staleness
            self.command, self.command_at = None, 0
            self.straggler = tuple(straggler)  # type: ignore[assignment]
            self.done.clear()
            self.reissue.clear()
            for w in self.workers.values():  # step times are the phase's own
                w.holding, w.step_s = None, 0.0
            self.cond.notify_all()

    def next_batch(self) -> int:
        """The first global batch not yet handed out in full (where an all-reduce phase goes on)."""
        with self.cond:
            return -(-self.next_id // self.n)

    def set_command(self, command: str | None, at_batch: int = 0) -> None:
        """`at_batch` > 0 holds the command until that global batch would be handed out: a planned
        switch (--switch-at) then ends the phase at the same step in every run, not at whichever batch
        the coordinator's hook happens to see the step."""
        with self.cond:
            self.command, self.command_at = command, int(at_batch) * self.n
            self.cond.notify_all()

    def _commanded(self) -> bool:
        return self.command is not None and self.next_id >= self.command_at

    def set_straggler(self, straggler: tuple[float, float, float]) -> None:
        with self.cond:
            self.straggler = tuple(straggler)  # type: ignore[assignment]

    def request(self, rank: int, name: str, step_s: float, loss: float | None, samples: int,
                wait_s: float = 2.0) -> dict[str, Any]:
        """A worker finished its previous batch (`step_s`, its `loss`, `samples`) and wants the next."""
        with self.cond:
            w = self.workers.setdefault(rank, WorkerView())
            w.name, w.last_seen, w.holding = name, time.monotonic(), None
            self.cond.notify_all()  # a worker waiting for the last tokens to come back
            if loss is not None:
                w.step_s, w.steps, w.samples = step_s, w.steps + 1, w.samples + samples
                w.loss_sum, w.loss_n = w.loss_sum + loss, w.loss_n + 1

            def ready() -> bool:
                if self.reissue and self.active:
                    return True
                if self._commanded() or not self.active:
                    return True
                if self.next_id >= self.end_id:  # "done" once no token is out: one held by a worker that
                    return not self._out(rank)  # died comes back to be handed out again (mark_lost)
                return may_issue(self.next_id // self.n - self.batch_offset, self.shard.step, self.max_staleness)

            deadline = time.monotonic() + wait_s
            while not ready():
                if not self.cond.wait(timeout=max(deadline - time.monotonic(), 0.0)):
                    return {"kind": "wait"}  # ask again (keeps RPC calls short; the coordinator's duties run)
            if self.reissue and self.active:  # before any command: the batch it belongs to must be whole
                return self._issue(self.reissue.pop(0), rank, w)
            # A command waits for the global batch begun to be handed out whole: stopping between its
            # slices left it to be applied as a partial sum and its other slices untrained (the next
            # phase starts at the batch after), breaking "every update takes N gradients".
            if self._commanded() and (self.next_id % self.n == 0 or self.next_id >= self.end_id):
                return {"kind": self.command, "batch": -(-self.next_id // self.n)}
            if not self.active or self.next_id >= self.end_id:
                return {"kind": "done", "batch": -(-self.next_id // self.n)}
            self.next_id += 1
            return self._issue(self.next_id - 1, rank, w)

    def _out(self, rank: int) -> bool:
        """Lock held: does a worker other than `rank` hold a token (its gradient may still be missing)?"""
        return any(v.holding is not None for r, v in self.workers.items() if r != rank)

    def _issue(self, tok: int, rank: int, w: WorkerView) -> dict[str, Any]:
        """Lock held: hand token `tok` to worker `rank`."""
        self.issued += 1
        w.holding = tok
        peers_s = peers_median({r: v.step_s for r, v in self.workers.items()}, rank, tuple(self.lost))
        return {"kind": "token", "id": tok, "step": self.shard.step, "batch": tok // self.n, "slice": tok % self.n,
                "straggler": self.straggler, "peers_s": peers_s}

    def finish(self, rank: int) -> None:
        with self.cond:
            self.done.add(rank)
            if rank in self.workers:
                self.workers[rank].holding = None
            self.cond.notify_all()

    def mark_lost(self, rank: int) -> None:
        """A worker that stopped answering: the token it held, unless its gradient reached this shard,
        goes to the next worker that asks, so its global batch still gets N gradients (under
        --max-staleness the global step would otherwise wait for it for ever)."""
        with self.cond:
            self.lost.add(rank)
            w = self.workers.get(rank)
            if w is not None and w.holding is not None and self.active and not self.shard.has_pushed(w.holding):
                self.reissue.append(w.holding)
            if w is not None:
                w.holding = None
            self.cond.notify_all()

    def report(self) -> dict[str, Any]:
        """What the coordinator logs: per-worker step times, the mean loss and samples since the last report."""
        with self.cond:
            out: dict[str, Any] = {"step": self.shard.step, "issued": self.issued, "done": sorted(self.done),
                                   "lost": sorted(self.lost), "next_batch": -(-self.next_id // self.n),
                                   "step_s": {r: w.step_s for r, w in self.workers.items()},
                                   "steps": {r: w.steps for r, w in self.workers.items()},
                                   "names": {r: w.name for r, w in self.workers.items()}}
            n = sum(w.loss_n for w in self.workers.values())
            out["loss"] = sum(w.loss_sum for w in self.workers.values()) / n if n else None
            out["samples"] = sum(w.samples for w in self.workers.values())
            for w in self.workers.values():
                w.loss_sum, w.loss_n, w.samples = 0.0, 0, 0
            return out
