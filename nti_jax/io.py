"""Images in and out, and atomic file writes.

Reading follows the authors' `load_512` (RGB, crop offsets, centre square, PIL's default bicubic
resize) and settles what it leaves open: an image file's EXIF orientation tag is applied (load_512
ignores it, so a phone photo stored sideways would be inverted sideways while its caption describes
the upright picture; images without the tag, PIE-Bench's among them, are read exactly as load_512
reads them); alpha is dropped as load_512's `[:, :, :3]` does; 16-bit images are scaled to 8 bits
(PIL's own conversion clips them, turning most of the image white); CMYK, palette and grey images
go through PIL's conversion to RGB.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import warnings
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nti_jax.errors import ImageError

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray]
MIN_SIDE = 8  # pixels of the centred square: less is not a picture (1x1 trackers, broken thumbnails)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _scale16(arr: np.ndarray) -> np.ndarray:
    """0..65535 -> uint8, rounded (65535 -> 255)."""
    arr = np.clip(arr.astype(np.int64), 0, 65535)
    return ((arr * 255 + 32767) // 65535).astype(np.uint8)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
    """uint8 (H, W, 3) of a PIL image of any mode."""
    if im.mode in _SIXTEEN_BIT:  # 16-bit grey (PIL opens 16-bit PNG/TIFF grey as I;16 or I)
        grey = _scale16(np.asarray(im))
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _read(path: Union[str, os.PathLike]) -> np.ndarray:
    """uint8 (H, W, 3) of an image file, upright as its EXIF orientation says."""
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ImageError(f"image {name} is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big but below PIL's limit: fine
            with Image.open(name) as im:
                im.load()
                return _pil_to_rgb(_upright(im))
    except FileNotFoundError:
        raise ImageError(f"image file not found: {name}") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image {name} is too large to decode safely ({_text(e)})") from None
    except Exception as e:  # noqa: BLE001 - PIL's decoders raise many kinds (OSError, SyntaxError, ...)
        raise ImageError(f"cannot read image {name}: {_text(e)}") from None


def _upright(im: Image.Image) -> Image.Image:
    """`im` turned as its EXIF orientation tag says (as is when the tag is absent or unreadable)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still good
        return im


def _text(e: BaseException) -> str:
    if isinstance(e, UnidentifiedImageError):
        return "not an image file in a format PIL knows"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return " ".join(str(e).split()) or "not a readable image"


def _as_rgb_array(image: ImageLike) -> np.ndarray:
    """uint8 (H, W, 3) of a file, a PIL image or an (H, W[, 3|4]) uint8/uint16 array."""
    if isinstance(image, (str, os.PathLike)):
        return _read(image)
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    arr = np.asarray(image)
    if arr.dtype == np.uint16:
        arr = _scale16(arr)
    if arr.dtype != np.uint8:
        raise ImageError(f"image arrays must be uint8 (or uint16), got {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ImageError(f"image arrays must be HxWx3 (RGB), got shape {arr.shape}")
    return arr[..., :3]


def load_image(image: ImageLike, size: int, crop: Optional[Sequence[int]] = None) -> np.ndarray:
    """uint8 (size, size, 3): trim `crop` = (left, right, top, bottom) pixels, centre-crop to a
    square, resize with PIL's default (bicubic) resampling, as the authors' `load_512`. The square
    must be at least MIN_SIDE pixels (ImageError otherwise)."""
    arr = _as_rgb_array(image)  # (H, W, 3)
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
    if arr.shape[0] < MIN_SIDE:
        whole = f"a {w}x{h} image" + (" after the crop" if crop else "")
        raise ImageError(f"image is too small: the centred square of {whole} is {arr.shape[0]}x{arr.shape[0]} pixels, at least {MIN_SIDE}x{MIN_SIDE} needed")
    if arr.shape[0] != size:
        arr = np.asarray(Image.fromarray(arr).resize((size, size)))
    return np.ascontiguousarray(arr)


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1] -> uint8, truncating as the authors' code does
    (`(image * 255).astype(np.uint8)` in ptp_utils/the notebook), so saved files match theirs."""
    return (np.clip(np.asarray(images, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def _write_error(e: Exception, path: str) -> Optional[OSError]:
    """An OSError naming `path` (not the temporary file) for a failed write; None if `e` is not an
    I/O error (safetensors reports them as its own error carrying "(os error N)")."""
    code = e.errno if isinstance(e, OSError) else None
    if code is None:
        m = _OS_ERROR.search(str(e))
        code = int(m.group(1)) if m else None
    if code is None:
        return e if isinstance(e, OSError) else None
    return OSError(code, os.strerror(code), path)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; it replaces `path` only if the block succeeds. A write
    that fails (disk full, file too large) raises OSError naming `path`, and leaves no file behind."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as e:
        err = _write_error(e, path)
        if err is None or err is e:
            raise
        raise err from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if needed) for the block: one process at
    a time, on this host or any host sharing the folder where the filesystem supports flock; the
    kernel drops the lock when its holder dies."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


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
