"""Images: what a trained descriptor sees. Every image's embedding (the run's descriptor head on
the trunk features its model carries) projected to 2-D and coloured by the item's category or, when
the dataset was built from a synthetic world, by a true visual attribute of the item (colour, shape,
pattern: the world's `truth/items.parquet`, never part of the dataset), so one can see whether the
embedding separates them; and an image's nearest neighbours by cosine similarity in the embedding
space. Legends list numeric labels by value (`charts.legend_order`)."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import streamlit as st

from app import auth, charts, data, settings, ui
from vitrine.errors import UserError

MAX_POINTS = 5000  # drawn points; the neighbours use every image
TRUTH_ITEMS = "truth/items.parquet"  # beside a synthetic world's raw data (pipeline/synth/world.py)
# label in the page -> (column of truth/items.parquet, names of its codes in pipeline/synth/draw.py)
ATTRIBUTES = {"colour": ("color", "COLOR_NAMES"), "shape": ("shape", "SHAPE_NAMES"),
              "pattern": ("pattern", "PATTERN_NAMES")}
COLOR_BY_DEFAULT = "category"


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
        # ids as text before the map: an index missing from the vocabulary (OOV) would turn an int
        # column to float, and the labels to "3.0"
        pairs["category"] = pairs["category_id"].map(vocab.astype(str)).fillna("OOV")
    else:
        pairs["category"] = pairs["category_id"].astype(str)
    return pairs.groupby("ad_image")["category"].agg(lambda c: c.mode().iloc[0])


def truth_items_path(manifest: dict) -> Path | None:
    """The synthetic world's `truth/items.parquet` in the raw directory the dataset was built from
    (the manifest's `source.dir`), when it is there."""
    raw = (manifest.get("source") or {}).get("dir")
    path = Path(raw) / TRUTH_ITEMS if raw else None
    return path if path is not None and path.is_file() else None


@st.cache_data(max_entries=4, show_spinner=False)
def image_truth(dataset: str, mtime: float) -> pd.DataFrame:
    """True visual attributes of each image-store row (columns colour, shape, pattern, as the world's
    names: red, circle, stripes ...) when the dataset comes from a synthetic world: its
    `truth/items.parquet` (raw item id -> codes) joined to the dataset's item lookup (raw item id ->
    image row). Empty when there is no such file, or it lacks the columns."""
    from pipeline.synth import draw

    empty = pd.DataFrame(columns=list(ATTRIBUTES))
    m = data.manifest(dataset, mtime)
    path = truth_items_path(m)
    lookup = Path(dataset) / ((m.get("lookup") or {}).get("items") or "lookup/items.parquet")
    if path is None or not lookup.is_file():
        return empty
    cols = [c for c, _ in ATTRIBUTES.values()]
    try:
        truth = pd.read_parquet(path)
        rows = pd.read_parquet(lookup, columns=["id", "image_row"])
    except (OSError, ValueError, KeyError):  # unreadable, or not the layout written by the world / pipeline
        return empty
    if not {"item_id", *cols} <= set(truth.columns):
        return empty
    rows = rows[rows["image_row"] > 0]  # row 0: the placeholder of items without an image
    truth = truth.assign(id=truth["item_id"].astype(str))
    joined = rows.assign(id=rows["id"].astype(str)).merge(truth, on="id", how="inner")
    out = pd.DataFrame(index=pd.Index(joined["image_row"].to_numpy(), name="image"))
    for label, (col, names_attr) in ATTRIBUTES.items():
        names = getattr(draw, names_attr)
        out[label] = [names[c] if 0 <= c < len(names) else str(c) for c in joined[col].astype(int)]
    return out.groupby(level=0).first()  # one item per image in a world; any duplicate keeps its first


def attribute_colors(label: str, order: list[str]) -> alt.Scale | None:
    """The `colour` attribute drawn in the hue it names (the world paints colour i at hue 45 i
    degrees); other labels (none today) in grey. None for the other attributes: the default palette."""
    if label != "colour":
        return None
    import colorsys

    from pipeline.synth import draw

    hues = {n: i / len(draw.COLOR_NAMES) for i, n in enumerate(draw.COLOR_NAMES)}
    hexes = []
    for name in order:
        if name in hues:
            r, g, b = colorsys.hsv_to_rgb(hues[name], 0.8, 0.9)
            hexes.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
        else:
            hexes.append("#9e9e9e")
    return alt.Scale(domain=order, range=hexes)


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
    mtime = (dataset / "manifest.json").stat().st_mtime if has_data else 0.0
    cats = image_categories(str(dataset), mtime) if has_data else pd.Series(dtype=object)
    truth = image_truth(str(dataset), mtime) if has_data else pd.DataFrame(columns=list(ATTRIBUTES))
    xy = project_2d(emb)
    pts = pd.DataFrame({"image": np.arange(len(emb)), "x": xy[:, 0], "y": xy[:, 1]})
    pts["category"] = pts["image"].map(cats).fillna("not shown as an ad")
    for label in ATTRIBUTES if not truth.empty else ():
        pts[label] = pts["image"].map(truth[label]).fillna("unknown")
    pts = pts.iloc[1:]  # the placeholder row
    if len(pts) > MAX_POINTS:
        pts = pts.sample(MAX_POINTS, random_state=0)
    st.caption(f"{len(emb) - 1} images, {emb.shape[1]}-d embeddings, first two principal components"
               + ("" if has_data else f" (dataset {row['dataset_path'] or '?'} not found: no categories or pixels)"))
    by = COLOR_BY_DEFAULT
    if not truth.empty:
        by = st.selectbox(
            "Colour the map by", [COLOR_BY_DEFAULT, *ATTRIBUTES], key="images.color_by",
            format_func=lambda o: o if o == COLOR_BY_DEFAULT else f"true {o}",
            help="The item's category, or one of the synthetic world's true visual attributes "
                 f"({TRUTH_ITEMS} beside its raw data; never given to the model): points of one colour "
                 "gathered together mean the embedding separates that attribute.")
    known = ()
    if by != COLOR_BY_DEFAULT:
        from pipeline.synth import draw

        known = getattr(draw, ATTRIBUTES[by][1])
    legend = charts.legend_order(pts[by], known)
    scale = attribute_colors(by, legend)
    color = alt.Color(f"{by}:N", sort=legend, legend=alt.Legend(columns=2, title=by),
                      **({"scale": scale} if scale is not None else {}))
    tooltip = ["image:Q", "category:N", *([f"{a}:N" for a in ATTRIBUTES] if not truth.empty else [])]
    chart = alt.Chart(pts).mark_circle(size=28, opacity=0.75).encode(
        x=alt.X("x:Q", title="PC 1"), y=alt.Y("y:Q", title="PC 2"), color=color,
        tooltip=tooltip).properties(height=460)
    st.altair_chart(chart, width="stretch")

    st.subheader("Nearest neighbours")
    c1, c2 = st.columns([1, 1])
    i = int(c1.number_input("Image", min_value=1, max_value=len(emb) - 1, value=1, key="images.query"))
    k = int(c2.slider("Neighbours", 1, 24, 8, key="images.k"))
    order, sims = neighbours(emb, i, k)
    table = pd.DataFrame({"image": order, "cosine": sims, "category": [cats.get(j, "-") for j in order]})
    for label in ATTRIBUTES if not truth.empty else ():  # do the neighbours share the query's attributes?
        table[label] = [truth[label].get(j, "-") for j in order]
    if has_data and (dataset / "images" / "pixels.npy").exists():
        from image_service.store import ImageStore

        store = ImageStore(dataset)
        st.image(store.get(np.array([i]))[0], caption=f"image {i} ({cats.get(i, '-')})", width=96)
        st.image([p for p in store.get(order)], caption=[f"{j} · {s:.2f}" for j, s in zip(order, sims)], width=80)
    st.dataframe(table, hide_index=True, column_config={"cosine": st.column_config.NumberColumn(format="%.3f")})
    ui.ready("images")


auth.require()
render()
