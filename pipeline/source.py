"""Where a raw source's tables are and what their columns are called.

A shop's logs never use our column names, so the pipeline reads them through a `SourceSpec`: the
raw directory's `source.toml` (or a file given with `--source`), then `--map` options on top. The
logical names are fixed (`user`, `item`, `timestamp`, `label`, ...); the physical names are free.
See docs/DATA.md for the file format.
"""

from __future__ import annotations

import glob
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from vitrine.errors import UserError

IMPRESSION_FIELDS = ("impression_id", "timestamp", "user", "item", "label")
ITEM_FIELDS = ("item", "category", "shop", "image")
USER_FIELDS = ("user",)
TRUTH_FIELDS = ("impression_id", "p_click")
REQUIRED_IMPRESSION_FIELDS = ("timestamp", "user", "item", "label")
# Names the processed dataset uses itself: a profile column or item attribute may not take one.
RESERVED_FIELD_NAMES = frozenset({
    "impression_id", "timestamp", "label", "group_id", "cold_item", "cold", "user_id", "item_id",
    "category_id", "shop_id", "image_id", "image_row", "hour", "ad_image", "hist_len",
})


@dataclass
class TableSpec:
    path: str | None
    columns: dict[str, str]
    extra: dict = field(default_factory=dict)

    def column(self, logical: str) -> str | None:
        return self.columns.get(logical)


@dataclass
class SourceSpec:
    raw_dir: Path
    impressions: TableSpec
    items: TableSpec | None
    users: TableSpec | None
    images_dir: Path | None
    truth: TableSpec | None
    timestamp_unit: str = "s"
    user_profile: tuple[str, ...] = ()
    item_attributes: tuple[str, ...] = ()  # extra categorical item columns, like user_profile

    def files(self, table: TableSpec) -> list[Path]:
        return resolve_files(self.raw_dir, table.path)

    def describe(self) -> dict:
        """What the manifest records about where the data came from."""

        def tab(t: TableSpec | None):
            if t is None:
                return None
            return {"path": t.path, "columns": dict(t.columns),
                    "files": [str(p) for p in self.files(t)]}

        return {
            "dir": str(self.raw_dir),
            "impressions": tab(self.impressions),
            "items": tab(self.items),
            "users": tab(self.users),
            "images_dir": str(self.images_dir) if self.images_dir else None,
            "truth": tab(self.truth),
            "timestamp_unit": self.timestamp_unit,
            "user_profile": list(self.user_profile),
            "item_attributes": list(self.item_attributes),
        }


def resolve_files(raw_dir: Path, path: str | None) -> list[Path]:
    """A file, a directory (its .parquet/.csv files) or a glob, relative to the raw dir, sorted."""
    if path is None:
        return []
    p = Path(path)
    if not p.is_absolute():
        p = raw_dir / p
    if p.is_dir():
        files = sorted(x for x in p.iterdir() if x.suffix.lower() in (".parquet", ".csv") and not x.name.startswith("."))
    elif any(ch in str(p) for ch in "*?["):
        files = sorted(Path(x) for x in glob.glob(str(p)))
    elif p.exists():
        files = [p]
    else:
        files = []
    return files


def file_format(files: list[Path], where: str) -> str:
    kinds = {f.suffix.lower() for f in files}
    if not files:
        raise UserError(f"{where}: no .parquet or .csv files found")
    if len(kinds) != 1 or kinds - {".parquet", ".csv"}:
        raise UserError(f"{where}: mixed or unsupported file types {sorted(kinds)}; use all .parquet or all .csv")
    return kinds.pop().lstrip(".")


_DEFAULT_IMPRESSION_COLUMNS = {
    "impression_id": "impression_id", "timestamp": "timestamp", "user": "user_id",
    "item": "item_id", "label": "click",
}


