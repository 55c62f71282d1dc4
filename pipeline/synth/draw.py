"""Drawing the synthetic items' images with Pillow and numpy.

Each item has three hidden visual attributes, a colour (8 well-separated hues), a shape (circle,
square, triangle, star) and a pattern (plain, stripes, dots). `draw_item` paints them on a textured,
noisy background with jitter (position, rotation, scale 0.6-1.0, hue, saturation, brightness,
shading, pixel noise), so that the attributes can be recovered from the pixels only by a model that
generalises over that jitter, not by looking at one pixel.

Determinism: every random choice comes from the `numpy.random.Generator` passed in (one per item,
derived from the world seed and the item id), the drawing is done at 3x resolution with Pillow's
non-antialiased primitives and numpy, then reduced with a box filter; PNG and JPEG are written with
fixed encoder settings. The same seed therefore gives the same bytes.
"""

from __future__ import annotations

import colorsys
import functools
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOR_NAMES = ("red", "amber", "lime", "green", "cyan", "blue", "violet", "magenta")
SHAPE_NAMES = ("circle", "square", "triangle", "star")
PATTERN_NAMES = ("plain", "stripes", "dots")
N_COLORS, N_SHAPES, N_PATTERNS = len(COLOR_NAMES), len(SHAPE_NAMES), len(PATTERN_NAMES)

_HUE_STEP = 360.0 / N_COLORS  # 45 degrees between neighbouring colours
_HUE_JITTER = 7.0  # degrees; well under half the step, so colours never overlap
_SUPERSAMPLE = 3
_IMAGE_TAG = 0x1A6E  # separates the image streams from the world's other random streams
_SHARED_TAG = 0x5AED  # the streams of shared images (`--drawn-images`), apart from the items' own

FORMAT_EXT = {"png": "png", "jpeg": "jpg"}


def image_format_for(item_id: int, image_format: str) -> str:
    """`png` or `jpeg` for one item: fixed, or alternating by item id when `mixed`."""
    if image_format == "mixed":
        return "png" if item_id % 2 == 0 else "jpeg"
    if image_format not in FORMAT_EXT:
        raise ValueError(f"unknown image format {image_format!r}")
    return image_format


def image_name(item_id: int, image_format: str) -> str:
    """File name of an item's image, e.g. `000123.png`."""
    return f"{item_id:06d}.{FORMAT_EXT[image_format_for(item_id, image_format)]}"


def shared_image_name(image: int, image_format: str) -> str:
    """File name of shared image `image` of a world with `--drawn-images`, e.g. `shared-000017.png`
    (`mixed` alternates by the image's number)."""
    return f"shared-{image:06d}.{FORMAT_EXT[image_format_for(image, image_format)]}"


