"""Launch: a form per job (generate, pipeline, train) built from its config dataclass; checked
before anything starts, each problem shown under its field; a valid form starts a detached job."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import streamlit as st

from app import auth, data, forms, settings, ui
from vitrine import jobs

LABELS = {"generate": "Generate a synthetic world", "pipeline": "Process a raw source (pipeline)",
          "train": "Train the DICM"}


def _free_name(base: Path, stem: str) -> Path:
    p = base / stem
    i = 2
    while p.exists():
        p = base / f"{stem}{i}"
        i += 1
    return p


def _form_defaults(command: str) -> dict[str, Any]:
    """Starting values that point at this data root's datasets rather than at relative defaults."""
    root = settings.data_root()
    if command == "generate":
        return {"out": str(_free_name(root / "raw", "world"))}
    if command == "pipeline":
        raws = data.raw_sources(root)
        raw = raws[0] if raws else root / "raw" / "demo"
        return {"raw": str(raw), "out": str(root / "processed" / raw.name)}
    if command == "train":
        found = data.processed_datasets(root)
        return {"dataset": str(found[0] if found else root / "processed" / "demo")}
    return {}


def _widget(f: forms.Field, start: Any, key: str) -> Any:
    label = f.label + (" *" if f.required else "")
    if f.kind == "bool":
        return st.checkbox(label, value=bool(start), help=f.help, key=key)
    if f.kind == "choice":
        return st.selectbox(label, list(f.choices), index=list(f.choices).index(start), help=f.help, key=key)
    if f.kind == "lines":
        return st.text_area(label, value=forms.to_text(f, start), help=f.help + " (one per line)", key=key, height=80)
    return st.text_input(label, value=forms.to_text(f, start), help=f.help, key=key)


def render_form(command: str) -> None:
    spec = forms.form_spec(command)
    starts = _form_defaults(command)
    slots: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    with st.form(f"launch-{command}"):
        top = st.empty()
        basic = [f for f in spec.fields if f.name in spec.basic]
        rest = [f for f in spec.fields if f.name not in spec.basic]
        cols = st.columns(2)
        for i, f in enumerate(basic):
            with cols[i % 2]:
                raw[f.name] = _widget(f, starts.get(f.name, f.default), f"{command}.{f.name}")
                slots[f.name] = st.empty()
        with st.expander(f"More settings ({len(rest)})"):
            cols = st.columns(2)
            for i, f in enumerate(rest):
                with cols[i % 2]:
                    raw[f.name] = _widget(f, starts.get(f.name, f.default), f"{command}.{f.name}")
                    slots[f.name] = st.empty()
        b1, b2, _ = st.columns([1, 1, 6])
        checked = b1.form_submit_button("Check")
        launched = b2.form_submit_button("Launch", type="primary")
    if not (checked or launched):
        return
    argv, errors = forms.prepare(command, raw, Path(os.getcwd()))
    if errors:
        for name, msg in errors.items():
            (slots.get(name) or top).error(msg)
        top.error(f"Nothing was launched: {len(errors)} setting(s) need attention (marked below).")
        return
    assert argv is not None
    st.code("vitrine " + shlex.join(argv), language="bash")
    if launched:
        job = jobs.launch(argv, command)
        st.session_state["launch.last_job"] = job.id
        st.success(f"Started job `{job.id}` (pid {job.wrapper_pid}); it keeps running if you close this page.")
        st.page_link("views/jobs.py", label="Follow it on the Jobs page", icon=":material/list:")
    else:
        st.success("All settings are valid. Launch starts exactly this command.")


def render() -> None:
    st.title("Launch")
    st.caption(f"Jobs run as their own processes under `{jobs.jobs_root()}`; datasets go under `{settings.data_root()}`.")
    command = st.radio("Job", forms.COMMANDS, format_func=LABELS.get, horizontal=True, key="launch.command")
    render_form(command)
    ui.ready("launch")


auth.require()
render()
