"""The image service in its own process, over torch.distributed.rpc: exactness against the in-process
service, request merging and the sync policy across two worker processes, refusals, and a service
that dies mid-run and comes back from its own checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from image_service.client import RemoteClient, SpawnedService, TrafficMeter
from image_service.descriptor import DescriptorConfig
from image_service.server import RequestTooLarge
from image_service.service import ImageService, UnknownImageIds
from trainer.train import TrainConfig, Trainer, train
from vitrine.errors import UserError

EXACT = dict(dtype="float64", optimizer="sgd", lr=0.05, seed=3)


def _env() -> dict[str, str]:
    """Read at call time: the session fixture points VITRINE_DATA at a temp root after import."""
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cfg(ds: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(ds), batch_size=128, epochs=1, progress=False, track=False, threads=1,
                checkpoint_every=1000, eval_batch_size=2048, **EXACT)
    base.update(kw)
    return TrainConfig(**base)


def _descriptor() -> DescriptorConfig:
    return DescriptorConfig(dtype="float64", optimizer="sgd", lr=0.05, seed=3)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"head.{k}": v.clone() for k, v in trainer.service.state_dict()["head"].items()})
    return out


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=atol), k


def _worker(*args: str, timeout: float = 180) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "ams_worker.py"), *map(str, args)], env=_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_remote_steps_equal_in_process_steps(world_dataset, tmp_path):
    """SGD in float64: a few steps through a spawned service = the same steps in one process."""
    _worker("train", world_dataset, tmp_path / "spawn", 4, tmp_path / "remote.pt")
    remote = torch.load(tmp_path / "remote.pt")
    trainer = Trainer(_cfg(world_dataset), run_dir=tmp_path / "local")
    head0 = {k: v.clone() for k, v in trainer.service.state_dict()["head"].items()}
    losses = []
    for i, batch in enumerate(trainer.train_loader.epoch(0)):
        losses.append(trainer.train_step(batch))
        if i == 3:
            break
    assert losses == pytest.approx(remote["losses"], abs=1e-6)
    _assert_close(_params(trainer), remote["params"])
    # The steps had images repeating within a batch (so dedup mattered), and the descriptor moved.
    rm, lm = remote["meter"], trainer.service.meter
    assert rm["occurrences"] > 2 * rm["unique"]
    assert any(not torch.equal(head0[k], remote["params"][f"head.{k}"]) for k in head0)
    # Both clients count the same traffic: per unique image, int32 id + 12 float64 each way.
    assert (lm.bytes_sent, lm.bytes_received) == (rm["bytes_sent"], rm["bytes_received"])
    assert (rm["bytes_sent"] + rm["bytes_received"]) / rm["unique"] == pytest.approx(2 * (4 + 12 * 8))


@pytest.fixture(scope="module")
def sync_service(world_dataset, tmp_path_factory):
    state = tmp_path_factory.mktemp("sync-service")
    svc = SpawnedService(world_dataset, _descriptor(), state, policy="sync", workers=2, merge_window_ms=30_000,
                         max_request_ids=50)
    yield svc
    svc.stop()


def test_two_workers_merge_and_sync(sync_service, world_dataset, tmp_path):
    """Two worker processes want overlapping images (with repeats); the service computes each once
    and takes one step with the average of their gradients, like one process on the global batch."""
    ids = {0: [3, 7, 7, 11, 20, 3], 1: [7, 20, 21, 21, 5]}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "ams_worker.py"), "step", sync_service.address,
                               ",".join(map(str, ids[w])), str(10 + w), "0", str(tmp_path / f"w{w}.pt")], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for w in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    got = [torch.load(tmp_path / f"w{w}.pt") for w in (0, 1)]

    ref = ImageService(world_dataset, _descriptor())
    before = {w: ref.embed(ids[w]).expand() for w in (0, 1)}
    for w in (0, 1):
        assert torch.allclose(got[w]["first"], before[w], rtol=0, atol=1e-12)
    union = sorted(set(ids[0]) | set(ids[1]))
    total = torch.zeros(len(union), 12, dtype=torch.float64)
    for w in (0, 1):
        for pos, i in enumerate(ids[w]):
            total[union.index(i)] += got[w]["grads"][pos] / 2
    ref.backward(union, total)
    for w in (0, 1):
        assert got[w]["version"] == 1  # one step for both pushes
        assert torch.allclose(got[w]["after"], ref.embed(ids[w]).expand(), rtol=0, atol=1e-6)

    _worker("inspect", sync_service.address, tmp_path / "inspect.pt")
    seen = torch.load(tmp_path / "inspect.pt")
    c = seen["counters"]
    _assert_close(seen["head"], ref.head_module().state_dict())
    # Each of the two rounds (before and after the step) was merged into one computation of the union.
    assert c["merger_largest_group"] == 2 and c["merger_groups"] == 2
    assert c["unique_ids_computed"] == 2 * len(union) < sum(len(set(v)) for v in ids.values()) * 2
    assert c["ids_requested"] == 2 * sum(len(v) for v in ids.values())
    assert c["updates"] == 1


def test_refusals_name_the_problem_and_the_service_lives_on(sync_service, tmp_path):
    _worker("refusals", sync_service.address, tmp_path / "refusals.pt")
    seen = torch.load(tmp_path / "refusals.pt")
    name, mro, msg = seen["unknown"]
    assert name == UnknownImageIds.__name__ and "UserError" in mro and "-4, 99999" in msg
    name, mro, msg = seen["too_large"]
    assert name == RequestTooLarge.__name__ and "at most 50" in msg and "--max-request-ids" in msg
    assert seen["alive"] > 0  # still answering after both
    with pytest.raises(UserError, match="HOST:PORT"):
        RemoteClient("nowhere")


def _serve(ds: Path, state: Path, log: Path) -> tuple[subprocess.Popen, str]:
    ready = state / "ready.json"
    ready.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "vitrine", "images", "serve", "--dataset", str(ds), "--port", "0",
            "--state-dir", str(state), "--ready-file", str(ready), "--dtype", "float64", "--optimizer", "sgd",
            "--lr", "0.05", "--seed", "3", "--threads", "1"]
    proc = subprocess.Popen(argv, env=_env(), stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "service did not start"
        time.sleep(0.05)
    return proc, json.loads(ready.read_text())["address"]


def test_service_death_stops_the_job_which_resumes_exactly(world_dataset, tmp_path):
    """Kill the service mid-run: the trainer stops with a clear message and a checkpoint; a restarted
    service resumes from its own checkpoint and `--resume` ends where an uninterrupted run ends."""
    state, run = tmp_path / "svc", tmp_path / "run"
    state.mkdir()
    proc, address = _serve(world_dataset, state, tmp_path / "svc.log")
    args = ["--dataset", str(world_dataset), "--batch-size", "128", "--epochs", "1", "--max-steps", "30",
            "--checkpoint-every", "3", "--no-track", "--no-progress", "--threads", "1", "--dtype", "float64",
            "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--eval-batch-size", "2048"]
    trainer = subprocess.Popen([sys.executable, "-m", "vitrine", "train", *args, "--image-service", address,
                                "--run-dir", str(run)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    # The trainer writes its own checkpoint after asking the service for one, so waiting on the
    # trainer's (not the service's) means both hold step >= 6 when the service is killed.
    while not (run / "checkpoint.pt").exists() or torch.load(run / "checkpoint.pt", weights_only=False)["step"] < 6:
        assert trainer.poll() is None, trainer.communicate()
        assert time.monotonic() < deadline, "the trainer made no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    out, err = trainer.communicate(timeout=120)
    assert trainer.returncode == 2, (out, err)
    assert "stopped answering" in err and f"--resume {run}" in err and "Traceback" not in err, err
    saved = torch.load(run / "checkpoint.pt", weights_only=False)
    assert 6 <= saved["step"] < 30

    proc, address = _serve(world_dataset, state, tmp_path / "svc.log")
    try:
        assert "resumed from" in (tmp_path / "svc.log").read_text(), (tmp_path / "svc.log").read_text()
        done = subprocess.run([sys.executable, "-m", "vitrine", "train", "--resume", str(run), "--image-service",
                               address, "--no-progress"], env=_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout, done.stderr)
    finally:
        proc.terminate()
        proc.wait(30)
    resumed = torch.load(run / "checkpoint.pt", weights_only=False)

    ref = train(_cfg(world_dataset, max_steps=30, run_dir=str(tmp_path / "ref")))
    straight = torch.load(Path(ref["run_dir"]) / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 30, (saved["step"], resumed["step"], straight["step"])
    _assert_close(resumed["model"], straight["model"])
    _assert_close(resumed["service"]["head"], straight["service"]["head"])


def test_meter_figures():
    m = TrafficMeter(samples=10, occurrences=300, unique=100, bytes_sent=100 * (4 + 48), bytes_received=100 * 48,
                     plain_pixel_bytes=100 * 12288, plain_trunk_bytes=100 * 7680)
    s = m.summary()
    assert s["ams_bytes_per_unique_image"] == 100 and s["ams_dedup_ratio"] == 3
    assert s["ams_bytes_per_sample"] == 1000 and s["plain_trunk_bytes_per_sample"] == 76800
    assert s["ams_bytes_saved_per_sample"] == 76800 - 1000
