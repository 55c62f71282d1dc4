"""Building blocks of the DICM: an MLP with PReLU, the DIN attention unit and masked poolings.

Masks are boolean `(B, L)`, True at real positions (`arange(L) < hist_len`). Every pooling here
ignores the values at masked positions completely (the sum and max replace them before any
arithmetic, attention never reads them), so even NaN or inf there cannot leak in, and gives an
exact zero vector for a row with no real position.

Attention weighting follows DIN (Zhou et al., KDD 2018) rather than a softmax: the weight of a
behaviour is the raw output of the attention MLP, masked positions get weight 0, and the pooled
vector is the weighted *sum*. Not normalising keeps the intensity of the user's interest (ten
clicks on red items weigh more than one), which is what DIN argues for and what the synthetic
world's decayed behaviour state rewards; and a row with `hist_len == 0` is the empty sum, exactly
0, with no 0/0 to guard against.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class MLP(nn.Sequential):
    """Linear -> PReLU for each hidden size, then an optional final Linear to `out_dim` (no activation).

    PReLU has one slope per unit (init 0.25). Inputs may have any leading dimensions
    (`(..., in_dim)`); they are flattened for the layers, as PReLU reads dim 1 as its channels.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = None):
        layers: list[nn.Module] = []
        d = int(in_dim)
        for h in hidden:
            h = int(h)
            if h < 1:
                raise ValueError(f"hidden layer sizes must be positive, got {list(hidden)}")
            layers += [nn.Linear(d, h), nn.PReLU(h)]
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, int(out_dim)))
            d = int(out_dim)
        super().__init__(*layers)
        self.in_dim = int(in_dim)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        lead = x.shape[:-1]
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_dim)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of `values` (B, L, D) over the real positions of `mask` (B, L) -> (B, D)."""
    return torch.where(mask.unsqueeze(-1), values, values.new_zeros(())).sum(dim=1)


def masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Per-dimension max of `values` (B, L, D) over real positions -> (B, D); rows with none -> 0.

    Gradient goes to the arg-max position(s) (split evenly on exact ties, as `torch.amax` does).
    """
    m = mask.unsqueeze(-1)
    filled = torch.where(m, values, values.new_tensor(float("-inf")))
    out = filled.amax(dim=1)
    return torch.where(mask.any(dim=1, keepdim=True), out, values.new_zeros(()))


def pack(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Row and column of every real position of `mask` (B, L), row-major: `(rows, cols)`, each (P,)."""
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols


class AttentionPooling(nn.Module):
    """DIN attention: weight_j = MLP([q, k_j, q - k_j, q * k_j]) -> 1; output = sum_j weight_j * k_j.

    `query` (B, D), `keys` (B, L, D), `mask` (B, L) -> (B, D). Only the real positions are ever
    read: they are gathered into a packed (P, D) batch first (P = number of real positions, often a
    small share of B*L), so padding costs no attention compute, its values never matter, and an
    all-masked row gives exactly 0. `forward_packed` takes keys already packed (the model gathers ID
    sequences before the embedding lookup). With `record_weights = True`, `last_weights` keeps the
    (B, L) weights of the latest call (detached; 0 at padding) for inspection; off by default, so
    forward has no side effects (torch.export warns about tensors assigned in forward).
    """

    def __init__(self, dim: int, hidden: Sequence[int] = (64, 16)):
        super().__init__()
        self.dim = int(dim)
        self.mlp = MLP(4 * self.dim, hidden, out_dim=1)
        self.record_weights = False
        self.last_weights: Tensor | None = None

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        if keys.shape[:2] != mask.shape:
            raise ValueError(f"keys {tuple(keys.shape)} do not match mask {tuple(mask.shape)}")
        rows, cols = pack(mask)
        return self.forward_packed(query, keys[rows, cols], rows, cols, mask.shape[1])

    def forward_packed(self, query: Tensor, keys: Tensor, rows: Tensor, cols: Tensor, max_len: int) -> Tensor:
        """`keys` (P, D) at positions (`rows`, `cols`) of a (B, max_len) batch; `query` (B, D)."""
        if query.shape[-1] != self.dim or keys.shape[-1] != self.dim:
            raise ValueError(f"attention over dim {self.dim} got query {tuple(query.shape)}, keys {tuple(keys.shape)}")
        q = query[rows]
        weights = self.mlp(torch.cat([q, keys, q - keys, q * keys], dim=-1))  # (P, 1)
        out = query.new_zeros(query.shape).index_add(0, rows, weights * keys)
        if self.record_weights:
            lw = query.new_zeros((query.shape[0], max_len))
            lw[rows, cols] = weights.detach().squeeze(-1)
            self.last_weights = lw
        return out
