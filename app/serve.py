"""The dashboard process: `python -m app.serve MAIN_SCRIPT [streamlit run options]`.

Streamlit imports a page's modules on the first visit, and MLflow alone takes about 3 s to import
here: the first visitor would wait for it. This entry point imports the heavy modules and opens the
tracking store in a background thread while Streamlit starts, then hands over to Streamlit's own
command line (`streamlit run`) unchanged.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

READY_ENV = "VITRINE_DASHBOARD_READY_FILE"  # touched when the warm-up is done (app/server.py waits for it)


def _warm_up() -> None:
    try:
        import altair  # noqa: F401
        import mlflow.tracking  # noqa: F401
        import pandas  # noqa: F401
        import pyarrow.parquet  # noqa: F401

        from app import charts, data, forms, settings  # noqa: F401
        from vitrine import tracking

        uri = settings.tracking_uri()
        if uri == tracking.tracking_uri():
            tracking.setup()
        data.runs(uri)  # the run list, read once before the first visitor asks for it
        for command in forms.COMMANDS:
            forms.form_spec(command)  # imports the job modules the Launch forms are built from
    except Exception as exc:  # noqa: BLE001 - a failed warm-up only costs the first page its speed
        print(f"vitrine dashboard: warm-up failed ({exc}); pages will load it on demand", file=sys.stderr)
    finally:
        ready = os.environ.get(READY_ENV)
        if ready:
            Path(ready).touch()


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m app.serve MAIN_SCRIPT [--server.port N ...]")
    threading.Thread(target=_warm_up, name="vitrine-warm-up", daemon=True).start()
    from streamlit.web import cli

    cli.main(args=["run", *argv], prog_name="streamlit")


if __name__ == "__main__":
    main(sys.argv[1:])
