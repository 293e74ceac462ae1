"""Turning model outputs into images on disk: uint8 conversion, grids, atomic PNG writes."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

from utils.fileio import atomic_write


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8, clipped and rounded (the original truncated)."""
    return np.rint((np.clip(np.asarray(x, np.float32), -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def rgb_uint8(images, what: str = "images") -> np.ndarray:
    """`images` as a uint8 [N, H, W, 3] array; ValueError for anything else (a float batch could be
    in [0, 1] or [-1, 1] and silently give a wrong FID)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    return images


def grid_side(n: int) -> int:
    return math.ceil(math.sqrt(n))


def make_grid(images: np.ndarray, gutter: int = 1, side: int | None = None) -> np.ndarray:
    """Tile N uint8 images [N, H, W, C] row by row into a side x side grid (side = ceil(sqrt(N)))
    with `gutter` white pixels between tiles; empty cells stay white."""
    n, h, w, c = images.shape
    side = side or grid_side(n)
    rows = math.ceil(n / side)
    out = np.full((rows * h + (rows - 1) * gutter, side * w + (side - 1) * gutter, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, side)
        out[r * (h + gutter):r * (h + gutter) + h, col * (w + gutter):col * (w + gutter) + w] = images[i]
    return out


def zoom(image: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour upscaling [H, W, C] -> [kH, kW, C]: each pixel becomes a k x k block."""
    return image if k == 1 else np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def tile_position(i: int, side: int, h: int, w: int, gutter: int = 1) -> tuple[int, int]:
    """Top-left pixel of tile i in a grid made by make_grid."""
    r, c = divmod(i, side)
    return r * (h + gutter), c * (w + gutter)


def save_png(path: str, image: np.ndarray) -> None:
    """Write a lossless PNG atomically."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    with atomic_write(path) as f:
        Image.fromarray(image).save(f, format="PNG")


def png_ok(path: str, size: tuple[int, int]) -> bool:
    """True if `path` is a complete PNG of size (width, height): its chunks' checksums are
    verified, without decoding the pixels (cheap enough to run over a folder on every resume)."""
    try:
        with Image.open(path) as im:
            if im.format != "PNG" or im.size != size:
                return False
            im.verify()
        return True
    except (OSError, SyntaxError):  # missing, empty, truncated, broken
        return False
