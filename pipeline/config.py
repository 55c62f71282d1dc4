"""The pipeline job's settings (kept free of heavy imports: the CLI and the dashboard read them)."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    valid_days: int = field(default=1, metadata=_h("days before the test days that form the valid split"))
    test_days: int = field(default=1, metadata=_h("last days of the log that form the test split"))
    partition_rows: int = field(default=250_000, metadata=_h("target rows per output shard when histories are joined by shuffle (broadcast keeps the input partitions)"))
    max_image_bytes: int = field(default=10_000_000, metadata=_h("images larger than this file size are replaced"))
    max_image_pixels: int = field(default=25_000_000, metadata=_h("images with more pixels than this are replaced, before decoding"))
    image_formats: tuple[str, ...] = field(default=("PNG", "JPEG", "WEBP", "GIF", "BMP"), metadata=_h("allowed image formats"))
    history_join: str = field(default="auto", metadata=_h("how histories meet their clicks: broadcast the clicks, shuffle by user, or auto", choices=("auto", "broadcast", "shuffle")))
    broadcast_clicks_max: int = field(default=5_000_000, metadata=_h("auto uses broadcast up to this many clicks"))
    overwrite: bool = field(default=False, metadata=_h("replace an existing output directory"))
    track: bool = field(default=True, metadata=_h("log the run to MLflow"))
    progress: bool = field(default=True, metadata=_h("show progress"))

    def check(self) -> None:
        for name in ("max_behaviors", "image_size", "min_count", "partition_rows", "max_image_bytes", "max_image_pixels"):
            if getattr(self, name) < (0 if name == "max_behaviors" else 1):
                raise UserError(f"--{name.replace('_', '-')} must be positive (got {getattr(self, name)})")
        if self.valid_days < 0 or self.test_days < 1:
            raise UserError("--test-days must be >= 1 and --valid-days >= 0")
