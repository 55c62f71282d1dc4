"""Slowing a worker down on purpose, to show what stragglers do to each training mode.

`RANK:FACTOR` makes worker RANK take FACTOR times as long per step as the other workers (the median
of their last steps): after its own work of a step it sleeps the difference. Its own work is
everything it does itself: waiting for its batch, PS pulls and image embeddings, forward and
backward, the optimizer step or the pushes; not what it waits for on other workers (the all-reduce,
tokens held back by --max-staleness) or the coordinator's duties. Measured against its peers rather
than against itself, because a slow worker's own work grows with its slowness (in the PS modes it
walks past the batches the others took) and shrinks the others' (its sleep frees the cores they
share here): FACTOR is the pace a benchmark sees, in every mode. Before any peer has timed a step it
sleeps (FACTOR - 1) x its own work. `random:P:FACTOR` slows, at each step with probability P, one
worker drawn at random. The draw is seeded by the step, so every worker agrees on who straggles
without talking about it. `none` (or empty) slows nobody.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass
from typing import Mapping

from vitrine.errors import UserError


@dataclass(frozen=True)
class Straggler:
    rank: int | None = None  # a fixed worker, or None for random
    probability: float = 0.0
    factor: float = 1.0

    @classmethod
    def parse(cls, spec: str | None, workers: int) -> "Straggler":
        """The spec grammar is the control channel's (`vitrine.control.parse_straggler`), so a setting
        given at launch and one sent to a running job read the same."""
        from vitrine.control import parse_straggler

        if not spec:
            return cls()
        try:
            d = parse_straggler(spec)
        except UserError as exc:
            raise UserError(f"--straggler: {exc}") from None
        if d["kind"] == "none":
            return cls()
        if d["kind"] == "random":
            return cls(None, d["p"], d["factor"])
        if d["rank"] >= workers:
            raise UserError(f"--straggler {spec!r}: rank {d['rank']} is not one of the {workers} workers")
        return cls(d["rank"], 1.0, d["factor"])

    def as_tuple(self) -> tuple[float, float, float]:
        return (-1 if self.rank is None else self.rank, self.probability, self.factor)

    @classmethod
    def from_tuple(cls, t: tuple[float, float, float]) -> "Straggler":
        rank, p, f = t
        return cls(None if rank < 0 else int(rank), float(p), float(f))

    def slowed(self, step: int, workers: int, seed: int = 0) -> int | None:
        """The rank slowed at `step`, or None."""
        if self.factor <= 1:
            return None
        if self.rank is not None:
            return self.rank
        rng = random.Random(seed * 1_000_003 + step)
        return rng.randrange(workers) if rng.random() < self.probability else None

    def delay(self, rank: int, step: int, workers: int, own_s: float, seed: int = 0, peers_s: float = 0.0) -> float:
        """Seconds to sleep after `own_s` of own work so that the step takes FACTOR x `peers_s` (the
        other workers' median step; FACTOR x `own_s` while that is unknown, i.e. 0)."""
        if self.slowed(step, workers, seed) != rank:
            return 0.0
        return max(self.factor * (peers_s if peers_s > 0 else own_s) - own_s, 0.0)


def peers_median(step_s: Mapping[int, float], rank: int, exclude: tuple[int, ...] = ()) -> float:
    """The median of the other workers' last step times (0.0 while none has timed one): what a
    straggler's step is set against. `exclude`: lost workers."""
    peers = [t for r, t in step_s.items() if r != rank and r not in exclude and t > 0]
    return statistics.median(peers) if peers else 0.0