def _table(doc: dict, name: str, defaults: dict[str, str] | None, where: str) -> TableSpec | None:
    section = doc.get(name)
    if section is None:
        return None
    if not isinstance(section, dict) or "path" not in section:
        raise UserError(f"{where}: section [{name}] needs a 'path'")
    columns = dict(defaults or {})
    columns.update({str(k): str(v) for k, v in section.get("columns", {}).items()})
    extra = {k: v for k, v in section.items() if k not in ("path", "columns")}
    return TableSpec(path=str(section["path"]), columns=columns, extra=extra)


def load_source(
    raw_dir: Path,
    source_file: Path | None = None,
    maps: list[str] | tuple[str, ...] = (),
    impressions: str | None = None,
    items: str | None = None,
    users: str | None = None,
    images: str | None = None,
) -> SourceSpec:
    """Build the spec: source file (explicit, else RAW/source.toml, else defaults), then options."""
    raw_dir = Path(raw_dir).resolve()
    if not raw_dir.is_dir():
        raise UserError(f"raw directory {raw_dir} does not exist; generate one with `vitrine generate --out {raw_dir}`")
    where = "defaults"
    doc: dict = {}
    if source_file is None and (raw_dir / "source.toml").exists():
        source_file = raw_dir / "source.toml"
    if source_file is not None:
        where = str(source_file)
        try:
            doc = tomllib.loads(Path(source_file).read_text())
        except FileNotFoundError:
            raise UserError(f"source file {source_file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{source_file}: not valid TOML ({exc})") from None
    if "impressions" not in doc:
        doc["impressions"] = {"path": "impressions"}
    imp = _table(doc, "impressions", _DEFAULT_IMPRESSION_COLUMNS, where)
    assert imp is not None
    it = _table(doc, "items", {"item": "item_id", "category": "category_id", "shop": "shop_id", "image": "image"}, where)
    us = _table(doc, "users", {"user": "user_id"}, where)
    tr = _table(doc, "truth", {"impression_id": "impression_id", "p_click": "p_click"}, where)
    images_dir = doc.get("images", {}).get("dir")

    # Options override the file.
    if impressions:
        imp.path = impressions
    if items:
        it = it or TableSpec(path=None, columns={"item": "item_id", "category": "category_id", "shop": "shop_id", "image": "image"})
        it.path = items
    if users:
        us = us or TableSpec(path=None, columns={"user": "user_id"})
        us.path = users
    if images:
        images_dir = images
    tables = {"impressions": imp, "items": it, "users": us, "truth": tr}
    known = {"impressions": IMPRESSION_FIELDS, "items": ITEM_FIELDS, "users": USER_FIELDS, "truth": TRUTH_FIELDS}
    for m in maps:
        if "=" not in m:
            raise UserError(f"--map {m!r}: expected LOGICAL=COLUMN or TABLE.LOGICAL=COLUMN, e.g. --map user=uid")
        key, col = m.split("=", 1)
        table, _, logical = key.rpartition(".")
        table = table or "impressions"
        if table not in tables or tables[table] is None:
            raise UserError(f"--map {m!r}: unknown or absent table {table!r}; tables: impressions, items, users, truth")
        if logical not in known[table]:
            raise UserError(f"--map {m!r}: {table} has no field {logical!r}; fields: {', '.join(known[table])}")
        tables[table].columns[logical] = col  # type: ignore[union-attr]

    # An empty column name says the table has no such column: `--map items.image=` (or `image = ""`
    # in source.toml) is a catalogue without images, whatever [images] says.
    no_images = False
    keys = {"impressions": REQUIRED_IMPRESSION_FIELDS, "items": ("item",), "users": ("user",), "truth": TRUTH_FIELDS}
    for tname, t in tables.items():
        if t is None:
            continue
        for logical in [k for k, v in t.columns.items() if not str(v).strip()]:
            if logical in keys[tname]:
                raise UserError(f"{where}: {tname}.{logical} cannot be left without a column; map it to one")
            no_images |= tname == "items" and logical == "image"
            t.columns.pop(logical)
    if no_images:
        images_dir = None
    profile = tuple(us.extra.get("profile", ())) if us else ()
    attributes = it.extra.get("attributes", []) if it else []
    if not isinstance(attributes, list) or not all(isinstance(a, str) for a in attributes):
        raise UserError(f"{where}: [items] attributes must be a list of column names, e.g. [\"brand\"]")
    attributes = tuple(dict.fromkeys(attributes))
    clash = sorted({n for n in (*profile, *attributes) if n in RESERVED_FIELD_NAMES or n.startswith("hist_")}
                   | set(profile) & set(attributes))
    if clash:
        raise UserError(f"{where}: user profile / item attribute names {clash} clash with the dataset's own "
                        "fields or with each other; rename the columns")
    unit = str(imp.extra.get("timestamp_unit", doc.get("timestamp_unit", "s")))
    if unit not in ("s", "ms", "us", "ns"):
        raise UserError(f"{where}: timestamp_unit must be one of s, ms, us, ns (got {unit!r})")
    spec = SourceSpec(
        raw_dir=raw_dir,
        impressions=imp,
        items=it,
        users=us,
        images_dir=(raw_dir / images_dir).resolve() if images_dir else None,
        truth=tr,
        timestamp_unit=unit,
        user_profile=profile,
        item_attributes=attributes,
    )
    check_source(spec)
    return spec


