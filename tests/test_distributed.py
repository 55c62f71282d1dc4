"""Multi-process training on loopback: synchronous all-reduce (gloo) with the image service in sync policy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
EXACT = ["--dtype", "float64", "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--threads", "1",
         "--no-track", "--no-progress", "--eval-batch-size", "4096", "--epochs", "1"]


def _train(ds, run_dir, *args) -> dict:
    done = subprocess.run([sys.executable, "-m", "vitrine", "train", "--dataset", str(ds), "--run-dir", str(run_dir),
                           *EXACT, *args], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


def test_all_reduce_equals_one_process_on_the_global_batch(world_dataset, tmp_path):
    """2 workers x their shares of a 255-sample global batch (127 + 128: uneven on purpose), ID dropout
    and images on, SGD in float64: 5 steps equal one process taking the 255-sample batches."""
    ar = _train(world_dataset, tmp_path / "ar", "--mode", "ar", "--workers", "2", "--global-batch", "255",
                "--max-steps", "5")
    single = _train(world_dataset, tmp_path / "single", "--batch-size", "255", "--max-steps", "5")
    assert ar["step"] == single["step"] == 5
    for k in single["model"]:
        assert torch.allclose(ar["model"][k], single["model"][k], rtol=0, atol=1e-6), k
    for k in single["service"]["head"]:
        assert torch.allclose(ar["service"]["head"][k], single["service"]["head"][k], rtol=0, atol=1e-6), k
    # The descriptor trained: one sync step per global batch, not one per worker push.
    assert ar["service"]["version"] == single["service"]["version"] == 5
    assert (tmp_path / "ar" / "worker-1.log").exists()
