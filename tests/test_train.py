"""The single-process trainer on a small generated world: it learns, it resumes exactly, it logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT
from trainer.train import TrainConfig, train
from vitrine.errors import UserError


def _cfg(ds: Path, run_dir: Path, **kw) -> TrainConfig:
    base = dict(dataset=str(ds), run_dir=str(run_dir), batch_size=128, epochs=2, progress=False,
                track=False, threads=1, checkpoint_every=5, eval_batch_size=2048)
    base.update(kw)
    return TrainConfig(**base)


def test_learns_better_than_a_constant(world_dataset, tmp_path):
    r = train(_cfg(world_dataset, tmp_path / "run", epochs=2))
    assert r["test_auc"] > 0.55  # a constant predictor scores 0.5
    ctr = r["test_ctr"]
    constant_logloss = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    # Calibration not broken: on this tiny world the test split's logloss sits within a few percent of the
    # constant predictor's either side, run to run (its days bring cold items), so the bound has slack;
    # ranking is what the AUC check above tests.
    assert r["test_logloss"] < 1.05 * constant_logloss
    assert r["test_oracle_auc"] > r["test_auc"]  # nobody beats the truth
    assert 0 < r["test_cold_n"] < r["test_n"]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test_auc"] == pytest.approx(r["test_auc"])


def test_killed_run_resumes_to_the_same_result(world_dataset, tmp_path):
    reference = train(_cfg(world_dataset, tmp_path / "reference"))

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "vitrine", "train", "--dataset", str(world_dataset), "--run-dir", str(run_dir),
           "--batch-size", "128", "--epochs", "2", "--no-progress", "--no-track", "--threads", "1",
           "--checkpoint-every", "5", "--eval-batch-size", "2048"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() or torch.load(ckpt, weights_only=False)["step"] < 5:  # step 0 is written first
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(ckpt, weights_only=False)["step"]
    assert 5 <= killed_at < reference["steps"], "the run finished before it could be killed"

    resumed = train(TrainConfig(resume=str(run_dir), progress=False))
    assert resumed["steps"] == reference["steps"]
    for key in ("test_auc", "test_gauc", "test_logloss", "test_cold_auc", "valid_auc"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-9), key


def test_sigterm_stops_cleanly_after_a_checkpoint(world_dataset, tmp_path):
    """The dashboard's Stop: SIGTERM ends the step, writes a checkpoint, ends the MLflow run as killed."""
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    run_dir = tmp_path / "stopped"
    cmd = [sys.executable, "-m", "vitrine", "train", "--dataset", str(world_dataset), "--run-dir", str(run_dir),
           "--batch-size", "128", "--epochs", "3", "--no-progress", "--threads", "1", "--checkpoint-every", "1000",
           "--log-every", "1"]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists():  # the step-0 checkpoint: training has started
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # the step under way (there always is one) finishes first
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    st = torch.load(ckpt, weights_only=False)
    assert f"stopped at step {st['step']} on request" in out and f"--resume {run_dir}" in out
    assert 0 < st["step"] < 3 * 60
    run = MlflowClient(tracking.tracking_uri()).get_run(st["run_id"])
    assert run.info.status == "KILLED"


def test_mlflow_run_holds_params_metrics_config_and_a_working_model(world_dataset, tmp_path):
    from mlflow.models import get_model_info
    from mlflow.tracking import MlflowClient

    from trainer import checkpoint
    from trainer.data import BatchLoader, LoaderConfig
    from trainer.dataset import open_dataset
    from trainer.images import image_inputs
    from trainer.serving import load_predictor, pack
    from trainer.train import Trainer
    from vitrine import tracking

    r = train(_cfg(world_dataset, tmp_path / "run", epochs=1, track=True, log_every=2))
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(r["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["features"] == "ids+images" and run.data.params["lr"] == "0.001"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert len(loss) >= r["steps"] // 2 and [m.step for m in loss] == sorted(m.step for m in loss)
    assert client.get_metric_history(run.info.run_id, "samples_per_s")
    # The image traffic, as AMS moved it and as a plain PS would have: per unique image, an int32 id
    # and a 12-d float32 row each way; the pixels and trunk features are hundreds of times more.
    m = run.data.metrics
    assert m["final_ams_bytes_per_unique_image"] == pytest.approx(2 * (4 + 12 * 4))
    assert m["final_ams_dedup_ratio"] > 1.5
    assert m["final_plain_trunk_bytes_per_sample"] > 50 * m["final_ams_bytes_per_sample"] > 0
    assert m["final_plain_pixels_bytes_per_sample"] > m["final_plain_trunk_bytes_per_sample"]
    assert client.get_metric_history(run.info.run_id, "ams_bytes_per_sample")
    for key in ("valid_auc", "test_auc", "test_gauc", "test_logloss", "test_cold_auc", "test_oracle_auc"):
        assert run.data.metrics[key] == pytest.approx(r[key]), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "model_layout.json"} <= artifacts

    info = get_model_info(f"runs:/{run.info.run_id}/model")
    assert info.signature is not None and info.signature.inputs.to_dict()
    layout_path = client.download_artifacts(run.info.run_id, "model_layout.json", str(tmp_path))
    layout = [tuple(x) for x in json.loads(Path(layout_path).read_text())["layout"]]

    # The logged model, loaded back, scores a test batch as the trainer's own model does (its torch
    # predictor on packed rows here; raw IDs through the pyfunc model: tests/test_serving.py).
    model = load_predictor(f"runs:/{run.info.run_id}/model")
    assert not model.training
    trainer = Trainer(_cfg(world_dataset, tmp_path / "unused", epochs=1))
    trainer.load_state(checkpoint.load(tmp_path / "run"))
    batch = next(iter(BatchLoader(open_dataset(world_dataset), "test", LoaderConfig(batch_size=256), 0, False).epoch(0)))
    with torch.no_grad():
        trainer.model.eval()
        img = image_inputs(batch, trainer.service, True, True, train=False)
        expect = torch.sigmoid(trainer.model(batch, img.ad, img.hist)).numpy()
        got = model(torch.from_numpy(pack(batch, layout))).numpy()
    np.testing.assert_allclose(got, expect, atol=1e-5)


def test_bad_dataset_is_refused_before_training(tmp_path):
    with pytest.raises(UserError, match="does not exist|missing"):
        train(TrainConfig(dataset=str(tmp_path / "nope"), track=False, progress=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "vitrine", "train", "--dataset", str(tmp_path / "nope"), "--no-track"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and str(tmp_path / "nope") in done.stderr


def test_run_directories_are_unique_held_while_a_job_runs_and_gone_when_a_start_fails(world_dataset, tmp_path):
    """Two jobs with the same settings in the same second get two run directories; a second job in a
    directory another job holds is refused; a start that fails before its first checkpoint (here: an
    image service that does not answer) says so in one line and leaves no directory behind."""
    from conftest import ROOT
    from trainer.train import claim_run_dir, new_run_name
    from vitrine.errors import UserError

    cfg = TrainConfig(dataset=str(world_dataset))
    assert len({new_run_name(cfg) for _ in range(20)}) == 20
    held = tmp_path / "held"
    with claim_run_dir(held, None):
        with pytest.raises(UserError, match="another job is running"):
            with claim_run_dir(held, None):
                pass
    root = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VITRINE_DATA": str(root)}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "vitrine", "train", "--dataset", str(world_dataset), "--no-track",
                           "--no-progress", "--image-service", "127.0.0.1:1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "no image service answers at 127.0.0.1:1" in done.stderr and time.monotonic() - t0 < 30
    assert not (root / "runs").exists() or not any((root / "runs").iterdir())
