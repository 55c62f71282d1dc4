"""Benchmarks: the reference results shipped with the repository (dated Markdown logs in
`benchmarks/results/`, each marked with its machine and date: `app/bench.py`), beside this machine's
own results, the latest of each script in benchmarks/, as tables and charts.

Each benchmark writes `benchmarks/results/NAME.json` in its own shape; this page reads any of them
generically: `failures` (missed targets) first, top-level numbers as a summary, and every list of
records or mapping of records as a table with a chart of the column you pick. Values logged as
`[mean, sd]` pairs become a mean column and a `± sd` column.
"""

from __future__ import annotations

import json
import time
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from app import auth, bench, settings, ui


def _cell(v: Any) -> Any:
    return v[0] if isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v) else v


def tables(doc: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The record tables of a result file (lists of dicts, and dicts of dicts)."""
    out: dict[str, pd.DataFrame] = {}
    for key, value in doc.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            out[key] = pd.DataFrame(value)
        elif isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            rows = []
            for name, rec in value.items():
                row: dict[str, Any] = {"name": name}
                for k, v in rec.items():
                    row[k] = _cell(v)
                    if _cell(v) is not v:
                        row[f"{k} ± sd"] = v[1]
                rows.append(row)
            out[key] = pd.DataFrame(rows)
    return out


def scalars(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if isinstance(v, (int, float, str, bool)) and k != "failures"}


def _chart(name: str, frame: pd.DataFrame, key: str) -> None:
    numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and not c.endswith("± sd")]
    labels = [c for c in frame.columns if c not in numeric and not c.endswith("± sd")]
    if not numeric:
        return
    y = st.selectbox("Chart", numeric, key=f"bench.{key}", label_visibility="collapsed")
    x = labels[0] if labels else None
    d = frame.reset_index()
    if x is None:
        x = numeric[0] if y != numeric[0] else "index"
    kind = "N" if x in labels or x == "index" else "Q"
    chart = (alt.Chart(d).mark_bar() if kind == "N" else alt.Chart(d).mark_line(point=True)).encode(
        x=alt.X(f"{x}:{kind}", sort=None, title=x), y=alt.Y(f"{y}:Q", title=y), tooltip=list(frame.columns))
    st.altair_chart(chart.properties(height=260, title=f"{name}: {y}"), width="stretch")


def render_references() -> None:
    refs = bench.references()
    st.subheader("Reference results (shipped with the repository)")
    if not refs:
        st.info(f"No reference results in `{bench.reference_dir()}`.")
        return
    st.caption("Measured by the project on the machine and date each names; compare them with your own "
               "results below only on a like machine.")
    for r in refs:
        with st.expander(f"{r.title} · {r.date} · {r.machine}"):
            st.caption(f"`{r.path.name}` · date: {r.date} · machine: {r.machine}")
            st.markdown(r.text)


def render_local() -> None:
    folder = settings.bench_results_dir()
    files = bench.local_results(folder)
    st.subheader("This machine's results")
    if not files:
        st.info(f"No local benchmark results in `{folder}` yet. Run a script from `benchmarks/` (for example "
                f"`make bench`, or `.venv/bin/python benchmarks/dashboard_bench.py`); its table appears here.")
        return
    for f in files:
        st.markdown(f"#### {f.stem}")
        st.caption(f"`{f}` · written {time.strftime('%Y-%m-%d %H:%M', time.localtime(f.stat().st_mtime))} on this "
                   "machine")
        try:
            doc = json.loads(f.read_text())
        except ValueError as exc:
            st.error(f"{f.name} is not valid JSON: {exc}")
            continue
        if not isinstance(doc, dict):
            st.json(doc, expanded=False)
            continue
        failures = doc.get("failures")
        if isinstance(failures, list):
            if failures:
                st.error("Missed targets: " + "; ".join(map(str, failures)))
            else:
                st.success("All targets met.")
        sc = scalars(doc)
        if sc:
            st.dataframe(pd.DataFrame({"value": {k: str(v) for k, v in sc.items()}}), width="content")
        for name, frame in tables(doc).items():
            st.markdown(f"**{name}**")
            st.dataframe(frame, hide_index=True)
            _chart(name, frame, f"{f.stem}.{name}")


def render() -> None:
    st.title("Benchmarks")
    render_local()
    render_references()
    ui.ready("benchmarks")


auth.require()
render()
