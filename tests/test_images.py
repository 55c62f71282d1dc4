"""Bounded image decoding (pipeline/images.py) and the packed image store (image_service/store.py)."""

from __future__ import annotations

import io
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from image_service.store import (
    CAPTION_HEIGHT,
    INDEX,
    PIXELS,
    ImageStore,
    contact_sheet,
    create_store,
    placeholder,
    write_rows,
)
from pipeline.images import (
    ImageLimits,
    OutsideFolderError,
    decode_block,
    decode_image,
    resolve_image_path,
)
from vitrine.errors import UserError

S = 16
LIMITS = ImageLimits()
GREY = placeholder(S)
RED, GREEN, BLUE = (220, 20, 30), (20, 200, 40), (30, 40, 210)


def noisy(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def close_to(arr: np.ndarray, rgb: tuple[int, int, int], tol: int) -> bool:
    return bool(np.abs(arr.astype(int) - np.array(rgb)).max() <= tol)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


def decode(images: Path, rel, limits: ImageLimits = LIMITS, size: int = S):
    arr, status, reason = decode_image(images, rel, size, limits)
    assert arr.shape == (size, size, 3) and arr.dtype == np.uint8
    if status != "ok":
        assert np.array_equal(arr, placeholder(size)), "non-ok results must be the placeholder"
        assert reason, "non-ok results must say why"
    return arr, status, reason


# -- ok images ---------------------------------------------------------------------------------------
def test_ok_png_is_exact(images: Path):
    save(Image.new("RGB", (40, 40), RED), images / "a.png")
    arr, status, reason = decode(images, "a.png")
    assert (status, reason) == ("ok", "")
    assert close_to(arr, RED, 0)


def test_ok_jpeg_colour_roughly_preserved(images: Path):
    save(Image.new("RGB", (300, 200), BLUE), images / "sub" / "b.jpg", quality=90)
    arr, status, _ = decode(images, "sub/b.jpg")
    assert status == "ok"
    assert close_to(arr, BLUE, 12)


def test_jpeg_uses_draft(images: Path, monkeypatch):
    save(noisy(800, 600), images / "big.jpg", quality=80)
    seen = []
    orig = Image.Image.resize

    def spy(self, size, *a, **kw):
        seen.append(self.size)
        return orig(self, size, *a, **kw)

    monkeypatch.setattr(Image.Image, "resize", spy)
    _, status, _ = decode(images, "big.jpg")
    assert status == "ok"
    # 600 // 16 = 37 -> DCT scale 1/8: the resize sees a 75x75 crop, not 600x600
    assert seen == [(75, 75)]


def test_non_square_is_centre_cropped(images: Path):
    img = Image.new("RGB", (120, 60), GREEN)
    img.paste(Image.new("RGB", (60, 60), RED), (30, 0))  # only the centre square is red
    save(img, images / "wide.png")
    arr, status, _ = decode(images, "wide.png")
    assert status == "ok"
    assert close_to(arr, RED, 0)
    tall = Image.new("RGB", (50, 150), GREEN)
    tall.paste(Image.new("RGB", (50, 50), BLUE), (0, 50))
    save(tall, images / "tall.jpg", quality=95)
    arr, status, _ = decode(images, "tall.jpg")
    assert status == "ok"
    assert close_to(arr[2:-2, 2:-2], BLUE, 20)


def test_small_image_is_upscaled(images: Path):
    save(Image.new("RGB", (3, 5), GREEN), images / "tiny.png")
    arr, status, _ = decode(images, "tiny.png", size=32)
    assert status == "ok" and arr.shape == (32, 32, 3)
    assert close_to(arr, GREEN, 0)


@pytest.mark.parametrize(
    "name, make, expected",
    [
        ("gray.png", lambda: Image.new("L", (30, 20), 90), (90, 90, 90)),
        ("gray.jpg", lambda: Image.new("L", (30, 20), 90), (90, 90, 90)),
        ("bw.bmp", lambda: Image.new("1", (30, 20), 1), (255, 255, 255)),
        ("opaque.png", lambda: Image.new("RGBA", (30, 20), (*RED, 255)), RED),
        ("clear.png", lambda: Image.new("RGBA", (30, 20), (0, 0, 0, 0)), (255, 255, 255)),  # on white
        ("half.png", lambda: Image.new("RGBA", (30, 20), (0, 0, 0, 128)), (127, 127, 127)),
        ("la.png", lambda: Image.new("LA", (30, 20), (0, 0)), (255, 255, 255)),
        ("cmyk.jpg", lambda: Image.new("CMYK", (30, 20), (0, 255, 255, 0)), (255, 0, 0)),
        ("g16.png", lambda: Image.fromarray(np.full((20, 30), 40000, np.uint16)), (156, 156, 156)),
        ("pal.gif", lambda: Image.new("RGB", (30, 20), BLUE).convert("P", palette=Image.Palette.ADAPTIVE), BLUE),
        ("rgb16.png", None, (128, 64, 32)),
    ],
)
def test_any_mode_becomes_rgb(images: Path, name, make, expected):
    if make is None:  # 16-bit RGB PNG: Pillow cannot write one, so build it by hand
        import struct
        import zlib

        raw = np.zeros((20, 30, 3), dtype=">u2")
        raw[...] = (128 * 257, 64 * 257, 32 * 257)
        rows = b"".join(b"\x00" + r.tobytes() for r in raw)

        def chunk(t: bytes, d: bytes) -> bytes:
            return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))

        data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30, 20, 16, 2, 0, 0, 0))
        data += chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
        (images / name).write_bytes(data)
    else:
        save(make(), images / name)
    arr, status, reason = decode(images, name)
    assert status == "ok", reason
    assert close_to(arr, expected, 8), arr[0, 0]


