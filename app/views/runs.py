"""Runs: every pipeline and training run in the tracking store, filtered and sorted, a side by side
comparison of the chosen training runs against step or wall time, with the mode timeline, and the
registered models: each version's run and test AUC, the champion marked, and the control that makes
a version the champion (what `vitrine serve --model models:/NAME@champion` serves)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import auth, charts, data, settings, ui
from vitrine import jobs

TRAIN_METRICS = ["test_auc", "test_gauc", "test_logloss", "test_cold_auc", "valid_auc", "samples_per_s", "loss"]
PIPELINE_METRICS = ["rows_out", "rows_quarantined", "events_per_s", "elapsed_s"]
CURVES = ["loss", "samples_per_s", "valid_auc", "valid_gauc"]
MAX_COMPARE = 8


def _job_status(job_id: str) -> str:
    if not job_id:
        return ""
    try:
        return jobs.get(job_id).status
    except Exception:  # noqa: BLE001 - a job from another data root, or pruned
        return "?"


def _with_job_status(frame: pd.DataFrame) -> pd.DataFrame:
    """A run left RUNNING by a job that is gone (killed, stopped) says so."""
    frame = frame.copy()
    frame["job status"] = [_job_status(j) if s == "RUNNING" else "" for j, s in zip(frame["job_id"], frame["status"])]
    stale = (frame["status"] == "RUNNING") & frame["job status"].isin(["stopped", "lost", "failed", "finished"])
    frame.loc[stale, "status"] = "RUNNING (job " + frame.loc[stale, "job status"] + ")"
    return frame


def _table(frame: pd.DataFrame) -> pd.DataFrame:
    c1, c2, c3, c4 = st.columns([2, 2, 3, 2])
    kinds = c1.multiselect("Job", ["pipeline", "train"], default=["pipeline", "train"], key="runs.kind")
    statuses = sorted(frame["status"].unique())
    chosen_status = c2.multiselect("Status", statuses, default=statuses, key="runs.status")
    text = c3.text_input("Search", placeholder="name, dataset, run or job id", key="runs.search")
    metric_cols = [m for m in TRAIN_METRICS + PIPELINE_METRICS if m in frame.columns]
    sort_by = c4.selectbox("Sort by", ["start", "name", "duration_s", *metric_cols], key="runs.sort")
    descending = c4.toggle("Descending", value=True, key="runs.desc")
    view = frame[frame["job"].isin(kinds) & frame["status"].isin(chosen_status)]
    if text:
        t = text.lower()
        hay = (view["name"] + " " + view["dataset"] + " " + view["run_id"] + " " + view["job_id"]).str.lower()
        view = view[hay.str.contains(t, regex=False)]
    view = view.sort_values(sort_by, ascending=not descending, na_position="last")
    cols = ["name", "job", "status", "start", "duration_s", "dataset", "mode", "features", *metric_cols, "job_id", "run_id"]
    base = settings.mlflow_url()
    config = {
        "start": st.column_config.DatetimeColumn("start", format="YYYY-MM-DD HH:mm:ss"),
        "duration_s": st.column_config.NumberColumn("duration (s)", format="%.1f"),
        **{m: st.column_config.NumberColumn(m, format="%.4f") for m in metric_cols
           if m not in ("rows_out", "rows_quarantined", "events_per_s", "samples_per_s")},
    }
    if base:
        view = view.assign(link=[data.run_link(r, base) for _, r in view.iterrows()])
        cols.append("link")
        config["link"] = st.column_config.LinkColumn("MLflow", display_text="open")
    st.caption(f"{len(view)} of {len(frame)} runs")
    st.dataframe(view[cols], hide_index=True, column_config=config, height=min(420, 38 + 35 * max(len(view), 1)))
    return view


def _compare(uri: str, view: pd.DataFrame) -> None:
    st.subheader("Compare training runs")
    train = view[view["job"] == "train"]
    if train.empty:
        st.info("No training runs match the filters. Launch one from the Launch page.")
        return
    labels = {r.run_id: f"{r.name} · {r.run_id[:8]}" for r in train.itertuples()}
    options = list(labels)
    # Nothing is drawn until runs are chosen: the curves are the page's heaviest part in the browser,
    # and the list above is what most visits are for.
    chosen = st.multiselect("Runs to compare", options, format_func=labels.get, max_selections=MAX_COMPARE,
                            key="runs.compare", placeholder="choose training runs (newest first)")
    x = st.radio("x axis", list(charts.X_FIELDS), horizontal=True, key="runs.x")
    if not chosen:
        st.caption("Choose one or more runs above to see their loss, samples/s, valid AUC and GAUC curves, "
                   "with the training-mode timeline marked.")
        return
    starts = {r.run_id: int(r.start_ms) for r in train.itertuples() if r.run_id in chosen and r.start_ms}
    curves = data.histories(uri, chosen, CURVES + ["mode_code"], starts)
    if curves.empty:
        st.info("The chosen runs have no step metrics yet.")
        return
    curves["run"] = curves["run_id"].map(labels)
    modes = curves[curves["metric"] == "mode_code"]
    bands = None
    mode_runs = modes["run_id"].unique()
    if len(mode_runs) == 1:
        bands = charts.mode_segments(modes[modes["run_id"] == mode_runs[0]])
    rules = []
    for rid in chosen:
        sw = charts.switches_from_tags(data.run_info(uri, rid)["tags"])
        if not sw.empty:
            ref = curves[(curves["run_id"] == rid) & (curves["metric"] == "loss")]
            rules.append(charts.with_wall(sw, ref).assign(run=labels[rid]))
    rules_df = pd.concat(rules, ignore_index=True) if rules else None
    present = [m for m in CURVES if m in set(curves["metric"])]
    st.altair_chart(charts.compare_chart(curves[curves["metric"].isin(present)], present, x, bands, rules_df))
    if bands is None and len(mode_runs) > 1:
        st.caption("Mode bands are drawn when one chosen run has a mode timeline; switches are marked on every run.")
    final = train[train["run_id"].isin(chosen)].set_index("name")
    show = [m for m in ["test_auc", "test_gauc", "test_logloss", "test_cold_auc", "valid_auc", "valid_gauc",
                        "test_oracle_auc"] if m in final.columns]
    if show:
        st.dataframe(final[show], column_config={m: st.column_config.NumberColumn(format="%.4f") for m in show})
    st.caption("What each run trained on (its MLflow dataset input) and the model version it registered")
    st.dataframe(pd.DataFrame([{"run": labels[rid], **_lineage(uri, rid)} for rid in chosen]), hide_index=True)


def _models() -> None:
    """The registry (`trainer/registry.py`): one table per registered model, and the champion control."""
    from trainer import registry
    from vitrine.errors import UserError

    st.subheader("Models")
    try:
        names = registry.names()
    except Exception as exc:  # noqa: BLE001 - a store without a registry
        st.caption(f"No model registry in this store ({str(exc).splitlines()[0][:200]}).")
        return
    if not names:
        st.caption("No registered models yet: every finished training run registers its model.")
        return
    name = st.selectbox("Registered model", names, key="runs.model")
    shown = st.container()  # the table goes above the control, drawn after a promotion took effect
    c1, c2 = st.columns([2, 1])
    chosen = c1.selectbox("Version", [v.version for v in registry.versions(name, with_runs=False)],
                          key="runs.model_version")
    if c2.button("Make champion", key="runs.promote"):
        try:
            v = registry.promote(name, int(chosen))
        except UserError as exc:
            st.error(str(exc))
        else:
            st.success(f"models:/{name}@{registry.CHAMPION} is now version {v.version} (run {v.run_id}); "
                       f"serve it with `vitrine serve --model models:/{name}@{registry.CHAMPION}`")
    table = pd.DataFrame([{"version": v.version, "champion": "★" if registry.CHAMPION in v.aliases else "",
                           "test_auc": v.test_auc, "run_id": v.run_id or "", "uri": v.uri}
                          for v in registry.versions(name)])
    shown.dataframe(table, hide_index=True,
                    column_config={"test_auc": st.column_config.NumberColumn("test AUC", format="%.4f")})


@st.cache_data(ttl=data.LIVE_TTL_S, show_spinner=False)
def _lineage(uri: str, run_id: str) -> dict[str, str]:
    """A training run's dataset input (name, digest, the pipeline run that made it) and its registered
    model version (champion marked)."""
    c = data.client(uri)
    out = {"dataset": "", "digest": "", "pipeline run": "", "model": ""}
    try:
        run = c.get_run(run_id)
        for inp in run.inputs.dataset_inputs if run.inputs else []:
            tags = {t.key: t.value for t in inp.tags}
            out.update(dataset=inp.dataset.name, digest=inp.dataset.digest,
                       **{"pipeline run": tags.get("vitrine.pipeline_run_id", "")})
        from trainer import registry

        out["model"] = ", ".join(v.uri + (" (champion)" if registry.CHAMPION in v.aliases else "")
                                 for v in registry.versions_of_run(run_id, c))
    except Exception:  # noqa: BLE001 - a store without a registry, or a deleted run: leave it blank
        pass
    return out


def render() -> None:
    st.title("Runs")
    uri = settings.tracking_uri()
    if st.button("Refresh", key="runs.refresh", help=f"read the store now (otherwise refreshed every {data.RUNS_TTL_S} s)"):
        data.clear()
    frame = data.runs(uri)
    if frame.empty:
        st.info(f"No runs yet in `{uri}`. Launch a pipeline or a training job from the **Launch** page "
                f"(or run `make demo`), and they appear here.")
        ui.mlflow_hint()
        ui.ready("runs")
        return
    view = _table(_with_job_status(frame))
    _compare(uri, view)
    _models()
    ui.mlflow_hint()
    ui.ready("runs")


auth.require()
render()
