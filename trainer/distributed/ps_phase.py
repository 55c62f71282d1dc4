"""A worker's loop in the parameter-server modes (async, gba), and the switches into and out of them.

Every step: take a token from shard 0 (it names a slice of a global batch and carries the global
step), pull the rows of the embedding tables the slice touches and the dense tensors, run forward and
backward on the local replica, push the image-embedding gradients to the image service (same token)
and the rest to the shards, and go on without waiting for the update (GBA's non-blocking worker).

Worker 0 is also the coordinator: between its own steps it reads the control channel, logs the job's
figures to MLflow, evaluates at epoch ends, checkpoints, and in `auto` mode decides when the cluster
is healthy enough to go back to all-reduce. Switches:

- into a PS mode (from all-reduce, at a step every worker agreed on): the coordinator loads its model
  and optimizer state into the shards (split by `trainer.ps.layout`), then every worker meets it at a
  barrier and starts taking tokens where the all-reduce phase stopped;
- between async and gba: the shards and the image service change policy in place;
- back to all-reduce: shard 0 answers "ar" instead of a token; each worker waits for its pushes, all
  meet at a barrier, the coordinator flushes the shards (a partial global batch is applied), and every
  worker reads the whole state back. Not possible once a worker is lost (the all-reduce needs all).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from trainer.distributed import allreduce
from trainer.distributed.allreduce import DistContext
from trainer.images import image_inputs
from trainer.ps.client import PSClient
from trainer.ps.layout import Layout

if TYPE_CHECKING:
    from trainer.train import Trainer


class PSPhase:
    def __init__(self, trainer: "Trainer", key: str, rpc_name: str):
        self.t = trainer
        assert trainer.ctx is not None
        self.ctx = trainer.ctx
        self.rpc_name = rpc_name
        self.layout = Layout.of(trainer.model, trainer.cfg.ps_shards)
        # Without packing, each table travels in its own call (the unpacked baseline PICASSO measures).
        self.client = PSClient(key, self.layout, per_table=not trainer.cfg.packing)
        self.params = dict(trainer.model.named_parameters())
        self.dense_names = [n for n in self.layout.names if not self.layout.is_table(n)]
        self.cache = self._hot_cache(trainer.cfg.cache_rows, trainer.cfg.cache_staleness)
        self.image_cache = self._hot_images(trainer.cfg.cache_images, trainer.cfg.cache_staleness)
        self.steps = 0
        self.mode = "gba"
        self.waits: dict[str, float] = {k: 0.0 for k in STAGES}  # seconds per stage, this worker
        self._own_mark = 0.0  # the own-work stages' total at the last straggler decision
        self._it = None
        self._pos = 0
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None
        self.lost: list[int] = []

    # -- the coordinator's switches ------------------------------------------------------------------
    def enter(self, mode: str, first_batch: int, end_batch: int) -> None:
        """Coordinator: hand the model and optimizer state to the shards and open the token book."""
        t, cfg = self.t, self.t.cfg
        params = {n: p.detach() for n, p in t.model.named_parameters()}
        self.client.load(params, t.optimizer_state(), t.step)
        self.client.configure(mode, self.ctx.world, cfg.gba_threshold, cfg.gba_decay, t.step)
        self.client.tokens("start", t.step, first_batch, end_batch, self.ctx.world, cfg.max_staleness,
                           t.straggler.as_tuple())
        self._service_policy(mode)
        # Epoch ends are evaluated on snapshots of that step (see `load_epoch_end`): the shards and the
        # service copy their state each time their step reaches an epoch's last batch.
        spe = len(t.train_loader)
        self.batch_minus_step = first_batch - t.step  # 0 unless a resumed PS phase lost in-flight batches
        self.client.keep_snapshots(spe, self.batch_minus_step)
        if t.service is not None:
            t.service.keep_snapshots(spe, self.batch_minus_step)

    def set_mode(self, mode: str) -> None:
        """Coordinator: async <-> gba in place."""
        cfg = self.t.cfg
        step = self.client.configure(mode, self.ctx.world, cfg.gba_threshold, cfg.gba_decay)
        self._service_policy(mode, step)

    def _service_policy(self, mode: str, step: int | None = None) -> None:
        t, cfg = self.t, self.t.cfg
        if t.service is None:
            return
        name = {"ar": "sync", "gba": "gba", "async": "immediate"}[mode]
        t.service.set_policy(name, self.ctx.world, *cfg.image_gba(), t.step if step is None else step)

    def start(self, mode: str, first_batch: int) -> None:
        """Every worker, after the entry barrier."""
        self.mode = mode
        if self.t.service is not None:
            self.t.service.cache = self.image_cache  # PS phases only: AR stays exactly the plain trainer
        self._it = None
        self._pos = first_batch
        self._last = None

    def load_epoch_end(self, epoch: int, wait_s: float = 60.0) -> int | None:
        """Coordinator: load the model as it was after the last global step of `epoch` epochs and return
        that step (the image head's snapshot has the same key), or None when a shard kept no snapshot of
        it (the caller evaluates the live state instead). The other workers train on meanwhile; taking
        the live state instead evaluated the model several steps into the next epoch, with a head that
        moved on during the evaluation (benchmarks/results/distributed_history.md)."""
        from vitrine.snapshots import SnapshotMissing

        step = epoch * len(self.t.train_loader) - self.batch_minus_step
        try:
            params = self.client.snapshot(step, wait_s)
        except SnapshotMissing as exc:
            print(f"epoch {epoch}: evaluating the live state, not the epoch's end: {exc}", flush=True)
            return None
        with torch.no_grad():
            for n, p in self.t.model.named_parameters():
                p.copy_(params[n])
        return step

    def load_from_ps(self) -> None:
        params, state, step = self.client.export()
        t = self.t
        with torch.no_grad():
            for n, p in t.model.named_parameters():
                p.copy_(params[n])
        t.load_optimizer_state(state)
        t.set_step(step)

    def _hot_cache(self, fraction: float, bound: int):
        """The hottest `fraction` of each vocabulary's rows by training count (vocab/<name>.parquet)."""
        if fraction <= 0:
            return None
        import pandas as pd

        from trainer.ps.cache import RowCache

        hot: dict[str, list[torch.Tensor]] = {}
        for vocab, size in self.t.fmap.vocabs.items():
            path = self.t.ds.dir / "vocab" / f"{vocab}.parquet"
            if not path.exists():
                continue
            v = pd.read_parquet(path, columns=["index", "count"]).sort_values("count", ascending=False)
            k = int(round(fraction * size))
            if k:
                name, rows = self.t.model.vocab_rows(vocab, torch.tensor(v["index"].to_numpy()[:k], dtype=torch.long))
                hot.setdefault(name, []).append(rows)
        return RowCache({n: torch.unique(torch.cat(r)) for n, r in hot.items()}, bound)

    def _hot_images(self, fraction: float, bound: int):
        """The hottest `fraction` of the image store's rows by occurrences in the train split (the ad's
        image and the behaviour images: what the worker asks the service to embed)."""
        t = self.t
        if fraction <= 0 or t.service is None:
            return None
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        from trainer.ps.cache import ImageCache

        counts = np.zeros(t.service.n_images, dtype=np.int64)
        for shard in t.ds.shards("train"):
            names = pq.read_schema(shard).names
            table = pq.read_table(shard, columns=[c for c in ("ad_image", "hist_image") if c in names])
            for col in table.columns:
                values = pc.list_flatten(col) if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) else col
                counts += np.bincount(values.to_numpy(zero_copy_only=False).astype(np.int64),
                                      minlength=counts.size)[: counts.size]
        k = int(round(fraction * counts.size))
        if not k:
            return None
        hot = np.argsort(-counts, kind="stable")[:k]
        return ImageCache(torch.unique(torch.as_tensor(hot, dtype=torch.long)), bound)

    # -- data ----------------------------------------------------------------------------------------
    def _global_batch(self, G: int) -> dict[str, torch.Tensor]:
        """Global batch number G (epoch * steps per epoch + batch), ID dropout applied. Tokens come in
        increasing order, so the worker walks the epoch's batches forward, skipping what others took."""
        spe = len(self.t.train_loader)
        if self._last is not None and self._last[0] == G:
            return self._last[1]  # another slice of the batch this worker just trained on
        if G < self._pos:
            self._it, self._pos = None, G
        while True:
            if self._it is None:
                self._it = iter(self.t.train_loader.lazy_epoch(self._pos // spe, skip_batches=self._pos % spe))
            try:
                gather = next(self._it)
            except StopIteration:
                self._it, self._pos = None, -(-self._pos // spe) * spe  # the next epoch's first batch
                continue
            pos, self._pos = self._pos, self._pos + 1
            if pos == G:
                self._last = (G, self.t.drop_ad_ids(gather(), G))
                return self._last[1]

    # -- one step ------------------------------------------------------------------------------------
    def prepare(self, tok: dict[str, Any]) -> dict[str, Any]:
        """Everything a step waits for: its data, its rows and dense tensors from the shards (or the row
        cache), its image embeddings. With `--interleave` this runs ahead, on the prefetch thread."""
        t = self.t
        clock = _Clock(self.waits)
        gb = self._global_batch(int(tok["batch"]))
        batch, share = allreduce.shard(gb, DistContext(int(tok["slice"]), self.ctx.world))
        clock("data")
        ids = t.model.read_rows(batch)
        want, refresh = ids, False
        if self.cache is not None:
            want, refresh = self.cache.plan(ids, int(tok["step"]))
        # The dense tensors are cached with the rows: pulled only when the cache is re-read (they are the
        # hottest parameters of all; the worker's own copies are the cache, nothing else writes them).
        pull_dense = self.cache is None or refresh
        pulled = self.client.pull(want, min_step=int(tok["step"]), dense=pull_dense)
        # The gradient is stamped with the oldest step it read, so GBA weighs the cache's staleness too.
        stamp = int(tok["step"]) if pull_dense else min(int(tok["step"]), int(self.cache.fetched))
        writes = []  # (parameter, rows or None for whole, values)
        if self.cache is not None:
            if refresh:
                self.cache.refresh(pulled, want, int(tok["step"]))
            else:
                for name, rows in ids.items():
                    cached, values = self.cache.read(name, rows)
                    if bool(cached.any()):
                        writes.append((name, rows[cached], values))
        writes += [(name, want[name], pulled[name]) for name in ids]
        if pull_dense:
            writes += [(name, None, pulled[name]) for name in self.dense_names]
        clock("pull")
        img = image_inputs(batch, t.service, t.model.uses_ad_image, t.model.uses_hist_images, train=True)
        clock("embed")
        return {"batch": batch, "share": share, "ids": ids, "writes": writes, "img": img, "stamp": stamp}

    def step(self, tok: dict[str, Any], prep: dict[str, Any] | None = None) -> tuple[float, int]:
        t = self.t
        if prep is None:
            prep = self.prepare(tok)
        clock = _Clock(self.waits)
        batch, share, ids, img = prep["batch"], prep["share"], prep["ids"], prep["img"]
        with torch.no_grad():
            for name, rows, values in prep["writes"]:
                if rows is None:
                    self.params[name].copy_(values)
                else:
                    self.params[name][rows] = values
        loss = t.forward_backward(batch, img, share)
        clock("compute")
        straggler = t.straggler.from_tuple(tuple(tok["straggler"]))
        own_s = self._own_work_s()
        pause = straggler.delay(self.ctx.rank, int(tok["id"]), self.ctx.world, own_s, t.cfg.seed,
                                float(tok.get("peers_s", 0.0)))
        if pause:
            time.sleep(pause)
        clock("straggler")
        # The image service first: when shard 0 completes a global step, the head's step is in too.
        # Under --max-staleness the push waits (the head's step must be in before the next token);
        # otherwise it is as non-blocking as the PS push.
        img.push_gradients(t.service, token=int(tok["step"]), wait=t.cfg.max_staleness >= 0)
        stamp = prep["stamp"]
        clock("image_push")
        dense = {n: (self.params[n].grad if self.params[n].grad is not None else torch.zeros_like(self.params[n]))
                 for n in self.dense_names}
        if t.tables is not None:  # sparse gradients: the rows the slice looked up, coalesced
            sparse = t.tables.local_gradients()
        else:
            sparse = {name: (rows, self.params[name].grad[rows] if self.params[name].grad is not None
                             else torch.zeros((rows.numel(), self.params[name].shape[1]), dtype=self.params[name].dtype))
                      for name, rows in ids.items()}
        self.client.push(int(tok["id"]), stamp, dense, sparse)
        clock("push")
        n = int(batch["label"].shape[0])
        self.steps += 1
        if t.service is not None:
            t.service.count_samples(n)
        self.last_step_s = own_s + pause  # what the token book compares: own work and the straggler's sleep
        return float(loss.detach()) / share, n

    def _own_work_s(self) -> float:
        """This worker's own work since the last call: its data, pulls, embeddings, compute and pushes
        (with `--interleave`, the wait for the prefetched step instead of the prefetching itself). Token
        waits (on other workers, under --max-staleness) and the coordinator's duties are not its work."""
        stages = OWN_STAGES if self.t.cfg.interleave <= 0 else OWN_STAGES_INTERLEAVED
        total = sum(self.waits[s] for s in stages)
        own, self._own_mark = total - self._own_mark, total
        return own

    # -- the loop -------------------------------------------------------------------------------------
    def _answers(self):
        """(token answer, prepared step or None) in order: requested and prepared here, or, with
        `--interleave K`, up to K steps ahead on a prefetch thread while this one computes."""
        depth = self.t.cfg.interleave
        if depth <= 0:
            while True:
                ans = self._request()
                if ans["kind"] == "wait":
                    yield ans, None
                    continue
                yield ans, (self.prepare(ans) if ans["kind"] == "token" else None)
                if ans["kind"] != "token":
                    return
        q: queue.Queue = queue.Queue(maxsize=depth)
        stop = threading.Event()

        def ahead() -> None:
            try:
                while not stop.is_set():
                    ans = self._request()
                    if ans["kind"] == "wait":
                        continue
                    q.put((ans, self.prepare(ans) if ans["kind"] == "token" else None))
                    if ans["kind"] != "token":
                        return
            except BaseException as exc:  # surfaces on the training thread
                q.put(({"kind": "error", "error": exc}, None))

        thread = threading.Thread(target=ahead, name="ps-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                ans, prep = q.get()
                self.waits["prefetch_wait"] += time.perf_counter() - t0
                if ans["kind"] == "error":
                    raise ans["error"]
                yield ans, prep
                if ans["kind"] != "token":
                    return
        finally:
            stop.set()

    def _request(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        report, self._report = self._report, (0.0, None, 0)
        ans = self.client.tokens("request", self.ctx.rank, self.rpc_name, *report)
        self.waits["token"] += time.perf_counter() - t0
        return ans

    def run(self, coordinator_hook) -> tuple[str, int]:
        """Train on tokens until shard 0 says otherwise: ("done" | "stop" | "ar", next global batch).
        `coordinator_hook(tok)` runs on worker 0 after each of its steps."""
        self._report = (0.0, None, 0)
        for ans, prep in self._answers():
            kind = ans["kind"]
            if kind == "wait":
                if self.ctx.is_coordinator:
                    coordinator_hook(None)
                continue
            if kind != "token":
                self.client.wait_pushes()
                if self.t.service is not None:
                    self.t.service.wait_pushes()
                    self.t.service.cache = None
                self.client.tokens("finish", self.ctx.rank)
                print(f"worker {self.ctx.rank}: seconds per stage in the PS phase: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in self.waits.items())
                      + f"; {self.steps} steps, {self.client.bytes_received / max(self.steps, 1):,.0f} B pulled "
                        f"per step" + (f", cache hit rate {self.cache.hit_rate():.3f}" if self.cache else "")
                      + (f", image cache hit rate {self.image_cache.hit_rate():.3f}" if self.image_cache else ""),
                      flush=True)
                return kind, int(ans["batch"])
            loss, n = self.step(ans, prep)
            self._report = (self.last_step_s, loss, n)
            if len(self.client.pushes) > 64:  # keep the list short; they completed long ago
                self.client.pushes = [f for f in self.client.pushes if not f.done()]
            if self.ctx.is_coordinator:
                t0 = time.perf_counter()
                coordinator_hook(ans)
                self.waits["coordinator"] += time.perf_counter() - t0
        raise AssertionError("the token stream ended without a final answer")

    def wait_for_workers(self, poll_s: float = 0.2, check_every_s: float = 5.0) -> list[int]:
        """Coordinator, after its own "done"/"stop"/"ar": until every other worker has finished its step
        or is lost (does not answer a ping). Returns the lost ranks."""
        last_check = time.monotonic()
        while True:
            rep = self.client.tokens("report")
            gone = set(rep["done"]) | set(rep["lost"])
            if len(gone) >= self.ctx.world:
                self.lost = sorted(rep["lost"])
                return self.lost
            if time.monotonic() - last_check > check_every_s:
                self.client.check_workers()
                last_check = time.monotonic()
            time.sleep(poll_s)


STAGES = ("token", "data", "pull", "embed", "prefetch_wait", "compute", "straggler", "image_push", "push",
          "coordinator")
OWN_STAGES = ("data", "pull", "embed", "compute", "image_push", "push")
OWN_STAGES_INTERLEAVED = ("prefetch_wait", "compute", "image_push", "push")


class _Clock:
    """Adds the time since the last call to the named stage."""

    def __init__(self, into: dict[str, float]):
        self.into = into
        self.last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        self.into[stage] += now - self.last
        self.last = now


def stats(ps: "PSPhase") -> dict[str, float]:
    """This worker's PS traffic and waits, for the result and MLflow."""
    steps = max(ps.steps, 1)
    out = {"ps_steps": float(ps.steps), "ps_pulled_bytes_per_step": ps.client.bytes_received / steps,
           "ps_pulled_row_bytes_per_step": ps.client.row_bytes_received / steps,
           "ps_pushed_bytes_per_step": ps.client.bytes_sent / steps}
    out.update({f"wait_{k}_s_per_step": v / steps for k, v in ps.waits.items()})
    if ps.cache is not None:
        out["cache_hit_rate"] = ps.cache.hit_rate()
    if ps.image_cache is not None:
        out["image_cache_hit_rate"] = ps.image_cache.hit_rate()
    return out
