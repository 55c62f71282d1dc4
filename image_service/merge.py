"""Merging the embed requests of concurrent workers, so that an image wanted by several is computed once.

Each request joins a queue; one thread takes the first waiting request, then gathers more until
`expect` requests are in hand or `window_s` has passed since the first arrived, computes the union
of their ids in one head forward, and answers each request with its own rows. Requests that arrive
while a group is being computed wait for the next group, so under load groups form by themselves
even with a zero window.

`expect` is the number of workers that request together (the job's workers in synchronous
training): with it the group closes as soon as everyone has asked, and a lone worker (expect=1)
never waits for the window.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor


@dataclass
class _Request:
    ids: Tensor  # (U,) int64 unique, sorted
    future: torch.futures.Future = field(default_factory=torch.futures.Future)


class EmbedMerger:
    def __init__(self, compute: Callable[[Tensor], tuple[Tensor, int]], window_s: float = 0.002, expect: int = 1):
        self._compute = compute
        self.window_s = max(0.0, float(window_s))
        self.expect = max(1, int(expect))
        self._q: queue.Queue[_Request | None] = queue.Queue()
        self.groups = 0  # merged computations
        self.requests = 0
        self.largest_group = 0
        self._thread = threading.Thread(target=self._loop, name="embed-merger", daemon=True)
        self._thread.start()

    def submit(self, unique_ids: Tensor) -> torch.futures.Future:
        """Future of (embeddings of `unique_ids` in their order, version)."""
        req = _Request(unique_ids)
        self._q.put(req)
        return req.future

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=5)

    def _gather(self, first: _Request) -> tuple[list[_Request], bool]:
        group = [first]
        deadline = time.monotonic() + self.window_s
        while len(group) < self.expect:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                req = self._q.get(timeout=left)
            except queue.Empty:
                break
            if req is None:
                return group, True
            group.append(req)
        while True:  # whatever else is already waiting joins too
            try:
                req = self._q.get_nowait()
            except queue.Empty:
                return group, False
            if req is None:
                return group, True
            group.append(req)

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            group, stop = self._gather(first)
            self._run(group)
            if stop:
                return

    def _run(self, group: list[_Request]) -> None:
        try:
            if len(group) == 1:
                union = group[0].ids
            else:
                union = torch.unique(torch.cat([r.ids for r in group]), sorted=True)
            emb, version = self._compute(union)
        except BaseException as exc:  # every waiting worker gets the error, the thread lives on
            for r in group:
                r.future.set_exception(exc)
            return
        self.groups += 1
        self.requests += len(group)
        self.largest_group = max(self.largest_group, len(group))
        for r in group:
            rows = emb if len(group) == 1 else emb[torch.searchsorted(union, r.ids)]
            r.future.set_result((rows, version))
