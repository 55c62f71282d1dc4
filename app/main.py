"""Streamlit entry point of the Vitrine dashboard (`vitrine dashboard` starts it; see app/server.py).

The pages live in `app/views/`, not `pages/`: Streamlit treats a `pages/` folder beside the entry
point as a legacy multipage app whose files can be opened directly, skipping this script (and with it
the access check); `st.navigation` below is the only way in.

Streamlit puts this file's folder first on sys.path, where `app/data.py` and friends would shadow
any top-level module of the same name; the folder is taken off and the repository put on instead,
so the pages import `app.data`, never `data`.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import streamlit as st  # noqa: E402

from app import auth  # noqa: E402

st.set_page_config(page_title="Vitrine", page_icon=":material/storefront:", layout="wide")

if not auth.gate():
    st.stop()

PAGES = [
    st.Page("views/runs.py", title="Runs", icon=":material/table_chart:", url_path="runs", default=True),
    st.Page("views/launch.py", title="Launch", icon=":material/rocket_launch:", url_path="launch"),
    st.Page("views/jobs.py", title="Jobs", icon=":material/list:", url_path="jobs"),
    st.Page("views/live_job.py", title="Live job", icon=":material/monitor_heart:", url_path="live"),
    st.Page("views/datasets.py", title="Data", icon=":material/dataset:", url_path="data"),
    st.Page("views/images.py", title="Images", icon=":material/image:", url_path="images"),
    st.Page("views/benchmarks.py", title="Benchmarks", icon=":material/speed:", url_path="benchmarks"),
]
st.navigation(PAGES).run()
