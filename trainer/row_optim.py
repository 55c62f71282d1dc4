"""Row-wise optimizers for embedding tables: a step reads, updates and moves only the rows a batch
touched, so its cost is set by the batch, not by the vocabulary.

A dense optimizer over an embedding table (`--embedding-optimizer dense`, the trainer before this
module) costs O(vocabulary) every step: the backward pass materialises a (V, d) gradient, the
all-reduce carries it, and Adam walks every row's moments (untouched rows too: their zero gradient
still decays the moments and moves the row). The two optimizers here follow FBGEMM's table-batched
embedding optimizers, as TorchRec's fused embeddings use them:

- `lazy_adam` (FBGEMM `ADAM`, "lazy Adam"): Adam on the touched rows only. For a touched row r with
  gradient g (d,): m_r = b1 m_r + (1 - b1) g; v_r = b2 v_r + (1 - b2) g^2;
  w_r -= lr * (m_r / (1 - b1^t)) / (sqrt(v_r / (1 - b2^t)) + eps), where t counts the table's updates
  (one per global step). Untouched rows and their moments stay as they are. When every row is touched
  every step this is exactly `torch.optim.Adam` (tests/test_row_optim.py checks it).
- `rowwise_adagrad` (FBGEMM `EXACT_ROWWISE_ADAGRAD`): one accumulator per row, the mean of the squared
  gradient over the row's d values: s_r += mean(g^2); w_r -= lr * g / (sqrt(s_r) + eps). Its state is
  V floats instead of Adam's 2 V d.

Every mode calls the same `RowOptimizer.apply` on the same (rows, summed gradient) pairs: single and
all-reduce workers on the global batch's rows (the workers exchange coalesced pairs,
`trainer.distributed.allreduce.exchange_rows`), a PS shard on the rows its pushes carry (summed with
their GBA weights). So a switch between modes carries the state over and needs no re-tuning.

State per table (by the names `torch.optim.Adam` uses, so checkpoints read alike): `step` (a 0-d
tensor), and `exp_avg`, `exp_avg_sq` (V, d) for lazy Adam or `sum` (V,) for row-wise Adagrad. Every
non-scalar state tensor is indexed by row first, so a PS layout cuts it like its table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("dense", "lazy_adam", "rowwise_adagrad")
# Each row-wise optimizer's own learning rate (`--embedding-lr` overrides it; `--lr`'s decay applies).
# A row moves only on the steps that touch it (dense Adam also moved untouched rows on their
# momentum), and Adagrad's steps shrink as its accumulator grows: at the dense layers' 1e-3 lazy Adam
# trained 0.0048 test AUC below dense Adam. These are the best of a sweep on the default world
# (benchmarks/embedding_optim_bench.py, benchmarks/results/2026-12-07-session15.md).
TABLE_LR = {"lazy_adam": 4e-3, "rowwise_adagrad": 3e-2}


@dataclass(frozen=True)
class RowOptimizer:
    kind: str  # "lazy_adam" | "rowwise_adagrad" ("dense" tables use the dense layers' torch optimizer)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.kind not in KINDS[1:]:
            raise ValueError(f"unknown row-wise optimizer {self.kind!r}; expected one of {KINDS[1:]}")

    def init_state(self, table: Tensor) -> dict[str, Tensor]:
        """Zero state for a (V, d) table."""
        step = torch.zeros((), dtype=table.dtype)
        if self.kind == "lazy_adam":
            return {"step": step, "exp_avg": torch.zeros_like(table), "exp_avg_sq": torch.zeros_like(table)}
        return {"step": step, "sum": torch.zeros(table.shape[0], dtype=table.dtype)}

    @torch.no_grad()
    def apply(self, table: Tensor, state: dict[str, Tensor], rows: Tensor, grad: Tensor, lr: float) -> None:
        """One update of `table` (V, d) in place: `rows` (n,) unique row ids, `grad` (n, d) their summed
        gradient. Counts as one step of the table even when `rows` is empty."""
        state["step"] += 1
        if rows.numel() == 0:
            return
        if self.kind == "lazy_adam":
            b1, b2 = self.betas
            t = float(state["step"])
            m = state["exp_avg"][rows].mul_(b1).add_(grad, alpha=1 - b1)
            v = state["exp_avg_sq"][rows].mul_(b2).addcmul_(grad, grad, value=1 - b2)
            state["exp_avg"][rows] = m
            state["exp_avg_sq"][rows] = v
            denom = (v / (1 - b2 ** t)).sqrt_().add_(self.eps)
            table[rows] -= (lr / (1 - b1 ** t)) * m / denom
        else:
            s = state["sum"][rows] + grad.pow(2).mean(dim=1)
            state["sum"][rows] = s
            table[rows] -= (lr / (s.sqrt() + self.eps)).unsqueeze(1) * grad


def coalesce(grad: Tensor | None, width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A table's sparse gradient (from `nn.Embedding(sparse=True)`, duplicates not yet summed) as
    (rows (n,) sorted unique, values (n, d)); empty when the table got no gradient."""
    if grad is None:
        return torch.zeros(0, dtype=torch.long), torch.zeros((0, width), dtype=dtype)
    g = grad.coalesce()
    return g.indices()[0], g.values()


