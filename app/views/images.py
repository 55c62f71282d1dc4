"""Images: what a trained descriptor sees. Every image's embedding (the run's descriptor head on
the trunk features its model carries) projected to 2-D and coloured by the item's category, and an
image's nearest neighbours by cosine similarity in the embedding space."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import streamlit as st

from app import auth, data, settings, ui
from vitrine.errors import UserError

MAX_POINTS = 5000  # drawn points; the neighbours use every image


@st.cache_data(max_entries=4, show_spinner=False)
def image_categories(dataset: str, mtime: float) -> pd.Series:
    """Raw category id of each image-store row, from the shards' (ad_image, category_id) pairs."""
    m = data.manifest(dataset, mtime)
    root = Path(dataset)
    parts = []
    for split in m.get("splits", {}).values():
        for s in split.get("shards", []):
            f = root / s["file"]
            if f.exists():
                parts.append(pq.read_table(f, columns=["ad_image", "category_id"]).to_pandas())
    if not parts:
        return pd.Series(dtype=object)
    pairs = pd.concat(parts).drop_duplicates()
    vocab_path = root / "vocab" / "category_id.parquet"
    if vocab_path.exists():
        vocab = pd.read_parquet(vocab_path).set_index("index")["id"]
        pairs["category"] = pairs["category_id"].map(vocab).astype(object).fillna("OOV").astype(str)
    else:
        pairs["category"] = pairs["category_id"].astype(str)
    return pairs.groupby("ad_image")["category"].agg(lambda c: c.mode().iloc[0])


def project_2d(emb: np.ndarray) -> np.ndarray:
    """Principal-component projection: deterministic and instant for thousands of points."""
    x = emb - emb.mean(axis=0, keepdims=True)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    out = x @ vt[:2].T
    return out if out.shape[1] == 2 else np.pad(out, ((0, 0), (0, 2 - out.shape[1])))


def neighbours(emb: np.ndarray, i: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The `k` images most similar to image `i`: cosine after centring (embeddings share a large
    common component that would make every pair look alike)."""
    x = emb - emb[1:].mean(axis=0, keepdims=True)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit[i]
    sims[i] = -np.inf
    sims[0] = -np.inf  # row 0 is the placeholder, not an image
    order = np.argsort(-sims)[:k]
    return order, sims[order]


def _candidates(uri: str) -> pd.DataFrame:
    runs = data.runs(uri)
    if runs.empty:
        return runs
    with_model = data.runs_with_model(uri)
    return runs[(runs["job"] == "train") & runs["run_id"].isin(with_model) & (runs["features"] != "ids")]


def render() -> None:
    st.title("Images")
    uri = settings.tracking_uri()
    cands = _candidates(uri)
    if cands.empty:
        st.info("No training run with image features and a logged model yet (`--features ids+images`, the default). "
                "Train one from the **Launch** page; its descriptor's view of the images appears here.")
        ui.ready("images")
        return
    labels = {r.run_id: f"{r.name} · {r.run_id[:8]}" for r in cands.itertuples()}
    run_id = st.selectbox("Descriptor of run", list(labels), format_func=labels.get, key="images.run")
    row = cands[cands["run_id"] == run_id].iloc[0]
    from app import models

    try:
        emb = models.embeddings(uri, run_id)
    except UserError as exc:
        st.warning(str(exc))
        ui.ready("images")
        return
    dataset = Path(row["dataset_path"]) if row["dataset_path"] else None
    has_data = dataset is not None and (dataset / "manifest.json").exists()
    cats = (image_categories(str(dataset), (dataset / "manifest.json").stat().st_mtime) if has_data
            else pd.Series(dtype=object))
    xy = project_2d(emb)
    pts = pd.DataFrame({"image": np.arange(len(emb)), "x": xy[:, 0], "y": xy[:, 1]})
    pts["category"] = pts["image"].map(cats).fillna("not shown as an ad")
    pts = pts.iloc[1:]  # the placeholder row
    if len(pts) > MAX_POINTS:
        pts = pts.sample(MAX_POINTS, random_state=0)
    st.caption(f"{len(emb) - 1} images, {emb.shape[1]}-d embeddings, first two principal components"
               + ("" if has_data else f" (dataset {row['dataset_path'] or '?'} not found: no categories or pixels)"))
    chart = alt.Chart(pts).mark_circle(size=28, opacity=0.75).encode(
        x=alt.X("x:Q", title="PC 1"), y=alt.Y("y:Q", title="PC 2"),
        color=alt.Color("category:N", legend=alt.Legend(columns=2, title="category")),
        tooltip=["image:Q", "category:N"]).properties(height=460)
    st.altair_chart(chart, width="stretch")

    st.subheader("Nearest neighbours")
    c1, c2 = st.columns([1, 1])
    i = int(c1.number_input("Image", min_value=1, max_value=len(emb) - 1, value=1, key="images.query"))
    k = int(c2.slider("Neighbours", 1, 24, 8, key="images.k"))
    order, sims = neighbours(emb, i, k)
    table = pd.DataFrame({"image": order, "cosine": sims, "category": [cats.get(j, "-") for j in order]})
    if has_data and (dataset / "images" / "pixels.npy").exists():
        from image_service.store import ImageStore

        store = ImageStore(dataset)
        st.image(store.get(np.array([i]))[0], caption=f"image {i} ({cats.get(i, '-')})", width=96)
        st.image([p for p in store.get(order)], caption=[f"{j} · {s:.2f}" for j, s in zip(order, sims)], width=80)
    st.dataframe(table, hide_index=True, column_config={"cosine": st.column_config.NumberColumn(format="%.3f")})
    ui.ready("images")


auth.require()
render()
