"""Start the dashboard (and optionally an MLflow UI) as subprocesses and wait until they answer.

Used by `vitrine dashboard`, the demo, the browser tests and the page-speed benchmark, so all of
them run the same server the same way: `python -m app.serve` (Streamlit with a warm-up, see there),
headless, no usage statistics, no file watcher, bound to the address asked for. Binding anywhere
but a loopback address requires an access token; this is checked here, before anything starts,
and again by every page (app/auth.py), in case Streamlit is started some other way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from app import settings
from app.serve import READY_ENV
from vitrine.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
MAIN = Path(__file__).resolve().parent / "main.py"


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token, or with a token too short to mean anything."""
    if token is not None and len(token) < settings.MIN_TOKEN_LEN:
        raise UserError(f"--token must be at least {settings.MIN_TOKEN_LEN} characters")
    if not settings.is_loopback(host) and not token:
        raise UserError(
            f"refusing to listen on {host or 'every interface'} without an access token: the dashboard can start "
            f"processes, so anyone who reaches it could run code as you. Pass --token TOKEN (or set "
            f"{settings.TOKEN_ENV}), or listen on 127.0.0.1 (the default)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _ExitedEarly(RuntimeError):
    """The server exited before it answered (for a port picked here: most likely taken in between)."""


def _on_a_free_port(launch, host: str = "127.0.0.1", attempts: int = 3):
    """`launch(port)` on a port free when picked. The server binds it only seconds later and another
    process may take it first; then the server exits at once, and a new port is tried."""
    for attempt in range(attempts):
        try:
            return launch(free_port(host))
        except _ExitedEarly:
            if attempt == attempts - 1:
                raise


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]") if host != "localhost" else "127.0.0.1", port))
        except OSError:
            return False
    return True


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)


def _url(host: str, port: int) -> str:
    h = _connect_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def _wait(proc: subprocess.Popen, url: str, timeout: float, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise _ExitedEarly(f"{what} exited with code {proc.returncode} before answering{': ' + tail if tail else ''}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s")
        time.sleep(0.1)


def start(host: str = "127.0.0.1", port: int = 8501, token: str | None = None, tracking_uri: str | None = None, *,
          data_root: str | Path | None = None, mlflow_url: str | None = None, log: Path | None = None,
          timeout: float = 120.0, env: dict[str, str] | None = None) -> tuple[str, subprocess.Popen]:
    """Start the dashboard; returns (base address to open, process) once it answers its health check.

    `port=0` picks a free port. `token=None` falls back to $VITRINE_DASHBOARD_TOKEN. The tracking URI
    and data root default to this process's. Output goes to `log` (None: inherited).
    """
    token = token if token is not None else (os.environ.get(settings.TOKEN_ENV) or None)
    check_bind(host, token)
    if port == 0:
        return _on_a_free_port(lambda p: start(host, p, token, tracking_uri, data_root=data_root, mlflow_url=mlflow_url,
                                               log=log, timeout=timeout, env=env), _connect_host(host))
    if not _port_free(host, port):
        raise UserError(f"port {port} on {host} is in use (another dashboard?); pass --port 0 for any free port")
    child_env = {**os.environ, **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), child_env.get("PYTHONPATH", "")) if p)
    child_env["MLFLOW_TRACKING_URI"] = tracking_uri or settings.tracking_uri()
    child_env["VITRINE_DATA"] = str(Path(data_root).resolve()) if data_root else str(settings.data_root())
    child_env.pop(settings.TOKEN_ENV, None)
    if token:
        child_env[settings.TOKEN_ENV] = token
    if mlflow_url:
        child_env[settings.MLFLOW_URL_ENV] = mlflow_url
    fd, ready_name = tempfile.mkstemp(prefix="vitrine-dashboard-ready-")
    os.close(fd)
    ready = Path(ready_name)
    ready.unlink()
    child_env[READY_ENV] = str(ready)
    cmd = [sys.executable, "-m", "app.serve", str(MAIN),
           "--server.address", host, "--server.port", str(port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
           "--server.runOnSave", "false", "--client.toolbarMode", "minimal"]
    out = _open_log(log) if log else None
    try:
        proc = subprocess.Popen(cmd, env=child_env, cwd=os.getcwd(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()
    address = _url(host, port)
    t0 = time.monotonic()
    try:
        _wait(proc, f"{address}/_stcore/health", timeout, "the dashboard", log)
        # Then the warm-up (imports, store): the first visitor should not pay for it.
        while not ready.exists() and proc.poll() is None and time.monotonic() - t0 < timeout:
            time.sleep(0.05)
    except BaseException:
        stop(proc)
        raise
    finally:
        ready.unlink(missing_ok=True)
    return address, proc


def page_url(address: str, page: str = "", token: str | None = None) -> str:
    """The address of a page (its url path, e.g. "jobs"), with the token when there is one."""
    url = f"{address}/{page}"
    return url + (f"?{urllib.parse.urlencode({'token': token})}" if token else "")


def start_mlflow_ui(tracking_uri: str, port: int = 0, log: Path | None = None,
                    timeout: float = 120.0) -> tuple[str, subprocess.Popen]:
    """`mlflow ui` on 127.0.0.1 over the same store, for the dashboard's run links (`port=0`: a free one)."""
    if port == 0:
        return _on_a_free_port(lambda p: start_mlflow_ui(tracking_uri, p, log, timeout))
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    out = _open_log(log) if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(proc, f"{url}/health", timeout, "mlflow ui", log)
    except BaseException:
        stop(proc)
        raise
    return url, proc


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _open_log(log: Path):
    log.parent.mkdir(parents=True, exist_ok=True)  # a fresh data root has no folder for it yet
    return open(log, "ab")


def _raise_interrupt(_sig: int, _frame: object) -> None:
    raise KeyboardInterrupt


def interrupt_on_sigterm() -> None:
    """Make a `kill` (SIGTERM) of this process act like Ctrl-C: Python's default SIGTERM ends the process
    without running `finally`, which left the servers it had started running on their ports."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
