"""A worker-side cache of the hottest embedding rows (PICASSO's caching), with bounded staleness.

The PS phase caches the dense tensors under the same rule (they are read by every step: the
hottest parameters of all), and stamps each gradient with the oldest step it read, so GBA's
staleness weighting sees the cache's staleness as well.

Which rows: per table, the top `fraction` of rows by training frequency (the pipeline's vocabulary
counts), chosen once. ID frequencies are Zipf-like, so a few percent of the rows serve most lookups.
How fresh: every cached row was read from the parameter server at a global step `fetched`; a step
whose token is stamped `step` may use it only while `step - fetched <= bound`. Past that, the whole
cache is re-read with the step's pull (one bigger pull, then `bound` cheaper ones). `bound = 0`
re-reads every step: correct but useless; the default trades a little staleness (which GBA weighs
anyway) for most of the row traffic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class RowCache:
    hot: dict[str, Tensor]  # per table: sorted unique hot row ids
    bound: int
    values: dict[str, Tensor] = field(default_factory=dict)
    fetched: int | None = None  # global step of the last refresh
    hits: int = 0
    misses: int = 0

    def fresh(self, step: int) -> bool:
        return self.fetched is not None and step - self.fetched <= self.bound

    def plan(self, ids: dict[str, Tensor], step: int) -> tuple[dict[str, Tensor], bool]:
        """The rows to pull for a batch that reads `ids` (sorted unique per table) at `step`: the
        uncached ones, plus every hot row when the cache is too stale to serve (then `refresh`)."""
        if not self.fresh(step):
            want = {n: torch.unique(torch.cat([t, self.hot[n]])) if n in self.hot else t for n, t in ids.items()}
            for n in self.hot:
                want.setdefault(n, self.hot[n])
            self.misses += sum(t.numel() for t in ids.values())
            return want, True
        want = {}
        for n, t in ids.items():
            cached = torch.isin(t, self.hot[n]) if n in self.hot else torch.zeros_like(t, dtype=torch.bool)
            self.hits += int(cached.sum())
            self.misses += int((~cached).sum())
            want[n] = t[~cached]
        return want, False

    def refresh(self, pulled: dict[str, Tensor], pulled_ids: dict[str, Tensor], step: int) -> None:
        for n, hot in self.hot.items():
            pos = torch.searchsorted(pulled_ids[n], hot)
            self.values[n] = pulled[n][pos].clone()
        self.fetched = step

    def read(self, name: str, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Of `ids`, the cached ones (a mask) and their cached rows."""
        if name not in self.hot:
            return torch.zeros_like(ids, dtype=torch.bool), torch.empty(0)
        mask = torch.isin(ids, self.hot[name])
        pos = torch.searchsorted(self.hot[name], ids[mask])
        return mask, self.values[name][pos]

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
