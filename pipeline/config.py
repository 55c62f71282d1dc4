"""The pipeline job's settings (kept free of heavy imports: the CLI and the dashboard read them)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from vitrine.config import help_meta as _h
from vitrine.errors import UserError


@dataclass
class PipelineConfig:
    raw: str = field(default="data/raw/demo", metadata=_h("raw source directory (with source.toml, or default file names)"))
    out: str = field(default="data/processed/demo", metadata=_h("where to write the processed dataset"))
    source: str | None = field(default=None, metadata=_h("source TOML describing tables and columns (default RAW/source.toml)"))
    map: tuple[str, ...] = field(default=(), metadata=_h("column mapping TABLE.FIELD=COLUMN, e.g. --map user=uid --map items.category=cat", action="append"))
    impressions: str | None = field(default=None, metadata=_h("impression log file/dir/glob, overriding the source file"))
    items: str | None = field(default=None, metadata=_h("item table file, overriding the source file"))
    users: str | None = field(default=None, metadata=_h("user table file, overriding the source file"))
    images: str | None = field(default=None, metadata=_h("image folder, overriding the source file"))
    scheduler: str | None = field(default=None, metadata=_h("address of an existing Dask scheduler (default: start a LocalCluster)"))
    workers: int = field(default=2, metadata=_h("LocalCluster worker processes"))
    threads_per_worker: int = field(default=1, metadata=_h("threads per LocalCluster worker"))
    max_behaviors: int = field(default=50, metadata=_h("L: clicks kept per behaviour sequence"))
    image_size: int = field(default=64, metadata=_h("S: images are stored as S x S RGB"))
    min_count: int = field(default=2, metadata=_h("IDs seen fewer times in train map to out-of-vocabulary"))
    test_days: float | None = field(default=None, metadata=_h(
        "split by days: the test split is the last N UTC days of the log, counted back from the end of the "
        "log's last UTC day (fractions allowed, e.g. 22.5; default 1 when no other split is given)"))
    valid_days: float | None = field(default=None, metadata=_h(
        "split by days: the valid split is the N UTC days before the test days (default 1 when no other "
        "split is given; 0 = no valid split)"))
    test_frac: float | None = field(default=None, metadata=_h(
        "split by fraction: the test split is this share of the log's rows, the latest in time order "
        "(e.g. 0.1)"))
    valid_frac: float | None = field(default=None, metadata=_h(
        "split by fraction: the valid split is this share of the rows just before the test rows (default 0)"))
    test_from: str | None = field(default=None, metadata=_h(
        "split by time: the test split starts at this time (ISO 8601, UTC unless it says otherwise, or unix "
        "seconds)"))
    valid_from: str | None = field(default=None, metadata=_h(
        "split by time: the valid split starts at this time, before --test-from (default: no valid split)"))
    partition_rows: int = field(default=250_000, metadata=_h("target rows per output shard when histories are joined by shuffle (broadcast keeps the input partitions)"))
    max_image_bytes: int = field(default=10_000_000, metadata=_h("images larger than this file size are replaced"))
    max_image_pixels: int = field(default=25_000_000, metadata=_h("images with more pixels than this are replaced, before decoding"))
    image_formats: tuple[str, ...] = field(default=("PNG", "JPEG", "WEBP", "GIF", "BMP"), metadata=_h("allowed image formats"))
    history_join: str = field(default="auto", metadata=_h("how histories meet their clicks: broadcast the clicks, shuffle by user, or auto", choices=("auto", "broadcast", "shuffle")))
    broadcast_clicks_max: int = field(default=5_000_000, metadata=_h("auto uses broadcast up to this many clicks"))
    overwrite: bool = field(default=False, metadata=_h("replace an existing output directory"))
    track: bool = field(default=True, metadata=_h("log the run to MLflow"))
    progress: bool = field(default=True, metadata=_h("show progress"))

    def split_rule(self) -> tuple[str, float | int, float | int]:
        """(kind, valid, test): ("days", valid days, test days), ("frac", valid share, test share) or
        ("time", valid start, test start in unix ms). UserError naming the flags when they do not fit."""
        days = (self.valid_days, self.test_days)
        fracs = (self.valid_frac, self.test_frac)
        times = (self.valid_from, self.test_from)
        given = [name for name, pair in (("--valid-days/--test-days", days), ("--valid-frac/--test-frac", fracs),
                                         ("--valid-from/--test-from", times)) if any(v is not None for v in pair)]
        if len(given) > 1:
            raise UserError(f"{' and '.join(given)} are different ways to split the log; use one of them")
        if fracs != (None, None):
            valid, test = self.valid_frac or 0.0, self.test_frac
            if test is None:
                raise UserError("--valid-frac needs --test-frac (the share of the latest rows that form the test split)")
            if not (0 < test < 1 and 0 <= valid < 1 and valid + test < 1):
                raise UserError(f"--test-frac must be in (0, 1), --valid-frac in [0, 1) and together below 1, so "
                                f"that rows are left to train on (got {test}, {valid})")
            return "frac", valid, test
        if times != (None, None):
            if self.test_from is None:
                raise UserError("--valid-from needs --test-from (where the test split starts)")
            test = parse_time(self.test_from, "--test-from")
            valid = parse_time(self.valid_from, "--valid-from") if self.valid_from is not None else test
            if valid > test:
                raise UserError(f"--valid-from {self.valid_from} is after --test-from {self.test_from}")
            return "time", valid, test
        valid = 1.0 if self.valid_days is None else self.valid_days
        test = 1.0 if self.test_days is None else self.test_days
        if not (math.isfinite(test) and test > 0 and math.isfinite(valid) and valid >= 0):
            raise UserError(f"--test-days must be > 0 and --valid-days >= 0 (got {test}, {valid})")
        return "days", valid, test

    def problems(self) -> list[UserError]:
        """Every bad setting, each a UserError naming its `--flag` (the CLI exits 2 with the first, the
        dashboard's Launch form shows each under its field)."""
        out: list[UserError] = []
        for name in ("workers", "threads_per_worker", "image_size", "min_count", "partition_rows",
                     "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < 1:
                out.append(UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(self, name)})"))
        for name in ("max_behaviors", "broadcast_clicks_max"):
            if getattr(self, name) < 0:
                out.append(UserError(f"--{name.replace('_', '-')} must be >= 0 (got {getattr(self, name)})"))
        try:
            self.split_rule()
        except UserError as exc:
            out.append(exc)
        return out

    def check(self) -> None:
        found = self.problems()
        if found:
            raise found[0]


def parse_time(text: str, flag: str) -> int:
    """An ISO 8601 time (UTC unless it names its zone) or unix seconds -> unix milliseconds."""
    t = str(text).strip()
    try:
        return int(round(float(t) * 1000))
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(t.replace("Z", "+00:00") if t.endswith("Z") else t)
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected an ISO 8601 time such as 2026-03-01 or 2026-03-01T12:00:00Z, "
                        "or unix seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return int(round(when.timestamp() * 1000))
