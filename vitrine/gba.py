"""Global Batch gradients Aggregation (GBA paper), the rules shared by the parameter server and the
image service.

Tokens: a worker takes a token with each batch; the token is stamped with the global step at which
it was issued. The worker pushes its gradient with the token and does not wait. The server applies
an update once it holds gradients worth one global batch: exactly N = global batch / local batch
gradients that still count. Staleness of a gradient = the global step when it arrives - its token's
step. Weight 1 while staleness <= `threshold`; beyond, `decay ** (staleness - threshold)`; a weight
below `drop_below` (0 by default, i.e. only an exact 0 when decay is 0) drops the gradient, which
then does not count towards N (decay 0 gives TensorFlow's SyncReplicasOptimizer). Dense gradients
are summed with their weights and divided by N; sparse rows likewise per row, divided by N (not by
the row's occurrences): with nothing stale a GBA update equals one synchronous step on the
concatenated global batch.

A token is used at most once: a second push with the same token is refused (the shards). The token
book that issues them, hands a lost worker's token to another and holds tokens back under bounded
staleness is shard 0's (`trainer/ps/tokens.py`); the rules it applies are here (`staleness`,
`may_issue`), beside the weighting (`GBAConfig.weight`) and the aggregation (`Aggregator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

G = TypeVar("G")


def staleness(step: int, token_step: int) -> int:
    """How many global steps a gradient is late: the server's step when it arrives minus the step its
    token was stamped with."""
    return int(step) - int(token_step)


def may_issue(batch: int, step: int, max_staleness: int) -> bool:
    """Bounded staleness (`--max-staleness K`): a token of global batch `batch` (counted from the
    phase's first batch, like the step) goes out only while it is at most K steps ahead of the global
    step; K = 0 is synchronous training over the PS, K < 0 never holds a token back."""
    return max_staleness < 0 or batch - step <= max_staleness


@dataclass
class GBAConfig:
    n: int  # gradients per update: global batch / local batch
    threshold: int = 2  # staleness (in global steps) with full weight
    decay: float = 0.5  # weight multiplier per step of staleness beyond the threshold
    drop_below: float = 0.0  # weights at or below this drop the gradient

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"GBA needs N >= 1 gradients per update (got {self.n})")
        if self.threshold < 0:
            raise ValueError(f"GBA staleness threshold must be >= 0 (got {self.threshold})")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"GBA decay must be in [0, 1] (got {self.decay})")

    def weight(self, staleness: int) -> float:
        if staleness <= self.threshold:
            return 1.0
        return self.decay ** (staleness - self.threshold)


@dataclass
class Stats:
    issued: int = 0
    applied: int = 0  # gradients that went into an update
    decayed: int = 0  # of those, with weight < 1
    dropped: int = 0  # weight at or below drop_below: not counted
    updates: int = 0
    staleness: list[int] = field(default_factory=list)  # of every accepted gradient (for percentiles)

    def as_dict(self) -> dict[str, float]:
        import numpy as np

        out = {"tokens_issued": self.issued, "tokens_applied": self.applied, "tokens_decayed": self.decayed,
               "tokens_dropped": self.dropped, "gba_updates": self.updates}
        if self.staleness:
            p = np.percentile(self.staleness, [50, 90, 99])
            out.update(staleness_p50=float(p[0]), staleness_p90=float(p[1]), staleness_p99=float(p[2]))
        return out


class Aggregator(Generic[G]):
    """The GBA rule for gradients as they arrive, shared by the parameter-server shards and the image
    service's gba policy: weigh each by its staleness, drop it when the weight is too
    small, and hand back a batch once exactly N count. Not thread-safe (every caller holds a lock) and
    step-agnostic: the caller knows the step, computes the staleness and advances the step when a
    batch comes back, since the shards also move it in their async mode.
    """

    def __init__(self, cfg: GBAConfig, stats: Stats | None = None):
        self.cfg = cfg
        self.stats = stats if stats is not None else Stats()
        self._held: list[tuple[float, int, G]] = []  # (weight, staleness, gradient)

    def add(self, staleness: int, gradient: G) -> tuple[float, list[tuple[float, int, G]] | None]:
        """(weight, the complete batch of (weight, staleness, gradient) or None). A weight at or below
        `drop_below` means the gradient was dropped: it does not count and is not held."""
        w = self.cfg.weight(staleness)
        if w <= self.cfg.drop_below:
            self.stats.dropped += 1
            return w, None
        self.stats.staleness.append(staleness)
        self.stats.decayed += w < 1.0
        self._held.append((w, staleness, gradient))
        return w, (self.take() if len(self._held) >= self.cfg.n else None)

    def take(self) -> list[tuple[float, int, G]]:
        """Everything held, as one update (also a partial batch at a switch: the caller divides its
        weighted sum by N all the same, as if the missing gradients were zero)."""
        batch, self._held = self._held, []
        if batch:
            self.stats.applied += len(batch)
            self.stats.updates += 1
        return batch

    def pending(self) -> int:
        return len(self._held)
