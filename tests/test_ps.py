"""The parameter-server modes: shards, tokens, GBA and async over real processes, and mode switches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


EXACT = ["--dtype", "float64", "--optimizer", "sgd", "--lr", "0.05", "--seed", "3", "--threads", "1",
         "--no-track", "--no-progress", "--epochs", "1"]


def _train(ds, run_dir, *args) -> dict:
    done = subprocess.run([sys.executable, "-m", "vitrine", "train", "--dataset", str(ds), "--run-dir", str(run_dir),
                           *EXACT, *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)


# -- in-process: layout and shard rules -------------------------------------------------------------------
def _model():
    from trainer.features import FeatureMap
    from trainer.model import DICM, ModelConfig

    manifest = {"fields": [
        {"name": "user_id", "kind": "categorical", "vocab": "user_id", "vocab_size": 11, "group": "user"},
        {"name": "item_id", "kind": "categorical", "vocab": "item_id", "vocab_size": 7, "group": "ad"},
        {"name": "hist_item_id", "kind": "sequence", "vocab": "item_id", "vocab_size": 7, "group": "behavior", "max_len": 5}]}
    return DICM(FeatureMap.from_manifest(manifest), ModelConfig(features="ids", mlp=(8,), attention_mlp=(4,)))


def test_layout_split_and_join_carry_model_and_adam_state_exactly():
    from trainer.ps.layout import Layout, optimizer_state_by_name

    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    layout = Layout.of(model, 3)
    assert set(layout.tables) == {"embeddings.user_id.weight", "embeddings.item_id.weight"}
    params = {n: p.detach() for n, p in model.named_parameters()}
    state = optimizer_state_by_name(model, opt)
    parts = layout.split(params, state)
    # Row r of a table lives on shard r % 3; each dense tensor on exactly one shard.
    assert parts[1]["params"]["embeddings.user_id.weight"].shape == (4, 12)  # rows 1, 4, 7, 10
    assert torch.equal(parts[1]["params"]["embeddings.user_id.weight"][2], params["embeddings.user_id.weight"][7])
    dense = [n for n in layout.names if n not in layout.tables]
    assert sorted(n for p in parts for n in p["params"] if n in dense) == sorted(dense)
    back_params, back_state = layout.join(parts)
    for n in layout.names:
        assert torch.equal(back_params[n], params[n]), n
        for k, v in state[n].items():
            assert torch.equal(back_state[n][k], v), (n, k)


def test_shard_gba_takes_exactly_n_refuses_reused_tokens_and_decays_stale_pushes():
    from trainer.ps.shard import ParameterShard, TokenReused

    shard = ParameterShard(0, 1, optimizer="sgd", lr=1.0)
    shard.load({"w": torch.zeros(3), "t": torch.zeros(4, 2)}, {}, tables=["t"], step=0)
    shard.configure("gba", n=2, threshold=1, decay=0.5)
    assert shard.push(0, 0, {"w": torch.ones(3)}, {"t": (torch.tensor([1]), torch.ones(1, 2))}) == 0
    with pytest.raises(TokenReused):
        shard.push(0, 0, {"w": torch.ones(3)}, {})
    assert shard.step == 0  # one gradient of two: nothing applied yet
    shard.push(1, 0, {"w": 3 * torch.ones(3)}, {"t": (torch.tensor([1, 2]), torch.ones(2, 2))})
    assert shard.step == 1
    p, _ = shard.pull({"t": torch.tensor([1, 2, 3])}, dense=True)
    # SGD lr 1: w -= (1 + 3) / 2; row 1 got two gradients of 1 -> -(2 / 2); row 2 one -> -(1 / 2).
    assert torch.equal(p["w"], -2 * torch.ones(3))
    assert torch.equal(p["t"], torch.tensor([[-1.0, -1.0], [-0.5, -0.5], [0.0, 0.0]]))
    for tok in (2, 3, 4, 5):  # two more updates from fresh tokens: step 3
        shard.push(tok, shard.step, {"w": torch.zeros(3)}, {})
    assert shard.step == 3
    shard.push(6, 0, {"w": 8 * torch.ones(3)}, {})  # staleness 3, threshold 1: weight 0.5 ** 2
    shard.push(7, 3, {"w": torch.zeros(3)}, {})
    p, _ = shard.pull({}, dense=True)
    assert torch.equal(p["w"], -2 * torch.ones(3) - 8 * 0.25 / 2)
    c = shard.counters()
    assert c["tokens_applied"] == 8 and c["tokens_decayed"] == 1 and c["gba_updates"] == 4
    # Switching away applies a partial global batch (its sum / N), so nothing pushed is lost.
    shard.push(8, 4, {"w": 2 * torch.ones(3)}, {})
    assert shard.configure("idle") == 5
    assert torch.equal(shard.pull({}, dense=True)[0]["w"], -4 * torch.ones(3))
    with pytest.raises(ValueError, match="idle"):
        shard.push(9, 5, {}, {})


def test_shard_snapshots_keep_the_parameters_of_the_epochs_last_step():
    from trainer.ps.shard import ParameterShard
    from vitrine.snapshots import SnapshotMissing

    shard = ParameterShard(0, 1, optimizer="sgd", lr=1.0)
    shard.load({"w": torch.zeros(2), "t": torch.zeros(3, 2)}, {}, tables=["t"], step=0)
    shard.configure("async", n=2)  # a global step every 2 pushes
    shard.keep_snapshots(every=2)
    for tok in range(6):  # steps 1, 2, 3: w = -1 per push
        shard.push(tok, shard.step, {"w": torch.ones(2)}, {"t": (torch.tensor([tok % 3]), torch.ones(1, 2))})
    assert shard.step == 3
    snap = shard.snapshot(2)
    assert torch.equal(snap["w"], -4 * torch.ones(2))  # after 4 pushes, not the live 6
    assert torch.equal(snap["t"][:, 0], torch.tensor([-2.0, -1.0, -1.0]))
    assert torch.equal(shard.pull({}, dense=True)[0]["w"], -6 * torch.ones(2))
    with pytest.raises(SnapshotMissing, match="no snapshot at step 3"):
        shard.snapshot(3, wait_s=0.01)
    shard.configure("gba", n=2)
    for tok in range(6, 12):  # GBA updates to steps 4, 5, 6: the copies of 4 and 6 both wait to be asked for
        shard.push(tok, shard.step, {"w": torch.ones(2)}, {})
    assert torch.equal(shard.snapshot(4)["w"], -7 * torch.ones(2))
    assert torch.equal(shard.snapshot(6)["w"], -9 * torch.ones(2))
    with pytest.raises(SnapshotMissing, match="kept: step 6"):  # asked for 6: the earlier copies are let go
        shard.snapshot(4, wait_s=0.01)


def test_a_command_takes_effect_at_a_global_batch_boundary_or_at_its_planned_batch():
    from trainer.ps.shard import ParameterShard
    from trainer.ps.tokens import TokenBook

    book = TokenBook(ParameterShard(0, 1), world=2)
    book.start(step=0, first_batch=0, end_batch=10, n=2, max_staleness=-1, straggler=(-1.0, 0.0, 1.0))
    ask = lambda rank: book.request(rank, f"w{rank}", 0.0, None, 0, wait_s=0.01)  # noqa: E731
    assert ask(0)["id"] == 0
    book.set_command("ar")  # half of batch 0 handed out: its other slice goes first, then the switch
    assert ask(1)["id"] == 1
    assert ask(0) == {"kind": "ar", "batch": 1} and ask(1) == {"kind": "ar", "batch": 1}
    book.start(step=1, first_batch=1, end_batch=10, n=2, max_staleness=-1, straggler=(-1.0, 0.0, 1.0))
    book.set_command("ar", at_batch=3)  # planned: batches 1 and 2 whole, then the switch
    assert [ask(r % 2)["id"] for r in range(4)] == [2, 3, 4, 5]
    assert ask(0) == {"kind": "ar", "batch": 3}
    book.set_command("stop")  # an unplanned command holds at once (here: a batch boundary)
    assert ask(1)["kind"] == "stop"


# -- real processes ------------------------------------------------------------------------------------------
def test_gba_without_staleness_equals_one_process_on_the_global_batch(world_dataset, tmp_path):
    """2 workers over the PS (tokens held back until the previous step is applied: no staleness), images
    and ID dropout on, SGD in float64: 24 GBA updates equal one process on the 256-sample batches, the
    model on the shards and the descriptor head on the image service (its gba policy) alike.

    The run crosses the end of epoch 1 (step 21). The coordinator evaluates it while the other worker
    trains on, so its validation figures equal the single process's only if it evaluates the model and
    the head of step 21 (the snapshots), not the live ones a step or more later."""
    steps = ["--epochs", "2", "--max-steps", "24"]
    gba = _train(world_dataset, tmp_path / "gba", "--mode", "gba", "--workers", "2", "--global-batch", "256",
                 *steps, "--max-staleness", "0")
    single = _train(world_dataset, tmp_path / "single", "--batch-size", "256", *steps)
    assert gba["step"] == single["step"] == 24 and gba["phase"] == "gba"
    for k in single["model"]:
        assert torch.allclose(gba["model"][k], single["model"][k], rtol=0, atol=1e-6), k
    for k in single["service"]["head"]:
        assert torch.allclose(gba["service"]["head"][k], single["service"]["head"][k], rtol=0, atol=1e-6), k
    assert gba["service"]["version"] == single["service"]["version"] == 24
    log = (tmp_path / "gba" / "ps0.log").read_text()
    assert "'tokens_applied': 48" in log and "'gba_updates': 24" in log, log
    # The image service's own GBA figures reach the result (its partial batch is flushed, its policy kept).
    result = json.loads((tmp_path / "gba" / "result.json").read_text())
    assert result["image_tokens_applied"] == 48 and result["image_gba_updates"] == 24, result
    (mine,), (one,) = gba["history"], single["history"]
    assert mine["step"] == one["step"] == 21
    for k in ("valid_logloss", "valid_auc", "valid_gauc"):
        assert mine[k] == pytest.approx(one[k], abs=1e-9), k


def test_a_switch_from_ar_to_gba_and_back_carries_adam_exactly(world_dataset, tmp_path):
    """Adam (not SGD, whose state is empty) in float64: 4 all-reduce steps, a planned switch to GBA
    without staleness, 3 GBA steps, a planned switch back, 1 all-reduce step: the parameters, both of Adam's
    moments and the descriptor head equal one process's 8 steps on the global batches. A switch that
    lost or mis-cut a moment would show here as a jump of the update size, not as a wrong step count.
    The GBA phase's figures survive the switch back (the service's policy is replaced by then)."""
    adam = ["--optimizer", "adam", "--lr", "0.01"]
    sw = _train(world_dataset, tmp_path / "sw", *adam, "--mode", "ar", "--workers", "2", "--global-batch", "256",
                "--max-steps", "8", "--max-staleness", "0", "--switch-at", "3:gba,6:ar")
    single = _train(world_dataset, tmp_path / "single", *adam, "--batch-size", "256", "--max-steps", "8")
    assert sw["step"] == single["step"] == 8 and sw["phase"] == "ar"
    # "S:mode" switches after step S either way; the GBA phase ends on a whole global batch.
    assert [s[:3] for s in sw["switches"]] == [(4, "ar", "gba"), (7, "gba", "ar")], sw["switches"]
    for k in single["model"]:
        assert torch.allclose(sw["model"][k], single["model"][k], rtol=0, atol=1e-9), k
    mine, one = sw["optimizer"]["state"], single["optimizer"]["state"]
    assert mine.keys() == one.keys()
    for i in one:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(mine[i][key], one[i][key], rtol=0, atol=1e-9), (i, key)
        assert int(mine[i]["step"]) == int(one[i]["step"]) == 8
    for k in single["service"]["head"]:
        assert torch.allclose(sw["service"]["head"][k], single["service"]["head"][k], rtol=0, atol=1e-9), k
    result = json.loads((tmp_path / "sw" / "result.json").read_text())
    assert result["tokens_applied"] == 6 and result["image_tokens_applied"] == 6, result
    assert result["image_gba_updates"] == 3 and result["worker_tokens_0"] + result["worker_tokens_1"] == 6, result


def test_switching_ar_to_gba_and_back_keeps_the_step_and_the_optimizer_state(world_dataset, tmp_path):
    """A job started in ar is switched to gba and back through its control channel (as the dashboard
    does). Every update of either mode counts: Adam's step counter of every parameter equals the job's
    global step at the end, and the run records both switches."""
    from vitrine import control, jobs

    run_dir = tmp_path / "switch"
    job = jobs.launch(["train", "--dataset", str(world_dataset), "--run-dir", str(run_dir), "--seed", "3",
                       "--threads", "1", "--no-track", "--no-progress", "--mode", "ar", "--workers", "2",
                       "--global-batch", "256", "--features", "ids", "--epochs", "1", "--max-steps", "60"],
                      "train", cwd=str(ROOT))
    deadline = time.monotonic() + 240

    def wait_for(text: str) -> None:
        while text not in jobs.get(job.id).tail(200):
            j = jobs.get(job.id)
            assert j.status == "running" and time.monotonic() < deadline, j.tail(60)
            time.sleep(0.1)

    while "switch" not in jobs.get(job.id).capabilities:
        assert jobs.get(job.id).status == "running" and time.monotonic() < deadline, jobs.get(job.id).tail(60)
        time.sleep(0.1)
    control.send(job.id, {"cmd": "switch", "mode": "gba"})
    wait_for("switching ar -> gba")
    control.send(job.id, {"cmd": "switch", "mode": "ar"})
    wait_for("switching gba -> ar")
    while jobs.get(job.id).status == "running":
        assert time.monotonic() < deadline, jobs.get(job.id).tail(60)
        time.sleep(0.2)
    assert jobs.get(job.id).exit_code == 0, jobs.get(job.id).tail(60)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert [s[1:3] for s in ckpt["switches"]] == [("ar", "gba"), ("gba", "ar")], ckpt["switches"]
    assert ckpt["phase"] == "ar" and ckpt["switches"][0][0] < ckpt["switches"][1][0] <= ckpt["step"] <= 60
    steps = {int(st["step"]) for st in ckpt["optimizer"]["state"].values()}
    assert steps == {ckpt["step"]}, (steps, ckpt["step"])


def _two_nodes(ds, run_dir, *args) -> list[str]:
    """One `torchrun` per "machine" (node ranks 0 and 1, one worker each) on loopback, each running the
    same `vitrine train` command, as docs/DISTRIBUTED.md "Across machines" tells a user to. Nothing is
    started by hand: rank 0 starts the job's PS shard and image service. Returns both nodes' output."""
    from vitrine.rpc_group import free_port

    port = free_port("127.0.0.1")
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), "--max-restarts", "0",
         "-m", "vitrine", "train", "--dataset", str(ds), "--run-dir", str(run_dir), "--seed", "3", "--threads", "1",
         "--no-progress", "--workers", "2", "--global-batch", "256", "--log-every", "2", *args],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    return outs


def _one_run(run_dir) -> "object":
    """The job's one MLflow run (by the run directory it records), and that it is the only one."""
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    client = MlflowClient(tracking.setup())
    exp = client.get_experiment_by_name(tracking.TRAIN_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], f"tags.`vitrine.run_dir` = '{run_dir}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


