"""The row-wise embedding optimizers (trainer/row_optim.py) against their definitions: lazy Adam is
torch's Adam on the rows a step touches and leaves the others alone; row-wise Adagrad keeps one
accumulator per row; the PS layout cuts their state like the table; a sparse all-reduce step moves
bytes set by the batch."""

from __future__ import annotations

import pytest
import torch

from trainer.ps.layout import Layout
from trainer.row_optim import RowOptimizer, TableOptimizer, coalesce, sum_rows

pytestmark = pytest.mark.unit


def test_lazy_adam_is_torch_adam_when_every_row_is_touched():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 4, dtype=torch.float64, generator=g)
    grads = [torch.randn(6, 4, dtype=torch.float64, generator=g) for _ in range(5)]
    ref = w0.clone().requires_grad_(True)
    adam = torch.optim.Adam([ref], lr=0.01)
    mine = w0.clone()
    opt = RowOptimizer("lazy_adam")
    state = opt.init_state(mine)
    for gr in grads:
        ref.grad = gr.clone()
        adam.step()
        opt.apply(mine, state, torch.arange(6), gr, 0.01)
    assert torch.allclose(mine, ref.detach(), rtol=0, atol=1e-12)
    assert torch.allclose(state["exp_avg_sq"], adam.state[ref]["exp_avg_sq"], rtol=0, atol=1e-15)


def test_lazy_adam_leaves_untouched_rows_and_their_moments_alone():
    w = torch.randn(5, 3, dtype=torch.float64)
    opt = RowOptimizer("lazy_adam")
    state = opt.init_state(w)
    opt.apply(w, state, torch.tensor([0, 1, 2, 3, 4]), torch.ones(5, 3, dtype=torch.float64), 0.1)
    before, m_before = w.clone(), state["exp_avg"].clone()
    opt.apply(w, state, torch.tensor([1, 3]), torch.ones(2, 3, dtype=torch.float64), 0.1)
    untouched = torch.tensor([0, 2, 4])
    assert torch.equal(w[untouched], before[untouched])  # dense Adam would move them on their momentum
    assert torch.equal(state["exp_avg"][untouched], m_before[untouched])
    assert not torch.equal(w[1], before[1])
    assert int(state["step"]) == 2


def test_rowwise_adagrad_follows_its_definition():
    w = torch.zeros(4, 2, dtype=torch.float64)
    opt = RowOptimizer("rowwise_adagrad", eps=0.0)
    state = opt.init_state(w)
    assert state["sum"].shape == (4,)
    g = torch.tensor([[3.0, 4.0]], dtype=torch.float64)  # mean of squares 12.5
    opt.apply(w, state, torch.tensor([2]), g, 0.5)
    assert state["sum"].tolist() == [0.0, 0.0, 12.5, 0.0]
    assert torch.allclose(w[2], -0.5 * g[0] / 12.5 ** 0.5)
    assert torch.equal(w[[0, 1, 3]], torch.zeros(3, 2, dtype=torch.float64))


def test_sparse_embedding_gradient_coalesces_to_touched_rows_without_padding():
    emb = torch.nn.Embedding(10, 3, padding_idx=0, sparse=True)
    emb(torch.tensor([[0, 4, 4, 7]])).sum().backward()
    rows, values = coalesce(emb.weight.grad, 3, torch.float32)
    assert rows.tolist() == [4, 7]
    assert values[0].tolist() == [2.0, 2.0, 2.0]


def test_sum_rows_adds_repeated_rows_across_parts():
    a = (torch.tensor([1, 5]), torch.tensor([[1.0], [2.0]]))
    b = (torch.tensor([5, 9]), torch.tensor([[10.0], [20.0]]))
    rows, values = sum_rows([a, b], 1, torch.float32)
    assert rows.tolist() == [1, 5, 9]
    assert values[:, 0].tolist() == [1.0, 12.0, 20.0]


@pytest.mark.parametrize("kind", ["lazy_adam", "rowwise_adagrad"])
def test_the_ps_layout_cuts_row_state_like_the_table_and_joins_it_back(kind):
    table = torch.nn.Parameter(torch.randn(7, 3, dtype=torch.float64))
    model = torch.nn.Module()
    model.embeddings = torch.nn.ModuleDict({"u": torch.nn.Embedding(7, 3)})
    model.embeddings["u"].weight = table
    tabs = TableOptimizer(RowOptimizer(kind), {"embeddings.u.weight": table})
    tabs.step({"embeddings.u.weight": (torch.tensor([1, 2, 6]), torch.ones(3, 3, dtype=torch.float64))}, 0.1)
    layout = Layout.of(model, 3)
    params = {"embeddings.u.weight": table.detach()}
    parts = layout.split(params, tabs.state_by_name())
    first = next(v for k, v in parts[1]["state"]["embeddings.u.weight"].items() if k != "step")
    assert first.shape[0] == 2  # rows 1 and 4 of 7 live on shard 1
    _, state = layout.join(parts)
    for k, v in tabs.state_by_name()["embeddings.u.weight"].items():
        assert torch.equal(state["embeddings.u.weight"][k], v)
