"""Worker processes for the AMS tests. An RPC agent is per process and joins one group for the
process's life, so every remote client of a test runs here, as its own process.

    python tests/ams_worker.py step ADDRESS IDS SEED TOKEN OUT.pt   # embed, push seeded grads, embed again
    python tests/ams_worker.py inspect ADDRESS OUT.pt               # counters and head state
    python tests/ams_worker.py refusals ADDRESS OUT.pt              # bad requests, then a good one
    python tests/ams_worker.py train DATASET RUN_DIR STEPS OUT.pt   # Trainer steps through a spawned service
"""

from __future__ import annotations

import sys

import torch

from image_service.client import RemoteClient


def step(address: str, ids: str, seed: str, token: str, out: str) -> None:
    client = RemoteClient(address)
    wanted = torch.tensor([int(x) for x in ids.split(",")])
    first = client.embed(wanted)
    grads = torch.randn(len(wanted), client.out_dim, dtype=first.embeddings.dtype,
                        generator=torch.Generator().manual_seed(int(seed)))
    # Gradients in request order, repeats included, summed per image as the trainer's leaf would.
    per_unique = torch.zeros_like(first.embeddings).index_add_(0, first.inverse, grads)
    version = client.backward(first.unique_ids, per_unique, token=int(token))
    after = client.embed(wanted)
    torch.save({"first": first.expand(), "grads": grads, "version": version, "after": after.expand()}, out)
    client.close()


def inspect(address: str, out: str) -> None:
    client = RemoteClient(address)
    torch.save({"counters": client.counters, "head": client.state_dict()["head"], "info": client.info()}, out)
    client.close()


def refusals(address: str, out: str) -> None:
    client = RemoteClient(address)
    seen = {}
    for name, ids in (("unknown", [1, 99999, -4]), ("too_large", list(range(60)))):
        try:
            client.embed(ids)
        except Exception as exc:
            seen[name] = (type(exc).__name__, [c.__name__ for c in type(exc).__mro__], str(exc))
    seen["alive"] = client.info()["n_images"]
    torch.save(seen, out)
    client.close()


def train(dataset: str, run_dir: str, steps: str, out: str) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_ams_service import _cfg, _params

    from trainer.train import Trainer

    trainer = Trainer(_cfg(__import__("pathlib").Path(dataset), image_service="spawn"), run_dir=run_dir)
    try:
        losses = []
        for i, batch in enumerate(trainer.train_loader.epoch(0)):
            losses.append(trainer.train_step(batch))
            if i + 1 == int(steps):
                break
        m = trainer.service.meter
        torch.save({"losses": losses, "params": _params(trainer),
                    "meter": {k: getattr(m, k) for k in ("occurrences", "unique", "bytes_sent", "bytes_received")}}, out)
    finally:
        trainer.close()


if __name__ == "__main__":
    {"step": step, "inspect": inspect, "refusals": refusals, "train": train}[sys.argv[1]](*sys.argv[2:])