def test_two_torchrun_nodes_run_a_gba_job_with_its_image_service_and_a_straggler(world_dataset, tmp_path):
    """gba across two node launchers with images: the launch starts the PS shard and the image service
    (none by hand), worker 1 is slowed 3x and takes fewer tokens, the job trains to its last step and
    logs one MLflow run."""
    run_dir = tmp_path / "gba"
    _two_nodes(world_dataset, run_dir, "--mode", "gba", "--straggler", "1:3", "--max-steps", "24",
               "--features", "ids+images")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 24 and "test_auc" in result, result
    assert result["worker_tokens_0"] > result["worker_tokens_1"] > 0, result
    assert result["image_tokens_applied"] > 0, result
    run = _one_run(run_dir)
    assert run.info.status == "FINISHED" and run.data.metrics["tokens_applied"] == 48


def test_two_torchrun_nodes_run_an_auto_job_that_switches(world_dataset, tmp_path):
    """auto across two node launchers: it starts in ar, worker 1 is slowed 4x, the policy switches to
    gba, and the switch is in the job's one MLflow run."""
    run_dir = tmp_path / "auto"
    outs = _two_nodes(world_dataset, run_dir, "--mode", "auto", "--straggler", "1:4", "--max-steps", "30",
                      "--features", "ids", "--auto-patience", "3")
    assert "switching ar -> gba" in outs[0], outs[0][-3000:]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 30 and ckpt["switches"][0][1:3] == ("ar", "gba"), ckpt["switches"]
    run = _one_run(run_dir)
    assert run.info.status == "FINISHED"
    assert any(k.startswith("vitrine.switch.") and v == "ar->gba" for k, v in run.data.tags.items()), run.data.tags


