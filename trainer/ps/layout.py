"""How a DICM's state is spread over S parameter-server shards.

Embedding tables (`embeddings.<vocab>.weight`, or the one packed table `packed.weight`) are sharded by row id: row r lives on shard r % S at
local row r // S, so a hot vocabulary's rows spread evenly and a worker asks each shard for just the
rows its batch touches. Every other tensor (MLPs, attention, PReLU slopes) is dense and lives whole
on shard i % S (i = its place in the model's parameter order), so dense pulls spread over shards too.

The optimizer state splits the same way (a table's state tensors indexed by row are cut like the
table, scalars such as Adam's `step` are copied), so a switch between all-reduce and PS modes, and a
checkpoint taken in either, carries the exact optimizer state across.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

TABLE_PREFIX = "embeddings."
PACKED = "packed.weight"  # all vocabularies in one table (`--packing`)


@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]  # every trainable parameter, in the model's order
    shapes: tuple[tuple[int, ...], ...]
    tables: tuple[str, ...]  # the names of the embedding tables
    shards: int

    @classmethod
    def of(cls, model: nn.Module, shards: int) -> "Layout":
        if shards < 1:
            raise ValueError(f"a parameter server needs at least one shard (got {shards})")
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        tables = tuple(n for n, p in named if (n.startswith(TABLE_PREFIX) or n == PACKED) and p.dim() == 2)
        return cls(tuple(n for n, _ in named), tuple(tuple(p.shape) for _, p in named), tables, shards)

    def is_table(self, name: str) -> bool:
        return name in self.tables

    def home(self, name: str) -> int:
        """The shard holding a dense parameter."""
        return self.names.index(name) % self.shards

    def dense_on(self, shard: int) -> list[str]:
        return [n for n in self.names if not self.is_table(n) and self.home(n) == shard]

    def route(self, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Split sorted unique row ids by shard: per shard (positions in `ids`, local rows)."""
        s = ids % self.shards
        out = []
        for shard in range(self.shards):
            pos = (s == shard).nonzero(as_tuple=True)[0]
            out.append((pos, ids[pos] // self.shards))
        return out

    # -- splitting and joining state ----------------------------------------------------------------
    def _cut(self, name: str, t: Tensor, shard: int) -> Tensor:
        return t[shard::self.shards].clone() if self.is_table(name) else t.clone()

    def split(self, params: dict[str, Tensor], opt_state: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
        """Full parameters and per-parameter optimizer state -> one {params, state} per shard."""
        parts = []
        for shard in range(self.shards):
            p_part, s_part = {}, {}
            for name in self.names:
                if not self.is_table(name) and self.home(name) != shard:
                    continue
                p_part[name] = self._cut(name, params[name], shard)
                st = opt_state.get(name, {})
                s_part[name] = {k: (self._cut(name, v, shard) if self._per_row(name, v, params[name]) else
                                    (v.clone() if isinstance(v, Tensor) else v)) for k, v in st.items()}
            parts.append({"params": p_part, "state": s_part})
        return parts

    def join(self, parts: list[dict[str, Any]]) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
        """The inverse of `split`."""
        params: dict[str, Tensor] = {}
        state: dict[str, dict[str, Any]] = {}
        for name, shape in zip(self.names, self.shapes):
            if not self.is_table(name):
                part = parts[self.home(name)]
                params[name] = part["params"][name].clone()
                state[name] = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in part["state"][name].items()}
                continue
            full = parts[0]["params"][name].new_empty(shape)
            for shard, part in enumerate(parts):
                full[shard::self.shards] = part["params"][name]
            params[name] = full
            st: dict[str, Any] = {}
            for k, v in parts[0]["state"][name].items():
                if self._per_row(name, v, parts[0]["params"][name]):
                    whole = v.new_empty((shape[0], *v.shape[1:]))
                    for shard, part in enumerate(parts):
                        whole[shard::self.shards] = part["state"][name][k]
                    st[k] = whole
                else:
                    st[k] = v.clone() if isinstance(v, Tensor) else v
            state[name] = st
        return params, state


    def _per_row(self, name: str, v: Any, param: Tensor) -> bool:
        """A table's state tensor indexed by row first (Adam's moments (V, d), row-wise Adagrad's (V,)):
        cut like the table. Scalars (`step`) are copied."""
        return self.is_table(name) and isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == param.shape[0]


# -- torch optimizer state by parameter name ----------------------------------------------------------
def optimizer_state_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """A torch optimizer's per-parameter state keyed by parameter name instead of position."""
    by_param = {p: n for n, p in model.named_parameters()}
    return {by_param[p]: dict(st) for p, st in opt.state.items()}


def load_optimizer_state_by_name(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, dict[str, Any]]) -> None:
    """Set a torch optimizer's per-parameter state from `optimizer_state_by_name`'s form (tensors copied)."""
    params = dict(model.named_parameters())
    opt.state.clear()
    for name, st in state.items():
        if st:
            opt.state[params[name]] = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
