"""`vitrine serve`: a loaded model behind MLflow's scoring protocol, bound to exactly the host given.

`POST /invocations` takes `{"dataframe_records": [...]}` (also `dataframe_split`, `instances`,
`inputs`, CSV or Parquet bodies: what MLflow's clients send) and answers `{"predictions": [...]}`;
`GET /ping` (and `/health`) answers 200 once the model is loaded; a request the model cannot read
gets HTTP 400 with MLflow's JSON error shape (`error_code`, `message`), the message naming the field.

Two servers speak it. The default is a small threaded `http.server` (`LeanServer`): a request is
parsed into a DataFrame and handed straight to the model's `predict`, with Nagle's algorithm off and
each answer written in one piece; on this 2-core machine it keeps a one-row request's p99 within the
20 ms target (benchmarks/serve_bench.py). `--server mlflow` runs MLflow's own scoring server
(`mlflow.pyfunc.scoring_server`, FastAPI under uvicorn) over the same loaded model, the server
`mlflow models serve -m URI --env-manager local` starts: same protocol, a few ms more per request.
"""

from __future__ import annotations

import errno
import io
import json
import os
import socket
import sys
import time
from typing import Any

from vitrine import tracking
from vitrine.errors import UserError


def load(uri: str):
    """The pyfunc model at an MLflow model URI; UserError naming --model when it cannot be loaded."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tracking.setup()  # models:/ and runs:/ resolve through the tracking (and registry) store
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    import trainer.scoring  # noqa: F401 - imported before MLflow loads the model: its quiet class definition

    try:
        model = mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {uri}: cannot load it ({first}). Give models:/NAME@champion, models:/NAME/latest, "
                        f"models:/NAME/VERSION or runs:/RUN_ID/model; `vitrine model list` shows the names") from None
    return model


def check_address(host: str, port: int) -> None:
    """Refuse an address this process cannot listen on, before loading anything."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 0..65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UserError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            what = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be listened on ({exc.strerror})"
            raise UserError(f"--host {host} --port {port}: {what}; pick another --port (0 = any free one)") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def curl_line(host: str, port: int, records: list[dict[str, Any]]) -> str:
    """The command a user would type to score `records`."""
    body = json.dumps({"dataframe_records": records})
    return (f"curl -s http://{host}:{port}/invocations -H 'Content-Type: application/json' "
            f"-d '{body}'")


def example_records(model) -> list[dict[str, Any]]:
    """The model's stored input example as request records (empty if it has none)."""
    try:
        ex = model.input_example
    except Exception:  # noqa: BLE001
        return []
    if ex is None:
        return []
    return json.loads(ex.to_json(orient="records")) if hasattr(ex, "to_json") else list(ex)


def parse_request(body: bytes, content_type: str):
    """An /invocations body -> DataFrame, as MLflow's scoring server reads it; ValueError if unreadable."""
    import pandas as pd

    mime = (content_type or "").split(";")[0].strip().lower()
    if mime == "text/csv":
        return pd.read_csv(io.BytesIO(body))
    if mime == "application/vnd.apache.parquet":
        return pd.read_parquet(io.BytesIO(body))
    if mime != "application/json":
        raise LookupError(f"content type {content_type!r}: send application/json, text/csv or "
                          f"application/vnd.apache.parquet")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body: not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ValueError("body: expected a JSON object with dataframe_records, dataframe_split, instances or inputs")
    keys = [k for k in ("dataframe_records", "dataframe_split", "instances", "inputs") if k in doc]
    if len(keys) != 1:
        raise ValueError("body: expected exactly one of dataframe_records, dataframe_split, instances, inputs "
                         f"(got {sorted(doc)})")
    data = doc[keys[0]]
    if keys[0] == "dataframe_split":
        if not isinstance(data, dict) or "columns" not in data or "data" not in data:
            raise ValueError("dataframe_split: expected {\"columns\": [...], \"data\": [[...], ...]}")
        return pd.DataFrame(data["data"], columns=data["columns"])
    if isinstance(data, dict):  # column -> list of values
        return pd.DataFrame(data)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{keys[0]}: expected a list of records (objects)")
    return pd.DataFrame.from_records(data)


def _predictor(model):
    """A callable DataFrame -> predictions: a Vitrine model's own predict (it checks its input
    itself), or the pyfunc's (with MLflow's schema enforcement) for any other model."""
    try:
        inner = model.unwrap_python_model()
    except Exception:  # noqa: BLE001 - not a python_model pyfunc
        inner = None
    from trainer.scoring import ScoringModel

    if isinstance(inner, ScoringModel):
        return lambda df: inner.predict(None, df)
    return model.predict


MAX_BODY_BYTES = 64 * 2**20  # about 100k scored rows with long behaviour lists; larger files: `vitrine score`