def test_a_stopped_gba_job_checkpoints_and_resumes_in_gba(world_dataset, tmp_path):
    """Stop (SIGTERM, as the dashboard does) ends a GBA job at a clean point with a checkpoint taken from
    the shards; `--resume` starts new shards from it and finishes the data in the same mode."""
    from vitrine import jobs

    run_dir = tmp_path / "resume"
    job = jobs.launch(["train", "--dataset", str(world_dataset), "--run-dir", str(run_dir), *EXACT, "--lr", "0.01",
                       "--mode", "gba", "--workers", "2", "--global-batch", "256", "--features", "ids",
                       "--epochs", "12"], "train", cwd=str(ROOT))
    deadline = time.monotonic() + 180
    while int((jobs.get(job.id).progress or {}).get("done", 0)) < 5:
        assert jobs.get(job.id).status == "running" and time.monotonic() < deadline, jobs.get(job.id).tail(60)
        time.sleep(0.02)
    stopped = jobs.stop(jobs.get(job.id), timeout=60)
    assert stopped.status == "stopped" and stopped.exit_code == 0, stopped.tail(60)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert ckpt["phase"] == "gba" and 5 <= ckpt["step"] and not (run_dir / "metrics.json").exists()
    spe = -(-len(__import__("pyarrow.parquet", fromlist=["x"]).ParquetDataset(
        str(world_dataset / "train")).read(columns=["label"])) // 256)
    done = subprocess.run([sys.executable, "-m", "vitrine", "train", "--resume", str(run_dir), "--no-progress"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    final = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    result = json.loads((run_dir / "result.json").read_text())
    assert final["phase"] == "gba" and final["epoch"] == 12 and "test_auc" in result
    # Every global batch after the stop point was trained once: the step count reaches the epochs' total
    # (less at most the slices in flight when the job stopped, which the checkpoint does not hold).
    assert 12 * spe - 2 <= final["step"] <= 12 * spe, (final["step"], spe)
    # Each epoch's validation is of its last step, also after the resume, where the steps lag the batches
    # by the lost slices' global batches (snapshots keyed with that offset; no fallback to the live state).
    lag = 12 * spe - final["step"]
    assert [h["epoch"] for h in final["history"]] == list(range(1, 13))
    assert all(h["step"] == h["epoch"] * spe - lag for h in final["history"] if h["epoch"] * spe > ckpt["step"] + lag)
    assert "evaluating the live state" not in done.stdout + done.stderr


def test_auto_judges_a_ps_phase_only_once_every_live_worker_has_timed_a_step():
    from trainer.switching import slowest_ratio

    assert slowest_ratio({0: 0.1, 1: 0.1, 2: 0.1}, lost=[], world=4) is None  # worker 3 (the straggler?) not yet
    assert slowest_ratio({0: 0.1, 1: 0.1, 2: 0.1, 3: 0.4}, lost=[], world=4) == pytest.approx(4.0)
    assert slowest_ratio({0: 0.1, 1: 0.1, 2: 0.1, 3: 0.0}, lost=[3], world=4) == pytest.approx(1.0)


def test_one_switching_policy_decides_planned_asked_and_auto_switches():
    """The policy decides and applies nothing: planned switches come due after their step (a switch to
    the current mode is dropped), a command turns auto on or off, and the auto rule needs `patience`
    steps in a row on the far side of the ratio, and no lost worker to go back to all-reduce."""
    from trainer.switching import Decision, SwitchPolicy

    p = SwitchPolicy("3:gba,6:ar,8:gba", auto=False, ratio=1.5, patience=2)
    assert p.due(2, "ar") is None
    assert p.due(3, "ar") == Decision("gba", "planned at step 3 (--switch-at)")
    assert p.take_planned("ar")[0] == 6 and p.planned == [(8, "gba")]
    assert p.due(9, "gba") is None and p.planned == []  # already there: dropped
    slow = {0: 0.1, 1: 0.1, 2: 0.4}
    assert p.observe("ar", slow, [], 3) is None  # auto is off
    assert p.asked("auto", "ar") is None and p.auto
    assert p.observe("ar", slow, [], 3) is None
    d = p.observe("ar", slow, [], 3)
    assert d.to == "gba" and "4.0 > 1.5" in d.why
    even = {0: 0.1, 1: 0.1, 2: 0.11}
    assert p.observe("gba", {0: 0.1, 1: 0.1}, [], 3) is None  # worker 2 has not timed a step yet
    assert p.observe("gba", even, [], 3) is None and p.observe("gba", even, [], 3).to == "ar"
    assert p.observe("gba", {0: 0.1, 1: 0.1, 2: 0.0}, [2], 3) is None  # lost worker: never back to ar
    assert p.observe("gba", {0: 0.1, 1: 0.1, 2: 0.0}, [2], 3) is None
    with pytest.raises(ValueError, match="lost"):
        p.asked("ar", "gba", lost=[2])
    assert not p.auto  # any explicit mode turns auto off
    assert p.asked("async", "gba") == Decision("async", "asked") and p.asked("gba", "gba") is None
    q = SwitchPolicy(None, auto=False, ratio=1.5, patience=2)
    q.load(p.state())
    assert q.state() == p.state()
