"""Row validation: every impression is either clean or quarantined with its reason.

A row is bad when an ID is missing, the timestamp does not parse, or the label is not 0/1. Bad rows
are written, with the original values as text, the reason and the source row number, to the
quarantine; they are counted in the manifest and the MLflow run. Nothing is dropped silently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

REASON_MISSING_USER = "missing user id"
REASON_MISSING_ITEM = "missing item id"
REASON_BAD_TIMESTAMP = "unparsable timestamp"
REASON_BAD_LABEL = "label not 0/1"

CANONICAL = ["impression_id", "timestamp", "user", "item", "label"]


def _missing_id(s: pd.Series) -> np.ndarray:
    miss = s.isna().to_numpy().copy()
    if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        text = s.astype("string").str.strip()
        miss |= (text.fillna("") == "").to_numpy()
    return miss


def parse_timestamps(s: pd.Series, unit: str = "s") -> np.ndarray:
    """Any reasonable timestamp column -> int64 unix milliseconds, with INT64_MIN where unparsable."""
    if pd.api.types.is_datetime64_any_dtype(s.dtype):
        ts = s
        if getattr(s.dt, "tz", None) is not None:
            ts = s.dt.tz_convert("UTC").dt.tz_localize(None)
    elif pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype):
        ts = pd.to_datetime(s, unit=unit, errors="coerce")
    else:
        text = s.astype("string")
        ts = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
        retry = ts.isna() & text.notna() & (text.str.strip() != "")
        if retry.any():
            # Rare non-ISO spellings: parse only those rows element by element.
            ts = ts.copy()
            ts[retry] = pd.to_datetime(text[retry], errors="coerce", utc=True, format="mixed")
        ts = ts.dt.tz_localize(None)
    out = ts.astype("datetime64[ms]").to_numpy().view("int64").copy()
    return out


NAT = np.iinfo(np.int64).min


def parse_labels(s: pd.Series) -> np.ndarray:
    """-> int8 array with -1 where the value is not exactly 0 or 1."""
    if pd.api.types.is_bool_dtype(s.dtype):
        return s.astype("Int8").fillna(-1).to_numpy(dtype="int8")
    num = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    ok = (num == 0) | (num == 1)
    return np.where(ok, num, -1).astype("int8")


def validate(df: pd.DataFrame, columns: dict[str, str], unit: str, row_offset: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a raw frame into (good rows in canonical columns, bad rows with reasons).

    `columns` maps logical names to the frame's column names. `row_offset` is the global row number
    of the frame's first row, so quarantined rows can be found in the source.
    """
    n = len(df)
    rows = np.arange(row_offset, row_offset + n, dtype=np.int64)
    reasons = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, reason: str) -> None:
        new = mask & (reasons == None)  # noqa: E711 - elementwise on an object array
        reasons[new] = reason

    user = df[columns["user"]]
    item = df[columns["item"]]
    flag(_missing_id(user), REASON_MISSING_USER)
    flag(_missing_id(item), REASON_MISSING_ITEM)
    ts = parse_timestamps(df[columns["timestamp"]], unit)
    flag(ts == NAT, REASON_BAD_TIMESTAMP)
    label = parse_labels(df[columns["label"]])
    flag(label < 0, REASON_BAD_LABEL)

    bad_mask = reasons != None  # noqa: E711
    good_mask = ~bad_mask
    if "impression_id" in columns:
        imp_raw = df[columns["impression_id"]]
        imp = pd.to_numeric(imp_raw, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        # An impression id that is not an integer is not a reason to lose the row: use the row number.
        imp = np.where(np.isfinite(imp), imp, rows).astype(np.int64)
    else:
        imp = rows

    good = pd.DataFrame(
        {
            "impression_id": imp[good_mask],
            "timestamp": ts[good_mask],
            "user": _clean_id(user[good_mask]),
            "item": _clean_id(item[good_mask]),
            "label": label[good_mask],
        }
    )
    bad = df[bad_mask].astype("string")
    bad.insert(0, "reason", pd.array(reasons[bad_mask], dtype="string"))
    bad.insert(0, "source_row", rows[bad_mask])
    return good.reset_index(drop=True), bad.reset_index(drop=True)


def _clean_id(s: pd.Series) -> pd.Series:
    """IDs keep their native type; text IDs are stripped so ' 42' and '42' are one ID."""
    if s.dtype == object or pd.api.types.is_string_dtype(s.dtype):
        return s.astype("string").str.strip().reset_index(drop=True)
    if pd.api.types.is_float_dtype(s.dtype):
        # A float column of whole numbers (a CSV with gaps) is an integer ID column.
        if np.all(np.mod(s.to_numpy(), 1) == 0):
            return s.astype("int64").reset_index(drop=True)
    return s.reset_index(drop=True)