def sum_rows(parts: list[tuple[Tensor, Tensor]], width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Sum (rows, values) pairs whose rows may repeat across parts: (unique rows (n,), summed (n, d))."""
    parts = [(r, v) for r, v in parts if r.numel()]
    if not parts:
        return torch.zeros(0, dtype=torch.long), torch.zeros((0, width), dtype=dtype)
    if len(parts) == 1:
        return parts[0]
    rows = torch.cat([r for r, _ in parts])
    values = torch.cat([v for _, v in parts])
    uniq, inverse = torch.unique(rows, sorted=True, return_inverse=True)
    out = torch.zeros((uniq.numel(), values.shape[1]), dtype=values.dtype)
    out.index_add_(0, inverse, values)
    return uniq, out


class TableOptimizer:
    """A row-wise optimizer over a model's embedding tables, with each table's state, by parameter name
    (the names `trainer.ps.layout` and the checkpoints use)."""

    def __init__(self, opt: RowOptimizer, tables: dict[str, Tensor]):
        self.opt = opt
        self.tables = tables
        # Made on first use: a PS-mode worker never steps its tables (the shards do), so it does not
        # hold their optimizer state (2 V d floats for lazy Adam).
        self.state: dict[str, dict[str, Tensor]] = {}

    def _state(self, name: str) -> dict[str, Tensor]:
        if name not in self.state:
            self.state[name] = self.opt.init_state(self.tables[name].detach())
        return self.state[name]

    def local_gradients(self) -> dict[str, tuple[Tensor, Tensor]]:
        """This process's gradient of every table, coalesced: {name: (rows, values)}."""
        return {n: coalesce(t.grad, t.shape[1], t.dtype) for n, t in self.tables.items()}

    def step(self, grads: dict[str, tuple[Tensor, Tensor]], lr: float) -> None:
        """One update of every table with its (rows, summed gradient); a table without rows still counts
        the step (Adam's bias correction follows the global step in every mode)."""
        for n, t in self.tables.items():
            rows, values = grads.get(n, (torch.zeros(0, dtype=torch.long), None))
            self.opt.apply(t.data, self._state(n), rows, values, lr)

    def state_by_name(self) -> dict[str, dict[str, Tensor]]:
        return {n: dict(self._state(n)) for n in self.tables}

    def load_state_by_name(self, state: dict[str, dict[str, Tensor]]) -> None:
        """Copy in every table's state (from `state_by_name`, a checkpoint or the PS shards)."""
        for n in self.tables:
            self.state[n] = {k: v.clone() for k, v in state[n].items()}
