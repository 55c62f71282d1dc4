"""The commands a user types, end to end, in fresh processes: generate -> pipeline on the default
LocalCluster, and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from conftest import ROOT

VITRINE = [sys.executable, "-m", "vitrine"]


def _run(args, env, timeout=300):
    done = subprocess.run(VITRINE + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_generate_then_pipeline_on_a_local_cluster(tmp_path):
    env = {**os.environ, "VITRINE_DATA": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    raw, out = tmp_path / "raw", tmp_path / "out"
    _run(["generate", "--out", str(raw), "--users", "150", "--items", "80", "--days", "5", "--seed", "3",
          "--no-progress"], env)
    world = json.loads((raw / "world.json").read_text())
    stdout = _run(["pipeline", "--raw", str(raw), "--out", str(out), "--workers", "2", "--max-behaviors", "10"], env)
    assert "[4/5]" in stdout  # the progress display
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["rows_in"] == m["counts"]["rows_out"] == world["impressions"]
    assert m["images"]["status_counts"]["ok"] == world["items"]
    assert m["oracle"]["available"]
    oracle = pd.read_parquet(out / "oracle" / "p_click.parquet")
    assert len(oracle) == world["impressions"]
    test = pd.read_parquet(out / "test")
    assert test.cold_item.any()  # the world's late items reach the test split as cold items
    assert test.hist_len.max() == 10
    assert "p_click" not in test.columns and "color" not in test.columns  # truth never becomes a feature

    # Errors a user can act on come as one line, exit code 2, no traceback.
    bad = subprocess.run(VITRINE + ["pipeline", "--raw", str(raw), "--out", str(out)], env=env,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2
    assert "already exists; pass --overwrite" in bad.stderr and "Traceback" not in bad.stderr


def test_demo_generates_processes_and_says_where(tmp_path, monkeypatch, capsys):
    env = {**os.environ, "VITRINE_DATA": str(tmp_path / "data"), "PYTHONPATH": str(ROOT)}
    stdout = _run(["demo", "--scale", "0.1", "--no-dashboard"], env)
    out = tmp_path / "data" / "processed" / "demo"
    m = json.loads((out / "manifest.json").read_text())
    assert str(out) in stdout and m["mlflow_run_id"] in stdout and "reusing" not in stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in stdout
    assert "workers in auto mode" in stdout and "(auto mode)" in stdout  # the distributed run, and its MLflow run
    # It ends by serving its champion model: one scored request and the curl line that sends it.
    assert "curl -s http://127.0.0.1:" in stdout and '-> {"predictions": [' in stdout, stdout[-3000:]
    # A second demo reuses the world instead of drawing it again (its step 1, here in-process: the rest
    # of a second demo is the first one again, a minute of CI), and draws it again when a setting changed.
    from pipeline.synth.world import WorldConfig
    from vitrine.demo import prepare_world

    monkeypatch.setenv("VITRINE_DATA", str(tmp_path / "data"))
    world = tmp_path / "data" / "raw" / "demo" / "world.json"
    before = world.stat().st_mtime_ns
    assert prepare_world("demo", WorldConfig(scale=0.1, seed=0)) == world.parent
    assert "reusing" in capsys.readouterr().out and world.stat().st_mtime_ns == before
    prepare_world("demo", WorldConfig(scale=0.1, seed=1))
    assert "reusing" not in capsys.readouterr().out
    assert json.loads(world.read_text())["settings"]["seed"] == 1