def check_source(spec: SourceSpec) -> None:
    """Fail before any work starts when a table or a mapped column is missing."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    def columns_of(f: Path, fmt: str) -> list[str]:
        if fmt == "parquet":
            return list(pq.read_schema(f).names)
        with open(f, "rb") as fh:
            reader = pacsv.open_csv(fh)
            return list(reader.schema.names)

    for name in ("impressions", "items", "users", "truth"):
        table: TableSpec | None = getattr(spec, name)
        if table is None:
            continue
        files = spec.files(table)
        where = f"[{name}] path {table.path!r} (in {spec.raw_dir})"
        if not files:
            if name == "impressions":
                raise UserError(f"{where}: no .parquet or .csv files found; point --impressions at your log")
            raise UserError(f"{where}: no such file; fix the path or remove the section")
        fmt = file_format(files, where)
        cols = set(columns_of(files[0], fmt))
        wanted = dict(table.columns)
        optional = {"impression_id", "shop"} if name in ("impressions", "items") else set()
        if name == "items" and spec.images_dir is None:
            optional.add("image")  # without an image folder, a catalogue's images are not used
        for logical, col in wanted.items():
            if col not in cols:
                if logical in optional:
                    table.columns.pop(logical)
                    continue
                hint = " (or --map items.image= for a catalogue without images)" if logical == "image" else ""
                raise UserError(
                    f"{files[0]}: column {col!r} for {name}.{logical} not found (columns: {', '.join(sorted(cols))}); "
                    f"map it with --map {'' if name == 'impressions' else name + '.'}{logical}=COLUMN{hint}"
                )
        if name == "users":
            for prof in spec.user_profile:
                if prof not in cols:
                    raise UserError(f"{files[0]}: user profile column {prof!r} not found (columns: {', '.join(sorted(cols))})")
        if name == "items":
            mapped = set(table.columns.values())
            for attr in spec.item_attributes:
                if attr not in cols:
                    raise UserError(f"{files[0]}: item attribute column {attr!r} not found (columns: {', '.join(sorted(cols))})")
                if attr in mapped:
                    raise UserError(f"{files[0]}: item attribute {attr!r} is already mapped as an item field")
    if spec.images_dir is not None and spec.items is not None and "image" in spec.items.columns \
            and not spec.images_dir.is_dir():
        raise UserError(f"images folder {spec.images_dir} does not exist (--images, or [images] dir in source.toml); "
                        "fix the path, or say the catalogue has no images with --map items.image= (or leave out "
                        "[images] and the items' image column)")
    missing = [f for f in REQUIRED_IMPRESSION_FIELDS if f not in spec.impressions.columns]
    if missing:
        raise UserError(f"impressions need columns for {', '.join(missing)}")

