"""Synchronous data-parallel training (AR) over a gloo process group.

Every worker reads the same global batch (same seed, same order) and takes its own contiguous slice,
so the union of the workers' slices is exactly the batch a single process would train on. Each
worker scales its loss by `share = n_local * world / n_global` before backward: the mean over
workers of the scaled local gradients is then exactly the gradient of the mean loss over the global
batch, even when the last batch does not split evenly. One all-reduce per step carries every dense
layer's gradient, the loss and a stop flag (so a stop requested on any worker ends all of them after
the same step). The embedding tables' gradients travel as coalesced (row, gradient) pairs
(`exchange_rows`, one all-gather of ids and one of values): every worker sums the same pairs in the
same order and applies the same row-wise update (trainer/row_optim.py), so the replicas stay equal
and the bytes per step are set by the batch, not by the vocabulary. (With `--embedding-optimizer
dense` the tables' whole gradients go into the all-reduce instead.) The image embeddings' gradients
are scaled the same way and the image service averages them over the workers (its `sync` policy).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistContext:
    rank: int
    world: int

    @property
    def is_coordinator(self) -> bool:
        return self.rank == 0


def from_env() -> DistContext | None:
    """The worker's place in the job when a launcher (ours or torchrun) set RANK and WORLD_SIZE."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return DistContext(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))


def init_group(ctx: DistContext, timeout_s: float = 1800) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=ctx.rank, world_size=ctx.world, timeout=timedelta(seconds=timeout_s))


def shard(batch: dict[str, torch.Tensor], ctx: DistContext) -> tuple[dict[str, torch.Tensor], float]:
    """This worker's contiguous slice of the global batch and its loss scale."""
    n = int(batch["label"].shape[0])
    lo, hi = ctx.rank * n // ctx.world, (ctx.rank + 1) * n // ctx.world
    return {k: v[lo:hi] for k, v in batch.items()}, (hi - lo) * ctx.world / n


@dataclass
class StepReport:
    loss: float  # of the global batch
    stop: bool  # some worker asked to stop
    step_s: list[float]  # each worker's time for its share of the step, before the all-reduce
    straggler: tuple[float, float, float] | None  # a new straggler setting from the coordinator
    switch: int = 0  # a mode the coordinator switches the job to after this step (MODE_CODES), 0 = none
    bytes: int = 0  # this worker's payload in the all-reduce


def all_reduce_step(params: list[nn.Parameter], ctx: DistContext, loss: float, stop: bool, step_s: float,
                    straggler: tuple[float, float, float] | None = None, switch: int = 0) -> StepReport:
    """Average the gradients of `params` (the dense ones) over the workers, in one all-reduce that also
    carries the loss, the stop flag, each worker's step time (in its own slot, zeros elsewhere) and,
    from the coordinator, a new straggler setting (rank or -1 for random, probability, factor) and a
    mode to switch to."""
    params = [p for p in params if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    dtype = grads[0].dtype
    extra = torch.zeros(7 + ctx.world, dtype=dtype)
    extra[0], extra[1], extra[7 + ctx.rank], extra[6] = loss, float(stop), step_s * ctx.world, switch * ctx.world
    if straggler is not None:  # only the coordinator sends one; x world undoes the averaging
        extra[2] = ctx.world
        extra[3:6] = torch.tensor(straggler, dtype=dtype) * ctx.world
    flat = torch.cat([g.reshape(-1) for g in grads] + [extra])
    dist.all_reduce(flat)
    flat /= ctx.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n
    tail = flat[offset:].tolist()
    new = (round(tail[3]), tail[4], tail[5]) if tail[2] > 0.5 else None
    return StepReport(tail[0], tail[1] > 0, tail[7:], new, round(tail[6]), flat.nbytes)


def exchange_rows(grads: dict[str, tuple[torch.Tensor, torch.Tensor]], ctx: DistContext
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """Every worker's coalesced table gradients {name: (rows (n,), values (n, d))} -> the global batch's:
    per table the union of the rows with their gradients summed over the workers and divided by the
    world (the mean, as for the dense gradients). One all-gather of the counts, one of the row ids
    (each table's rows offset into one id space) and one of the values, each padded to the longest
    worker's; the same result on every worker. Returns it and the bytes this worker sent."""
    names = list(grads)
    widths = {n: grads[n][1].shape[1] for n in names}
    dtype = next(iter(grads.values()))[1].dtype
    width = max(widths.values())
    if len(set(widths.values())) != 1:
        raise ValueError(f"tables of different widths cannot share one exchange: {widths}")
    base, offsets = 0, {}
    for n in names:  # rows of table n become base_n + row; bases far apart (any vocabulary fits)
        offsets[n] = base
        base += 1 << 40
    ids = torch.cat([grads[n][0] + offsets[n] for n in names])
    values = torch.cat([grads[n][1] for n in names])
    counts = [torch.zeros(1, dtype=torch.long) for _ in range(ctx.world)]
    dist.all_gather(counts, torch.tensor([ids.numel()]))
    most = int(max(int(c) for c in counts))
    pad = most - ids.numel()
    ids = torch.cat([ids, ids.new_full((pad,), -1)])
    values = torch.cat([values, values.new_zeros((pad, width))])
    all_ids = [torch.empty_like(ids) for _ in range(ctx.world)]
    all_values = [torch.empty_like(values) for _ in range(ctx.world)]
    dist.all_gather(all_ids, ids)
    dist.all_gather(all_values, values)
    from trainer.row_optim import sum_rows

    out = {}
    for n in names:
        lo, hi = offsets[n], offsets[n] + (1 << 40)
        parts = []
        for r in range(ctx.world):
            keep = (all_ids[r] >= lo) & (all_ids[r] < hi)
            parts.append((all_ids[r][keep] - lo, all_values[r][keep]))
        rows, summed = sum_rows(parts, width, dtype)
        out[n] = (rows, summed / ctx.world)
    return out, ids.nbytes + values.nbytes + 8


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
