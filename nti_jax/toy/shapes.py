"""The "shapes" toy world: one coloured shape on a plain coloured background.

Each scene is ``a {color} {shape} on a {background} background`` with

* ``color`` / ``background`` from the 9-colour palette :data:`COLORS`
  (background always differs from the object colour),
* ``shape`` from :data:`SHAPES`: an axis-aligned ``square``, a ``circle``
  inscribed in its bounding box, or an isosceles ``triangle`` pointing up
  (base = bottom side of the box, apex = top centre; area = side^2 / 2),
* a square bounding box whose side is uniform in [30%, 60%] of the image side
  and whose position is uniform such that the box lies fully inside the image.

Rendering is deterministic in the seed (``numpy.random.default_rng(seed)``) and
always consumes the same random draws in the same order, whatever attributes
the caller fixes, so ``render(s)`` and ``render(s, color="blue")`` share the
same shape, geometry and (where possible) background: handy for
prompt-to-prompt style edits.

Anti-aliasing is analytic.  Pixel ``(i, j)`` covers ``[j, j+1] x [i, i+1]``.
The coverage of a pixel by a half-plane is computed exactly (it is the CDF of
the projection of the uniform pixel square onto the half-plane normal, a
trapezoid distribution).  Squares are exact (product of the x and y interval
overlaps).  Circles use the exact coverage of the tangent half-plane at each
boundary pixel (error O(1/r^2)).  Triangles multiply the exact coverages of
their edges (exact except in the few pixels that contain a corner).  Both are
then clamped from above by the exact coverage of their bounding box.
The image is ``mask * object + (1 - mask) * background`` rounded to uint8.

Colour measurement (:func:`classify_color`, :func:`dominant_colors`) uses the
nearest palette colour by Euclidean distance in CIELAB (CIE76, D65 white, sRGB
input).  CIELAB separates lightness from chroma/hue on a roughly perceptual
scale, so the typical over-saturation of classifier-free-guided samples stays
with the intended colour: a black that drifted to dark red (60,10,10) has
L*~12 and is much closer to black (L*~6) than to red (L*~48), a white that
drifted to pink (255,200,210) is nearest to white, a tinted gray stays gray,
while chromatic colours pushed to full saturation keep their hue.  (OKLab was
tried and rejected: with its unscaled axes lightness dominates, and pure green
(0,255,0) came out as yellow.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
MIN_SIDE_FRAC = 0.3
MAX_SIDE_FRAC = 0.6

_CHUNK = 512  # images rasterised at once (bounds temporary memory)


def caption(color: str, shape: str, background: str) -> str:
    """``a {color} {shape} on a {background} background``."""
    return f"a {color} {shape} on a {background} background"


def parse_caption(text: str) -> tuple[str, str, str]:
    """Inverse of :func:`caption`: ``(color, shape, background)``."""
    words = text.strip().split()
    if (
        len(words) != 7
        or words[0] != "a"
        or words[3:5] != ["on", "a"]
        or words[6] != "background"
        or words[1] not in COLORS
        or words[2] not in SHAPES
        or words[5] not in COLORS
    ):
        raise ValueError(f"not a shapes caption: {text!r}")
    return words[1], words[2], words[5]


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One rendered scene.

    ``bbox`` is ``(x0, y0, side)`` in pixels (x = column, y = row) of the
    shape's square bounding box.
    """

    image: np.ndarray  # uint8 (H, W, 3)
    mask: np.ndarray  # float32 (H, W), object coverage in [0, 1]
    caption: str
    color: str
    shape: str
    background: str
    bbox: tuple[float, float, float]


def _check(name: str | None, allowed: Sequence[str], what: str) -> None:
    if name is not None and name not in allowed:
        raise ValueError(f"unknown {what} {name!r}; expected one of {tuple(allowed)}")


def scene_params(
    seed: int,
    size: int = 64,
    *,
    color: str | None = None,
    shape: str | None = None,
    background: str | None = None,
) -> tuple[str, str, str, tuple[float, float, float]]:
    """Draw ``(color, shape, background, (x0, y0, side))`` for one seed.

    Always draws, in order: colour index (9), shape index (3), "other colour"
    index (8), side fraction, x fraction, y fraction; fixed attributes only
    override the drawn ones.
    """
    _check(color, COLOR_NAMES, "color")
    _check(shape, SHAPES, "shape")
    _check(background, COLOR_NAMES, "background")
    if color is not None and color == background:
        raise ValueError(f"object and background colour must differ (both {color!r})")
    if int(size) < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    rng = np.random.default_rng(seed)
    ci = int(rng.integers(len(COLOR_NAMES)))
    si = int(rng.integers(len(SHAPES)))
    oi = int(rng.integers(len(COLOR_NAMES) - 1))
    frac = float(rng.uniform(MIN_SIDE_FRAC, MAX_SIDE_FRAC))
    fx, fy = float(rng.random()), float(rng.random())

    if color is None and background is not None:
        color = [c for c in COLOR_NAMES if c != background][oi]
    if color is None:
        color = COLOR_NAMES[ci]
    if background is None:
        background = [c for c in COLOR_NAMES if c != color][oi]
    if shape is None:
        shape = SHAPES[si]
    side = frac * size
    x0 = fx * (size - side)
    y0 = fy * (size - side)
    return color, shape, background, (x0, y0, side)


