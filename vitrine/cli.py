"""The `vitrine` command. Each part registers its own subcommands from its own `cli` module, so the
code of a job lives beside the package it drives and this file only dispatches."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from vitrine.errors import UserError

# (module, function) pairs; each `register(subparsers)` adds one or more subcommands whose parsers
# set `func` to the callable that runs them.
_PARTS = [
    "pipeline.cli",
    "image_service.cli",
    "trainer.cli",
    "serving.cli",
    "vitrine.demo",
    "app.cli",
]

# Commands that are jobs: started from a terminal they register themselves in the job registry
# (vitrine/jobs.py), so the dashboard lists them beside the jobs it launched.
JOB_COMMANDS = ("generate", "pipeline", "train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitrine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in _PARTS:
        importlib.import_module(mod).register(sub)
    return parser


def _register_job(command: str, argv: list[str] | None) -> str | None:
    """Record a CLI-started job; a registry that cannot be written costs a warning, not the job."""
    if command not in JOB_COMMANDS or os.environ.get("VITRINE_JOB_ID"):
        return None
    try:
        from vitrine import jobs

        return jobs.register_current(command, list(sys.argv[1:] if argv is None else argv)).id
    except Exception as exc:  # noqa: BLE001 - never break the command for its registry entry
        print(f"vitrine: warning: could not record this job in the job registry: {exc}", file=sys.stderr)
        return None


def _record_exit(job_id: str, rc: int) -> None:
    os.environ.pop("VITRINE_JOB_ID", None)  # an in-process caller (a test) runs its next command afresh
    try:
        from vitrine import jobs

        jobs.record_exit(job_id, rc)
    except Exception as exc:  # noqa: BLE001
        print(f"vitrine: warning: could not record the job's exit code: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    job_id = _register_job(args.command, argv)
    rc = 1  # an exception escaping below is a failure
    try:
        try:
            rc = int(args.func(args) or 0)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            rc = 130
        except UserError as exc:
            print(f"vitrine {args.command}: error: {exc}", file=sys.stderr)
            rc = 2
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            raise
        return rc
    finally:
        if job_id is not None:
            _record_exit(job_id, rc)


if __name__ == "__main__":
    sys.exit(main())