def lean_server(model, host: str, port: int):
    """The threaded HTTP server over `model` (bound, not yet serving)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import mlflow
    import numpy as np
    from mlflow.exceptions import MlflowException

    predict = _predictor(model)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        disable_nagle_algorithm = True
        server_version = "vitrine-serve"

        def _send(self, status: int, payload: bytes, ctype: str = "application/json") -> None:
            head = (f"HTTP/1.1 {status} {self.responses.get(status, ('',))[0]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n").encode("latin-1")
            self.wfile.write(head + payload)  # one write: no small segment waiting on a delayed ACK

        def _error(self, status: int, code: str, message: str) -> None:
            self._send(status, json.dumps({"error_code": code, "message": message}).encode())

        def do_GET(self) -> None:  # noqa: N802
            if self.path in ("/ping", "/health"):
                self._send(200, b"\n")
            elif self.path == "/version":
                self._send(200, mlflow.__version__.encode())
            else:
                self._error(404, "ENDPOINT_NOT_FOUND", f"{self.path}: GET /ping, /health, /version; POST /invocations")

        def do_POST(self) -> None:  # noqa: N802
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_BODY_BYTES:  # a request's size is bounded before it is read
                self.close_connection = True
                self._error(413 if length > 0 else 400, "BAD_REQUEST",
                            f"Content-Length: expected 0..{MAX_BODY_BYTES} bytes (got {self.headers.get('Content-Length')})")
                return
            body = self.rfile.read(length) if length else b""
            if self.path != "/invocations":
                self._error(404, "ENDPOINT_NOT_FOUND", f"{self.path}: POST /invocations")
                return
            try:
                df = parse_request(body, self.headers.get("Content-Type", ""))
            except LookupError as exc:
                self._error(415, "BAD_REQUEST", str(exc))
                return
            except Exception as exc:  # noqa: BLE001 - any unreadable body is the client's
                self._error(400, "BAD_REQUEST", str(exc))
                return
            try:
                pred = predict(df)
            except MlflowException as exc:
                status = exc.get_http_status_code()
                self._error(status if status < 500 else 400, exc.error_code, exc.message)
                return
            except Exception as exc:  # noqa: BLE001
                self._error(500, "INTERNAL_ERROR", f"{type(exc).__name__}: {exc}")
                return
            out = pred.tolist() if isinstance(pred, np.ndarray) else json.loads(
                pred.to_json(orient="records")) if hasattr(pred, "to_json") else list(pred)
            self._send(200, json.dumps({"predictions": out}).encode())

        def log_message(self, format, *args) -> None:  # noqa: A002 - quiet: no line per request
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        request_queue_size = 128

    import socket as _socket

    Server.address_family = _socket.getaddrinfo(host, port, type=_socket.SOCK_STREAM)[0][0]
    return Server((host, port), Handler)


def serve(uri: str, host: str = "127.0.0.1", port: int = 5001, ready_file: str | None = None,
          threads: int = 1, server_kind: str = "vitrine") -> int:
    """Load the model at `uri` and serve it on host:port until SIGINT/SIGTERM. `threads`: torch's
    intra-op threads per request (1: a request of one row is fastest alone, and concurrent requests
    run side by side on the server's threads)."""
    import torch

    if threads < 1:
        raise UserError(f"--threads must be >= 1 (got {threads})")
    torch.set_num_threads(threads)
    if port:
        check_address(host, port)
    else:
        port = free_port(host)
    t0 = time.perf_counter()
    if server_kind not in ("vitrine", "mlflow"):
        raise UserError(f"--server {server_kind!r}: expected vitrine or mlflow")
    model = load(uri)
    loaded_s = time.perf_counter() - t0
    print(f"serving {uri} (loaded in {loaded_s:.1f} s) at http://{host}:{port}/invocations  (GET /ping: health)",
          flush=True)
    records = example_records(model)[:1]
    if records:
        print(f"try:  {curl_line(host, port, records)}", flush=True)
    if server_kind == "vitrine":
        return _serve_lean(model, host, port, ready_file)
    return _serve_mlflow(model, host, port, ready_file)


def _write_ready(ready_file: str | None, host: str, port: int) -> None:
    """For callers that start the server and wait on its port (`vitrine.procs.Spawned`: the demo, the
    benchmark, the tests): {"host", "port"}, written atomically once it accepts requests."""
    if ready_file:
        from vitrine.procs import write_ready

        write_ready(ready_file, {"host": host, "port": port})


def _serve_lean(model, host: str, port: int, ready_file: str | None) -> int:
    import signal

    httpd = lean_server(model, host, port)

    def stop(signum, frame):  # SIGTERM: finish like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    _write_ready(ready_file, host, port)
    try:
        httpd.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    print("server stopped", file=sys.stderr, flush=True)
    return 0


def _serve_mlflow(model, host: str, port: int, ready_file: str | None) -> int:
    import threading

    import uvicorn
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(model)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))

    def _mark() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            _write_ready(ready_file, host, port)

    threading.Thread(target=_mark, daemon=True).start()
    server.run()
    print("server stopped", file=sys.stderr, flush=True)
    return 0
