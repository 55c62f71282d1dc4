"""The control channel: how the dashboard (or `vitrine job ...`) tells a running job what to do.

A job's channel is one append-only file, `control.jsonl`, in its registry directory. A writer
appends one JSON line per command under an exclusive `flock`, numbering it (`seq`) and stamping it
(`time`); a reader keeps a byte offset and returns only the lines it has not seen, so a job polls
it between steps at the cost of one `stat` when nothing is new. A file rather than a socket keeps
the channel alive across dashboard restarts and lets a command wait for a job that has not opened
it yet.

Commands (validated here, so a typo is refused before it reaches a job):

| command | meaning |
|---|---|
| `{"cmd": "stop"}` | finish the current step, checkpoint, exit (the sender also sends SIGTERM) |
| `{"cmd": "switch", "mode": "ar" \\| "gba" \\| "async" \\| "auto"}` | change the training mode |
| `{"cmd": "straggler", "spec": "RANK:FACTOR" \\| "random:P:FACTOR" \\| "none"}` | inject (or clear) a slow worker |
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from vitrine import paths
from vitrine.errors import UserError

FILE = "control.jsonl"
MODES = ("ar", "gba", "async", "auto")
COMMANDS = ("stop", "switch", "straggler")


def parse_straggler(spec: str) -> dict[str, Any]:
    """`RANK:FACTOR`, `random:P:FACTOR` or `none` -> a dict; UserError naming the spec otherwise."""
    s = spec.strip()
    bad = UserError(f"straggler spec {spec!r}: expected RANK:FACTOR (e.g. 1:3), random:P:FACTOR "
                    f"(e.g. random:0.1:4) or none")
    if s == "none":
        return {"kind": "none"}
    parts = s.split(":")
    try:
        if parts[0] == "random" and len(parts) == 3:
            p, factor = float(parts[1]), float(parts[2])
            if not (0 < p <= 1):
                raise UserError(f"straggler spec {spec!r}: the probability P must be in (0, 1], got {parts[1]}")
            kind: dict[str, Any] = {"kind": "random", "p": p}
        elif len(parts) == 2:
            rank, factor = int(parts[0]), float(parts[1])
            if rank < 0:
                raise UserError(f"straggler spec {spec!r}: RANK must be >= 0, got {rank}")
            kind = {"kind": "rank", "rank": rank}
        else:
            raise bad
    except ValueError:
        raise bad from None
    if not (math.isfinite(factor) and factor >= 1):
        raise UserError(f"straggler spec {spec!r}: FACTOR (how many times slower) must be >= 1, got {factor}")
    return {**kind, "factor": factor}


def validate(command: dict[str, Any]) -> dict[str, Any]:
    """The command as it will be written; UserError for an unknown command or a bad argument."""
    if not isinstance(command, dict) or command.get("cmd") not in COMMANDS:
        raise UserError(f"unknown control command {command!r}: expected cmd one of {', '.join(COMMANDS)}")
    cmd = command["cmd"]
    if cmd == "switch" and command.get("mode") not in MODES:
        raise UserError(f"switch: mode must be one of {', '.join(MODES)}, got {command.get('mode')!r}")
    if cmd == "straggler":
        if not isinstance(command.get("spec"), str):
            raise UserError("straggler: spec must be a string such as 1:3, random:0.1:4 or none")
        parse_straggler(command["spec"])
    return dict(command)


def _job_dir(job_id_or_dir: str | os.PathLike[str]) -> Path:
    p = Path(job_id_or_dir)
    if p.is_dir():
        return p
    return paths.job_dir(str(job_id_or_dir))


def send(job_id_or_dir: str | os.PathLike[str], command: dict[str, Any]) -> dict[str, Any]:
    """Append `command` to the job's channel; returns it with its `seq` and `time`."""
    command = validate(command)
    d = _job_dir(job_id_or_dir)
    if not d.is_dir():
        raise UserError(f"no job directory {d}")
    fd = os.open(d / FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        # The sequence number is the line count; under the lock no other writer can add a line.
        with open(d / FILE, "rb") as fh:
            seq = sum(1 for line in fh if line.endswith(b"\n")) + 1
        record = {**command, "seq": seq, "time": time.time()}
        os.write(fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
    finally:
        os.close(fd)  # closing drops the lock
    return record


class ControlReader:
    """Commands appended since the last `poll()`, in order. Cheap when nothing is new."""

    def __init__(self, job_dir: str | os.PathLike[str]):
        self.path = Path(job_dir) / FILE
        self.offset = 0

    def poll(self) -> list[dict[str, Any]]:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return []
        if size <= self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(size - self.offset)
        end = data.rfind(b"\n")
        if end < 0:
            return []  # a line being written; read it next time
        self.offset += end + 1
        out = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a foreign or damaged line is skipped, not fatal to the job
            if isinstance(rec, dict) and "cmd" in rec:
                out.append(rec)
        return out
