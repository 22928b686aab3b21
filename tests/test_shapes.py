"""Tests for the "shapes" toy world renderer and colour measurement."""

import math

import numpy as np
import pytest

from nti_jax.toy.shapes import (
    COLORS,
    SHAPES,
    Sample,
    caption,
    classify_color,
    dominant_colors,
    interior,
    parse_caption,
    render,
    render_batch,
    scene_params,
)


def test_palette_and_shapes():
    assert COLORS == {
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
    assert SHAPES == ("circle", "square", "triangle")


def test_caption_format():
    assert caption("red", "circle", "blue") == "a red circle on a blue background"
    assert parse_caption("a red circle on a blue background") == ("red", "circle", "blue")
    with pytest.raises(ValueError):
        parse_caption("a red dog on a blue background")
    s = render(3)
    assert s.caption == f"a {s.color} {s.shape} on a {s.background} background"


def test_sample_fields():
    s = render(0)
    assert isinstance(s, Sample)
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (64, 64) and s.mask.dtype == np.float32
    assert s.mask.min() >= 0.0 and s.mask.max() <= 1.0
    assert (s.mask == 1).any() and (s.mask == 0).any()  # interior/exterior exact
    assert s.color in COLORS and s.background in COLORS and s.shape in SHAPES
    with pytest.raises(dataclasses_frozen_error()):
        s.color = "red"  # type: ignore[misc]


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_determinism():
    a, b = render(1234), render(1234)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert (a.caption, a.bbox) == (b.caption, b.bbox)
    # batch == single, element by element
    seeds = [5, 1234, 0, 99]
    images, masks, captions = render_batch(seeds)
    for i, sd in enumerate(seeds):
        s = render(sd)
        assert np.array_equal(images[i], s.image)
        assert np.array_equal(masks[i], s.mask)
        assert captions[i] == s.caption


def test_different_seeds_differ():
    images, masks, captions = render_batch(range(50))
    for i in range(49):
        assert not np.array_equal(images[i], images[i + 1])
    assert len({c for c in captions}) > 25


def test_fixed_attributes_keep_geometry():
    base = render(77)
    for kw in ({"color": "blue" if base.color != "blue" else "red"},
               {"shape": "square"},
               {"background": "white" if base.color != "white" else "black"}):
        s = render(77, **kw)
        for k, v in kw.items():
            assert getattr(s, k) == v
        assert s.bbox == base.bbox
        assert s.color != s.background
    s = render(77, color="green", shape="triangle", background="black")
    assert s.caption == "a green triangle on a black background"
    with pytest.raises(ValueError):
        render(1, color="red", background="red")
    with pytest.raises(ValueError):
        render(1, color="pink")
    with pytest.raises(ValueError):
        render(1, shape="star")


def test_pixels_are_palette_mixes():
    s = render(11)
    obj = np.array(COLORS[s.color], np.float32)
    bg = np.array(COLORS[s.background], np.float32)
    expect = np.rint(s.mask[..., None] * obj + (1 - s.mask[..., None]) * bg)
    assert np.abs(expect - s.image.astype(np.float32)).max() <= 1
    assert np.array_equal(s.image[s.mask == 0], np.broadcast_to(bg.astype(np.uint8), s.image[s.mask == 0].shape))
    assert np.array_equal(s.image[s.mask == 1], np.broadcast_to(obj.astype(np.uint8), s.image[s.mask == 1].shape))


@pytest.mark.parametrize("size", [64, 32])
def test_bbox_and_area_constraints(size):
    expected_area = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5}
    seen = set()
    for seed in range(150):
        s = render(seed, size)
        x0, y0, side = s.bbox
        seen.add(s.shape)
        assert 0.3 * size <= side <= 0.6 * size
        assert x0 >= 0 and y0 >= 0 and x0 + side <= size and y0 + side <= size
        area = float(s.mask.sum())
        assert area == pytest.approx(expected_area[s.shape] * side * side, rel=0.01, abs=0.5)
        # nothing outside the bounding box (to within the pixels it touches)
        outside = np.ones((size, size), bool)
        outside[int(math.floor(y0)) : int(math.ceil(y0 + side)), int(math.floor(x0)) : int(math.ceil(x0 + side))] = False
        assert s.mask[outside].max(initial=0.0) == 0.0
    assert seen == set(SHAPES)


def test_side_and_position_distribution():
    sides, xs, ys = [], [], []
    for seed in range(2000):
        _, _, _, (x0, y0, side) = scene_params(seed, 64)
        sides.append(side / 64)
        xs.append(x0 / (64 - side))
        ys.append(y0 / (64 - side))
    sides = np.array(sides)
    assert 0.3 <= sides.min() < 0.31 and 0.59 < sides.max() <= 0.6
    assert abs(sides.mean() - 0.45) < 0.01
    for u in (np.array(xs), np.array(ys)):
        assert u.min() < 0.01 and u.max() > 0.99 and abs(u.mean() - 0.5) < 0.03


def test_background_differs_and_all_colours_used():
    images, masks, captions = render_batch(range(1000))
    pairs = [parse_caption(c) for c in captions]
    assert all(c != b for c, _, b in pairs)
    assert {c for c, _, _ in pairs} == set(COLORS)
    assert {b for _, _, b in pairs} == set(COLORS)
    assert {s for _, s, _ in pairs} == set(SHAPES)