def shared_rng(seed: int, image: int) -> np.random.Generator:
    """The random stream of shared image `image`: like `item_rng`, apart from every item's stream."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SHARED_TAG, image])))


def item_rng(seed: int, item_id: int) -> np.random.Generator:
    """The random stream of one item's image: independent of every other item and of the order
    in which images are drawn (so a process pool gives the same bytes as a loop)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _IMAGE_TAG, item_id])))


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x) of a size x size image; cached, never written to."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def _box_down(a: np.ndarray, size: int) -> np.ndarray:
    """Average-pool a float image down to size x size with Pillow's box filter."""
    return np.asarray(Image.fromarray(a, mode="F").resize((size, size), Image.Resampling.BOX), dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, scale: float) -> np.ndarray:
    """Low-frequency noise: a random coarse grid upsampled bicubically to size x size."""
    grid = rng.normal(0.0, scale, size=(cells, cells)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A desaturated, textured background (float RGB in 0..1): base grey with a faint tint,
    low-frequency blotches, a faint weave of lines and fine grain."""
    grey = rng.uniform(0.32, 0.86)
    tint = rng.normal(0.0, 0.035, size=3)
    base = np.clip(grey + tint, 0.0, 1.0).astype(np.float32)
    blotch = _smooth_noise(rng, size, int(rng.integers(3, 7)), 0.07)
    yy, xx = _grid(size)
    ang = rng.uniform(0.0, math.pi)
    period = rng.uniform(3.0, 9.0) * size / 64.0
    weave = rng.uniform(0.0, 0.035) * np.sin(
        2 * math.pi * (xx * math.cos(ang) + yy * math.sin(ang)) / period + rng.uniform(0, 2 * math.pi)
    )
    grain = rng.normal(0.0, rng.uniform(0.01, 0.04), size=(size, size)).astype(np.float32)
    lum = (blotch + weave + grain)[..., None]
    return np.clip(base[None, None, :] + lum, 0.0, 1.0)


def _shape_mask(shape: int, size: int, cx: float, cy: float, radius: float, theta: float) -> np.ndarray:
    """Binary mask (float 0/1) of the shape drawn at `size` x `size`."""
    mask = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(mask)
    name = SHAPE_NAMES[shape]
    if name == "circle":
        r = radius * 0.92
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        if name == "square":
            angles = [theta + math.pi / 4 + k * math.pi / 2 for k in range(4)]
            radii = [radius] * 4
        elif name == "triangle":
            angles = [theta + k * 2 * math.pi / 3 for k in range(3)]
            radii = [radius * 1.12] * 3
        else:  # star, 5 points
            angles = [theta + k * math.pi / 5 for k in range(10)]
            radii = [radius * 1.12 if k % 2 == 0 else radius * 0.46 for k in range(10)]
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii)]
        d.polygon(pts, fill=255)
    return np.asarray(mask, dtype=np.float32) / 255.0


def _pattern_mask(
    pattern: int, rng: np.random.Generator, size: int, cx: float, cy: float, radius: float, theta: float
) -> np.ndarray:
    """Where the pattern's second tone goes (float 0/1), in the shape's rotated frame."""
    if PATTERN_NAMES[pattern] == "plain":
        return np.zeros((size, size), dtype=np.float32)
    yy, xx = _grid(size)
    phi = theta + rng.uniform(-0.15, 0.15)
    u = (xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)
    v = -(xx - cx) * math.sin(phi) + (yy - cy) * math.cos(phi)
    if PATTERN_NAMES[pattern] == "stripes":
        period = radius * rng.uniform(0.38, 0.5)
        frac = np.mod(u / period + rng.uniform(0.0, 1.0), 1.0)
        return (frac < rng.uniform(0.4, 0.55)).astype(np.float32)
    # dots on a square lattice
    period = radius * rng.uniform(0.42, 0.55)
    fu = np.mod(u / period + rng.uniform(0.0, 1.0), 1.0) - 0.5
    fv = np.mod(v / period + rng.uniform(0.0, 1.0), 1.0) - 0.5
    r = rng.uniform(0.2, 0.27)
    return ((fu * fu + fv * fv) < r * r).astype(np.float32)


def draw_item(color: int, shape: int, pattern: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one item's image (RGB, size x size)."""
    if not (0 <= color < N_COLORS and 0 <= shape < N_SHAPES and 0 <= pattern < N_PATTERNS):
        raise ValueError(f"bad visual attributes color={color} shape={shape} pattern={pattern}")
    big = size * _SUPERSAMPLE
    bg = _background(rng, size)

    # geometry: scale 0.6-1.0, random offset, random rotation
    scale = rng.uniform(0.6, 1.0)
    radius = 0.34 * big * scale
    max_off = 0.5 * big - radius * 1.05
    cx = 0.5 * big + rng.uniform(-1.0, 1.0) * min(0.14 * big, max(max_off, 0.0))
    cy = 0.5 * big + rng.uniform(-1.0, 1.0) * min(0.14 * big, max(max_off, 0.0))
    theta = rng.uniform(0.0, 2 * math.pi)
    mask = _shape_mask(shape, big, cx, cy, radius, theta)
    pmask = _pattern_mask(pattern, rng, big, cx, cy, radius, theta)

    # colour with hue / saturation / brightness jitter
    hue = ((color * _HUE_STEP + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 360.0) / 360.0
    sat = rng.uniform(0.7, 1.0)
    val = rng.uniform(0.7, 1.0)
    main = np.array(colorsys.hsv_to_rgb(hue, sat, val), dtype=np.float32)
    if rng.uniform() < 0.5:  # dark second tone, same hue
        second = np.array(colorsys.hsv_to_rgb(hue, sat, val * rng.uniform(0.3, 0.45)), dtype=np.float32)
    else:  # light second tone
        second = main + (1.0 - main) * rng.uniform(0.55, 0.75)

    # box-filter the coverage of the shape and of its pattern down to the output size
    # (antialiasing); colour, shading and compositing are done there
    cover = _box_down(mask, size)
    pcover = _box_down(mask * pmask, size)
    yy, xx = _grid(size)
    la = rng.uniform(0.0, 2 * math.pi)
    k = 0.14 / max(radius / _SUPERSAMPLE, 1.0)  # soft directional shading across the object
    shade = 1.0 + k * ((xx - cx / _SUPERSAMPLE) * math.cos(la) + (yy - cy / _SUPERSAMPLE) * math.sin(la))
    fg = cover[..., None] * main[None, None, :] + pcover[..., None] * (second - main)[None, None, :]
    fg = np.minimum(np.clip(fg * shade[..., None], 0.0, None), cover[..., None])
    comp = bg * (1.0 - cover[..., None]) + fg
    # pixel noise, roughly Gaussian
    comp = comp * 255.0 + rng.normal(0.0, rng.uniform(2.0, 7.0), size=comp.shape).astype(np.float32)
    return Image.fromarray(np.clip(comp + 0.5, 0, 255).astype(np.uint8), mode="RGB")


def save_image(img: Image.Image, path: Path, fmt: str) -> None:
    """Write with fixed encoder settings (no metadata, so the bytes depend on the pixels only)."""
    if fmt == "png":
        img.save(path, format="PNG", compress_level=6, optimize=False)
    elif fmt == "jpeg":
        img.save(path, format="JPEG", quality=92, subsampling="4:2:0", optimize=False, progressive=False)
    else:
        raise ValueError(f"unknown image format {fmt!r}")


def render_items(
    seed: int,
    item_ids: Sequence[int],
    colors: Sequence[int],
    shapes: Sequence[int],
    patterns: Sequence[int],
    size: int,
    image_format: str,
    out_dir: str,
    shared: bool = False,
) -> int:
    """Draw and save a batch of items' images into `out_dir`; returns how many were written.
    With `shared`, the ids are shared images' numbers (`shared_image_name`, `shared_rng`).
    A plain module-level function so that a process pool can run it."""
    out = Path(out_dir)
    name, rng = (shared_image_name, shared_rng) if shared else (image_name, item_rng)
    for item_id, c, s, p in zip(item_ids, colors, shapes, patterns):
        item_id = int(item_id)
        img = draw_item(int(c), int(s), int(p), size, rng(seed, item_id))
        save_image(img, out / name(item_id, image_format), image_format_for(item_id, image_format))
    return len(item_ids)