# ----------------------------------------------------------------------------
# analytic coverage


def _interval_cov(lo: np.ndarray, hi: np.ndarray, n: int) -> np.ndarray:
    """Overlap length of pixel [k, k+1] with [lo, hi]; (N,) -> (N, n) float32."""
    k = np.arange(n, dtype=np.float32)
    lo = lo.astype(np.float32)[:, None]
    hi = hi.astype(np.float32)[:, None]
    return np.clip(np.minimum(k + 1, hi) - np.maximum(k, lo), 0.0, 1.0)


def _box_cov(x0, y0, x1, y1, n: int) -> np.ndarray:
    """Exact coverage of axis-aligned boxes; (N,) each -> (N, n, n) float32."""
    return _interval_cov(y0, y1, n)[:, :, None] * _interval_cov(x0, x1, n)[:, None, :]


def _halfplane_cov_const(t: np.ndarray, a: float, b: float) -> np.ndarray:
    """P(n . u <= t), u uniform in [-1/2, 1/2]^2, |n_x|,|n_y| = a >= b > 0 (scalars).

    ``t`` is minus the signed distance of the pixel centre from the edge
    (positive inside).  The projection is the sum of U[-a/2,a/2] and
    U[-b/2,b/2], whose CDF is a difference of squared ramps.
    """
    lo, mid = (a + b) / 2, (a - b) / 2
    t = np.clip(t, -lo, lo)

    def r2(x):
        return np.square(np.maximum(x, 0.0))

    return (r2(t + lo) - r2(t + mid) - r2(t - mid) + r2(t - lo)) * (1.0 / (2 * a * b))


