"""Cross-attention heat maps: the notebook's show_cross_attention as one PNG per image or edit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from nti_jax.io import atomic_path, to_uint8

if TYPE_CHECKING:
    from nti_jax.loading.pipeline import Pipeline


def token_labels(pipe: Pipeline, prompt: str) -> list[str]:
    """The decoded tokens of a prompt, bos first, without padding."""
    ids = pipe.tokenizer(prompt)["input_ids"]
    return [pipe.tokenizer.decode([i]) for i in ids]


def attention_grid(image, maps: np.ndarray, labels: Sequence[str], cell: int = 96) -> np.ndarray:
    """uint8 (cell + 16, cell * len(labels), 3): each token's map (s, s, >= len(labels)), scaled to
    its own range, as a heat map over the image, the token written under it."""
    from PIL import Image, ImageDraw

    img = np.asarray(image)
    img = img if img.dtype == np.uint8 else to_uint8(img)
    base = Image.fromarray(img).resize((cell, cell))
    grid = Image.new("RGB", (cell * len(labels), cell + 16), "white")
    for k, label in enumerate(labels):
        m = maps[..., k]
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        heat = np.stack([m, 0.2 * np.ones_like(m), 1.0 - m], axis=-1)
        heat = Image.fromarray(to_uint8(heat)).resize((cell, cell), Image.BILINEAR)
        grid.paste(Image.blend(base, heat, 0.55), (k * cell, 0))
        ImageDraw.Draw(grid).text((k * cell + 4, cell + 2), label[:14], fill="black")
    return np.asarray(grid)


def save_attention_grid(image, maps: np.ndarray, labels: Sequence[str], path: str, cell: int = 96) -> None:
    """`attention_grid` written atomically as a PNG."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(attention_grid(image, maps, labels, cell)).save(tmp, format="PNG")


def attention_sheet(pipe: Pipeline, prompts: Sequence[str], images, maps: np.ndarray, cell: int = 96) -> np.ndarray:
    """uint8: one `attention_grid` row per prompt (its image (H, W, 3), its maps (s, s, L)), stacked."""
    labels = [token_labels(pipe, p)[: maps.shape[-1]] for p in prompts]
    rows = [attention_grid(images[r], maps[r], labels[r], cell) for r in range(len(prompts))]
    grid = np.full((sum(r.shape[0] for r in rows), max(r.shape[1] for r in rows), 3), 255, np.uint8)
    y = 0
    for r in rows:
        grid[y : y + r.shape[0], : r.shape[1]] = r
        y += r.shape[0]
    return grid