def test_palette_transparency_composited_on_white(images: Path):
    p = Image.new("P", (30, 20), 0)
    p.putpalette([0, 0, 0] + list(RED) + [0, 0, 0] * 254)
    p.paste(1, (15, 0, 30, 20))
    save(p, images / "pt.png", transparency=0)
    arr, status, _ = decode(images, "pt.png", size=20)
    assert status == "ok"
    assert close_to(arr[:, 1:5], (255, 255, 255), 0)
    assert close_to(arr[:, -4:], RED, 0)


def test_exif_orientation_applied(images: Path):
    img = Image.new("RGB", (60, 60), RED)
    img.paste(Image.new("RGB", (60, 30), BLUE), (0, 0))  # blue on top as stored
    exif = Image.Exif()
    exif[0x0112] = 3  # rotate 180 to display
    save(img, images / "rot.jpg", quality=95, exif=exif)
    arr, status, _ = decode(images, "rot.jpg")
    assert status == "ok"
    assert close_to(arr[-3:].reshape(-1, 3).mean(0).astype(int), BLUE, 25)  # blue ends up at the bottom


def test_animated_gif_uses_first_frame(images: Path):
    frames = [Image.new("RGB", (20, 20), c) for c in (RED, BLUE)]
    frames[0].save(images / "anim.gif", save_all=True, append_images=frames[1:])
    arr, status, _ = decode(images, "anim.gif")
    assert status == "ok" and close_to(arr, RED, 10)


def test_webp_and_mpo_alias(images: Path):
    save(Image.new("RGB", (20, 20), GREEN), images / "w.webp", lossless=True)
    assert decode(images, "w.webp")[1] == "ok"
    only_jpeg = ImageLimits(formats=("jpg",))
    assert only_jpeg.formats == ("JPEG",)
    assert decode(images, "w.webp", only_jpeg)[1] == "bad_format"


# -- failures ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rel", [None, "", "   ", float("nan")])
def test_no_path_is_missing(images: Path, rel):
    _, status, reason = decode(images, rel)
    assert status == "missing" and "no image path" in reason