def _halfplane_cov(t: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """As :func:`_halfplane_cov_const` with per-element ``a >= b >= 0`` (float64)."""
    lo, mid = (a + b) / 2, (a - b) / 2
    tt = np.clip(t, -lo, lo)
    small = b < 1e-4
    bb = np.where(small, 1.0, b)

    def r2(x):
        return np.square(np.maximum(x, 0.0))

    quad = (r2(tt + lo) - r2(tt + mid) - r2(tt - mid) + r2(tt - lo)) / (2 * a * bb)
    lin = np.clip(t / a + 0.5, 0.0, 1.0)
    return np.clip(np.where(small, lin, quad), 0.0, 1.0)


_SQRT5 = math.sqrt(5.0)


def _coverage(shape_idx: np.ndarray, bbox: np.ndarray, size: int) -> np.ndarray:
    """Object coverage masks (N, size, size) float32 for shapes/bboxes (N,), (N, 3)."""
    n = len(shape_idx)
    out = np.zeros((n, size, size), np.float32)
    pix = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
    x0, y0, s = bbox[:, 0], bbox[:, 1], bbox[:, 2]
    x1, y1 = x0 + s, y0 + s

    # square: exact separable product of interval overlaps
    sel = np.nonzero(shape_idx == SHAPES.index("square"))[0]
    if sel.size:
        out[sel] = _box_cov(x0[sel], y0[sel], x1[sel], y1[sel], size)

    # triangle: product of the exact coverages of its three edges (and of the
    # line y >= y0 through the apex), then min() with the exact coverage of the
    # bounding box (which contains the shape, so this only removes the
    # product's small spill at the corners).
    sel = np.nonzero(shape_idx == SHAPES.index("triangle"))[0]
    if sel.size:
        box = _box_cov(x0[sel], y0[sel], x1[sel], y1[sel], size)
        # rows in [y0, y1]: the bottom edge, and a top clamp that tames the
        # product's overestimate around the apex
        cy = _interval_cov(y0[sel], y1[sel], size)
        a, b = 2 / _SQRT5, 1 / _SQRT5
        xs = pix[None, None, :]
        ys = pix[None, :, None]
        # left edge through (x0, y1) and apex; outward normal (-2, -1)/sqrt5
        cl = ((2 * x0[sel] + y1[sel]) / _SQRT5).astype(np.float32)[:, None, None]
        # right edge through (x1, y1) and apex; outward normal (2, -1)/sqrt5
        cr = ((-2 * x1[sel] + y1[sel]) / _SQRT5).astype(np.float32)[:, None, None]
        ys_term = ys * np.float32(b)
        xs_term = xs * np.float32(a)
        t_left = xs_term + ys_term - cl  # = -(signed distance to left edge)
        t_right = -xs_term + ys_term - cr
        cov = cy[:, :, None] * _halfplane_cov_const(t_left, a, b) * _halfplane_cov_const(t_right, a, b)
        out[sel] = np.minimum(cov, box)

    # circle: exact coverage of the tangent half-plane in the boundary band
    sel = np.nonzero(shape_idx == SHAPES.index("circle"))[0]
    if sel.size:
        r = (s[sel] / 2).astype(np.float32)[:, None, None]
        dx = pix[None, None, :] - (x0[sel] + s[sel] / 2).astype(np.float32)[:, None, None]
        dy = pix[None, :, None] - (y0[sel] + s[sel] / 2).astype(np.float32)[:, None, None]
        dist = np.sqrt(dx * dx + dy * dy)
        t = r - dist
        cov = (t > 0).astype(np.float32)
        band = np.nonzero(np.abs(t) < 0.7072)  # outside the band coverage is 0 or 1
        if band[0].size:
            dd = dist[band].astype(np.float64)
            ddx = np.broadcast_to(dx, dist.shape)[band].astype(np.float64)
            ddy = np.broadcast_to(dy, dist.shape)[band].astype(np.float64)
            nx = np.abs(ddx) / np.maximum(dd, 1e-12)
            ny = np.abs(ddy) / np.maximum(dd, 1e-12)
            cov[band] = _halfplane_cov(t[band].astype(np.float64), np.maximum(nx, ny), np.minimum(nx, ny))
        # the tangent half-plane contains the circle: clamp by the bounding box
        out[sel] = np.minimum(cov, _box_cov(x0[sel], y0[sel], x1[sel], y1[sel], size))
    # snap float32 rounding noise so that the interior is exactly 1, outside exactly 0
    out[out < 1e-6] = 0.0
    out[out > 1 - 1e-6] = 1.0
    return out


def _compose(masks: np.ndarray, obj_rgb: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """``rint(bg + mask * (obj - bg))`` as uint8 (N, H, W, 3), computed in place."""
    obj = obj_rgb.astype(np.float32)[:, None, None, :]
    bg = bg_rgb.astype(np.float32)[:, None, None, :]
    img = np.multiply(masks[..., None], obj - bg)
    img += bg
    np.rint(img, out=img)  # a convex combination of 0..255 values: no clipping needed
    return img.astype(np.uint8)


def _render_params(params, size: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(params)
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.empty((n, size, size), np.float32)
    shape_idx = np.array([SHAPES.index(p[1]) for p in params], np.int64)
    bbox = np.array([p[3] for p in params], np.float64).reshape(n, 3)
    obj = np.array([COLORS[p[0]] for p in params], np.float32).reshape(n, 3)
    bg = np.array([COLORS[p[2]] for p in params], np.float32).reshape(n, 3)
    for i in range(0, n, _CHUNK):
        sl = slice(i, i + _CHUNK)
        masks[sl] = _coverage(shape_idx[sl], bbox[sl], size)
        images[sl] = _compose(masks[sl], obj[sl], bg[sl])
    return images, masks


def render_batch(
    seeds: Sequence[int] | np.ndarray,
    size: int = 64,
    *,
    color: str | None = None,
    shape: str | None = None,
    background: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Render many scenes: ``(images uint8 (N,H,W,3), masks float32 (N,H,W), captions)``.

    ``render_batch(seeds)[k][i]`` equals ``render(seeds[i])`` field by field.
    Optional ``color`` / ``shape`` / ``background`` fix that attribute for all.
    """
    params = [
        scene_params(int(sd), size, color=color, shape=shape, background=background) for sd in seeds
    ]
    images, masks = _render_params(params, size)
    return images, masks, [caption(p[0], p[1], p[2]) for p in params]


def render(
    seed: int,
    size: int = 64,
    *,
    color: str | None = None,
    shape: str | None = None,
    background: str | None = None,
) -> Sample:
    """Render one scene, deterministically from ``seed``."""
    p = scene_params(seed, size, color=color, shape=shape, background=background)
    images, masks = _render_params([p], size)
    return Sample(
        image=images[0],
        mask=masks[0],
        caption=caption(p[0], p[1], p[2]),
        color=p[0],
        shape=p[1],
        background=p[2],
        bbox=p[3],
    )


# ----------------------------------------------------------------------------
# colour measurement


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..255, (..., 3)) -> CIELAB (D65) (..., 3), float64."""
    c = np.asarray(rgb, np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4 / 29)
    return np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1
    )


_PALETTE_LAB = srgb_to_lab(np.array([COLORS[c] for c in COLOR_NAMES], np.float64))


def classify_color(rgb) -> str | list[str]:
    """Nearest palette colour name (CIE76 distance in CIELAB).

    ``rgb``: one colour (3,) -> ``str``; or an (N, 3) array -> ``list[str]``.
    Values are sRGB in 0..255 (ints or floats).
    """
    arr = np.asarray(rgb, np.float64)
    if arr.shape == (3,):
        return classify_color(arr[None])[0]
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"expected (3,) or (N, 3) RGB, got shape {arr.shape}")
    lab = srgb_to_lab(arr)
    dist = np.sum((lab[:, None, :] - _PALETTE_LAB[None]) ** 2, axis=-1)
    return [COLOR_NAMES[i] for i in np.argmin(dist, axis=1)]


def _erode_min(m: np.ndarray) -> np.ndarray:
    """3x3 min filter (edge-padded)."""
    p = np.pad(m, 1, mode="edge")
    h, w = m.shape
    return np.min([p[i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)


def interior(mask: np.ndarray, px: int = 2) -> np.ndarray:
    """Pixels at least ``px`` pixels inside a coverage mask (``interior(1 - mask)``: background
    at least ``px`` pixels from the object), as a bool array."""
    m = np.asarray(mask, np.float32)
    for _ in range(px):
        m = _erode_min(m)
    return m > 0.99


def dominant_colors(image: np.ndarray, mask: np.ndarray) -> tuple[str, str]:
    """``(object_color_name, background_color_name)`` of an image given an object mask.

    Object pixels: mask > 0.9 after a 3x3 erosion (i.e. at least one pixel
    away from the anti-aliased edge); background: mask < 0.1 likewise.  The
    per-channel median of each region is classified with
    :func:`classify_color`.  Fallbacks for tiny regions: the un-eroded
    threshold; then, for the object, the pixels with mask >= half its maximum,
    un-mixed from the background colour (``bg + (pixel - bg) / mask``); for
    the background, mask < 0.5.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {image.shape}")
    m = np.asarray(mask, np.float32)
    if m.shape != image.shape[:2]:
        raise ValueError(f"mask shape {m.shape} != image shape {image.shape[:2]}")
    if not (m.max() > 0 and m.min() < 1):
        raise ValueError("mask must contain both object and background")
    px = image.astype(np.float64)

    bg_rgb = None
    for sel in (_erode_min(1.0 - m) > 0.9, m < 0.1, m < 0.5, m == m.min()):
        if sel.any():
            bg_rgb = np.median(px[sel], axis=0)
            break

    for sel in (_erode_min(m) > 0.9, m > 0.9):
        if sel.any():
            obj_rgb = np.median(px[sel], axis=0)
            break
    else:  # object too small to have a clean pixel: un-mix partial pixels
        sel = m >= 0.5 * m.max()
        w = m[sel][:, None].astype(np.float64)
        obj_rgb = np.median(np.clip(bg_rgb + (px[sel] - bg_rgb) / w, 0, 255), axis=0)
    return classify_color(obj_rgb), classify_color(bg_rgb)


def scene_colors(image: np.ndarray, border: int = 2, min_delta_e: float = 25.0) -> tuple[str, str]:
    """``(object_color_name, background_color_name)`` of a generated image, without a mask.

    The background is the median colour of a ``border``-pixel frame (objects cover at most 60% of
    a side, so the frame is mostly background); the object mask is every pixel farther than
    ``min_delta_e`` (CIE76) from it; then :func:`dominant_colors`. No such pixel: the object is
    reported as ``"none"``.
    """
    image = np.asarray(image)
    px = image.astype(np.float64)
    frame = np.ones(image.shape[:2], bool)
    frame[border:-border, border:-border] = False
    bg_lab = srgb_to_lab(np.median(px[frame], axis=0))
    mask = (np.linalg.norm(srgb_to_lab(px) - bg_lab, axis=-1) > min_delta_e).astype(np.float32)
    if not mask.any():
        return "none", classify_color(np.median(px[frame], axis=0))
    return dominant_colors(image, mask)
