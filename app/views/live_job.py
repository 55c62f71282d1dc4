"""Live job: one training job as it runs. Progress, loss, each worker's step time with the
straggler marked, the current mode with switch buttons, straggler injection, tokens and staleness
over time, and the image service's dedup ratio and bytes saved. Refreshes by itself.

Everything past progress comes from the job's MLflow run (found by its `vitrine.job_id` tag); a
panel whose metrics the run does not log (yet, or in this mode) says so instead of drawing nothing.
"""

from __future__ import annotations

import re

import pandas as pd
import streamlit as st

from app import auth, charts, data, settings, ui
from vitrine import control, jobs
from vitrine.errors import UserError

REFRESH_S = 2.0
SWITCH_MODES = ("ar", "gba", "async", "auto")
TOKENS = ["tokens_issued", "tokens_applied", "tokens_decayed", "tokens_dropped"]
STALENESS = ["staleness_p50", "staleness_p90", "staleness_p99"]
AMS = [("ams_dedup_ratio", "dedup ratio", "{:.2f}x"), ("ams_bytes_per_sample", "AMS bytes/sample", "{:,.0f}"),
       ("plain_pixels_bytes_per_sample", "plain pixels bytes/sample", "{:,.0f}"),
       ("plain_trunk_bytes_per_sample", "plain trunk bytes/sample", "{:,.0f}"),
       ("ams_bytes_saved_per_sample", "bytes saved/sample", "{:,.0f}")]
WORKER = re.compile(r"^worker_step_s_(\d+)$")


def _send(job: jobs.Job, command: dict) -> None:
    try:
        rec = jobs.send_command(job, command)
    except UserError as exc:
        st.error(str(exc))
    else:
        st.toast(f"sent {command} (#{rec['seq']})")


def _controls(job: jobs.Job, current_mode: str) -> None:
    st.markdown(f"**Mode** now: `{current_mode}`")
    reason = jobs.capability_problem(job, "switch")
    cols = st.columns(len(SWITCH_MODES) + 1)
    for col, mode in zip(cols, SWITCH_MODES):
        if col.button(mode.upper() if mode != "auto" else "auto", key=f"live.switch.{mode}", disabled=reason is not None,
                      help=reason or f"switch the job to {mode}"):
            _send(job, {"cmd": "switch", "mode": mode})
    if reason:
        st.caption(f"Switching is off: {reason}.")
    st.markdown("**Straggler injection** (for demonstrations): `RANK:FACTOR` slows one worker, "
                "`random:P:FACTOR` slows a random worker with probability P per step, `none` clears it.")
    reason = jobs.capability_problem(job, "straggler")
    c1, c2 = st.columns([3, 1])
    spec = c1.text_input("straggler spec", value="1:3", key="live.straggler", disabled=reason is not None,
                         label_visibility="collapsed")
    if c2.button("Inject", key="live.inject", disabled=reason is not None, help=reason or "send to the job"):
        try:
            control.parse_straggler(spec)
        except UserError as exc:
            st.error(str(exc))
        else:
            _send(job, {"cmd": "straggler", "spec": spec.strip()})
    if reason:
        st.caption(f"Straggler injection is off: {reason}.")


def _cluster(uri: str, run_id: str, latest: dict[str, float]) -> None:
    st.subheader("Cluster")
    ranks = sorted(int(m.group(1)) for k in latest if (m := WORKER.match(k)))
    if not ranks:
        st.caption("No per-worker step times in this run (a single-process job has one worker: itself).")
        return
    straggler = int(latest["straggler_rank"]) if "straggler_rank" in latest else -1
    now = pd.DataFrame({"rank": [str(r) for r in ranks], "step_s": [latest[f"worker_step_s_{r}"] for r in ranks],
                        "straggler": [r == straggler for r in ranks]})
    c1, c2 = st.columns(2)
    c1.altair_chart(charts.bar(now, "rank", "step_s", highlight="straggler", title="step time per worker (latest)"),
                    width="stretch")
    over = data.histories(uri, [run_id], [f"worker_step_s_{r}" for r in ranks])
    if not over.empty:
        over["rank"] = over["metric"].str.rsplit("_", n=1).str[1]
        c2.altair_chart(charts.lines(over, "step", "value", "rank", title="step time per worker (s)"), width="stretch")
    if straggler >= 0:
        st.caption(f"Straggler: worker {straggler}")


