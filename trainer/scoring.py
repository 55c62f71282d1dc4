"""Raw impressions in, click probabilities out: the MLflow pyfunc model a training run logs.

A request row names its IDs as the user's logs do (the columns `source.toml` mapped: e.g.
`user_id`, `item_id`, `timestamp`) plus `behaviors`, the user's clicked item IDs, newest last. The
`RawEncoder` turns such rows into the loader's batch format exactly as the pipeline built the shards
(docs/DATA.md): the user's and the item's encoded attributes from the dataset's lookup tables, the
hour of day from the timestamp, the behaviour lists (the last L, oldest first) with each clicked
item's attributes and image row. IDs the dataset does not know encode as out-of-vocabulary (index
1; image row 0, the grey placeholder), as the trainer saw cold items. A row that cannot be read
(a required field missing or empty, a timestamp that does not parse, behaviours that are not a list)
raises `BadInput` naming the field; MLflow's scoring server answers it with HTTP 400.

The encoder's files (`spec.json`, `items.parquet`, `users.parquet`, `hour.parquet`) travel inside the
model as its `encoder` artifact, beside the pickled `CTRPredictor` (`trainer/serving.py`).
"""

from __future__ import annotations

import json
import time
import warnings
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.vocab import OOV

# MLflow warns about every PythonModel whose `predict` has no type hints (its own too, on import),
# forcing the warning on inside; requests here are DataFrames of raw IDs that RawEncoder checks, not
# typed inputs for MLflow to validate, so the warning is not shown.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    import mlflow.pyfunc

BEHAVIORS = "behaviors"
HOUR_MS = 3_600_000
NOBODY = np.iinfo(np.int64).min  # the key of an ID that cannot be one
UNIT_MS = {"s": 1000, "ms": 1, "us": 1e-3, "ns": 1e-6, "m": 60_000, "h": 3_600_000, "D": 86_400_000}


class BadInput(ValueError):
    """A request the encoder cannot read; the message starts with the field's name."""


