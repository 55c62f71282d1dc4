"""One parameter-server shard: its slice of the model, its optimizer, and when it applies gradients.

Modes (`configure`):
- `async`: every push is applied at once, with the same optimizer and learning rate as synchronous
  training (the plain asynchronous PS baseline). The global step advances once per N pushes, so the
  learning-rate schedule and the staleness figures stay in global batches.
- `gba`: the GBA rules of `vitrine.gba`: a push's staleness is this shard's step minus the step its
  token was stamped with; its weight is 1 up to the threshold and decays beyond; exactly N pushes
  that still count make one update, dense gradients and sparse rows summed with their weights and
  divided by N. Pushes never wait for the update (the worker goes on at once).
- `idle`: holds the state, refuses pushes (all-reduce phases, before the job starts).

`keep_snapshots(every)`: the shard copies its parameters each time its step reaches a multiple of
`every`, so the coordinator can evaluate the model of exactly that step (an epoch's end) while the
other workers train on; `snapshot(step)` returns the copy.

An update is one step of the dense layers' optimizer over this shard's dense tensors and, for its
table rows, one step of the row-wise optimizer (trainer/row_optim.py) over exactly the rows the
update's pushes carry, their gradients summed with their weights: the same rows and the same rule as
in single and all-reduce training, so the model evolves the same way in every mode and a switch
needs no re-tuning, and an update costs what its pushes carry, not the shard's vocabulary. (With
`--embedding-optimizer dense` the tables take the dense optimizer: untouched rows get a zero
gradient, as the all-reduce's dense gradients give them.)
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

from trainer.row_optim import RowOptimizer, sum_rows
from vitrine.gba import Aggregator, GBAConfig, Stats, staleness as gba_staleness
from vitrine.snapshots import EpochSnapshots

MODES = ("idle", "async", "gba")
Gradient = tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]  # (dense by name, sparse: (ids, rows) by name)


class TokenReused(ValueError):
    pass




class ParameterShard:
    def __init__(self, shard: int, shards: int, optimizer: str = "adam", lr: float = 1e-3, lr_decay: float = 1.0,
                 lr_decay_steps: int = 1 << 62, embedding_optimizer: str = "dense", embedding_lr: float | None = None):
        self.shard, self.shards = shard, shards
        self.optimizer, self.lr, self.lr_decay, self.lr_decay_steps = optimizer, lr, lr_decay, lr_decay_steps
        self.rows = RowOptimizer(embedding_optimizer) if embedding_optimizer != "dense" else None
        self.table_lr_scale = 1.0 if embedding_lr is None else embedding_lr / lr
        self.row_state: dict[str, dict[str, Tensor]] = {}  # per table, with a row-wise optimizer
        self.cond = threading.Condition()
        self.params: dict[str, Tensor] = {}
        self.tables: set[str] = set()
        self.opt: torch.optim.Optimizer | None = None
        self.mode = "idle"
        self.step = 0  # global steps applied
        self.gba = GBAConfig(n=1)
        self.stats = Stats()
        self.pushes = 0  # accepted since the mode started (async: the step advances every N)
        self.agg: Aggregator[Gradient] = Aggregator(self.gba, self.stats)  # the gba mode's held gradients
        self._seen: set[int] = set()
        self.bytes_in = 0
        self.bytes_out = 0
        self.snapshots: EpochSnapshots[dict[str, Tensor]] = EpochSnapshots(f"PS shard {shard} has no snapshot")

    # -- state --------------------------------------------------------------------------------------
    def load(self, params: dict[str, Tensor], state: dict[str, dict[str, Any]], tables: list[str], step: int) -> None:
        with self.cond:
            self.params = {n: t.detach().clone().requires_grad_(True) for n, t in params.items()}
            self.tables = set(tables) & set(params)
            row_wise = self.tables if self.rows is not None else set()
            plist = [p for n, p in self.params.items() if n not in row_wise]
            self.opt = (torch.optim.Adam(plist, lr=self.lr) if self.optimizer == "adam"
                        else torch.optim.SGD(plist, lr=self.lr))
            self.row_state = {}
            for name, st in state.items():
                if name in row_wise:
                    self.row_state[name] = {k: v.clone() for k, v in st.items()}
                elif st:
                    self.opt.state[self.params[name]] = {k: (v.clone() if isinstance(v, Tensor) else v)
                                                         for k, v in st.items()}
            for name in row_wise - set(self.row_state):
                self.row_state[name] = self.rows.init_state(self.params[name].detach())
            self.step = int(step)
            self.snapshots.clear()
            self._stepped()

    def export(self) -> dict[str, Any]:
        """A consistent snapshot of this shard: params, optimizer state by name, step."""
        with self.cond:
            assert self.opt is not None, "shard holds no state yet"
            state = {n: {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in self.opt.state.get(p, {}).items()}
                     for n, p in self.params.items()}
            state.update({n: {k: v.clone() for k, v in st.items()} for n, st in self.row_state.items()})
            return {"params": {n: p.detach().clone() for n, p in self.params.items()}, "state": state,
                    "step": self.step}

    def configure(self, mode: str, n: int = 1, threshold: int = 2, decay: float = 0.5,
                  step: int | None = None) -> int:
        """Enter a mode; a partial GBA batch still buffered is applied first (its sum divided by N, as if
        the missing gradients were zero), so nothing pushed is lost. Returns the step."""
        if mode not in MODES:
            raise ValueError(f"unknown PS mode {mode!r}; expected one of {MODES}")
        with self.cond:
            held = self.agg.take()
            if held:
                self._apply(held, self.gba.n)
                self.step += 1
            if step is not None:
                self.step = int(step)
            self.mode = mode
            self.gba = GBAConfig(n=n, threshold=threshold, decay=decay)
            self.agg = Aggregator(self.gba, self.stats)
            self.pushes = 0
            self._stepped()
            return self.step

    # -- the worker's calls ---------------------------------------------------------------------------
    def pull(self, rows: dict[str, Tensor], dense: bool, min_step: int = 0, wait_s: float = 10.0
             ) -> tuple[dict[str, Tensor], int]:
        """Rows of tables (local ids) and, with `dense`, every dense tensor of this shard. Waits (at most
        `wait_s`) until this shard has applied `min_step` steps, so a worker holding a token stamped
        with step t reads parameters at least as new as t on every shard, not just on shard 0."""
        with self.cond:
            self.cond.wait_for(lambda: self.step >= min_step, timeout=wait_s)
            out = {n: self.params[n].detach()[ids] for n, ids in rows.items()}
            if dense:
                out.update({n: p.detach().clone() for n, p in self.params.items() if n not in self.tables})
            self.bytes_out += sum(t.nbytes for t in out.values())
            return out, self.step

    def push(self, token: int, token_step: int, dense: dict[str, Tensor],
             sparse: dict[str, tuple[Tensor, Tensor]]) -> int:
        """One worker's gradient for one token. Returns its staleness (-1 when dropped)."""
        with self.cond:
            if self.mode == "idle":
                raise ValueError(f"PS shard {self.shard} is idle (the job trains with all-reduce now); push refused")
            if token in self._seen:
                raise TokenReused(f"token {token} already pushed to shard {self.shard}; each token carries one gradient")
            self._seen.add(token)
            self.bytes_in += sum(t.nbytes for t in dense.values()) + sum(i.nbytes + r.nbytes for i, r in sparse.values())
            staleness = gba_staleness(self.step, token_step)
            if self.mode == "async":
                self.stats.staleness.append(staleness)
                self.stats.applied += 1
                self._apply([(1.0, staleness, (dense, sparse))], 1)
                self.pushes += 1
                if self.pushes % self.gba.n == 0:
                    self.step += 1
                    self.stats.updates += 1
                self._stepped()
                return staleness
            w, batch = self.agg.add(staleness, (dense, sparse))
            if w <= self.gba.drop_below:
                return -1
            if batch is not None:
                self._apply(batch, self.gba.n)
                self.step += 1
                self._stepped()
            return staleness

    def has_pushed(self, token: int) -> bool:
        with self.cond:
            return token in self._seen

    # -- evaluation snapshots ------------------------------------------------------------------------
    def keep_snapshots(self, every: int, offset: int = 0) -> None:
        """Copy the parameters whenever `step + offset` is a multiple of `every` (0: never)."""
        with self.cond:
            self.snapshots.configure(every, offset)
            self._stepped()

    def _stepped(self) -> None:
        """Lock held, after anything that may have moved the step."""
        self.snapshots.stepped(self.step, lambda: {n: p.detach().clone() for n, p in self.params.items()})
        self.cond.notify_all()

    def snapshot(self, step: int, wait_s: float = 60.0) -> dict[str, Tensor]:
        """The parameters as they were after `step`, waiting (at most `wait_s`) for the shard to get there
        (`vitrine.snapshots`: which copies are kept, and for how long)."""
        with self.cond:
            self.cond.wait_for(lambda: self.step >= step, timeout=wait_s)
            return dict(self.snapshots.take(step, self.step))

    def _apply(self, contributions, divisor: int) -> None:
        """One optimizer step on sum(weight * gradient) / divisor over (weight, staleness, (dense,
        sparse)) contributions (the caller holds the lock)."""
        assert self.opt is not None
        lr = self.lr * self.lr_decay ** (self.step // self.lr_decay_steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        for name, st in self.row_state.items():
            p = self.params[name]
            parts = [(sparse[name][0], sparse[name][1] if w == 1.0 else sparse[name][1] * w)
                     for w, _, (_, sparse) in contributions if name in sparse]
            rows, grad = sum_rows(parts, p.shape[1], p.dtype)
            self.rows.apply(p.data, st, rows, grad / divisor if divisor != 1 else grad, lr * self.table_lr_scale)
        for name, p in self.params.items():
            if name in self.row_state:
                continue
            grad = torch.zeros_like(p)
            for w, _, (dense, sparse) in contributions:
                if name in self.tables:
                    if name in sparse:
                        ids, rows = sparse[name]
                        grad.index_add_(0, ids, rows if w == 1.0 else rows * w)
                elif name in dense:
                    grad.add_(dense[name], alpha=w)
            if divisor != 1:
                grad.div_(divisor)
            p.grad = grad
        self.opt.step()
        for p in self.params.values():
            p.grad = None

    def counters(self) -> dict[str, Any]:
        with self.cond:
            return {"step": self.step, "mode": self.mode, "pending": self.agg.pending(), "bytes_in": self.bytes_in,
                    "bytes_out": self.bytes_out, **self.stats.as_dict()}
