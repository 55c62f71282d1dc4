"""A worker's view of the parameter server: pull the rows and tensors a batch needs, push gradients.

One RPC per shard per pull and per push (every table's rows for that shard travel together); with
`per_table` (the unpacked baseline of `--no-packing`) a pull makes one call per table and shard. A
push is one call per shard either way: its tables form one gradient, which a shard must take whole. Pushes
are asynchronous: `push` returns the futures and the worker goes on; it waits for them only before
it leaves a PS phase (so the shards hold every gradient before a switch or the end). Traffic is
counted here (the bytes of the tensors sent and received), for the MLflow metrics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.rpc as rpc
from torch import Tensor

from trainer.ps import server
from trainer.ps.layout import Layout


class PSClient:
    def __init__(self, key: str, layout: Layout, per_table: bool = False):
        self.layout = layout
        self.per_table = per_table  # one call per table and shard (unpacked) instead of one per shard
        self.names = [server.shard_name(s, key) for s in range(layout.shards)]
        self.dense_shards = {s for s in range(layout.shards) if layout.dense_on(s)}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.row_bytes_received = 0  # of that, embedding rows (the rest: dense tensors)
        self.pushes: list[torch.futures.Future] = []

    # -- training calls -----------------------------------------------------------------------------
    def pull(self, ids: dict[str, Tensor], min_step: int = 0, dense: bool = True) -> dict[str, Tensor]:
        """`ids`: per table, sorted unique global row ids. Returns per table its rows (in `ids` order)
        and, with `dense`, every dense tensor."""
        routes = {name: self.layout.route(t) for name, t in ids.items()}
        futs = []
        for s, shard in enumerate(self.names):
            rows = {name: r[s][1] for name, r in routes.items() if r[s][1].numel()}
            self.bytes_sent += sum(t.nbytes for t in rows.values())
            with_dense = dense and s in self.dense_shards
            calls = [(rows, with_dense)]
            if self.per_table:
                calls = [({n: r}, False) for n, r in rows.items()] + [({}, True)] * with_dense
            for part_rows, dense in calls:
                futs.append((s, rpc.rpc_async(shard, server.rpc_pull, args=(part_rows, dense, min_step))))
        out: dict[str, Tensor] = {}
        parts: list[dict[str, Tensor]] = [{} for _ in self.names]
        for s, f in futs:
            parts[s].update(f.wait()[0])
        for name, t in ids.items():
            rows = None
            for s, part in enumerate(parts):
                if name in part:
                    if rows is None:
                        rows = part[name].new_empty((t.numel(), part[name].shape[1]))
                    rows[routes[name][s][0]] = part[name]
            out[name] = rows if rows is not None else torch.empty(0)
        for part in parts:
            for name, v in part.items():
                self.bytes_received += v.nbytes
                if name in ids:
                    self.row_bytes_received += v.nbytes
                else:
                    out[name] = v
        return out

    def push(self, token: int, token_step: int, dense: dict[str, Tensor], sparse: dict[str, tuple[Tensor, Tensor]]
             ) -> list[torch.futures.Future]:
        """Send one token's gradient: dense tensors to their homes, table rows (global ids) by shard."""
        futs = []
        routes = {name: self.layout.route(ids) for name, (ids, _) in sparse.items()}
        for s, shard in enumerate(self.names):
            d = {n: g for n, g in dense.items() if self.layout.home(n) == s}
            sp = {}
            for name, (ids, rows) in sparse.items():
                pos, local = routes[name][s]
                if pos.numel():
                    sp[name] = (local, rows[pos])
            self.bytes_sent += sum(t.nbytes for t in d.values()) + sum(i.nbytes + r.nbytes for i, r in sp.values())
            futs.append(rpc.rpc_async(shard, server.rpc_push, args=(token, token_step, d, sp)))
        self.pushes.extend(futs)
        return futs

    def wait_pushes(self) -> list[int]:
        """Block until every push sent so far has reached its shard; their staleness values."""
        out = [f.wait() for f in self.pushes]
        self.pushes = []
        return out

    def tokens(self, method: str, *args: Any) -> Any:
        return rpc.rpc_sync(self.names[0], server.rpc_tokens, args=(method, *args))

    # -- whole state (switches, checkpoints) -------------------------------------------------------
    def load(self, params: dict[str, Tensor], state: dict[str, dict[str, Any]], step: int) -> None:
        parts = self.layout.split(params, state)
        futs = [rpc.rpc_async(n, server.rpc_load, args=(p["params"], p["state"], list(self.layout.tables), step))
                for n, p in zip(self.names, parts)]
        for f in futs:
            f.wait()

    def export(self) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]], int]:
        parts = [f.wait() for f in [rpc.rpc_async(n, server.rpc_export) for n in self.names]]
        params, state = self.layout.join(parts)
        return params, state, int(parts[0]["step"])  # shard 0 keeps the global step

    def keep_snapshots(self, every: int, offset: int = 0) -> None:
        for f in [rpc.rpc_async(n, server.rpc_keep_snapshots, args=(every, offset)) for n in self.names]:
            f.wait()

    def snapshot(self, step: int, wait_s: float = 60.0) -> dict[str, Tensor]:
        """Every parameter as it was after global step `step` (`keep_snapshots`); raises
        `trainer.ps.shard.SnapshotMissing` when a shard kept none of that step."""
        from vitrine.snapshots import SnapshotMissing

        parts = [f.wait() for f in [rpc.rpc_async(n, server.rpc_snapshot, args=(step, wait_s)) for n in self.names]]
        missing = [p["missing"] for p in parts if "missing" in p]
        if missing:
            raise SnapshotMissing("; ".join(missing))
        params, _ = self.layout.join([{"params": p["params"], "state": {n: {} for n in p["params"]}} for p in parts])
        return params

    def configure(self, mode: str, n: int, threshold: int, decay: float, step: int | None = None) -> int:
        futs = [rpc.rpc_async(s, server.rpc_configure, args=(mode, n, threshold, decay, step)) for s in self.names]
        return max(f.wait() for f in futs)

    def counters(self) -> list[dict[str, Any]]:
        return [f.wait() for f in [rpc.rpc_async(n, server.rpc_counters) for n in self.names]]

    def check_workers(self, timeout_s: float = 5.0) -> list[int]:
        return rpc.rpc_sync(self.names[0], server.rpc_check_workers, args=(timeout_s,))
