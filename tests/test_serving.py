"""From a training run to a served model: the registry, `vitrine serve` (MLflow's scoring protocol
over raw IDs), `vitrine score`, and what a run records about its dataset and machine.

One tiny world, processed and trained once for the module (a few seconds), one server process."""

from __future__ import annotations

import http.client
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import make_raw

NAME = "serving-ds"
MODEL = f"vitrine-{NAME}"
L = 6


def _histories(raw: pd.DataFrame, rows: pd.DataFrame) -> list[list[int]]:
    """Each row's behaviours as the pipeline defines them (docs/DATA.md): the user's clicks strictly
    before the impression, by (timestamp, impression_id), the last L, newest last."""
    clicks = raw[raw.click == 1].sort_values(["timestamp", "impression_id"])
    by_user = {u: g for u, g in clicks.groupby("user_id")}
    out = []
    for r in rows.itertuples():
        g = by_user.get(r.user_id)
        out.append([] if g is None else g[g.timestamp < r.timestamp].item_id.tolist()[-L:])
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, dask_address):
    """A processed world and one tracked training run of it (registered as MODEL, promoted champion)."""
    from pipeline.build import PipelineConfig, run_pipeline
    from trainer import registry
    from trainer.train import TrainConfig, train

    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5"
    root = tmp_path_factory.mktemp("serving")
    raw = make_raw(root / "raw", n=2500, users=30, items=20)
    run_pipeline(PipelineConfig(raw=str(root / "raw"), out=str(root / NAME), scheduler=dask_address,
                                progress=False, max_behaviors=L, track=True))
    cfg = TrainConfig(dataset=str(root / NAME), run_dir=str(root / "run"), batch_size=256, epochs=1, progress=False,
                      threads=1, eval_batch_size=4096, log_every=2)
    result = train(cfg)
    registry.promote(MODEL)
    return {"root": root, "raw": raw, "result": result, "cfg": cfg, "ds": root / NAME}


@pytest.fixture(scope="module")
def server(run):
    """`vitrine serve --model models:/MODEL@champion` on a free port, stopped at the end."""
    from vitrine.procs import Spawned

    ready = run["root"] / "ready"
    server = Spawned([sys.executable, "-m", "vitrine", "serve", "--model", f"models:/{MODEL}@champion",
                      "--port", "0", "--ready-file", str(ready)], ready, run["root"] / "serve.log", "model server",
                     start_timeout_s=120)
    yield {"port": int(server.info["port"]), "proc": server.proc}
    assert server.stop(30) == 0, server.log_tail()  # SIGTERM: a clean stop


def _post(port: int, payload, content_type: str = "application/json") -> tuple[int, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/invocations", payload if isinstance(payload, str) else json.dumps(payload),
              {"Content-Type": content_type})
    r = c.getresponse()
    return r.status, json.loads(r.read() or b"null")


def _test_rows(run) -> tuple[pd.DataFrame, np.ndarray]:
    """Raw request rows of the test split and the trainer's own evaluation of them (its checkpoint)."""
    from trainer import checkpoint
    from trainer.train import Trainer

    trainer = Trainer(run["cfg"])
    trainer.load_state(checkpoint.load(run["root"] / "run"))
    pred = trainer.predict("test")
    raw = run["raw"].set_index("impression_id")
    rows = raw.loc[pred["impression_id"]].reset_index()
    rows["behaviors"] = _histories(run["raw"], rows)
    rows["timestamp"] = rows["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S")  # ISO strings, as JSON carries them
    return rows[["user_id", "item_id", "timestamp", "behaviors"]], pred["p"]


def test_served_model_scores_like_the_trainers_evaluation(run, server):
    import psutil

    rows, expect = _test_rows(run)
    assert len(rows) > 300 and any(len(b) == L for b in rows.behaviors)
    got = []
    for start in range(0, len(rows), 256):
        status, body = _post(server["port"], {"dataframe_records": rows.iloc[start:start + 256].to_dict("records")})
        assert status == 200, body
        got += body["predictions"]
    np.testing.assert_allclose(got, expect, atol=1e-5)
    status, body = _post(server["port"], {"dataframe_records": rows.iloc[:1].to_dict("records")})  # one row alone
    assert status == 200 and body["predictions"][0] == pytest.approx(expect[0], abs=1e-5)
    c = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    c.request("GET", "/ping")
    assert c.getresponse().status == 200
    listening = [x.laddr for x in psutil.Process(server["proc"].pid).net_connections("tcp") if x.status == "LISTEN"]
    assert listening and all(a.ip == "127.0.0.1" for a in listening), listening


def test_a_bad_request_gets_400_naming_the_field(server):
    port = server["port"]
    ok = {"user_id": 1, "item_id": 2, "timestamp": "2026-01-05T10:00:00", "behaviors": [3, 4]}
    cases = {
        "item_id": {k: v for k, v in ok.items() if k != "item_id"},
        "behaviors": {**ok, "behaviors": 7},
        "timestamp": {**ok, "timestamp": "yesterday-ish"},
        "user_id": {**ok, "user_id": None},
    }
    for field, record in cases.items():
        status, body = _post(port, {"dataframe_records": [ok, record]})
        assert status == 400, (field, body)
        assert field in body["message"], (field, body["message"])
    status, body = _post(port, "{not json")
    assert status == 400
    # A body's size is bounded before it is read: a claimed 1 TB is refused at once.
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.putrequest("POST", "/invocations")
    c.putheader("Content-Type", "application/json")
    c.putheader("Content-Length", str(2**40))
    c.endheaders()
    r = c.getresponse()
    assert r.status == 413 and "Content-Length" in json.loads(r.read())["message"]