def _series(uri: str, run_id: str, keys: list[str], latest: dict[str, float], title: str, empty: str) -> None:
    have = [k for k in keys if k in latest]
    if not have:
        st.caption(empty)
        return
    h = data.histories(uri, [run_id], have)
    st.altair_chart(charts.lines(h, "step", "value", "metric", title=title), width="stretch")


def _ams(latest: dict[str, float]) -> None:
    st.subheader("Image service")
    have = [(k, label, fmt) for k, label, fmt in AMS if k in latest]
    if not have:
        st.caption("This run logs no image-service traffic metrics (ams_*), e.g. a run with --features ids.")
        return
    for col, (k, label, fmt) in zip(st.columns(len(have)), have):
        col.metric(label, fmt.format(latest[k]))


@st.fragment(run_every=REFRESH_S)
def panel(job_id: str) -> None:
    try:
        job = jobs.get(job_id)
    except UserError as exc:
        st.error(str(exc))
        return
    c1, c2, c3 = st.columns([2, 2, 3])
    c1.markdown(f"**status** {ui.status(job.status)}")
    c2.markdown(f"**started** {ui.when(job.started)}")
    c3.code(job.command_line, language="bash")
    p = job.progress or {}
    if p.get("total"):
        st.progress(min(1.0, p["done"] / p["total"]), text=f"step {p['done']} of {p['total']}")
    uri = settings.tracking_uri()
    found = data.runs_for_job(uri, job.id)
    if not found:
        st.info("No MLflow run is tagged with this job yet (`vitrine.job_id`); the run's metrics appear here once "
                "the trainer has opened it.")
        _controls(job, "-")
        return
    run = data.run_info(uri, found[0])
    latest = run["metrics"]
    mode = data.MODE_NAMES.get(int(latest["mode_code"]), "?") if "mode_code" in latest else (run["mode"] or "single")
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("step", f"{p.get('done', '-')}")
    m2.metric("loss", f"{latest['loss']:.4f}" if "loss" in latest else "-")
    m3.metric("samples/s", f"{latest['samples_per_s']:,.0f}" if "samples_per_s" in latest else "-")
    m4.metric("mode", mode)
    _controls(job, mode)
    curves = data.histories(uri, [run["run_id"]], ["loss", "mode_code"])
    if not curves.empty and "loss" in set(curves["metric"]):
        curves["run"] = run["name"]
        bands = charts.mode_segments(curves[curves["metric"] == "mode_code"])
        rules = charts.switches_from_tags(run["tags"])
        rules = charts.with_wall(rules, curves[curves["metric"] == "loss"]).assign(run=run["name"]) if not rules.empty else None
        st.altair_chart(charts.metric_chart(curves, "loss", "step", bands, rules), width="stretch")
    _cluster(uri, run["run_id"], latest)
    st.subheader("Tokens and staleness")
    t1, t2 = st.columns(2)
    with t1:
        _series(uri, run["run_id"], TOKENS, latest, "tokens", "No token counts: they are logged in GBA mode.")
    with t2:
        _series(uri, run["run_id"], STALENESS, latest, "staleness (steps)",
                "No staleness: it is logged in async and GBA modes.")
    _ams(latest)
    base = settings.mlflow_url()
    if base:
        st.markdown(f"[This run in MLflow]({data.run_link(run, base)})")


def render() -> None:
    st.title("Live job")
    train = [j for j in jobs.list_jobs(limit=200) if j.kind == "train"]
    if not train:
        st.info("No training job yet. Start one from the **Launch** page; it shows here while it runs.")
        ui.ready("live")
        return
    ids = [j.id for j in train]
    if st.session_state.get("live.job") not in ids:
        running = [j.id for j in train if j.running]
        st.session_state["live.job"] = running[0] if running else ids[0]
    status = {j.id: j.status for j in train}
    job_id = st.selectbox("Training job", ids, key="live.job", format_func=lambda i: f"{i} ({status[i]})")
    panel(job_id)
    ui.ready("live")


auth.require()
render()