def test_missing_file_and_folder(images: Path):
    assert decode(images, "nope.png")[1:] == ("missing", "file not found")
    (images / "dir.png").mkdir()
    status, reason = decode(images, "dir.png")[1:]
    assert status == "missing" and "folder" in reason


def test_fifo_does_not_hang(images: Path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(images / "pipe.png")
    status, reason = decode(images, "pipe.png")[1:]
    assert status == "missing" and "regular file" in reason


def test_empty_file_is_corrupt(images: Path):
    (images / "empty.png").write_bytes(b"")
    status, reason = decode(images, "empty.png")[1:]
    assert status == "corrupt" and "empty" in reason


@pytest.mark.parametrize("name, kw", [("t.png", {}), ("t.jpg", {"quality": 90})])
def test_truncated_is_corrupt(images: Path, name, kw):
    buf = io.BytesIO()
    noisy(200, 200).save(buf, format="PNG" if name.endswith("png") else "JPEG", **kw)
    data = buf.getvalue()
    (images / name).write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    status, reason = decode(images, name)[1:]
    assert status == "corrupt" and "truncated" in reason


def test_garbage_is_corrupt(images: Path):
    junk = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (images / "junk.png").write_bytes(junk)
    status, reason = decode(images, "junk.png")[1:]
    assert status == "corrupt" and "not a recognisable image" in reason


def test_over_max_bytes_is_not_read(images: Path, monkeypatch):
    save(noisy(64, 64), images / "big.png")
    size = (images / "big.png").stat().st_size
    limits = ImageLimits(max_bytes=size - 1)
    reads = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
    status, reason = decode(images, "big.png", limits)[1:]
    monkeypatch.undo()
    assert status == "too_large"
    assert reads == [], "the size must be checked before reading"
    assert "--max-image-bytes" in reason and "kB" in reason
    assert decode(images, "big.png", ImageLimits(max_bytes=size))[1] == "ok"


def test_over_max_pixels_is_not_decoded(images: Path, monkeypatch):
    save(Image.new("RGB", (3000, 3000), RED), images / "huge.png")  # a few kB on disk
    assert (images / "huge.png").stat().st_size < 100_000
    loads = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(1))
    status, reason = decode(images, "huge.png", ImageLimits(max_pixels=1_000_000))[1:]
    monkeypatch.undo()
    assert status == "too_large"
    assert loads == [], "pixels must be checked from the header, before decoding"
    assert "3000x3000" in reason and "pixels" in reason and "--max-image-pixels" in reason


@pytest.mark.parametrize("action", ["error", "ignore"])
def test_pillow_bomb_limit_also_refuses(images: Path, monkeypatch, action):
    save(Image.new("RGB", (300, 300), RED), images / "bomb.png")
    loose = ImageLimits(max_pixels=10**9)
    with warnings.catch_warnings():  # however the process filters Pillow's warning
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 90k pixels: Pillow raises
        status, reason = decode(images, "bomb.png", loose)[1:]
        assert status == "too_large" and "decompression-bomb" in reason
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 60_000)  # Pillow would only warn...
        status, reason = decode(images, "bomb.png", loose)[1:]
        assert status == "too_large" and "decompression-bomb" in reason  # ...refused all the same


def test_disallowed_format(images: Path):
    save(Image.new("RGB", (20, 20), RED), images / "t.tiff")
    status, reason = decode(images, "t.tiff")[1:]
    assert status == "bad_format" and "TIFF" in reason and "--image-formats" in reason
    assert decode(images, "t.tiff", ImageLimits(formats=("TIFF",)))[1] == "ok"
    (images / "doc.png").write_bytes(b"%PDF-1.4\n" + b"x" * 100)
    status, reason = decode(images, "doc.png")[1:]
    assert status == "bad_format" and "PDF" in reason


