"""Small pieces every page uses: the page-ready marker, the MLflow link, time and status formats."""

from __future__ import annotations

import time

import streamlit as st

from app import settings

STATUS_COLORS = {"running": "blue", "finished": "green", "failed": "red", "stopped": "orange", "lost": "gray",
                 "unknown": "gray", "RUNNING": "blue", "FINISHED": "green", "FAILED": "red", "KILLED": "orange"}


def ready(page: str) -> None:
    """An invisible marker written last: its presence means the page rendered to the end (the
    page-speed benchmark and the browser tests wait for it)."""
    st.markdown(f'<div class="vitrine-ready" data-page="{page}"></div>', unsafe_allow_html=True)


def status(s: str) -> str:
    return f":{STATUS_COLORS.get(s, 'gray')}[{s}]"


def when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def mlflow_hint() -> None:
    base = settings.mlflow_url()
    if base:
        st.markdown(f"[Open the MLflow UI]({base})")
    else:
        st.caption("MLflow UI (not started with the dashboard; `vitrine dashboard --mlflow-ui` starts one):")
        st.code(settings.mlflow_ui_command(), language="bash")