def _lookup_tables(ds) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, users) lookup tables of a processed dataset: raw `id` plus encoded attribute columns.
    Datasets built before the pipeline wrote `lookup/` get them rebuilt from the shards and vocabularies
    (every ID seen in any split under a known index; IDs only seen as out-of-vocabulary are left out)."""
    look = ds.manifest.get("lookup") or {}
    if look.get("items") and (ds.dir / look["items"]).is_file():
        return pd.read_parquet(ds.dir / look["items"]), pd.read_parquet(ds.dir / look["users"])
    fields = {f["name"]: f for f in ds.fields}
    item_cols = [n for n, f in fields.items() if f["kind"] == "categorical" and f.get("group") == "ad"]
    user_cols = [n for n, f in fields.items() if f["kind"] == "categorical" and f.get("group") == "user"]
    extra = ["ad_image"] if "ad_image" in fields else []
    frames = [pd.read_parquet(p, columns=item_cols + user_cols + extra) for s in ds.splits for p in ds.shards(s)]
    rows = pd.concat(frames, ignore_index=True)

    def table(key: str, cols: list[str]) -> pd.DataFrame:
        t = rows[rows[key] != OOV].drop_duplicates(key)[cols]
        vocab = pd.read_parquet(ds.dir / "vocab" / f"{fields[key]['vocab']}.parquet")
        raw = pd.Series(vocab["id"].to_numpy(), index=vocab["index"].to_numpy())
        return t.assign(id=raw.reindex(t[key].to_numpy()).to_numpy()).reset_index(drop=True)

    items = table("item_id", item_cols + extra).rename(columns={"ad_image": "image_row"})
    return items, table("user_id", user_cols)


def write_encoder(ds, predictor, out: Path) -> dict[str, Any]:
    """Write the encoder's files for a model trained on `ds` (a `trainer.dataset.Dataset`) into `out`;
    returns the spec."""
    out.mkdir(parents=True, exist_ok=True)
    items, users = _lookup_tables(ds)
    model = predictor.model
    fmap = model.fmap
    src = (ds.manifest.get("source") or {})
    columns = {"user": "user_id", "item": "item_id", "timestamp": "timestamp",
               **{k: v for k, v in ((src.get("impressions") or {}).get("columns") or {}).items()
                  if k in ("user", "item", "timestamp")}}
    fields = []
    for f in fmap.categorical:
        source = ("user" if f.name in users.columns else "item" if f.name in items.columns
                  else "hour" if f.name == "hour" else "oov")
        fields.append({"name": f.name, "source": source})
    sequences = []
    for f in fmap.sequences:
        col = f.name[len("hist_"):] if f.name.startswith("hist_") else f.name
        sequences.append({"name": f.name, "source": col if col in items.columns else "oov"})
    names = {f.name for f in fmap.sequences} | {"hist_image"}
    spec = {
        "format": 1,
        "dataset": {"name": ds.manifest.get("name"), "dir": str(ds.dir), "pipeline_run_id": ds.manifest.get("mlflow_run_id")},
        "columns": columns,
        "behaviors": BEHAVIORS,
        "timestamp_unit": src.get("timestamp_unit", "s"),
        "max_len": next((w for n, w in predictor.layout if n in names), 0),
        "fields": fields,
        "sequences": sequences,
        "ad_image": bool(model.uses_ad_image),
        "hist_image": bool(model.uses_hist_images),
        "user_key": "int" if pd.api.types.is_integer_dtype(users["id"].dtype) else "str",
        "item_key": "int" if pd.api.types.is_integer_dtype(items["id"].dtype) else "str",
    }
    (out / "spec.json").write_text(json.dumps(spec, indent=2))
    items.to_parquet(out / "items.parquet", index=False)
    users.to_parquet(out / "users.parquet", index=False)
    hour_field = next((f for f in ds.fields if f["name"] == "hour"), None)
    if hour_field is not None:
        pd.read_parquet(ds.dir / "vocab" / f"{hour_field['vocab']}.parquet").to_parquet(out / "hour.parquet", index=False)
    return spec


def input_example(root: Path) -> pd.DataFrame:
    """Two request rows of known IDs (the encoder's files at `root`), for the model's page and docs."""
    spec = json.loads((Path(root) / "spec.json").read_text())
    items = pd.read_parquet(Path(root) / "items.parquet", columns=["id"])["id"].tolist()
    users = pd.read_parquet(Path(root) / "users.parquet", columns=["id"])["id"].tolist()
    c = spec["columns"]
    return pd.DataFrame({c["user"]: users[:2] * (2 // max(len(users[:2]), 1)), c["item"]: (items * 2)[:2],
                         c["timestamp"]: ["2026-01-08T12:00:00Z"] * 2,
                         spec["behaviors"]: [(items * 3)[1:4], []]})


def model_signature(spec: dict[str, Any]):
    """The request columns (any type: IDs are ints or strings, as the logs have them; `timestamp` may
    be left out, and then means now) and one probability per row."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    c = spec["columns"]
    inputs = Schema([ColSpec(AnyType(), c["user"]), ColSpec(AnyType(), c["item"]),
                     ColSpec(AnyType(), c["timestamp"], required=False), ColSpec(AnyType(), spec["behaviors"])])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("double")]))


