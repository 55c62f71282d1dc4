"""Open a processed dataset (docs/DATA.md) and refuse a damaged or foreign one before any training.

`open_dataset(path)` reads `manifest.json` and checks, without reading any rows:

* the manifest is JSON, of a `format_version` this code reads, with the structure the trainer needs;
* every shard it lists exists, lies inside the dataset, and has the row count the manifest says
  (from the Parquet footer); no `.parquet` file in a split folder is left out of the manifest;
* every shard's schema has the columns the manifest's fields promise, with usable types;
* the image store exists (and has the manifest's shape) when the manifest has images, and the
  oracle file exists when the manifest says one is available.

Each problem is one `UserError` that names the path and says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from vitrine.errors import UserError

SUPPORTED_FORMATS = {1}
MANIFEST = "manifest.json"
# Columns every shard has besides the fields (the label's name comes from the manifest).
BASE_COLUMNS = ("impression_id", "group_id", "cold_item")
SCALAR_KINDS = ("categorical", "image")
LIST_KINDS = ("sequence", "image_sequence")
KINDS = SCALAR_KINDS + LIST_KINDS


def _rebuild(path: Path) -> str:
    return f"rebuild it with `vitrine pipeline --raw RAW --out {path} --overwrite`"


def _is_int(t: pa.DataType) -> bool:
    return pa.types.is_integer(t)


def _is_int_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type)


class Dataset:
    """A checked processed dataset. Build it with `open_dataset`, not directly."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.dir = path
        self.manifest = manifest

    # -- fields -------------------------------------------------------------------------------
    @property
    def fields(self) -> list[dict[str, Any]]:
        return self.manifest["fields"]

    def field_names(self, *kinds: str) -> list[str]:
        return [f["name"] for f in self.fields if f["kind"] in kinds]

    @property
    def categorical(self) -> list[str]:
        return self.field_names("categorical")

    @property
    def sequences(self) -> list[str]:
        return self.field_names("sequence")

    @property
    def has_images(self) -> bool:
        return bool(self.manifest.get("images"))

    @property
    def label(self) -> str:
        return self.manifest.get("label", "label")

    @property
    def max_len(self) -> int:
        """L of the stored behaviour lists (the largest `max_len` of the list fields; 0 if none)."""
        lens = [int(f.get("max_len", 0)) for f in self.fields if f["kind"] in LIST_KINDS]
        return max(lens, default=0)

    @property
    def images_path(self) -> Path | None:
        return self.dir / self.manifest["images"]["path"] if self.has_images else None

    # -- splits -------------------------------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def _split(self, split: str) -> dict[str, Any]:
        try:
            return self.manifest["splits"][split]
        except KeyError:
            raise UserError(f"{self.dir}: no split {split!r} in the dataset (it has {', '.join(self.splits)})") from None

    def shards(self, split: str) -> list[Path]:
        return [self.dir / s["file"] for s in self._split(split)["shards"]]

    def shard_rows(self, split: str) -> list[int]:
        return [int(s["rows"]) for s in self._split(split)["shards"]]

    def rows(self, split: str) -> int:
        return sum(self.shard_rows(split))

    # -- reference ----------------------------------------------------------------------------
    def oracle(self) -> pd.DataFrame | None:
        """The true click probabilities (impression_id, p_click) of a synthetic world, else None.
        Reference only: never a feature."""
        path = _oracle_path(self.dir, self.manifest)
        if path is None:
            return None
        try:
            return pd.read_parquet(path, columns=["impression_id", "p_click"])
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"oracle file {path} is not readable ({e}); {_rebuild(self.dir)}") from e

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}={self.rows(s)}" for s in self.splits)
        return f"Dataset({str(self.dir)!r}, {rows}, fields={len(self.fields)}, images={self.has_images})"


def _oracle_path(root: Path, manifest: dict[str, Any]) -> Path | None:
    info = manifest.get("oracle") or {}
    if not isinstance(info, dict) or not info.get("available"):
        return None
    return root / info.get("path", "oracle/p_click.parquet")


