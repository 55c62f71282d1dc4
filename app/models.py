"""A training run's logged model, for scoring sample impressions and mapping image embeddings.

A run's model is a pyfunc model whose artifacts hold the trained `CTRPredictor`
(`trainer.serving.load_predictor` gives it back; runs logged before that have MLflow's `pt2` format,
a traced `GraphModule` whose submodules lose their `forward`). Either way the image descriptor head
is rebuilt from the loaded weights (Linear layers with their PReLUs, the layout
`image_service.descriptor.build_head` makes) and applied to the trunk features the model carries,
giving every image's embedding without an image service.

Torch and MLflow's model loading are imported only here, and only when a page asks for a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import streamlit as st

from app import data
from vitrine.errors import UserError


@st.cache_resource(max_entries=2, show_spinner="Loading the run's model ...")
def load(uri: str, run_id: str) -> tuple[Any, list[tuple[str, int]]]:
    """(model, layout) of a run; UserError when the run logged no model."""
    doc = data.json_artifact(uri, run_id, "model_layout.json")
    if doc is None:
        raise UserError(f"run {run_id} has no logged model (no model_layout.json): it did not finish, or ran "
                        f"with --no-track")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from trainer.serving import load_predictor

    # `runs:/` resolves through the global tracking URI; set it for the load only.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        model = load_predictor(f"runs:/{run_id}/model")  # the torch predictor, in eval mode
    finally:
        mlflow.set_tracking_uri(previous)
    return model, [(str(n), int(w)) for n, w in doc["layout"]]


def head_embeddings(model: Any) -> np.ndarray:
    """Every image's embedding (n_images, d) from the model's trunk features and descriptor head."""
    import torch
    from torch import nn

    state = model.state_dict()
    if "trunk_features" not in state:
        raise UserError("this model has no image descriptor (it was trained with --features ids)")
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    layers: list[nn.Module] = []
    for i in sorted({int(k.split(".")[0]) for k in head}):
        w = head[f"{i}.weight"]
        if w.dim() == 2:
            lin = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
            lin.load_state_dict({"weight": w, "bias": head[f"{i}.bias"]})
            layers.append(lin)
        else:
            act = nn.PReLU(w.shape[0], dtype=w.dtype)
            act.load_state_dict({"weight": w})
            layers.append(act)
    net = nn.Sequential(*layers).eval()
    feats = state["trunk_features"]
    with torch.no_grad():
        return net(feats.to(layers[0].weight.dtype)).float().numpy()


@st.cache_data(max_entries=4, show_spinner="Computing image embeddings ...")
def embeddings(uri: str, run_id: str) -> np.ndarray:
    model, _ = load(uri, run_id)
    return head_embeddings(model)


def sample_rows(dataset: Path, split: str, n: int, seed: int) -> pd.DataFrame:
    """`n` random impressions of one split (from one randomly chosen shard: a sample, not a scan)."""
    return _sample_rows(str(dataset), (dataset / "manifest.json").stat().st_mtime, split, n, seed)


@st.cache_data(max_entries=16, show_spinner=False)
def _sample_rows(dataset: str, mtime: float, split: str, n: int, seed: int) -> pd.DataFrame:
    m = data.manifest(dataset, mtime)
    shards = [Path(dataset) / s["file"] for s in m["splits"].get(split, {}).get("shards", []) if s.get("rows")]
    if not shards:
        return pd.DataFrame()
    rng = np.random.default_rng(seed)
    shard = shards[int(rng.integers(len(shards)))]
    pf = pq.ParquetFile(shard)
    if pf.metadata.num_rows == 0:
        return pd.DataFrame()
    group = int(rng.integers(pf.num_row_groups))
    table = pf.read_row_group(group)
    take = np.sort(rng.choice(table.num_rows, size=min(n, table.num_rows), replace=False))
    return table.take(pa.array(take)).to_pandas()


def predict(uri: str, run_id: str, rows: pd.DataFrame) -> np.ndarray:
    """Predicted CTRs of `rows` (shard columns) by a run's model, packed as the model was logged."""
    import torch

    from trainer.data import pad_lists
    from trainer.serving import pack

    model, layout = load(uri, run_id)
    batch = {}
    for name, width in layout:
        if name not in rows.columns:
            raise UserError(f"the model expects column {name!r}, which this dataset lacks: it was trained on another one")
        col = rows[name]
        if width == 1 and not isinstance(col.iloc[0], (list, np.ndarray)):
            v = np.array(col, dtype=np.int64)  # a writable copy, as torch wants
            if name == "hist_len":
                v = np.minimum(v, max((w for n, w in layout if n != "hist_len" and w > 1), default=0))
            batch[name] = torch.from_numpy(v)
        else:
            arr = pa.array([list(x) for x in col], type=pa.list_(pa.int64()))
            batch[name] = torch.from_numpy(pad_lists(arr, width))
    x = pack(batch, layout)
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy().reshape(-1)