def test_escapes_are_outside_folder(images: Path, tmp_path: Path):
    secret = save(Image.new("RGB", (20, 20), RED), tmp_path / "escape.png")
    outside_dir = tmp_path / "elsewhere"
    save(Image.new("RGB", (20, 20), RED), outside_dir / "x.png")
    (images / "link.png").symlink_to(secret)
    (images / "linkdir").symlink_to(outside_dir, target_is_directory=True)
    save(Image.new("RGB", (20, 20), GREEN), images / "real.png")
    (images / "inside_link.png").symlink_to(images / "real.png")
    for rel in ["../escape.png", str(secret), "link.png", "linkdir/x.png", "sub/../../escape.png"]:
        arr, status, reason = decode(images, rel)
        assert status == "outside_folder", (rel, status, reason)
        with pytest.raises(OutsideFolderError):
            resolve_image_path(images, rel)
    assert decode(images, "inside_link.png")[1] == "ok"  # a symlink that stays inside is fine
    assert decode(images, "sub/../real.png")[1] == "ok"
    assert resolve_image_path(images, "inside_link.png") == (images / "real.png").resolve()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_never_raise(images: Path, data: bytes):
    (images / "fuzz.png").write_bytes(data)
    _, status, _ = decode(images, "fuzz.png")
    assert status in {"corrupt", "bad_format", "ok"}


_PNG = io.BytesIO()
noisy(24, 24, seed=3).save(_PNG, format="PNG")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=len(_PNG.getvalue()) - 1))
def test_png_prefixes_are_corrupt_or_complete(images: Path, cut: int):
    (images / "full.png").write_bytes(_PNG.getvalue())
    (images / "cut.png").write_bytes(_PNG.getvalue()[:cut])
    arr, status, _ = decode(images, "cut.png")
    # Losing only trailing bytes (IEND, CRC, zlib checksum) may still leave every pixel: then it
    # must be exactly the full image, never a padded one.
    assert status == "corrupt" or (status == "ok" and np.array_equal(arr, decode(images, "full.png")[0]))
    if cut < len(_PNG.getvalue()) - 24:
        assert status == "corrupt"


# -- the store ---------------------------------------------------------------------------------------
def _index(frames: list[pd.DataFrame]) -> pd.DataFrame:
    row0 = pd.DataFrame(
        {"image_index": [0], "key": [""], "source": [""], "status": ["placeholder"], "reason": ["no image"]}
    )
    return pd.concat([row0, *frames], ignore_index=True)


@pytest.fixture
def built(tmp_path: Path, images: Path):
    save(Image.new("RGB", (40, 30), RED), images / "r.png")
    save(Image.new("RGB", (30, 40), BLUE), images / "b.jpg", quality=95)
    save(Image.new("L", (20, 20), 200), images / "g.png")
    (images / "bad.png").write_bytes(b"not an image")
    ds = tmp_path / "ds"
    pixels = create_store(ds, 7, S)
    assert pixels == ds / PIXELS
    assert np.array_equal(np.load(pixels)[0], GREY)
    # two blocks into disjoint rows, the second written first
    b2 = decode_block(str(images), ["g.png", None, "../x.png"], 4, str(pixels), S, LIMITS)
    b1 = decode_block(str(images), ["r.png", "b.jpg", "bad.png"], 1, str(pixels), S, LIMITS)
    index = _index([b1, b2])
    index.to_parquet(ds / INDEX)
    return ds, images, b1, b2


def test_decode_block_frame(built):
    _ds, images, b1, b2 = built
    assert list(b1.columns) == ["image_index", "key", "source", "status", "reason"]
    assert b1["image_index"].tolist() == [1, 2, 3] and b2["image_index"].tolist() == [4, 5, 6]
    assert b1["image_index"].dtype == np.int64
    assert b1["status"].tolist() == ["ok", "ok", "corrupt"]
    assert b2["status"].tolist() == ["ok", "missing", "outside_folder"]
    assert b1["source"].iloc[0] == str((images / "r.png").resolve())
    assert b2["source"].tolist()[1:] == ["", "../x.png"]
    assert pd.isna(b2["key"].iloc[1])
    assert b1["reason"].iloc[0] == "" and b1["reason"].iloc[2]