def test_unknown_ids_score_as_out_of_vocabulary(run, server):
    import torch

    from pipeline.vocab import OOV
    from trainer.serving import load_predictor

    ts = "2026-01-05T10:00:00"
    records = [{"user_id": 10_000, "item_id": 20_000, "timestamp": ts, "behaviors": [30_000, 30_001]},
               {"user_id": "nobody", "item_id": "no-such-item", "timestamp": ts, "behaviors": ["x", "y"]}]
    status, body = _post(server["port"], {"dataframe_records": records})
    assert status == 200, body
    p = body["predictions"]
    assert p[0] == pytest.approx(p[1], abs=1e-7)  # an ID of the wrong type is just as unknown
    # What the model gives rows whose every ID is out of vocabulary, the images the placeholder (row 0).
    pred = load_predictor(f"models:/{MODEL}@champion").freeze_images()
    hour = json.loads((run["ds"] / "manifest.json").read_text())
    assert hour["lookup"]["items"]
    hv = pd.read_parquet(run["ds"] / "vocab" / "hour.parquet")
    batch = {f.name: torch.full((1,), OOV) for f in pred.model.fmap.categorical}
    batch["hour"] = torch.tensor([int(hv.loc[hv["id"] == 10, "index"].iloc[0])])
    for f in pred.model.fmap.sequences:
        batch[f.name] = torch.tensor([[OOV, OOV] + [0] * (L - 2)])
    batch.update(hist_len=torch.tensor([2]), ad_image=torch.tensor([0]), hist_image=torch.zeros((1, L), dtype=torch.long))
    with torch.no_grad():
        assert p[0] == pytest.approx(float(pred.score(batch)[0]), abs=1e-6)


def test_vitrine_score_scores_a_csv_file(run, tmp_path):
    import mlflow.pyfunc

    from vitrine.cli import main

    rows, expect = _test_rows(run)
    rows = rows.iloc[:200].assign(behaviors=[" ".join(map(str, b)) for b in rows.behaviors[:200]])
    rows.to_csv(tmp_path / "in.csv", index=False)
    assert main(["score", "--model", f"runs:/{run['result']['run_id']}/model", "--input", str(tmp_path / "in.csv"),
                 "--out", str(tmp_path / "out.parquet"), "--batch-size", "64"]) == 0
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out.columns) == [*rows.columns, "p_click"] and len(out) == 200
    np.testing.assert_allclose(out.p_click, expect[:200], atol=1e-5)
    assert main(["score", "--model", "models:/no-such-model@champion", "--input", str(tmp_path / "in.csv"),
                 "--out", str(tmp_path / "x.csv")]) == 2
    rows.drop(columns="item_id").to_csv(tmp_path / "bad.csv", index=False)
    assert main(["score", "--model", f"runs:/{run['result']['run_id']}/model", "--input", str(tmp_path / "bad.csv"),
                 "--out", str(tmp_path / "x.csv")]) == 2
    del mlflow


def test_registry_versions_the_run_and_the_champion_alias_serves_it(run, capsys):
    from mlflow.tracking import MlflowClient

    from trainer import registry
    from trainer.config import TrainConfig
    from vitrine import tracking
    from vitrine.cli import main
    from vitrine.errors import UserError

    run_id = run["result"]["run_id"]
    (v,) = registry.versions_of_run(run_id)
    assert v.name == MODEL and registry.champion(MODEL) == v.version
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_model_version_by_alias(MODEL, "champion").run_id == run_id
    assert main(["model", "list"]) == 0 and f"models:/{MODEL}@champion" in capsys.readouterr().out
    assert main(["model", "show", MODEL]) == 0 and run_id in capsys.readouterr().out
    assert main(["model", "promote", MODEL, str(v.version)]) == 0
    assert main(["model", "promote", MODEL, "99"]) == 2 and "VERSION 99" in capsys.readouterr().err
    assert main(["model", "show", "no-such-model"]) == 2 and "no-such-model" in capsys.readouterr().err
    with pytest.raises(UserError, match="--model-name"):
        TrainConfig(dataset=str(run["ds"]), model_name="bad/name").check()


def test_a_run_records_its_dataset_and_system_metrics(run):
    from mlflow.tracking import MlflowClient

    from vitrine import tracking

    client = MlflowClient(tracking.tracking_uri())
    r = client.get_run(run["result"]["run_id"])
    manifest = json.loads((run["ds"] / "manifest.json").read_text())
    (inp,) = r.inputs.dataset_inputs
    assert inp.dataset.name == NAME and json.loads(inp.dataset.source)["uri"] == str(run["ds"])
    schema = json.loads(inp.dataset.schema)["mlflow_colspec"]
    assert {"user_id", "item_id", "hist_item_id", "label"} <= {c["name"] for c in schema}
    tags = {t.key: t.value for t in inp.tags}
    assert tags["mlflow.data.context"] == "train" and manifest["mlflow_run_id"]
    assert tags["vitrine.pipeline_run_id"] == manifest["mlflow_run_id"] == r.data.tags["vitrine.pipeline_run_id"]
    assert any(k.startswith("system/cpu_utilization") for k in r.data.metrics), sorted(r.data.metrics)
    assert any(k.startswith("system/system_memory_usage") for k in r.data.metrics)
