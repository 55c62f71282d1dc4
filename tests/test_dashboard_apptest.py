"""Every dashboard page under Streamlit's AppTest: the widgets each offers, the messages a bad value
gets (next to its field), the empty states of a fresh data root, and the pages over a small real
world: a generated world, the pipeline's dataset and run, a short training run with its logged
model, and a few more runs logged with the real MlflowClient (one with a GBA mode timeline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pytest
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from conftest import ROOT
from vitrine import control, jobs

MAIN = str(ROOT / "app" / "main.py")
VIEWS = {"runs": "views/runs.py", "launch": "views/launch.py", "jobs": "views/jobs.py", "live": "views/live_job.py",
         "data": "views/datasets.py", "images": "views/images.py", "benchmarks": "views/benchmarks.py"}
ENV_KEYS = ("VITRINE_DATA", "MLFLOW_TRACKING_URI", "VITRINE_BENCH_RESULTS", "VITRINE_DASHBOARD_TOKEN",
            "VITRINE_MLFLOW_URL", "VITRINE_JOB_ID")

# A stand-in training job: a live process registered the way the CLI registers a job.
STAND_IN = """
import sys, time
sys.path.insert(0, {root!r})
from vitrine import jobs
job = jobs.register_current("train", ["train", "--dataset", "x"])
jobs.set_capabilities({caps!r})
jobs.report_progress(40, 100, loss=0.4)
print(job.id, flush=True)
time.sleep(600)
"""


@pytest.fixture(autouse=True)
def _loopback_and_fresh_caches():
    """The server binds 127.0.0.1 (AppTest has no server: set the option it would have)."""
    from app import data, models

    old = st_config.get_option("server.address")
    st_config.set_option("server.address", "127.0.0.1")
    data.clear()
    models.load.clear()
    yield
    st_config.set_option("server.address", old)


def _use(mp: pytest.MonkeyPatch, data_root: Path, bench: Path | None = None) -> None:
    for k in ENV_KEYS:
        mp.delenv(k, raising=False)
    mp.setenv("VITRINE_DATA", str(data_root))
    mp.setenv("VITRINE_BENCH_RESULTS", str(bench or data_root / "no-bench"))


def page(name: str, **query) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=120)
    at.query_params.update(query)
    at.run()
    if name != "runs":
        at.switch_page(VIEWS[name]).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def ready(at: AppTest, name: str) -> bool:
    return any(f'data-page="{name}"' in m.value for m in at.markdown)


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def chart_data(at: AppTest) -> list[pd.DataFrame]:
    """Every dataset of every chart (Streamlit ships a chart's data beside its spec, as Arrow)."""
    out = []
    for c in at.get("vega_lite_chart"):
        for ds in c.proto.datasets:
            out.append(pa.ipc.open_stream(ds.data.data).read_all().to_pandas())
    return out


def _stand_in(data_root: Path, caps: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "VITRINE_DATA": str(data_root)}
    env.pop("VITRINE_JOB_ID", None)
    proc = subprocess.Popen([sys.executable, "-c", STAND_IN.format(root=str(ROOT), caps=list(caps))], env=env,
                            stdout=subprocess.PIPE, text=True)
    job_id = proc.stdout.readline().strip()
    assert job_id
    return proc, job_id


# -- a fresh data root ------------------------------------------------------------------------------
@pytest.fixture
def empty(tmp_path, monkeypatch):
    _use(monkeypatch, tmp_path / "data")
    return tmp_path / "data"


@pytest.mark.parametrize("name, message", [
    ("runs", "No runs yet"), ("jobs", "No jobs yet"), ("live", "No training job yet"),
    ("data", "No processed dataset"), ("images", "No training run with image features"),
    ("benchmarks", "No local benchmark results"),
])
def test_empty_states(empty, name, message):
    at = page(name)
    assert any(message in m for m in texts(at.info)), texts(at.info)
    if name == "benchmarks":  # a fresh setup still shows the reference results shipped in the repository
        _shows_reference_results(at)
    assert ready(at, name)


def _shows_reference_results(at: AppTest) -> None:
    from app import bench

    shipped = bench.references()
    assert shipped and all(r.path.parent == ROOT / "benchmarks" / "results" for r in shipped)
    labels = [e.label for e in at.expander]
    for r in shipped:  # each marked with its machine and date, as read from the file
        assert any(r.title in lb and r.date in lb and r.machine in lb for lb in labels), (r, labels)
    dated = next(r for r in shipped if r.path.name == "2026-12-07-issue19.md")
    assert (dated.date, dated.machine) == ("2026-12-07", "The 2-core development machine (no GPU)")


def test_launch_offers_every_setting_of_each_job(empty):
    from app import forms

    at = page("launch")
    assert at.radio(key="launch.command").options == ["Generate a synthetic world", "Process a raw source (pipeline)",
                                                      "Train the DICM"]
    for i, command in enumerate(forms.COMMANDS):
        if i:
            at.radio(key="launch.command").set_value(command).run()
        spec = forms.form_spec(command)
        keys = {w.key for kind in ("text_input", "selectbox", "checkbox", "text_area") for w in getattr(at, kind)}
        missing = [f.name for f in spec.fields if f"{command}.{f.name}" not in keys]
        assert not missing, (command, missing)
        assert [b.label for b in at.button if b.label in ("Check", "Launch")] == ["Check", "Launch"]
    # The form's defaults point into this data root.
    at.radio(key="launch.command").set_value("generate").run()
    assert at.text_input(key="generate.out").value == str(empty / "raw" / "world")


def _error_after(at: AppTest, key: str) -> str | None:
    """The error shown right under the widget `key` (the next element in its column), if any."""
    def walk(block):
        kids = list(block.children.values()) if isinstance(block.children, dict) else list(block.children)
        for i, child in enumerate(kids):
            if getattr(child, "key", None) == key:
                nxt = kids[i + 1] if i + 1 < len(kids) else None
                # the slot is an empty placeholder unless it holds an error
                return getattr(nxt, "value", None) if getattr(nxt, "type", "") == "error" else ""
            found = walk(child) if hasattr(child, "children") else None
            if found is not None:
                return found
        return None

    return walk(at.main)


@pytest.mark.parametrize("command, values, field, message", [
    ("generate", {"scale": "abc"}, "scale", "scale: must be a number, got 'abc'"),
    ("generate", {"days": "0"}, "days", "--days must be >= 1"),
    ("generate", {"users": "1.5"}, "users", "users: must be a whole number"),
    ("pipeline", {"raw": "{root}/raw/nonexistent"}, "raw", "raw/nonexistent does not exist"),
    ("pipeline", {"raw": "/etc"}, "raw", "'/etc' is outside the data root"),
    ("pipeline", {"image_size": "0"}, "image_size", "--image-size must be >= 1"),
    ("pipeline", {"map": "user"}, "map", "each line is TABLE.FIELD=COLUMN"),
    ("train", {"epochs": "0"}, "epochs", "--epochs must be >= 1"),
    ("train", {"lr": "fast"}, "lr", "lr: must be a number"),
    ("train", {"mlp": "200, x"}, "mlp", "whole numbers separated by commas"),
    ("train", {"dataset": "{root}/processed/nonexistent"}, "dataset", "processed/nonexistent does not exist"),
    ("train", {"trunk_weights": "{root}/nonexistent.pth"}, "trunk_weights", "nonexistent.pth"),
    ("train", {"image_gba_threshold": "soon"}, "image_gba_threshold", "image gba threshold: must be a whole number"),
])
def test_a_bad_value_is_explained_next_to_its_field_and_nothing_starts(empty, command, values, field, message):
    at = page("launch")
    at.radio(key="launch.command").set_value(command).run()
    for name, value in values.items():
        w = at.text_input(key=f"{command}.{name}") if name != "map" else at.text_area(key=f"{command}.{name}")
        w.set_value(value.replace("{root}", str(empty)))
    at.button[[b.label for b in at.button].index("Launch")].click().run()
    assert not at.exception, [e.value for e in at.exception]
    shown = _error_after(at, f"{command}.{field}")
    assert shown and message in shown, (shown, texts(at.error))
    assert any("Nothing was launched" in e for e in texts(at.error))
    assert jobs.list_jobs() == []


def test_a_valid_form_shows_its_command_and_launch_starts_the_job(empty, tmp_path):
    at = page("launch")
    out = empty / "raw" / "tiny"
    for name, value in {"out": str(out), "users": "30", "items": "15", "days": "3"}.items():
        at.text_input(key=f"generate.{name}").set_value(value)
    at.button[[b.label for b in at.button].index("Check")].click().run()
    assert texts(at.code)[-1] == f"vitrine generate --out {out} --users 30 --items 15 --days 3"
    assert jobs.list_jobs() == []
    at.button[[b.label for b in at.button].index("Launch")].click().run()
    assert any("Started job" in s for s in texts(at.success))
    (job,) = jobs.list_jobs()
    assert job.argv == ["generate", "--out", str(out), "--users", "30", "--items", "15", "--days", "3"]
    deadline = time.monotonic() + 120
    while (job := jobs.get(job.id)).running:
        assert time.monotonic() < deadline, job.tail()
        time.sleep(0.1)
    assert job.status == "finished", job.tail()
    assert (out / "world.json").exists()


def test_forms_round_trip_through_the_real_parser(empty, tmp_path):
    from app import forms
    from vitrine.cli import build_parser
    from vitrine.config import from_args
    from pipeline.synth.world import WorldConfig

    raw = {"out": "rel/world", "scale": "0.5", "seed": "-3", "image_format": "png", "overwrite": True,
           "progress": False}
    argv, errors = forms.prepare("generate", raw, empty)
    assert not errors
    ns = build_parser().parse_args(argv)
    assert ns.out == str(empty / "rel" / "world") and ns.overwrite and not ns.progress
    assert from_args(WorldConfig, ns) == WorldConfig(scale=0.5, seed=-3, image_format="png")
    assert "--seed=-3" in argv  # a value that looks like a flag travels attached


def test_an_optional_number_left_empty_stays_unset(empty, world_dataset, tmp_path, monkeypatch):
    """`--image-gba-threshold` / `--image-gba-decay` default to None (follow the shards' settings): an
    empty field must launch without the flag, a filled one with it."""
    from app import forms

    monkeypatch.setenv("VITRINE_DATA", str(world_dataset.parent))  # the form keeps to the data root
    from trainer.config import TrainConfig
    from vitrine.cli import build_parser
    from vitrine.config import from_args

    argv, errors = forms.prepare("train", {"dataset": str(world_dataset), "image_gba_decay": "1"}, tmp_path)
    assert not errors, errors
    assert not any(a.startswith("--image-gba-threshold") for a in argv), argv
    cfg = from_args(TrainConfig, build_parser().parse_args(argv))
    assert cfg.image_gba_threshold is None and cfg.image_gba() == (cfg.gba_threshold, 1.0)


def test_non_loopback_without_a_token_shows_nothing(empty):
    st_config.set_option("server.address", "0.0.0.0")
    at = AppTest.from_file(MAIN, default_timeout=60).run()
    assert any("without an access token" in e for e in texts(at.error))
    assert not at.title and not ready(at, "runs")


def test_a_token_is_asked_for_once_per_session(empty, monkeypatch):
    monkeypatch.setenv("VITRINE_DASHBOARD_TOKEN", "s3cret-token")
    at = AppTest.from_file(MAIN, default_timeout=60).run()
    assert not ready(at, "runs") and at.text_input[0].label == "Access token"
    at.query_params["token"] = "wrong-token"
    at.run()
    assert any("wrong" in e for e in texts(at.error)) and not ready(at, "runs")
    at.text_input[0].set_value("s3cret-token")
    at.button[0].click().run()
    assert ready(at, "runs") or ready(at.run(), "runs")
    at.switch_page(VIEWS["jobs"]).run()  # the session stays in without presenting it again
    assert ready(at, "jobs")
    fresh = page("runs", token="s3cret-token")  # the address form
    assert ready(fresh, "runs") and "token" not in fresh.query_params


def test_the_server_refuses_to_listen_beyond_loopback_without_a_token(empty):
    from app import server
    from vitrine.errors import UserError

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("VITRINE_DASHBOARD_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "vitrine", "dashboard", "--host", "0.0.0.0"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "without an access token" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(UserError, match="at least 8 characters"):
        server.start("0.0.0.0", 0, "short")
    with pytest.raises(UserError, match="without an access token"):
        server.start("::", 0, None)
    server.check_bind("127.0.0.1", None)
    server.check_bind("0.0.0.0", "long-enough-token")


def test_a_server_whose_picked_port_is_taken_meanwhile_starts_on_another(empty, tmp_path, monkeypatch):
    """`port=0` picks a free port that the server binds seconds later; another process may take it in
    between. Here one really is taken (a listening socket) when the real MLflow UI tries it: the UI
    exits at once, and the start goes on with a new port."""
    import socket
    import urllib.request

    from app import server

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    picks = [taken.getsockname()[1]]
    real = server.free_port
    monkeypatch.setattr(server, "free_port", lambda host="127.0.0.1": picks.pop() if picks else real(host))
    try:
        from app import settings

        url, proc = server.start_mlflow_ui(settings.tracking_uri(), log=tmp_path / "ui.log")
        try:
            assert not picks and not url.endswith(f":{taken.getsockname()[1]}")
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                assert r.status == 200
        finally:
            server.stop(proc)
    finally:
        taken.close()


@pytest.mark.parametrize("argv, ready_line", [
    (["-m", "vitrine", "dashboard", "--port", "0", "--mlflow-ui"], "Ctrl-C to stop"),
    (["-c", "from vitrine.demo import _serve_dashboard; _serve_dashboard(0)"], "Open the dashboard"),
])
def test_a_killed_dashboard_stops_the_servers_it_started(empty, argv, ready_line):
    """`kill` (SIGTERM) of `vitrine dashboard --mlflow-ui`, and of the demo's last step, stops the
    Streamlit server and the MLflow UI they started, as Ctrl-C does: left running, they would hold
    their ports against the next start."""
    import signal

    import psutil

    proc = subprocess.Popen([sys.executable, *argv], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children = []
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if ready_line in line:
                break
        assert any(ready_line in line for line in seen), "".join(seen)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2, children  # the dashboard and the MLflow UI
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, alive
    finally:
        for p in [proc, *children]:
            try:
                p.kill()
            except (ProcessLookupError, psutil.NoSuchProcess):
                pass

# -- a small real world -----------------------------------------------------------------------------
def _log_runs(uri: str) -> dict[str, str]:
    """Runs the trainer will log in other modes, written with the real client: one with a mode
    timeline (AR, then GBA after a switch at step 20), cluster, token, staleness and AMS metrics."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    c = MlflowClient(uri)
    exp = tracking.experiment_id(tracking.TRAIN_EXPERIMENT)
    now = int(time.time() * 1000)
    out = {}
    for name, modes in (("plain", None), ("switching", [1, 1, 3, 3, 3])):
        run = c.create_run(exp, run_name=name, tags={"vitrine.job": "train", "vitrine.mode": "auto" if modes else "single",
                                                      "vitrine.dataset": "/elsewhere/ds"})
        rid = run.info.run_id
        ms = [Metric("loss", 0.5 - 0.01 * s, now + 100 * s, 10 * s) for s in range(5)]
        ms += [Metric("samples_per_s", 1000 + s, now + 100 * s, 10 * s) for s in range(5)]
        if modes:
            ms += [Metric("mode_code", m, now + 100 * s, 10 * s) for s, m in enumerate(modes)]
            for s in range(5):
                ms += [Metric("worker_step_s_0", 0.1, now + 100 * s, 10 * s), Metric("worker_step_s_1", 0.3, now + 100 * s, 10 * s),
                       Metric("straggler_rank", 1, now + 100 * s, 10 * s), Metric("tokens_issued", 10 * s, now + 100 * s, 10 * s),
                       Metric("tokens_applied", 9 * s, now + 100 * s, 10 * s), Metric("staleness_p50", 1, now + 100 * s, 10 * s),
                       Metric("staleness_p99", 3, now + 100 * s, 10 * s)]
            ms += [Metric("ams_dedup_ratio", 9.7, now, 40), Metric("ams_bytes_saved_per_sample", 12000, now, 40)]
            c.set_tag(rid, "vitrine.switch.20", "ar->gba")
        c.log_batch(rid, metrics=ms)
        if not modes:
            c.set_terminated(rid, "FINISHED")
        out[name] = rid
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory, dask_address):
    from pipeline.build import PipelineConfig, run_pipeline
    from pipeline.synth.world import WorldConfig, generate
    from trainer.train import TrainConfig, train
    from vitrine import tracking

    root = tmp_path_factory.mktemp("dash-world")
    data_root = root / "data"
    bench = root / "bench"
    bench.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        _use(mp, data_root, bench)
        generate(WorldConfig(users=80, items=40, days=4, seed=3), data_root / "raw" / "tiny", progress=False)
        ds = data_root / "processed" / "tiny"
        run_pipeline(PipelineConfig(raw=str(data_root / "raw" / "tiny"), out=str(ds), scheduler=dask_address,
                                    progress=False, max_behaviors=10))
        trained = train(TrainConfig(dataset=str(ds), run_dir=str(root / "run"), epochs=1, batch_size=128,
                                    progress=False, threads=1, log_every=2, eval_batch_size=1024))
        extra = _log_runs(tracking.tracking_uri())
        yield SimpleNamespace(root=data_root, dataset=ds, bench=bench, model_run=trained["run_id"], **extra)


@pytest.fixture
def at_world(world, monkeypatch):
    _use(monkeypatch, world.root, world.bench)
    return world


def panels(spec: dict) -> dict[str, dict]:
    """The comparison chart's panels by metric (one chart of small multiples)."""
    return {p["title"]: p for p in spec.get("concat", [])}


def test_runs_lists_filters_and_compares_real_runs(at_world):
    at = page("runs")
    table = at.dataframe[0].value
    assert len(table) == 4 and set(table["job"]) == {"pipeline", "train"}
    assert table.loc[table["name"] == "switching", "status"].item() == "RUNNING"
    at.multiselect(key="runs.kind").set_value(["pipeline"]).run()
    assert list(at.dataframe[0].value["job"]) == ["pipeline"]
    at.multiselect(key="runs.kind").set_value(["pipeline", "train"]).run()
    at.text_input(key="runs.search").set_value("switch").run()
    assert list(at.dataframe[0].value["name"]) == ["switching"]
    assert not charts(at)  # nothing drawn until runs are chosen
    at.multiselect(key="runs.compare").set_value([at_world.switching]).run()
    (spec,) = charts(at)
    assert set(panels(spec)) == {"loss", "samples_per_s"}
    # A run with a mode timeline: bands by mode and the switch marked, on every panel.
    loss = panels(spec)["loss"]
    assert [layer["mark"]["type"] for layer in loss["layer"]] == ["rect", "line", "rule", "text"]
    frames = chart_data(at)
    bands = next(f for f in frames if "mode" in f.columns)
    assert list(bands["mode"]) == ["ar", "gba"] and list(bands["start"]) == [0, 20]
    assert any("label" in f.columns and list(f["label"]) == ["ar->gba"] for f in frames)
    at.radio(key="runs.x").set_value("wall time (s)").run()
    assert not at.exception
    assert '"wall_s"' in json.dumps(charts(at))
    assert ready(at, "runs")


def test_runs_compares_the_chosen_runs_side_by_side(at_world):
    at = page("runs")
    assert at.multiselect(key="runs.compare").value == []
    assert at.multiselect(key="runs.compare").options[0].startswith("switching")  # newest first
    at.multiselect(key="runs.compare").set_value([at_world.model_run, at_world.plain]).run()
    (spec,) = charts(at)
    assert set(panels(spec)) == {"loss", "samples_per_s", "valid_auc", "valid_gauc"}
    curves = next(f for f in chart_data(at) if "metric" in f.columns)
    assert curves["run_id"].nunique() == 2
    final = at.dataframe[1].value
    assert "test_auc" in final.columns and len(final) == 2
    lineage = at.dataframe[2].value.set_index("run")  # the dataset each run read, the model it registered
    row = lineage.loc[next(i for i in lineage.index if i.endswith(at_world.model_run[:8]))]
    assert row["dataset"] and row["digest"] and row["model"].startswith("models:/vitrine-")
    # The registry: the run's model version, made the champion from the page.
    models = at.dataframe[3].value
    version = int(models.loc[models["run_id"] == at_world.model_run, "version"].item())
    assert "★" not in set(models["champion"])
    at.selectbox(key="runs.model_version").set_value(version).run()
    next(b for b in at.button if b.key == "runs.promote").click().run()
    assert not at.exception and "is now version" in at.success[0].value
    assert at.dataframe[3].value.set_index("version").loc[version, "champion"] == "★"


def test_jobs_shows_status_log_and_stops_a_running_job(at_world):
    proc, job_id = _stand_in(at_world.root)
    try:
        at = page("jobs")
        frame = at.dataframe[0].value
        assert job_id in set(frame["job"]) and frame.loc[frame["job"] == job_id, "status"].item() == "running"
        assert at.selectbox(key="jobs.selected").value == job_id  # the running one is shown
        stop = next(b for b in at.button if b.key == f"jobs.stop.{job_id}")
        assert not stop.disabled
        stop.click().run()
        assert proc.wait(timeout=60) == -15
        deadline = time.monotonic() + 30
        while jobs.get(job_id).status != "stopped":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        at.run()
        stop = next(b for b in at.button if b.key == f"jobs.stop.{job_id}")
        assert stop.disabled and "stopped" in stop.help
    finally:
        proc.kill()
        proc.wait()


def test_live_job_shows_the_cluster_and_steers_only_what_the_job_accepts(at_world):
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    plain, plain_id = _stand_in(at_world.root)
    able, able_id = _stand_in(at_world.root, caps=("stop", "switch", "straggler"))
    try:
        MlflowClient(tracking.tracking_uri()).set_tag(at_world.switching, "vitrine.job_id", able_id)
        at = page("live")
        assert at.selectbox(key="live.job").value == able_id  # the newest running training job
        assert {m.label: m.value for m in at.metric}["mode"] == "gba"
        assert {m.label for m in at.metric} >= {"dedup ratio", "bytes saved/sample"}
        titles = json.dumps(charts(at))
        for what in ("step time per worker (latest)", "tokens", "staleness (steps)"):
            assert what in titles, what
        workers = next(f for f in chart_data(at) if "straggler" in f.columns)
        assert workers.set_index("rank")["straggler"].to_dict() == {"0": False, "1": True}
        assert not next(b for b in at.button if b.key == "live.switch.gba").disabled
        next(b for b in at.button if b.key == "live.switch.gba").click().run()
        at.text_input(key="live.straggler").set_value("1:x")
        next(b for b in at.button if b.key == "live.inject").click().run()
        assert any("straggler spec '1:x'" in e for e in texts(at.error))
        at.text_input(key="live.straggler").set_value("random:0.2:5")
        next(b for b in at.button if b.key == "live.inject").click().run()
        sent = control.ControlReader(jobs.job_dir(able_id)).poll()
        assert [(c["cmd"], c.get("mode") or c.get("spec")) for c in sent] == [("switch", "gba"), ("straggler", "random:0.2:5")]

        at.selectbox(key="live.job").set_value(plain_id).run()
        assert all(b.disabled for b in at.button if b.key and b.key.startswith("live.switch."))
        assert any("Switching is off" in c and "does not accept 'switch'" in c for c in texts(at.caption))
        assert any("No MLflow run is tagged with this job" in i for i in texts(at.info))
        assert ready(at, "live")
    finally:
        for p in (plain, able):
            p.kill()
            p.wait()


def test_data_shows_the_manifest_samples_and_a_models_predictions(at_world):
    at = page("data")
    assert {m.label for m in at.metric} >= {"impressions in", "rows out", "quarantined"}
    splits = at.dataframe[0].value
    assert list(splits["split"]) == ["train", "valid", "test"] and splits["rows"].sum() > 0
    assert len(at.get("image")) == 6  # six sample impressions, each drawn as ad | behaviours
    assert not any("predicted CTR" in m for m in texts(at.markdown))
    at.selectbox(key="data.model").set_value(at_world.model_run).run()
    assert not at.exception, [e.value for e in at.exception]
    preds = [m for m in texts(at.markdown) if "predicted CTR" in m]
    assert len(preds) == 6
    ctr = [float(p.split("predicted CTR **")[1].split("**")[0]) for p in preds]
    # Probabilities, shown to 3 decimals (a tiny one-epoch model may well show 0.000 for one sample).
    assert all(0 <= c <= 1 for c in ctr) and any(0 < c < 1 for c in ctr), preds


def test_images_maps_the_descriptors_embeddings(at_world):
    at = page("images")
    assert at.selectbox(key="images.run").options and at.selectbox(key="images.run").value == at_world.model_run
    scatter = charts(at)[0]
    assert scatter["mark"]["type"] == "circle" and scatter["encoding"]["color"]["field"] == "category"
    at.slider(key="images.k").set_value(5).run()
    table = at.dataframe[0].value
    assert len(table) == 5 and table["cosine"].is_monotonic_decreasing and 1 not in set(table["image"])
    assert len(at.get("image")) == 2  # the query image and the strip of its neighbours


def test_legends_list_numeric_labels_by_value():
    from app.charts import legend_order

    assert legend_order(["10", "2", "OOV", "1", "2", "not shown as an ad", "-3", "1.5"]) == [
        "-3", "1", "1.5", "2", "10", "OOV", "not shown as an ad"]
    assert legend_order([12, 3, 1]) == ["1", "3", "12"]
    assert legend_order(["nan", "b", "a"]) == ["a", "b", "nan"]  # "nan" is a word here, not a number
    assert legend_order(["stripes", "unknown", "plain", "dots"], known=("plain", "stripes", "dots")) == [
        "plain", "stripes", "dots", "unknown"]


def test_images_colours_the_map_by_the_worlds_true_attributes(at_world):
    from app import data
    from pipeline.synth import draw

    raw = at_world.root / "raw" / "tiny"
    truth = pd.read_parquet(raw / "truth" / "items.parquet").set_index("item_id")
    # image row -> item, read independently of the page's join: the world names item i's image 00000i.<ext>
    index = pd.read_parquet(at_world.dataset / "images" / "index.parquet").set_index("image_index")["key"]
    at = page("images")
    by = at.selectbox(key="images.color_by")
    assert by.value == "category" and by.options == ["category", "true colour", "true shape", "true pattern"]
    color = charts(at)[0]["encoding"]["color"]
    pts = next(f for f in chart_data(at) if "x" in f.columns)
    assert color["field"] == "category" and set(color["sort"]) == set(pts["category"])
    numbers = [c for c in color["sort"] if c.isdigit()]
    assert numbers == sorted(numbers, key=int) and any(len(c) > 1 for c in numbers), color["sort"]

    by.set_value("shape").run()
    assert not at.exception, [e.value for e in at.exception]
    color = charts(at)[0]["encoding"]["color"]
    pts = next(f for f in chart_data(at) if "x" in f.columns)
    assert color["field"] == "shape" and color["sort"] == [n for n in draw.SHAPE_NAMES if n in set(pts["shape"])]
    items = pts["image"].map(lambda i: int(index[i].split(".")[0]))
    assert list(pts["shape"]) == [draw.SHAPE_NAMES[s] for s in truth.loc[items, "shape"]]
    assert list(pts["pattern"]) == [draw.PATTERN_NAMES[s] for s in truth.loc[items, "pattern"]]
    assert {"colour", "shape", "pattern"} <= set(at.dataframe[0].value.columns)  # the neighbours' too

    at.selectbox(key="images.color_by").set_value("colour").run()
    color = charts(at)[0]["encoding"]["color"]
    assert color["sort"] == [n for n in draw.COLOR_NAMES if n in color["sort"]]
    assert color["scale"]["domain"] == color["sort"] and len(color["scale"]["range"]) == len(color["sort"])

    # A dataset from a source without the truth file: no such choice, the map by category as before.
    hidden = raw / "truth" / "items.hidden"
    (raw / "truth" / "items.parquet").rename(hidden)
    try:
        data.clear()
        at = page("images")
        assert "images.color_by" not in [s.key for s in at.selectbox]
        assert charts(at)[0]["encoding"]["color"]["field"] == "category"
    finally:
        hidden.rename(raw / "truth" / "items.parquet")


def test_benchmarks_reads_any_result_file(at_world):
    (at_world.bench / "pipeline.json").write_text(json.dumps({
        "rows": [{"impressions": 100, "pipeline_s": 5.4}, {"impressions": 1000, "pipeline_s": 9.1}],
        "failures": [], "time_ratio_target": 1.5}))
    (at_world.bench / "quality.json").write_text(json.dumps({
        "table": {"ids / sum": {"auc": [0.61, 0.01]}, "ids+images / sum": {"auc": [0.63, 0.01]}},
        "failures": ["ids+images beats ids by < 0.01"]}))
    (at_world.bench / "broken.json").write_text("{not json")
    at = page("benchmarks")
    assert any("broken.json is not valid JSON" in e for e in texts(at.error))
    assert any("Missed targets: ids+images beats ids" in e for e in texts(at.error))
    assert any("All targets met" in s for s in texts(at.success))
    tables = [d.value for d in at.dataframe]
    quality = next(t for t in tables if "auc ± sd" in t.columns)
    assert list(quality["auc"]) == [0.61, 0.63]
    assert len(charts(at)) == 2
    _shows_reference_results(at)  # beside the local ones
    assert ready(at, "benchmarks")
