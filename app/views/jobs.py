"""Jobs: everything in the job registry (launched here or from a terminal) with live status,
progress and log tail, and a Stop button (graceful first, forced after a timeout)."""

from __future__ import annotations

import threading

import pandas as pd
import streamlit as st

from app import auth, data, settings, ui
from vitrine import jobs
from vitrine.errors import UserError

REFRESH_S = 2.0
SHOWN = 200


def _progress_text(job: jobs.Job) -> tuple[float | None, str]:
    p = job.progress or {}
    done, total = p.get("done"), p.get("total")
    if not total:
        return None, ""
    frac = max(0.0, min(1.0, float(done) / float(total)))
    extra = p.get("stage") or ""
    return frac, f"{done}/{total}" + (f" · {extra}" if extra else "")


def _frame(all_jobs: list[jobs.Job]) -> pd.DataFrame:
    rows = []
    for j in all_jobs:
        frac, text = _progress_text(j)
        rows.append({"job": j.id, "kind": j.kind, "status": j.status, "progress": frac, "stage": text,
                     "started": pd.Timestamp.fromtimestamp(j.started) if j.started else pd.NaT,
                     "from": j.launcher, "pid": j.pid, "exit": j.exit_code, "command": j.command_line})
    return pd.DataFrame(rows)


def _stop_in_background(job: jobs.Job, timeout: float) -> None:
    """stop() waits up to `timeout` before forcing; the page must not wait with it."""
    def run() -> None:
        try:
            jobs.stop(job, timeout=timeout)
        except UserError:
            pass  # ended in the meantime

    threading.Thread(target=run, name=f"stop-{job.id}", daemon=True).start()


def _details(job: jobs.Job) -> None:
    st.subheader(job.id)
    c1, c2, c3, c4 = st.columns(4)
    c1.markdown(f"**status** {ui.status(job.status)}" + (" (stop requested)" if job.stop_requested and job.running else ""))
    c2.markdown(f"**kind** {job.kind} · from {job.launcher}")
    c3.markdown(f"**started** {ui.when(job.started)}")
    c4.markdown(f"**pid** {job.pid or '-'} · exit {job.exit_code if job.exit_code is not None else '-'}")
    st.code(job.command_line, language="bash")
    frac, text = _progress_text(job)
    if frac is not None:
        st.progress(frac, text=text)
    uri = settings.tracking_uri()
    runs = data.runs_for_job(uri, job.id)
    if runs:
        base = settings.mlflow_url()
        links = ", ".join(f"[{r[:8]}]({data.run_link(data.run_info(uri, r), base)})" if base else f"`{r}`" for r in runs)
        st.markdown(f"MLflow run(s): {links}")
    s1, s2, _ = st.columns([1, 1, 4])
    timeout = s2.number_input("force after (s)", min_value=0.0, max_value=3600.0, value=float(jobs.STOP_TIMEOUT_S),
                              step=5.0, key=f"jobs.timeout.{job.id}",
                              help="SIGTERM first (a training job checkpoints and ends); SIGKILL after this long")
    reason = None if job.running else f"the job is {job.status}"
    if job.running and job.stop_requested:
        reason = "a stop was already requested"
    if s1.button("Stop", key=f"jobs.stop.{job.id}", type="primary", disabled=reason is not None,
                 help=reason or "stop this job"):
        _stop_in_background(job, timeout)
        st.toast(f"Stopping {job.id}")
    if job.log:
        st.caption(f"log: {job.log}")
        st.code(job.tail(60) or "(no output yet)", language="text")
    else:
        st.caption("Started from a terminal: its output went there.")


@st.fragment(run_every=REFRESH_S)
def live() -> None:
    all_jobs = jobs.list_jobs(limit=SHOWN)
    if not all_jobs:
        st.info("No jobs yet. Start one from the **Launch** page, or run `vitrine generate/pipeline/train` in a "
                "terminal: those appear here too.")
        return
    kinds = st.multiselect("Kind", list(jobs.KINDS), default=list(jobs.KINDS), key="jobs.kinds")
    shown = [j for j in all_jobs if j.kind in kinds]
    frame = _frame(shown)
    st.dataframe(frame, hide_index=True, column_config={
        "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
        "started": st.column_config.DatetimeColumn("started", format="YYYY-MM-DD HH:mm:ss"),
    }, height=min(360, 38 + 35 * max(len(frame), 1)))
    if not shown:
        return
    ids = [j.id for j in shown]
    pick = st.session_state.get("jobs.selected")
    if pick not in ids:
        running = [j.id for j in shown if j.running]
        st.session_state["jobs.selected"] = running[0] if running else ids[0]
    chosen = st.selectbox("Job", ids, key="jobs.selected",
                          format_func=lambda i: f"{i} ({next(j.status for j in shown if j.id == i)})")
    _details(next(j for j in shown if j.id == chosen))


def render() -> None:
    st.title("Jobs")
    st.caption(f"Registry: `{jobs.jobs_root()}` · refreshes every {REFRESH_S:g} s")
    live()
    ui.ready("jobs")


auth.require()
render()
