"""Data: a processed dataset's manifest (splits, counts, quarantine, images, ID frequency) and
sample impressions drawn as the ad image beside the user's behaviour images, with the label and,
for a chosen training run, the model's predicted CTR."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app import auth, data, settings, ui
from vitrine.errors import UserError

GAP = 6  # pixels between the ad image and the behaviour images
MAX_BEHAVIOURS_SHOWN = 12


@st.cache_resource(max_entries=4, show_spinner=False)
def _store(path: str, mtime: float):
    from image_service.store import ImageStore

    return ImageStore(Path(path))


def _strip(store, ad: int, hist: list[int]) -> np.ndarray:
    """One picture per impression: the ad, a white gap, then the last behaviour images (oldest first)."""
    hist = list(hist)[-MAX_BEHAVIOURS_SHOWN:]
    ad_px = store.get(np.array([ad]))[0]
    s = ad_px.shape[0]
    parts = [ad_px, np.full((s, GAP * 2, 3), 255, np.uint8)]
    if hist:
        h = store.get(np.array(hist, dtype=np.int64))
        for img in h:
            parts += [img, np.full((s, 2, 3), 255, np.uint8)]
    return np.concatenate(parts, axis=1)


def _summary(m: dict, path: Path) -> None:
    c = m.get("counts", {})
    cols = st.columns(6)
    for col, (label, value) in zip(cols, [("impressions in", c.get("rows_in")), ("rows out", c.get("rows_out")),
                                          ("quarantined", c.get("quarantined")), ("users", c.get("users")),
                                          ("items", c.get("items")), ("cold items", c.get("cold_items"))]):
        col.metric(label, f"{value:,}" if isinstance(value, int) else "-")
    st.caption(f"`{path}` · format {m.get('format_version')} · created {m.get('created', '-')}"
               + (f" · pipeline run `{m['mlflow_run_id']}`" if m.get("mlflow_run_id") else ""))
    left, right = st.columns(2)
    splits = pd.DataFrame([{"split": k, "rows": v.get("rows"), "positives": v.get("positives"),
                            "ctr": (v.get("positives", 0) / v["rows"]) if v.get("rows") else None,
                            "cold-item rows": v.get("cold_item_rows"), "start": v.get("start"), "end": v.get("end"),
                            "shards": len(v.get("shards", []))} for k, v in m.get("splits", {}).items()])
    left.markdown("**Splits**")
    left.dataframe(splits, hide_index=True, column_config={"ctr": st.column_config.NumberColumn(format="%.4f")})
    right.markdown("**Quarantine**")
    reasons = c.get("quarantine_reasons") or {}
    if reasons:
        right.dataframe(pd.DataFrame({"reason": list(reasons), "rows": list(reasons.values())}), hide_index=True)
    else:
        right.caption(f"No impression quarantined ({c.get('quarantined', 0)} rows).")
    images = m.get("images") or {}
    if images:
        sc = images.get("status_counts", {})
        right.markdown(f"**Images** {images.get('shape')} · " + ", ".join(f"{k} {v}" for k, v in sc.items()))
    freq = m.get("frequency") or {}
    if freq:
        st.markdown("**ID frequency (train split)**")
        st.dataframe(pd.DataFrame(freq).T, column_config={k: st.column_config.NumberColumn(format="%.3f")
                                                        for k in ("top1pct_share", "top10pct_share")})
    with st.expander("Fields"):
        st.dataframe(pd.DataFrame(m.get("fields", [])), hide_index=True)
    with st.expander("manifest.json"):
        st.json(m, expanded=False)


def _model_choice(path: Path) -> str | None:
    uri = settings.tracking_uri()
    runs = data.runs(uri)
    if runs.empty:
        st.caption("No training run in the tracking store: train one to see predicted CTRs here.")
        return None
    mine = runs[(runs["job"] == "train") & runs["run_id"].isin(data.runs_with_model(uri))
                & (runs["dataset_path"].map(lambda p: bool(p) and Path(p).resolve() == path.resolve()))]
    if mine.empty:
        st.caption("No training run with a logged model on this dataset: train one to see predicted CTRs here.")
        return None
    labels = {"": "(none)", **{r.run_id: f"{r.name} · {r.run_id[:8]}" for r in mine.itertuples()}}
    return st.selectbox("Predict with the model of", list(labels), format_func=labels.get, key="data.model") or None


def _samples(path: Path, m: dict) -> None:
    st.subheader("Sample impressions")
    splits = [k for k, v in m.get("splits", {}).items() if v.get("rows")]
    if not splits:
        st.caption("The dataset has no rows.")
        return
    c1, c2, c3 = st.columns([2, 1, 1])
    split = c1.selectbox("Split", splits, index=splits.index("test") if "test" in splits else 0, key="data.split")
    n = int(c2.number_input("Samples", min_value=1, max_value=30, value=6, key="data.n"))
    seed = int(c3.number_input("Seed", min_value=0, value=0, key="data.seed"))
    run_id = _model_choice(path)
    from app import models

    rows = models.sample_rows(path, split, n, seed)
    if rows.empty:
        st.caption("No rows in that split.")
        return
    pred = None
    if run_id:
        try:
            pred = models.predict(settings.tracking_uri(), run_id, rows)
        except UserError as exc:
            st.warning(str(exc))
    has_images = bool(m.get("images")) and (path / "images" / "pixels.npy").exists()
    store = _store(str(path), (path / "manifest.json").stat().st_mtime) if has_images else None
    label_col = m.get("label", "label")
    for i in range(len(rows)):
        r = rows.iloc[i]
        caption = (f"label **{int(r[label_col])}**" + (f" · predicted CTR **{pred[i]:.3f}**" if pred is not None else "")
                   + f" · impression {r.get('impression_id')} · {int(r.get('hist_len', 0))} behaviours"
                   + (" · cold item" if r.get("cold_item") else ""))
        st.markdown(caption)
        if store is not None and "ad_image" in r:
            strip = _strip(store, int(r["ad_image"]), list(r["hist_image"]) if "hist_image" in r else [])
            # A fixed scale, so an image is the same size in every row (the store's images are small).
            st.image(strip, caption="ad | behaviour images, oldest to newest (last 12)",
                     width=min(int(strip.shape[1] * 96 / strip.shape[0]), 1400))
    if not has_images:
        st.caption("This dataset has no image store.")


def render() -> None:
    st.title("Data")
    root = settings.data_root()
    found = data.processed_datasets(root)
    if not found:
        st.info(f"No processed dataset under `{root / 'processed'}`. Build one from the **Launch** page "
                f"(generate a world, then run the pipeline on it).")
        ui.ready("data")
        return
    names = {str(p): p.name for p in found}
    chosen = Path(st.selectbox("Dataset", list(names), format_func=names.get, key="data.dataset"))
    try:
        m = data.load_manifest(chosen)
    except (OSError, ValueError) as exc:
        st.error(f"{chosen}/manifest.json is not readable: {exc}")
        ui.ready("data")
        return
    _summary(m, chosen)
    _samples(chosen, m)
    ui.ready("data")


auth.require()
render()
