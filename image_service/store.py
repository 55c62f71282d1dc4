"""The packed image store: every item image decoded once into one memory-mappable array.

Layout inside a processed dataset (see docs/DATA.md):

* `images/pixels.npy`   uint8 `(n_images, S, S, 3)`, RGB, a plain .npy file;
* `images/index.parquet` one row per image: `image_index`, `key`, `source`, `status`, `reason`.

Row 0 is the grey placeholder used where an item has no image row at all; images that failed to
decode keep their own row, filled with the placeholder.

Writers: `create_store` preallocates the file once, then any number of processes call `write_rows`
on disjoint row ranges (each opens its own `r+` memmap, so no array crosses process boundaries).
Readers: `ImageStore` memory-maps the file read-only; it pickles as just its directory, so Dask and
torch DataLoader workers reopen the map lazily on first use instead of copying pixels.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from vitrine.errors import UserError

PIXELS = "images/pixels.npy"
INDEX = "images/index.parquet"
INDEX_COLUMNS = ("image_index", "key", "source", "status", "reason")
PLACEHOLDER_RGB = (128, 128, 128)
CAPTION_HEIGHT = 14  # pixels below each tile of a captioned contact sheet


def placeholder(size: int) -> np.ndarray:
    """A uniform mid-grey `(size, size, 3)` uint8 image."""
    if size < 1:
        raise ValueError(f"image size must be at least 1, got {size}")
    out = np.empty((size, size, 3), dtype=np.uint8)
    out[...] = PLACEHOLDER_RGB
    return out


def create_store(dataset_dir: Path, n_images: int, size: int) -> Path:
    """Preallocate `images/pixels.npy` for `n_images` rows of `size`x`size` RGB; row 0 = placeholder.

    Rows 1.. are left zero (the file is sparse where the filesystem allows) until `write_rows`
    fills them. Returns the path of the .npy file.
    """
    if n_images < 1:
        raise ValueError(f"the store needs at least one row (the placeholder), got n_images={n_images}")
    path = Path(dataset_dir) / PIXELS
    path.parent.mkdir(parents=True, exist_ok=True)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(int(n_images), size, size, 3))
    mm[0] = placeholder(size)
    mm.flush()
    del mm
    return path


def write_rows(pixels_path: Path | str, start: int, rows: np.ndarray) -> None:
    """Write `rows` (k, S, S, 3) uint8 into rows `start..start+k-1` of the store, then flush.

    Safe to call from several processes at once as long as their row ranges do not overlap (each
    call maps the file shared; the page cache merges writes that touch the same page). Not safe on
    network filesystems without coherent shared mappings (NFS): build the dataset on local disk.
    """
    rows = np.asarray(rows)
    if rows.dtype != np.uint8:
        raise TypeError(f"image rows must be uint8, got {rows.dtype}")
    mm = np.load(pixels_path, mmap_mode="r+")
    try:
        if rows.ndim != 4 or rows.shape[1:] != mm.shape[1:]:
            raise ValueError(f"rows of shape {rows.shape} do not fit a store of shape {mm.shape}")
        start = int(start)
        stop = start + rows.shape[0]
        if start < 0 or stop > mm.shape[0]:
            raise ValueError(f"rows {start}..{stop - 1} fall outside the store's {mm.shape[0]} rows")
        if rows.shape[0]:
            mm[start:stop] = rows
            mm.flush()
    finally:
        del mm


class ImageStore:
    """Read-only view of a dataset's packed images.

    `get(indices)` returns a fresh uint8 array of shape `indices.shape + (S, S, 3)` (order and
    repeats preserved); `status(indices)` the matching status strings. Pickling keeps only the
    directory and the expected shape; the unpickled copy reopens the files on first use.
    """

    def __init__(self, dataset_dir: Path | str):
        self.dataset_dir = Path(dataset_dir)
        self._pixels: np.ndarray | None = None
        self._index: pd.DataFrame | None = None
        self._status: np.ndarray | None = None
        pixels = self._open_pixels()
        self._shape: tuple[int, ...] = tuple(pixels.shape)
        self._load_index()

    # -- files ---------------------------------------------------------------------------------
    @property
    def pixels_path(self) -> Path:
        return self.dataset_dir / PIXELS

    @property
    def index_path(self) -> Path:
        return self.dataset_dir / INDEX

    def _open_pixels(self) -> np.ndarray:
        path = self.pixels_path
        if not path.is_file():
            raise UserError(f"image store not found: {path} (build the dataset with `vitrine pipeline`)")
        try:
            mm = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise UserError(f"image store {path} is not a readable .npy file: {e}") from e
        if mm.dtype != np.uint8 or mm.ndim != 4 or mm.shape[3] != 3 or mm.shape[1] != mm.shape[2]:
            raise UserError(
                f"image store {path} has shape {mm.shape} and dtype {mm.dtype}; "
                "expected uint8 (n_images, S, S, 3)"
            )
        if getattr(self, "_shape", None) is not None and tuple(mm.shape) != self._shape:
            raise UserError(
                f"image store {path} changed since it was opened: shape {mm.shape}, was {self._shape}"
            )
        # A plain ndarray view over the map: fancy indexing then returns ordinary arrays.
        self._pixels = np.asarray(mm)
        return self._pixels

    def _load_index(self) -> pd.DataFrame:
        path = self.index_path
        if not path.is_file():
            raise UserError(f"image index not found: {path} (build the dataset with `vitrine pipeline`)")
        try:
            index = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise UserError(f"image index {path} is not a readable parquet file: {e}") from e
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing:
            raise UserError(f"image index {path} lacks columns {missing}")
        n = self._shape[0]
        if len(index) != n:
            raise UserError(
                f"image store {self.pixels_path} has {n} rows but {path} lists {len(index)} images; "
                "the dataset is incomplete or mixed, rebuild it with `vitrine pipeline`"
            )
        ids = index["image_index"].to_numpy()
        if not np.array_equal(np.sort(ids), np.arange(n)):
            raise UserError(f"image index {path}: image_index is not exactly 0..{n - 1}")
        index = index.sort_values("image_index", kind="stable").reset_index(drop=True)
        self._index = index
        self._status = index["status"].astype(object).to_numpy()
        return index

    def __getstate__(self) -> dict[str, Any]:
        return {"dataset_dir": self.dataset_dir, "shape": self._shape}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.dataset_dir = state["dataset_dir"]
        self._shape = state["shape"]
        self._pixels = None
        self._index = None
        self._status = None

    def close(self) -> None:
        """Drop the memory map; the next access reopens it."""
        self._pixels = None

    # -- shape -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._shape[0]

    @property
    def size(self) -> int:
        return self._shape[1]

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def index(self) -> pd.DataFrame:
        if self._index is None:
            self._load_index()
        assert self._index is not None
        return self._index

    def __repr__(self) -> str:
        return f"ImageStore({str(self.dataset_dir)!r}, shape={self._shape})"

    # -- reads -----------------------------------------------------------------------------------
    def _check(self, indices: Any) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.size == 0:
            return idx.astype(np.int64)
        if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"image indices must be integers, got dtype {idx.dtype}")
        n = self._shape[0]
        bad = (idx < 0) | (idx >= n)
        if bad.any():
            ids = np.unique(idx[bad])
            shown = ", ".join(str(int(i)) for i in ids[:10]) + (" ..." if len(ids) > 10 else "")
            raise IndexError(
                f"image indices out of range for a store of {n} images (valid 0..{n - 1}): {shown}"
            )
        return idx

    def get(self, indices: Any) -> np.ndarray:
        """Pixels of `indices` (any integer array): uint8 of shape `indices.shape + (S, S, 3)`."""
        idx = self._check(indices)
        pixels = self._pixels if self._pixels is not None else self._open_pixels()
        if idx.size == 0:
            return np.empty(idx.shape + self._shape[1:], dtype=np.uint8)
        return pixels[idx]

    def status(self, indices: Any) -> np.ndarray:
        """Status strings (`ok`, `missing`, ..., `placeholder`) of `indices`, same shape."""
        idx = self._check(indices)
        if self._status is None:
            self._load_index()
        assert self._status is not None
        return self._status[idx]


def contact_sheet(
    store: ImageStore,
    indices: Sequence[int] | np.ndarray,
    path: Path,
    columns: int = 8,
    labels: list[str] | None = None,
) -> Path:
    """Write a PNG grid of the given store rows, `min(columns, k)` tiles wide, row-major.

    Without labels the sheet is exactly `cols*S` x `rows*S` pixels; with labels each tile gets a
    white caption strip of `CAPTION_HEIGHT` pixels beneath it (text cut to the tile's width).
    """
    from PIL import Image, ImageDraw, ImageFont

    idx = np.asarray(indices).reshape(-1)
    k = len(idx)
    if k == 0:
        raise ValueError("contact_sheet needs at least one image index")
    if columns < 1:
        raise ValueError(f"columns must be at least 1, got {columns}")
    if labels is not None and len(labels) != k:
        raise ValueError(f"got {len(labels)} labels for {k} images")
    tiles = store.get(idx)
    s = store.size
    cols = min(columns, k)
    rows = math.ceil(k / cols)
    cap = CAPTION_HEIGHT if labels is not None else 0
    sheet = Image.new("RGB", (cols * s, rows * (s + cap)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet) if labels is not None else None
    font = ImageFont.load_default() if labels is not None else None
    for i in range(k):
        x, y = (i % cols) * s, (i // cols) * (s + cap)
        sheet.paste(Image.fromarray(tiles[i], "RGB"), (x, y))
        if draw is not None and labels is not None:
            text = str(labels[i])
            while text and draw.textlength(text, font=font) > s - 2:
                text = text[:-1]
            draw.text((x + 1, y + s + 1), text, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
