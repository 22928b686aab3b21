"""The text conditioning a UNet reads, as one pytree: the prompt's token embeddings (..., L, D)
for SD 1.x/2.x, or `TextCond` (token embeddings and the pooled embedding) for SDXL.

Inversion, sampling and Prompt-to-Prompt move conditioning only through the functions here, so
they run unchanged on either family, and SD's arrays stay bare arrays (the same programs and
files as before SDXL)."""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TextCond:
    """SDXL's conditioning for a batch: both encoders' penultimate states side by side and
    text_encoder_2's projected end-of-text state. Leading axes (rows, steps) are shared."""

    tokens: jax.Array  # (..., L, D1 + D2)
    pooled: jax.Array  # (..., P)


Cond = Union[jax.Array, TextCond]


def tokens(c: Cond) -> jax.Array:
    """The token embeddings (..., L, D): what cross-attention reads."""
    return c.tokens if isinstance(c, TextCond) else c


def num_rows(c: Cond) -> int:
    return tokens(c).shape[0]


def take(c: Cond, idx) -> Cond:
    """Every leaf indexed by `idx` on its leading axes."""
    return jax.tree_util.tree_map(lambda a: a[idx], c)


def concat(parts: Sequence[Cond], axis: int = 0) -> Cond:
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a, axis=axis), *parts)


def broadcast(c: Cond, lead: tuple, drop: int = 0) -> Cond:
    """Each leaf's last dimensions (all but its first `drop`) behind new leading axes `lead`:
    e.g. one row (1, L, D) to B rows with lead=(B,), drop=1."""
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a.reshape(a.shape[drop:]), tuple(lead) + a.shape[drop:]), c)


def where_rows(mask: jax.Array, new: Cond, old: Cond) -> Cond:
    """`new` in the rows where `mask` (B,) holds, else `old`."""
    pick = lambda n, o: jnp.where(mask.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
    return jax.tree_util.tree_map(pick, new, old)


def finite_rows(c: Cond) -> jax.Array:
    """(B,) bool: every value of the row is finite, in every leaf."""
    leaves = [jnp.all(jnp.isfinite(a), axis=tuple(range(1, a.ndim))) for a in jax.tree_util.tree_leaves(c)]
    return jnp.stack(leaves).all(axis=0)


def as_float32(c: Cond) -> Cond:
    return jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), c)


__all__ = ["Cond", "TextCond", "broadcast", "concat", "finite_rows", "num_rows", "take", "tokens", "where_rows", "as_float32"]
