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


@dataclass
class ImageCache:
    """Worker-side cache of the hottest images' embeddings, checked against the descriptor version.

    The image service answers every embed call with the head's version (it counts the head's
    updates). A cached embedding computed at version `fetched` is served only while the version the
    service reports is at most `bound` ahead of it. The check runs twice: before the call (against the
    last version seen, so a stale cache is re-read in the same call) and after it (the head may have
    moved since; then the hot rows are fetched again at once). So no served embedding is ever more than
    `bound` versions older than the head the same call reported.

    Gradients still go back for every image, cached ones included: the service applies them to its
    current head, as it does for any stale gradient in the asynchronous modes.
    """

    hot: Tensor  # sorted unique image-store rows
    bound: int
    values: Tensor | None = None
    fetched: int = -1  # head version the cached values were computed at
    latest: int = -1  # newest head version the service reported
    hits: int = 0
    misses: int = 0

    def _stale(self, version: int) -> bool:
        return self.values is None or version - self.fetched > self.bound

    def _refresh(self, emb: Tensor, ids: Tensor, version: int) -> None:
        self.values = emb[torch.searchsorted(ids, self.hot)].clone()
        self.fetched = version

    def embed(self, unique: Tensor, fetch) -> tuple[Tensor, int]:
        """Embeddings for `unique` (sorted unique ids) and the head version; `fetch(ids)` asks the
        service for `ids` (sorted unique) and returns (embeddings, version)."""
        if self._stale(self.latest):
            want = torch.unique(torch.cat([unique, self.hot]))
            emb, version = fetch(want)
            self.latest = max(self.latest, version)
            self._refresh(emb, want, version)
            self.misses += unique.numel()
            return emb[torch.searchsorted(want, unique)], version
        hot = torch.isin(unique, self.hot)
        version = self.latest
        out = None
        if bool((~hot).any()):
            emb, version = fetch(unique[~hot])
            self.latest = max(self.latest, version)
            out = emb.new_empty((unique.numel(), emb.shape[1]))
            out[~hot] = emb
        if self._stale(version):  # the head moved past the bound since the last call: re-read the hot rows
            emb, version = fetch(self.hot)
            self.latest = max(self.latest, version)
            self._refresh(emb, self.hot, version)
        if out is None:
            out = self.values.new_empty((unique.numel(), self.values.shape[1]))
        out[hot] = self.values[torch.searchsorted(self.hot, unique[hot])]
        self.hits += int(hot.sum())
        self.misses += int((~hot).sum())
        return out, version

    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