def _supersampled(shape, bbox, size, k=32):
    x0, y0, s = bbox
    u = (np.arange(size * k) + 0.5) / k
    x, y = np.meshgrid(u, u)
    if shape == "square":
        inside = (x >= x0) & (x <= x0 + s) & (y >= y0) & (y <= y0 + s)
    elif shape == "circle":
        inside = (x - x0 - s / 2) ** 2 + (y - y0 - s / 2) ** 2 <= (s / 2) ** 2
    else:  # triangle pointing up: apex at (x0 + s/2, y0), base on y = y0 + s
        inside = (y >= y0) & (y <= y0 + s) & (np.abs(x - x0 - s / 2) <= (y - y0) / 2)
    return inside.reshape(size, k, size, k).mean(axis=(1, 3))


@pytest.mark.parametrize("shape", SHAPES)
def test_antialiasing_matches_supersampling(shape):
    for seed in range(4):
        s = render(seed, 24, shape=shape)
        edge = (s.mask > 0) & (s.mask < 1)
        assert edge.sum() >= 8  # anti-aliased edges exist
        ref = _supersampled(shape, s.bbox, 24)
        # 32x32 supersampling itself is only good to ~1/32; triangle corners
        # use a product of edge coverages (approximate in corner pixels only)
        tol = 0.1 if shape == "triangle" else 0.04
        assert np.abs(ref - s.mask).max() < tol
        assert np.abs(ref - s.mask).mean() < 0.005


def test_render_batch_empty():
    images, masks, captions = render_batch([])
    assert images.shape == (0, 64, 64, 3) and masks.shape == (0, 64, 64) and captions == []


def test_render_batch_shapes_and_equal_to_one_by_one():
    images, masks, captions = render_batch(range(2000))
    assert images.shape == (2000, 64, 64, 3) and images.dtype == np.uint8
    assert masks.shape == (2000, 64, 64) and masks.dtype == np.float32
    assert len(captions) == 2000
    for i in (0, 777, 1999):  # batching mixes no scene into another
        one = render(i)
        np.testing.assert_array_equal(images[i], one.image)
        np.testing.assert_array_equal(masks[i], one.mask)
        assert captions[i] == one.caption


# --------------------------------------------------------------- colours


def test_classify_palette_is_identity():
    for name, rgb in COLORS.items():
        assert classify_color(rgb) == name
        assert classify_color(np.array(rgb, np.float32)) == name
    assert classify_color(np.array(list(COLORS.values()))) == list(COLORS)


@pytest.mark.parametrize(
    "rgb, name",
    [
        # classifier-free guidance over-saturates: achromatic colours pick up a
        # tint and are pushed towards the extremes, but keep their lightness
        ((60, 10, 10), "black"),  # black drifted to dark red: L*~12 vs red's ~48
        ((40, 40, 60), "black"),  # bluish black
        ((255, 200, 210), "white"),  # white drifted to pink
        ((230, 230, 255), "white"),  # bluish white
        ((255, 240, 200), "white"),  # warm white
        ((150, 110, 100), "gray"),  # warm-tinted gray
        ((100, 100, 100), "gray"),  # darker gray is still gray, not black
        # chromatic colours pushed to full saturation keep their hue
        ((255, 0, 0), "red"),
        ((120, 0, 0), "red"),  # strongly chromatic dark red stays red (cf. black above)
        ((255, 100, 100), "red"),
        ((255, 120, 0), "orange"),
        ((255, 170, 50), "orange"),
        ((255, 255, 0), "yellow"),
        ((200, 170, 0), "yellow"),
        ((0, 255, 0), "green"),
        ((0, 100, 0), "green"),
        ((0, 0, 255), "blue"),
        ((60, 60, 200), "blue"),
        ((80, 0, 120), "purple"),
        ((170, 100, 255), "purple"),
        ((255, 0, 255), "purple"),  # magenta: the palette's nearest is purple
    ],
)
def test_classify_saturated_variants(rgb, name):
    assert classify_color(rgb) == name


def test_classify_batch_and_bad_shape():
    out = classify_color(np.array([[60, 10, 10], [0, 255, 0]]))
    assert out == ["black", "green"]
    with pytest.raises(ValueError):
        classify_color(np.zeros((2, 4)))


def test_dominant_colors_recovers_captions():
    images, masks, captions = render_batch(range(1000, 1200))
    for img, m, cap in zip(images, masks, captions):
        color, _, background = parse_caption(cap)
        assert dominant_colors(img, m) == (color, background), cap


def test_dominant_colors_tiny_objects():
    images, masks, captions = render_batch(range(100), size=8)
    for img, m, cap in zip(images, masks, captions):
        color, _, background = parse_caption(cap)
        assert dominant_colors(img, m) == (color, background), cap


def test_dominant_colors_robust_to_oversaturation_and_noise():
    rng = np.random.default_rng(0)
    s = render(5, color="black", background="white")
    img = s.image.astype(np.float32)
    img = img + np.array([40.0, -10.0, -10.0])  # reddish cast everywhere
    img = img + rng.normal(0, 12, img.shape)  # noise
    img[rng.random(s.mask.shape) < 0.05] = 255  # salt
    img = np.clip(img, 0, 255).astype(np.uint8)
    assert dominant_colors(img, s.mask) == ("black", "white")


def test_interior_keeps_pixels_px_inside_the_mask():
    m = np.zeros((12, 12), np.float32)
    m[2:10, 3:9] = 1.0
    m[2, 3] = 0.5  # a partly covered pixel counts as outside
    expect = np.zeros((12, 12), bool)
    expect[4:8, 5:7] = True
    expect[4, 5] = False  # 2 px from the partly covered corner
    np.testing.assert_array_equal(interior(m, 2), expect)
    bg = interior(1.0 - m, 1)
    assert not bg[1:11, 2:10].any() and bg[0].all() and bg[:, 0].all()
