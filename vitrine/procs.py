"""Starting a helper process of a job (image service, parameter-server shard) and waiting until it answers.

The child writes a ready file (atomically) once it accepts calls; the parent waits for that file, or
for the child's early death, whose log tail then goes into the error. The child runs in its own
session: a stop sent to the job's process group must not take it down while the trainer still
checkpoints through it; the job stops it after, and the child's `exit_with_parent` ends it if the
job dies first.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from vitrine.errors import UserError


class Spawned:
    def __init__(self, argv: list[str], ready: Path, log_path: Path, what: str, start_timeout_s: float = 600.0):
        self.what = what
        self.ready = Path(ready)
        self.ready.unlink(missing_ok=True)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.ready.exists():
                try:
                    self.info: dict[str, Any] = json.loads(self.ready.read_text())
                    break
                except ValueError:
                    pass
            if self.proc.poll() is not None:
                self._log.close()
                raise UserError(f"the {what} exited with code {self.proc.returncode} before it answered; "
                                f"its log {self.log_path} ends with:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"the {what} did not answer within {start_timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.05)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


def write_ready(path: str | Path, info: dict[str, Any]) -> None:
    import os

    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, p)