def open_dataset(path: str | Path) -> Dataset:
    """Open and check the processed dataset at `path`; raises UserError when it cannot be trained on."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        what = "is a file, not a dataset folder" if root.exists() else "does not exist"
        raise UserError(f"dataset {root} {what}; build one with `vitrine pipeline --raw RAW --out {root}`")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise UserError(
            f"{mpath} not found: {root} is not a processed dataset (or its build did not finish); "
            f"build it with `vitrine pipeline --raw RAW --out {root}`"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{mpath} is not valid JSON ({e}); {_rebuild(root)}") from e
    if not isinstance(manifest, dict):
        raise UserError(f"{mpath} is not a JSON object; {_rebuild(root)}")
    version = manifest.get("format_version")
    if version not in SUPPORTED_FORMATS:
        raise UserError(
            f"{mpath}: format_version {version!r} is not one this trainer reads ({sorted(SUPPORTED_FORMATS)}); "
            f"{_rebuild(root)} with this version of Vitrine"
        )
    _check_structure(root, mpath, manifest)
    ds = Dataset(root, manifest)
    required = _required_columns(ds)
    for split in ds.splits:
        _check_split(ds, split, required)
    _check_images(ds)
    opath = _oracle_path(root, manifest)
    if opath is not None:
        if not opath.is_file():
            raise UserError(f"oracle file {opath} listed in {mpath} is missing; {_rebuild(root)}")
        names = _schema(opath, root).names
        missing = [c for c in ("impression_id", "p_click") if c not in names]
        if missing:
            raise UserError(f"oracle file {opath} lacks columns {missing}; {_rebuild(root)}")
    return ds


def _check_structure(root: Path, mpath: Path, m: dict[str, Any]) -> None:
    def bad(what: str) -> UserError:
        return UserError(f"{mpath} is malformed: {what}; {_rebuild(root)}")

    fields = m.get("fields")
    if not isinstance(fields, list) or not fields:
        raise bad("'fields' must be a non-empty list")
    seen = set()
    for f in fields:
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or f.get("kind") not in KINDS:
            raise bad(f"field {f!r} needs a 'name' and a 'kind' among {list(KINDS)}")
        if f["name"] in seen:
            raise bad(f"field {f['name']!r} is listed twice")
        seen.add(f["name"])
        if f["kind"] in LIST_KINDS and (not isinstance(f.get("max_len"), int) or f["max_len"] < 0):
            raise bad(f"list field {f['name']!r} needs a non-negative integer 'max_len'")
    if not isinstance(m.get("label", "label"), str):
        raise bad("'label' must be a column name")
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise bad("'splits' must be a non-empty object")
    for name, s in splits.items():
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list):
            raise bad(f"split {name!r} needs a 'shards' list")
        for sh in s["shards"]:
            if (not isinstance(sh, dict) or not isinstance(sh.get("file"), str)
                    or not isinstance(sh.get("rows"), int) or sh["rows"] < 0):
                raise bad(f"shard entry {sh!r} of split {name!r} needs 'file' and a non-negative integer 'rows'")
        if "rows" in s and s["rows"] != sum(sh["rows"] for sh in s["shards"]):
            raise bad(f"split {name!r} says {s['rows']} rows but its shards add up to "
                      f"{sum(sh['rows'] for sh in s['shards'])}")
    images = m.get("images")
    if images and (not isinstance(images, dict) or not isinstance(images.get("path"), str)):
        raise bad("'images' must be null or an object with a 'path'")
    has_image_fields = any(f["kind"] in ("image", "image_sequence") for f in fields)
    if has_image_fields and not images:
        raise bad("image fields are listed but 'images' is empty")


def _required_columns(ds: Dataset) -> dict[str, str]:
    """column -> 'int' | 'list' | 'any' (what a shard's schema must hold)."""
    req = {c: "int" for c in ("impression_id", "group_id")}
    req["cold_item"] = "bool"
    req[ds.label] = "number"
    for f in ds.fields:
        req[f["name"]] = "list" if f["kind"] in LIST_KINDS else "int"
    if any(f["kind"] in LIST_KINDS for f in ds.fields):
        req["hist_len"] = "int"
    return req


def _schema(path: Path, root: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except Exception as e:  # ArrowInvalid, OSError, ...: a damaged or non-Parquet file
        raise UserError(f"shard {path} is not a readable Parquet file ({e}); {_rebuild(root)}") from e


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
        return True
    except ValueError:
        return False


def _check_split(ds: Dataset, split: str, required: dict[str, str]) -> None:
    root = ds.dir
    listed: set[Path] = set()
    folders: set[Path] = {root / split}
    for shard, rows in zip(ds.shards(split), ds.shard_rows(split)):
        if not _inside(shard, root):
            raise UserError(f"{root / MANIFEST} lists shard {shard}, outside the dataset; {_rebuild(root)}")
        if not shard.is_file():
            raise UserError(f"shard {shard} listed in {root / MANIFEST} is missing; the dataset is incomplete, "
                            f"{_rebuild(root)}")
        listed.add(shard.resolve())
        folders.add(shard.parent)
        try:
            meta = pq.read_metadata(shard)
        except Exception as e:
            raise UserError(f"shard {shard} is not a readable Parquet file ({e}); {_rebuild(root)}") from e
        if meta.num_rows != rows:
            raise UserError(f"shard {shard} has {meta.num_rows} rows but {root / MANIFEST} says {rows}; "
                            f"the shard was replaced or truncated, {_rebuild(root)}")
        schema = meta.schema.to_arrow_schema()
        missing = [c for c in required if c not in schema.names]
        if missing:
            raise UserError(f"shard {shard} lacks columns {missing} that {root / MANIFEST} lists; {_rebuild(root)}")
        for col, want in required.items():
            t = schema.field(col).type
            ok = {"int": _is_int(t), "list": _is_int_list(t),
                  "bool": pa.types.is_boolean(t) or _is_int(t),
                  "number": pa.types.is_boolean(t) or _is_int(t) or pa.types.is_floating(t)}[want]
            if not ok:
                raise UserError(f"shard {shard}: column {col!r} has type {t}, expected "
                                f"{'a list of integers' if want == 'list' else 'integers' if want == 'int' else want}; "
                                f"{_rebuild(root)}")
    for folder in folders:
        if not folder.is_dir():
            continue
        stray = sorted(p for p in folder.glob("*.parquet") if p.resolve() not in listed)
        if stray:
            names = ", ".join(str(p) for p in stray[:3]) + (f" and {len(stray) - 3} more" if len(stray) > 3 else "")
            raise UserError(f"{names} in split {split!r} not listed in {root / MANIFEST}: the folder mixes datasets "
                            f"or a build was interrupted; remove the file(s) or {_rebuild(root)}")


def _check_images(ds: Dataset) -> None:
    if not ds.has_images:
        return
    path = ds.images_path
    assert path is not None
    if not path.is_file():
        raise UserError(f"image store {path} is missing but {ds.dir / MANIFEST} lists images; {_rebuild(ds.dir)}")
    try:
        mm = np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise UserError(f"image store {path} is not a readable .npy file ({e}); {_rebuild(ds.dir)}") from e
    shape = ds.manifest["images"].get("shape")
    if shape is not None and list(mm.shape) != list(shape):
        raise UserError(f"image store {path} has shape {list(mm.shape)} but {ds.dir / MANIFEST} says {shape}; "
                        f"{_rebuild(ds.dir)}")
    del mm
