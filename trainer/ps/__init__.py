"""The parameter server of the async and GBA modes: model state sharded over PS processes.

- `layout`: which parameter lives on which shard (embedding rows by id, dense tensors whole), and how
  a worker's model and optimizer state split into shards and join back (mode switches, checkpoints).
- `shard`: one shard's tensors, optimizer and update rules (async: apply on arrival; GBA: aggregate
  exactly N gradients per update with staleness decay).
- `tokens`: the token book of shard 0: data, global step and commands handed to the workers.
- `server` / `client`: the same over torch.distributed.rpc.
"""