class RawEncoder:
    """Raw request rows -> the loader's batch (int64 tensors by field name). Built from the files
    `write_encoder` wrote."""

    def __init__(self, root: Path):
        root = Path(root)
        self.spec = spec = json.loads((root / "spec.json").read_text())
        self.user_col, self.item_col = spec["columns"]["user"], spec["columns"]["item"]
        self.ts_col = spec["columns"]["timestamp"]
        self.max_len = int(spec["max_len"])
        items = pd.read_parquet(root / "items.parquet")
        users = pd.read_parquet(root / "users.parquet")
        self._items_index = pd.Index(self._keys(items["id"], spec["item_key"], "", strict=False))
        self._users_index = pd.Index(self._keys(users["id"], spec["user_key"], "", strict=False))
        # Each column gets one more entry at the end, the unknown ID's (position -1): OOV, image row 0.
        self._item = {c: np.append(items[c].to_numpy(np.int64), 0 if c == "image_row" else OOV)
                      for c in items.columns if c not in ("id", "cold")}
        self._user = {c: np.append(users[c].to_numpy(np.int64), OOV) for c in users.columns if c != "id"}
        self._hour = np.full(24, OOV, dtype=np.int64)
        if (root / "hour.parquet").is_file():
            hv = pd.read_parquet(root / "hour.parquet")
            ok = hv["id"].between(0, 23)
            self._hour[hv["id"][ok].to_numpy(np.int64)] = hv["index"][ok].to_numpy(np.int64)

    # -- reading a request -------------------------------------------------------------------------
    @staticmethod
    def _keys(values, kind: str, field: str, strict: bool = True) -> np.ndarray:
        """Raw IDs in the lookup tables' key type; an ID of the wrong type is just unknown (OOV).
        Plain numpy and Python on small requests: pandas' per-call overhead is most of a row's time."""
        arr = values.to_numpy() if isinstance(values, pd.Series) else np.asarray(values, dtype=object)
        if arr.dtype.kind in "iu":
            return arr.astype(np.int64) if kind == "int" else np.array([str(v) for v in arr.tolist()], dtype=object)
        items = arr.tolist()
        if strict:
            for i, v in enumerate(items):
                if v is None or v is pd.NA or (isinstance(v, float) and v != v):
                    raise BadInput(f"{field}: empty in row {i}; every row needs one")
        if kind == "int":
            out = np.empty(len(items), dtype=np.int64)
            for i, v in enumerate(items):
                if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
                    out[i] = int(v)
                    continue
                try:
                    f = float(str(v).strip())
                    out[i] = int(f) if f.is_integer() and abs(f) < 2**62 else NOBODY
                except (TypeError, ValueError):
                    out[i] = NOBODY  # not an integer: no one's ID
            return out
        return np.array([str(v).strip() for v in items], dtype=object)

    def _positions(self, values, kind: str, index: pd.Index, field: str) -> np.ndarray:
        return index.get_indexer(self._keys(values, kind, field))

    def _behaviors(self, col: pd.Series) -> tuple[np.ndarray, np.ndarray]:
        """(flat positions of the clicked items in the item table, offsets) of the behaviour lists."""
        lists = []
        for i, v in enumerate(col.tolist()):
            if v is None or (isinstance(v, float) and np.isnan(v)):
                lists.append([])
            elif isinstance(v, str):  # from CSV: "12 34 56", "12,34" or "[12, 34]"
                lists.append([t for t in v.strip().strip("[]").replace(",", " ").split() if t])
            elif isinstance(v, (list, tuple, np.ndarray)):
                lists.append(list(v))
            else:
                raise BadInput(f"{BEHAVIORS}: row {i} is {type(v).__name__}; expected a list of item IDs, newest last")
        lens = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
        offsets = np.concatenate([[0], np.cumsum(lens)])
        flat = list(chain.from_iterable(lists))
        if not flat:
            return np.empty(0, dtype=np.int64), offsets
        if any(v is None for v in flat):
            raise BadInput(f"{BEHAVIORS}: a list holds an empty item ID")
        return self._items_index.get_indexer(self._keys(flat, self.spec["item_key"], BEHAVIORS)), offsets

    def _hours(self, df: pd.DataFrame) -> np.ndarray:
        """The hour-of-day index of each row's timestamp (unix numbers in the logs' unit, or ISO 8601
        strings; naive ones are UTC, as in the pipeline); now when the column is left out."""
        from pipeline.validate import NAT, parse_timestamps

        if self.ts_col not in df.columns:
            ms = np.full(len(df), int(time.time() * 1000), dtype=np.int64)
            return self._hour[(ms // HOUR_MS) % 24]
        col = df[self.ts_col]
        ms = self._fast_ms(col.tolist())
        if ms is None:  # an unusual spelling: the pipeline's own parser, row by row as it does
            if col.isna().any():
                raise BadInput(f"{self.ts_col}: empty in row {int(np.flatnonzero(col.isna().to_numpy())[0])}; "
                               f"give a timestamp or leave the column out (then: now)")
            if col.dtype == object:
                num = pd.to_numeric(col, errors="coerce")
                col = num if num.notna().all() else col.astype(str)
            ms = parse_timestamps(col, self.spec["timestamp_unit"])
            if (ms == NAT).any():
                i = int(np.flatnonzero(ms == NAT)[0])
                raise BadInput(f"{self.ts_col}: {df[self.ts_col].iloc[i]!r} in row {i} is not a timestamp "
                               f"(unix {self.spec['timestamp_unit']} or ISO 8601)")
        return self._hour[(ms // HOUR_MS) % 24]

    def _fast_ms(self, values: list) -> np.ndarray | None:
        """Unix ms of plain numbers and ISO 8601 strings without pandas; None when any needs more."""
        from datetime import datetime, timezone

        unit = UNIT_MS.get(self.spec["timestamp_unit"])
        out = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and unit and v == v:
                out[i] = int(v * unit)
            elif isinstance(v, str):
                try:
                    t = datetime.fromisoformat(v.strip())
                except ValueError:
                    return None
                if t.tzinfo is None:
                    t = t.replace(tzinfo=timezone.utc)
                out[i] = int(t.timestamp() * 1000)
            else:
                return None
        return out

    def encode(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        """The batch of `df`'s rows; BadInput naming the field when a row cannot be read."""
        if not isinstance(df, pd.DataFrame):
            raise BadInput(f"input: expected records with fields {self.user_col}, {self.item_col}, {BEHAVIORS}")
        for col in (self.user_col, self.item_col, BEHAVIORS):
            if col not in df.columns:
                raise BadInput(f"{col}: missing; each record needs {self.user_col}, {self.item_col} and {BEHAVIORS} "
                               f"(clicked item IDs, newest last; may be empty), and may have {self.ts_col}")
        upos = self._positions(df[self.user_col], self.spec["user_key"], self._users_index, self.user_col)
        ipos = self._positions(df[self.item_col], self.spec["item_key"], self._items_index, self.item_col)
        hours = self._hours(df)
        out: dict[str, np.ndarray] = {}
        for f in self.spec["fields"]:
            src, name = f["source"], f["name"]
            out[name] = (self._user[name][upos] if src == "user" else self._item[name][ipos] if src == "item"
                         else hours if src == "hour" else np.full(len(df), OOV, dtype=np.int64))
        L = self.max_len
        if self.spec["sequences"] or self.spec["hist_image"]:
            bpos, offsets = self._behaviors(df[BEHAVIORS])
            ends = offsets[1:]
            keep = np.minimum(ends - offsets[:-1], L)
            idx = (ends - keep)[:, None] + np.arange(L)
            mask = np.arange(L)[None, :] < keep[:, None]
            take = bpos[np.minimum(idx, max(len(bpos) - 1, 0))] if len(bpos) else np.zeros_like(idx)

            def seq(values: np.ndarray) -> np.ndarray:
                return np.where(mask, values[take], 0) if len(bpos) else np.zeros((len(df), L), dtype=np.int64)

            for s in self.spec["sequences"]:
                out[s["name"]] = (seq(self._item[s["source"]]) if s["source"] != "oov"
                                  else np.where(mask, OOV, 0).astype(np.int64))
            out["hist_len"] = keep
            if self.spec["hist_image"]:
                out["hist_image"] = seq(self._item["image_row"])
        if self.spec["ad_image"]:
            out["ad_image"] = self._item["image_row"][ipos]
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)) for k, v in out.items()}


def _quiet(*args, **kwargs) -> None:
    pass


with warnings.catch_warnings():
    warnings.showwarning = _quiet  # MLflow's own catch_warnings forces 'once'; this hides the message

    class ScoringModel(mlflow.pyfunc.PythonModel):
        """The pyfunc model: `predict(DataFrame of raw rows) -> click probabilities (float64, one per row)`.
        Loading embeds every image once with the trained descriptor head."""

        def load_context(self, context) -> None:
            self.encoder = RawEncoder(Path(context.artifacts["encoder"]))
            self.predictor = torch.load(context.artifacts["predictor"], weights_only=False, map_location="cpu")
            self.predictor.eval().freeze_images()

        def predict(self, context, model_input, params=None):
            from mlflow.exceptions import MlflowException

            try:
                batch = self.encoder.encode(model_input)
            except BadInput as exc:
                raise MlflowException.invalid_parameter_value(str(exc)) from None
            if not len(model_input):
                return np.empty(0, dtype=np.float64)
            with torch.no_grad():
                return self.predictor.score(batch).to(torch.float64).numpy().reshape(-1)