def test_store_reads_back(built):
    ds, _images, _b1, _b2 = built
    store = ImageStore(ds)
    assert len(store) == 7 and store.size == S and store.shape == (7, S, S, 3)
    got = store.get(np.array([1, 2, 4, 0, 3, 5, 6, 1]))
    assert got.shape == (8, S, S, 3) and got.dtype == np.uint8 and type(got) is np.ndarray
    assert close_to(got[0], RED, 0) and close_to(got[1], BLUE, 12) and close_to(got[2], (200,) * 3, 0)
    for i in (3, 4, 5, 6):
        assert np.array_equal(got[i], GREY)
    assert np.array_equal(got[7], got[0])  # repeats preserved
    assert store.status(np.array([0, 1, 3, 5, 6])).tolist() == [
        "placeholder", "ok", "corrupt", "missing", "outside_folder"
    ]
    assert store.get(np.array([[1, 2], [0, 0]])).shape == (2, 2, S, S, 3)
    assert store.get(np.array([], dtype=np.int64)).shape == (0, S, S, 3)
    assert list(store.index["image_index"]) == list(range(7))
    assert store.get(np.array([1])).flags.writeable  # a copy the caller may modify
    with pytest.raises(ValueError, match="read-only"):
        store._pixels[1, 0, 0, 0] = 0  # type: ignore[index]  # the map itself is read-only


def test_store_pickles_lazily(built):
    ds, *_ = built
    store = ImageStore(ds)
    blob = pickle.dumps(store)
    assert len(blob) < 1000, "pickles must not carry pixels"
    clone = pickle.loads(blob)
    assert clone._pixels is None
    idx = np.arange(7)
    assert np.array_equal(clone.get(idx), store.get(idx))
    assert clone.status(idx).tolist() == store.status(idx).tolist()


def test_out_of_range_names_ids(built):
    store = ImageStore(built[0])
    with pytest.raises(IndexError, match=r"7, 99") as e:
        store.get(np.array([1, 7, 99, 7]))
    assert "0..6" in str(e.value)
    with pytest.raises(IndexError, match="-1"):
        store.status(np.array([-1]))
    with pytest.raises(TypeError):
        store.get(np.array([1.0]))


def test_store_errors_name_the_file(built, tmp_path: Path):
    ds, *_ = built
    with pytest.raises(UserError, match="pixels.npy"):
        ImageStore(tmp_path / "nowhere")
    pd.read_parquet(ds / INDEX).iloc[:5].to_parquet(ds / INDEX)
    with pytest.raises(UserError, match=r"7 rows.*index.parquet.*5 images"):
        ImageStore(ds)
    (ds / INDEX).unlink()
    with pytest.raises(UserError, match="index.parquet"):
        ImageStore(ds)
    np.save(ds / PIXELS, np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(UserError, match="pixels.npy.*shape"):
        ImageStore(ds)


def test_write_rows_checks_bounds(tmp_path: Path):
    p = create_store(tmp_path, 3, 4)
    with pytest.raises(ValueError, match="outside"):
        write_rows(p, 2, np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        write_rows(p, 1, np.zeros((1, 5, 5, 3), np.uint8))
    write_rows(p, 1, np.full((2, 4, 4, 3), 7, np.uint8))
    assert np.load(p)[1:].min() == 7


def test_contact_sheet(built, tmp_path: Path):
    store = ImageStore(built[0])
    out = contact_sheet(store, [1, 2, 3, 4, 5], tmp_path / "sheets" / "a.png", columns=3)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (3 * S, 2 * S)
        assert close_to(np.asarray(im.convert("RGB"))[:S, :S], RED, 0)
    out = contact_sheet(store, [1, 2], tmp_path / "b.png", labels=["red", "blue"])
    with Image.open(out) as im:
        assert im.size == (2 * S, S + CAPTION_HEIGHT)
        caption = np.asarray(im.convert("L"))[S:]
        assert caption.min() < 128, "some caption text was drawn"
    with pytest.raises(ValueError):
        contact_sheet(store, [1, 2], tmp_path / "c.png", labels=["one"])
