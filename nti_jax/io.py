"""Images in and out, and atomic file writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                im.load()
                image = im.convert("RGB") if im.mode != "RGB" else im.copy()
        except FileNotFoundError:
            raise ImageError(f"image file not found: {image}") from None
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageError(f"cannot read image {image}: {e}") from None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ImageError(f"image arrays must be HxWx3 (RGB), got shape {arr.shape}")
    if arr.shape[0] < 8 or arr.shape[1] < 8:
        raise ImageError(f"image is too small ({arr.shape[1]}x{arr.shape[0]})")
    return arr[..., :3]


def load_image(image: ImageLike, size: int, crop: Optional[Sequence[int]] = None) -> np.ndarray:
    """uint8 (size, size, 3): trim `crop` = (left, right, top, bottom) pixels, centre-crop to a
    square, resize with PIL's default (bicubic) resampling, as the authors' `load_512`."""
    arr = _as_rgb_array(image)
    h, w = arr.shape[:2]
    left, right, top, bottom = crop or (0, 0, 0, 0)
    if min(left, right, top, bottom) < 0 or left + right >= w or top + bottom >= h:
        raise ImageError(f"crop {tuple(crop)} leaves nothing of a {w}x{h} image")
    arr = arr[top : h - bottom, left : w - right]
    h, w = arr.shape[:2]
    if h < w:
        off = (w - h) // 2
        arr = arr[:, off : off + h]
    elif w < h:
        off = (h - w) // 2
        arr = arr[off : off + w]
    if arr.shape[0] != size:
        arr = np.asarray(Image.fromarray(arr).resize((size, size)))
    return np.ascontiguousarray(arr)


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] -> uint8, rounding as PIL does."""
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(image, path: str) -> None:
    """Write one float [0,1] or uint8 HxWx3 image atomically."""
    arr = image if np.asarray(image).dtype == np.uint8 else to_uint8(image)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(arr)).save(tmp, format="PNG")


def psnr(a, b) -> float:
    """PSNR in dB between two images with values in [0, 1] (or two uint8 images)."""
    scale = lambda x: np.asarray(x, np.float64) / (255.0 if np.asarray(x).dtype == np.uint8 else 1.0)
    a, b = scale(a), scale(b)
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
