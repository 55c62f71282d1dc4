"""`vitrine dashboard` and `vitrine job ...`: the dashboard server, and the job registry from a
terminal (list, stop, switch a training job's mode, inject a straggler, show a log)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("dashboard", help="the Streamlit dashboard over the tracking store and the job registry")
    d.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but a loopback address needs --token (default: 127.0.0.1)")
    d.add_argument("--port", type=int, default=8501, help="port (0 = any free port) (default: 8501)")
    d.add_argument("--token", default=None,
                   help="access token the browser must present (?token=...); default $VITRINE_DASHBOARD_TOKEN, "
                        "which is better: other local users can read a command line in `ps`")
    d.add_argument("--mlflow-url", default=None,
                   help="base URL of an MLflow UI to link runs into (default $VITRINE_MLFLOW_URL; none: show the "
                        "`mlflow ui` command instead)")
    d.add_argument("--mlflow-ui", action="store_true",
                   help="also start `mlflow ui` on 127.0.0.1 (a free port) and link runs into it")
    d.set_defaults(func=_dashboard)

    j = sub.add_parser("job", help="list and steer jobs (the dashboard's Jobs page, in a terminal)")
    jsub = j.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    ls = jsub.add_parser("list", help="jobs in the registry, newest first")
    ls.add_argument("--all", action="store_true", help="every job (default: the 30 newest)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_job_list)
    st = jsub.add_parser("stop", help="stop a job: SIGTERM (a trainer checkpoints and ends), SIGKILL after --timeout")
    st.add_argument("job")
    st.add_argument("--timeout", type=float, default=30.0, help="seconds before forcing (default: 30)")
    st.set_defaults(func=_job_stop)
    sw = jsub.add_parser("switch", help="switch a training job's mode")
    sw.add_argument("job")
    sw.add_argument("mode", choices=("ar", "gba", "async", "auto"))
    sw.set_defaults(func=_job_switch)
    sg = jsub.add_parser("straggler", help="inject a slow worker: RANK:FACTOR, random:P:FACTOR or none")
    sg.add_argument("job")
    sg.add_argument("spec")
    sg.set_defaults(func=_job_straggler)
    lg = jsub.add_parser("log", help="the last lines of a launched job's log")
    lg.add_argument("job")
    lg.add_argument("-n", type=int, default=40, help="lines (default: 40)")
    lg.set_defaults(func=_job_log)


def _dashboard(args: argparse.Namespace) -> int:
    from app import server, settings
    from vitrine import tracking
    from vitrine.errors import UserError

    token = args.token if args.token is not None else (os.environ.get(settings.TOKEN_ENV) or None)
    server.check_bind(args.host, token)  # before starting anything
    uri = tracking.tracking_uri()
    mlflow_url = args.mlflow_url or os.environ.get(settings.MLFLOW_URL_ENV)
    ui_proc = proc = None
    server.interrupt_on_sigterm()  # a `kill` stops the servers too, not only this process
    try:
        try:
            if args.mlflow_ui and not mlflow_url:
                print("starting mlflow ui ...", flush=True)
                mlflow_url, ui_proc = server.start_mlflow_ui(uri)
            address, proc = server.start(args.host, args.port, token, uri, mlflow_url=mlflow_url)
        except RuntimeError as exc:  # a server that did not come up: one line, not a traceback
            raise UserError(str(exc)) from None
        print(f"Vitrine dashboard: {server.page_url(address, '', token)}", flush=True)
        print(f"  tracking {uri}", flush=True)
        if mlflow_url:
            print(f"  MLflow UI {mlflow_url}", flush=True)
        print("  Ctrl-C to stop (jobs it started keep running)", flush=True)
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, whenever it comes: the servers stop below
        return 0
    finally:
        for p in (proc, ui_proc):
            if p is not None:
                server.stop(p)


def _job_list(args: argparse.Namespace) -> int:
    from vitrine import jobs

    found = jobs.list_jobs(limit=None if args.all else 30)
    if args.json:
        print(json.dumps([{"id": j.id, "kind": j.kind, "status": j.status, "pid": j.pid, "started": j.started,
                           "exit_code": j.exit_code, "progress": j.progress, "argv": j.argv,
                           "capabilities": j.capabilities} for j in found], indent=1))
        return 0
    if not found:
        print(f"no jobs in {jobs.jobs_root()}")
        return 0
    try:
        print(f"{'JOB':34} {'KIND':8} {'STATUS':9} {'PROGRESS':>9} {'STARTED':19}  COMMAND")
        for j in found:
            p = j.progress or {}
            prog = f"{100 * p['done'] / p['total']:.0f}%" if p.get("total") else "-"
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.started)) if j.started else "-"
            print(f"{j.id:34} {j.kind:8} {j.status:9} {prog:>9} {started:19}  {j.command_line}", flush=True)
    except BrokenPipeError:  # `vitrine job list | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _job_stop(args: argparse.Namespace) -> int:
    from vitrine import jobs

    job = jobs.get(args.job)
    print(f"stopping {job.id} (forced after {args.timeout:g} s) ...", flush=True)
    job = jobs.stop(job, timeout=args.timeout)
    print(f"{job.id}: {job.status}" + (f" (exit {job.exit_code})" if job.exit_code is not None else ""))
    return 0


def _job_switch(args: argparse.Namespace) -> int:
    from vitrine import jobs

    rec = jobs.send_command(jobs.get(args.job), {"cmd": "switch", "mode": args.mode})
    print(f"sent switch to {args.mode} to {args.job} (#{rec['seq']})")
    return 0


def _job_straggler(args: argparse.Namespace) -> int:
    from vitrine import jobs

    rec = jobs.send_command(jobs.get(args.job), {"cmd": "straggler", "spec": args.spec})
    print(f"sent straggler {args.spec} to {args.job} (#{rec['seq']})")
    return 0


def _job_log(args: argparse.Namespace) -> int:
    from vitrine import jobs

    job = jobs.get(args.job)
    if not job.log:
        print(f"{job.id} was started from a terminal; its output went there", file=sys.stderr)
        return 1
    print(job.tail(args.n))
    return 0
