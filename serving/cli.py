"""`vitrine serve`, `vitrine score` and `vitrine model list|show|promote` (docs/SERVING.md)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vitrine.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a model over HTTP with MLflow's scoring protocol (POST /invocations)")
    s.add_argument("--model", required=True,
                   help="MLflow model URI: models:/NAME@champion, models:/NAME/latest, models:/NAME/VERSION or "
                        "runs:/RUN_ID/model")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=5001, help="port (0 = any free one) (default: 5001)")
    s.add_argument("--server", default="vitrine", choices=("vitrine", "mlflow"),
                   help="vitrine: a small threaded HTTP server (fastest); mlflow: MLflow's own scoring server "
                        "(FastAPI + uvicorn), as `mlflow models serve` runs it (default: vitrine)")
    s.add_argument("--threads", type=int, default=1, help="torch threads per request (default: 1)")
    s.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)  # written with the port once listening
    s.set_defaults(func=_serve)

    sc = sub.add_parser("score", help="score a Parquet or CSV file of impressions in batch")
    sc.add_argument("--model", required=True, help="MLflow model URI (as for `vitrine serve`)")
    sc.add_argument("--input", required=True,
                    help="FILE.parquet or FILE.csv: the user's ID columns (e.g. user_id, item_id), optionally "
                         "timestamp, and behaviors (clicked item IDs, newest last; in CSV separated by spaces)")
    sc.add_argument("--out", required=True, help="FILE.parquet or FILE.csv: the input's columns plus p_click")
    sc.add_argument("--batch-size", type=int, default=65_536, help="rows scored at once (default: 65536)")
    sc.set_defaults(func=_score)

    m = sub.add_parser("model", help="the model registry: list models, show versions, promote the champion")
    msub = m.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    ls = msub.add_parser("list", help="registered models with their newest and champion versions")
    ls.set_defaults(func=_model_list)
    sh = msub.add_parser("show", help="the versions of a registered model: run, test AUC, aliases")
    sh.add_argument("name")
    sh.set_defaults(func=_model_show)
    pr = msub.add_parser("promote", help="give a version the champion alias (models:/NAME@champion)")
    pr.add_argument("name")
    pr.add_argument("version", nargs="?", type=int, default=None, help="default: the newest version")
    pr.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    pr.set_defaults(func=_model_promote)


def _serve(args: argparse.Namespace) -> int:
    from serving.server import serve

    return serve(args.model, args.host, args.port, args.ready_file, args.threads, args.server)


def _read(path: Path):
    import pandas as pd

    if not path.is_file():
        raise UserError(f"--input {path}: no such file")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        if path.suffix == ".csv":
            return pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow and pandas raise many types for a bad file
        raise UserError(f"--input {path}: not readable as {path.suffix[1:]} ({exc})") from None
    raise UserError(f"--input {path}: expected a .parquet or .csv file")


def _score(args: argparse.Namespace) -> int:
    import numpy as np
    from mlflow.exceptions import MlflowException

    from serving.server import load

    inp, out = Path(args.input), Path(args.out)
    if out.suffix not in (".parquet", ".csv"):
        raise UserError(f"--out {out}: expected a .parquet or .csv file name")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    df = _read(inp)
    model = load(args.model)
    t0 = time.perf_counter()
    parts = []
    for start in range(0, len(df), args.batch_size):
        chunk = df.iloc[start:start + args.batch_size].reset_index(drop=True)
        try:
            parts.append(np.asarray(model.predict(chunk), dtype=np.float64).reshape(-1))
        except MlflowException as exc:
            raise UserError(f"--input {inp}: rows {start}..{start + len(chunk) - 1}: {exc.message}") from None
    p = np.concatenate(parts) if parts else np.empty(0)
    result = df.assign(p_click=p)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".parquet":
        result.to_parquet(tmp, index=False)
    else:
        result.to_csv(tmp, index=False)
    tmp.replace(out)
    print(f"scored {len(df):,} rows in {time.perf_counter() - t0:.2f} s -> {out}")
    return 0


def _ts(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000)) if ms else "-"


def _model_list(args: argparse.Namespace) -> int:
    from trainer import registry

    c = registry.client()
    names = registry.names(c)
    if not names:
        print("no registered models yet: every finished `vitrine train` run registers one (vitrine-<dataset>)")
        return 0
    print(f"{'model':<32} {'versions':>8} {'newest':>6} {'champion':>8}  serve with")
    for name in names:
        vs = registry.versions(name, c, with_runs=False)
        champ = registry.champion(name, c)
        print(f"{name:<32} {len(vs):>8} {vs[0].version if vs else '-':>6} {champ if champ else '-':>8}  "
              f"{'models:/' + name + '@champion' if champ else 'vitrine model promote ' + name}")
    return 0


def _model_show(args: argparse.Namespace) -> int:
    from trainer import registry

    vs = registry.versions(args.name)
    print(f"{args.name}: {len(vs)} version(s)")
    print(f"{'version':>7}  {'created':<16} {'test AUC':>8}  {'aliases':<12} run")
    for v in vs:
        auc = f"{v.test_auc:.4f}" if v.test_auc is not None else "-"
        print(f"{v.version:>7}  {_ts(v.created_ms):<16} {auc:>8}  {','.join(v.aliases) or '-':<12} {v.run_id or '-'}")
    return 0


def _model_promote(args: argparse.Namespace) -> int:
    from trainer import registry

    if not args.alias or not args.alias.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"--alias {args.alias!r}: letters, digits, '_' and '-' only")
    v = registry.promote(args.name, args.version, args.alias)
    print(f"{args.name} version {v.version} is now @{args.alias} (run {v.run_id}); serve it with "
          f"`vitrine serve --model models:/{args.name}@{args.alias}`")
    return 0
