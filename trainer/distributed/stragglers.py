"""Slowing a worker down on purpose, to show what stragglers do to each training mode.

`RANK:FACTOR` makes worker RANK take FACTOR times as long for its share of every step (it sleeps
(FACTOR - 1) x its own compute time); `random:P:FACTOR` slows, at each step with probability P, one
worker drawn at random. The draw is seeded by the step, so every worker agrees on who straggles
without talking about it. `none` (or empty) slows nobody.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from vitrine.errors import UserError


@dataclass(frozen=True)
class Straggler:
    rank: int | None = None  # a fixed worker, or None for random
    probability: float = 0.0
    factor: float = 1.0

    @classmethod
    def parse(cls, spec: str | None, workers: int) -> "Straggler":
        if not spec or spec == "none":
            return cls()
        parts = spec.split(":")
        try:
            if parts[0] == "random" and len(parts) == 3:
                p, f = float(parts[1]), float(parts[2])
                if not 0 <= p <= 1:
                    raise ValueError
                out = cls(None, p, f)
            elif len(parts) == 2:
                out = cls(int(parts[0]), 1.0, float(parts[1]))
            else:
                raise ValueError
        except ValueError:
            raise UserError(f"--straggler {spec!r}: use RANK:FACTOR (e.g. 1:4), random:P:FACTOR (e.g. random:0.1:4) "
                            f"or none") from None
        if out.factor < 1:
            raise UserError(f"--straggler {spec!r}: FACTOR is how many times slower, >= 1")
        if out.rank is not None and not 0 <= out.rank < workers:
            raise UserError(f"--straggler {spec!r}: rank {out.rank} is not one of the {workers} workers")
        return out

    def slowed(self, step: int, workers: int, seed: int = 0) -> int | None:
        """The rank slowed at `step`, or None."""
        if self.factor <= 1:
            return None
        if self.rank is not None:
            return self.rank
        rng = random.Random(seed * 1_000_003 + step)
        return rng.randrange(workers) if rng.random() < self.probability else None

    def delay(self, rank: int, step: int, workers: int, compute_s: float, seed: int = 0) -> float:
        return (self.factor - 1) * compute_s if self.slowed(step, workers, seed) == rank else 0.0
