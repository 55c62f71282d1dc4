"""Streaming batches from a processed dataset: flat memory, deterministic, resumable.

Rows are read shard by shard with `pyarrow.parquet.ParquetFile.iter_batches` (never a whole split),
each Arrow chunk turned into numpy columns at once (list columns padded from their Arrow offsets,
without a Python loop over rows), and, when shuffling, passed through a shuffle buffer:

* the shard order is a permutation drawn from `(seed, epoch)`;
* the buffer holds `max(shuffle_buffer, batch_size)` rows; each batch is `batch_size` rows drawn
  uniformly without replacement from the buffer, and the next `batch_size` rows of the stream take
  their places; when the stream ends, the rest of the buffer is permuted and emitted;
* the draws come from a generator seeded with `(seed, epoch)`.

The batches depend only on the dataset, `(seed, epoch)`, the batch size, the buffer size and L,
never on how Arrow happens to chunk the files, so the same `(seed, epoch)` gives identical batches
and `epoch(e, skip_batches=k)` yields exactly batches k, k+1, ... of `epoch(e)` (what `--resume`
uses): skipped batches still advance the buffer, but are never gathered into tensors.

Batch format (the contract with the model), B rows, L = `LoaderConfig.max_len` or the manifest's:

| key | tensor |
|---|---|
| each `categorical` field | LongTensor (B,) |
| each `sequence` field | LongTensor (B, L), right-padded with 0, the LAST L entries of longer lists |
| `hist_len` | LongTensor (B,), clipped to L (only when the dataset has list fields) |
| `ad_image` / `hist_image` | LongTensor (B,) / (B, L) image-store rows (when the dataset has images) |
| `label` | FloatTensor (B,) |
| `group_id`, `impression_id` | LongTensor (B,) |
| `cold_item` | BoolTensor (B,) |
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

T = TypeVar("T")

from trainer.dataset import LIST_KINDS, Dataset
from vitrine.errors import UserError

Columns = dict[str, np.ndarray]


def _h(text: str) -> dict:
    return {"help": text}


@dataclass
class LoaderConfig:
    batch_size: int = field(default=1024, metadata=_h("rows per batch"))
    shuffle_buffer: int = field(default=65536, metadata=_h("rows held in the shuffle buffer (memory grows with it)"))
    max_len: int | None = field(default=None, metadata=_h("L: behaviour entries kept per sequence (default: the dataset's)"))

    def check(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.shuffle_buffer < 0:
            raise UserError(f"--shuffle-buffer must be >= 0 (got {self.shuffle_buffer})")
        if self.max_len is not None and self.max_len < 0:
            raise UserError(f"--max-len must be >= 0 (got {self.max_len})")


def pad_lists(arr: pa.Array, max_len: int) -> np.ndarray:
    """An Arrow list<int> array -> int64 (n, max_len): the last `max_len` entries of each list,
    oldest first, right-padded with 0. Vectorised over the Arrow offsets."""
    n = len(arr)
    out = np.zeros((n, max_len), dtype=np.int64)
    if n == 0 or max_len == 0:
        return out
    offsets = arr.offsets.to_numpy()  # accounts for a slice; indexes into arr.values
    values = np.asarray(arr.values.to_numpy(zero_copy_only=False), dtype=np.int64)
    if len(values) == 0:
        return out
    ends = offsets[1:].astype(np.int64)
    keep = np.minimum(ends - offsets[:-1], max_len)
    cols = np.arange(max_len)
    idx = (ends - keep)[:, None] + cols
    mask = cols < keep[:, None]
    np.minimum(idx, len(values) - 1, out=idx)  # padded slots read any valid entry, then are zeroed
    np.multiply(values[idx], mask, out=out)
    return out


class _Stream:
    """Rows of an iterator of column chunks, handed out `n` at a time whatever the chunking."""

    def __init__(self, chunks: Iterator[Columns]):
        self._chunks = chunks
        self._pending: deque[Columns] = deque()
        self._head = 0  # rows of _pending[0] already handed out
        self._avail = 0
        self._done = False

    @staticmethod
    def _len(c: Columns) -> int:
        return len(next(iter(c.values())))

    def _pull(self) -> bool:
        for chunk in self._chunks:
            n = self._len(chunk)
            if n:
                self._pending.append(chunk)
                self._avail += n
                return True
        self._done = True
        return False

    @property
    def exhausted(self) -> bool:
        if self._avail == 0 and not self._done:
            self._pull()
        return self._avail == 0

    def take(self, n: int) -> Columns | None:
        """The next min(n, rows left) rows; None when none are left."""
        while self._avail < n and not self._done:
            self._pull()
        n = min(n, self._avail)
        if n == 0:
            return None
        parts: list[Columns] = []
        need = n
        while need:
            chunk = self._pending[0]
            size = self._len(chunk) - self._head
            k = min(size, need)
            parts.append({key: v[self._head:self._head + k] for key, v in chunk.items()})
            need -= k
            if k == size:
                self._pending.popleft()
                self._head = 0
            else:
                self._head += k
        self._avail -= n
        if len(parts) == 1:
            return parts[0]
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


class BatchLoader:
    """Batches of one split; see the module docstring for the format and the guarantees."""

    def __init__(self, dataset: Dataset, split: str, cfg: LoaderConfig, seed: int, shuffle: bool,
                 drop_last: bool = False, read_rows: int = 8192):
        cfg.check()
        self.dataset = dataset
        self.split = split
        self.cfg = cfg
        self.seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.read_rows = max(1, int(read_rows))
        self.max_len = dataset.max_len if cfg.max_len is None else int(cfg.max_len)
        self.shards = dataset.shards(split)
        self.shard_rows = dataset.shard_rows(split)
        self.rows = sum(self.shard_rows)
        fields = dataset.fields
        # (column in the shard, key in the batch, numpy dtype) for scalar columns.
        self._scalars: list[tuple[str, str, type]] = [
            (f["name"], f["name"], np.int64) for f in fields if f["kind"] not in LIST_KINDS
        ]
        self._lists = [f["name"] for f in fields if f["kind"] in LIST_KINDS]
        self._scalars += [(dataset.label, "label", np.float32), ("group_id", "group_id", np.int64),
                          ("cold_item", "cold_item", np.bool_), ("impression_id", "impression_id", np.int64)]
        if self._lists:
            self._scalars.append(("hist_len", "hist_len", np.int64))
        self._columns = list(dict.fromkeys([c for c, _, _ in self._scalars] + self._lists))

    @property
    def keys(self) -> list[str]:
        return [k for _, k, _ in self._scalars] + self._lists

    def __len__(self) -> int:
        b = self.cfg.batch_size
        return self.rows // b if self.drop_last else math.ceil(self.rows / b)

    # -- reading ------------------------------------------------------------------------------
    def _convert(self, rb: pa.RecordBatch, shard: Path) -> Columns:
        out: Columns = {}
        for col, key, dtype in self._scalars:
            a = rb.column(col)
            if a.null_count:
                raise UserError(f"shard {shard}: column {col!r} has {a.null_count} missing values; "
                                f"rebuild the dataset with `vitrine pipeline`")
            v = a.to_numpy(zero_copy_only=False, writable=True)  # torch wants writable arrays
            out[key] = v if v.dtype == dtype else v.astype(dtype)
        if "hist_len" in out:
            np.minimum(out["hist_len"], self.max_len, out=out["hist_len"])
        for col in self._lists:
            a = rb.column(col)
            if a.null_count or a.values.null_count:
                raise UserError(f"shard {shard}: list column {col!r} has missing values; "
                                f"rebuild the dataset with `vitrine pipeline`")
            out[col] = pad_lists(a, self.max_len)
        return out

    def _chunks(self, order: list[int], skip_rows: int = 0) -> Iterator[Columns]:
        for i in order:
            shard, expect = self.shards[i], self.shard_rows[i]
            if skip_rows >= expect:  # a whole shard before the resume point: not even opened
                skip_rows -= expect
                continue
            got = 0
            try:
                pf = pq.ParquetFile(shard)
            except (OSError, pa.ArrowException) as e:
                raise UserError(f"shard {shard} cannot be read ({e}); it changed since the dataset was opened") from e
            with pf:
                for rb in pf.iter_batches(batch_size=self.read_rows, columns=self._columns, use_threads=False):
                    got += rb.num_rows
                    if skip_rows >= rb.num_rows:
                        skip_rows -= rb.num_rows
                        continue
                    if skip_rows:
                        rb, skip_rows = rb.slice(skip_rows), 0
                    yield self._convert(rb, shard)
            if got != expect:
                raise UserError(f"shard {shard} now has {got} rows, the manifest says {expect}: "
                                f"it changed since the dataset was opened; rebuild the dataset")

    # -- epochs -------------------------------------------------------------------------------
    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(epoch), stream])

    def epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch, from batch `skip_batches` on."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        for take in self.lazy_epoch(epoch, skip_batches):
            yield take()

    def lazy_epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Callable[[], dict[str, torch.Tensor]]]:
        """The same batches, each as a function that gathers it, valid until the next one is asked for.
        A worker that trains on one batch in N (the PS modes) walks the others without gathering them."""
        if skip_batches < 0:
            raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
        gen = self._shuffled(epoch, skip_batches) if self.shuffle else self._ordered(skip_batches)
        for gather in gen:
            yield lambda g=gather: {k: torch.from_numpy(v) for k, v in g().items()}

    def _ordered(self, skip_batches: int) -> Iterator[Callable[[], Columns]]:
        b = self.cfg.batch_size
        stream = _Stream(self._chunks(list(range(len(self.shards))), skip_rows=skip_batches * b))
        while (batch := stream.take(b)) is not None:
            if self.drop_last and len(batch["label"]) < b:
                return
            yield lambda batch=batch: batch

    def _fill(self, stream: _Stream, capacity: int) -> tuple[Columns, int]:
        """Up to `capacity` rows of the stream, copied chunk by chunk into arrays allocated once
        (so filling never holds the buffer twice)."""
        buf: Columns = {}
        size = 0
        while size < capacity and (part := stream.take(min(self.read_rows, capacity - size))) is not None:
            n = len(part["label"])
            if not buf:
                buf = {k: np.empty((capacity, *v.shape[1:]), dtype=v.dtype) for k, v in part.items()}
            for k, v in part.items():
                buf[k][size:size + n] = v
            size += n
        if size < capacity:
            buf = {k: v[:size] for k, v in buf.items()}
        return buf, size

    def _shuffled(self, epoch: int, skip_batches: int) -> Iterator[Callable[[], Columns]]:
        b = self.cfg.batch_size
        order = [int(i) for i in self._rng(epoch, 0).permutation(len(self.shards))]
        rng = self._rng(epoch, 1)
        stream = _Stream(self._chunks(order))
        buf, size = self._fill(stream, min(max(self.cfg.shuffle_buffer, b), self.rows))
        if size == 0:
            return
        live = np.ones(size, dtype=bool)  # slots holding a row not yet emitted (for the drain)
        index = 0
        # Streaming: the buffer is full (size >= b); swap a random batch out for the next rows.
        while not stream.exhausted:
            incoming = stream.take(b)
            assert incoming is not None
            r = len(incoming["label"])
            idx = rng.choice(size, b, replace=False)
            if index >= skip_batches:
                yield lambda idx=idx: {k: v[idx] for k, v in buf.items()}
            index += 1
            for k, v in buf.items():
                v[idx[:r]] = incoming[k]
            if r < b:  # the stream ended inside this step: these slots stay empty
                live[idx[r:]] = False
        # Draining: the rest of the buffer, in a random order.
        perm = rng.permutation(np.flatnonzero(live))
        left = len(perm)
        for start in range(0, left, b):
            if self.drop_last and left - start < b:
                return
            if index >= skip_batches:
                yield lambda sel=perm[start:start + b]: {k: v[sel] for k, v in buf.items()}
            index += 1


def prefetched(batches: Iterator[T], depth: int) -> Iterator[T]:
    """The same items, produced up to `depth` ahead on a background thread (reading and decoding
    overlap the training step; the order and the values are unchanged). `depth` 0: as is."""
    if depth <= 0:
        yield from batches
        return
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                if stop.is_set():
                    return
                q.put((item, None))
            q.put((done, None))
        except BaseException as exc:
            q.put((done, exc))

    threading.Thread(target=produce, name="batch-prefetch", daemon=True).start()
    try:
        while True:
            item, exc = q.get()
            if exc is not None:
                raise exc
            if item is done:
                return
            yield item
    finally:
        stop.set()
