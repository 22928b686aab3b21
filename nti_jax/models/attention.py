"""The one attention function of the models.

Two paths: the fused `jax.nn.dot_product_attention` (cuDNN flash attention on GPU) when nothing
needs the probabilities, and an explicit softmax whose probabilities a caller's hook may read or
replace (Prompt-to-Prompt). The hook receives the probabilities (B, heads, Lq, Lk) in float32 and
the layer's `AttentionPlace`, and returns probabilities of the same shape.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class AttentionPlace(NamedTuple):
    """Where an attention layer sits in the UNet (all static)."""

    block: str  # "down" | "mid" | "up"
    kind: str  # "self" | "cross"
    size: tuple[int, int]  # query resolution (h, w)
    name: str  # module path, unique per layer


AttentionHook = Callable[[jax.Array, AttentionPlace], jax.Array]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    hook: Optional[AttentionHook] = None,
    place: Optional[AttentionPlace] = None,
) -> jax.Array:
    """Multi-head attention of (B, Lq, heads*d) queries over (B, Lk, heads*d) keys/values."""
    b, lq, inner = q.shape
    d = inner // heads
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d)
    q, k, v = split(q), split(k), split(v)
    scale = d**-0.5
    if hook is None:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale)
    else:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        probs = hook(jax.nn.softmax(logits, axis=-1), place)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return out.reshape(b, lq, inner)


class Attention(nn.Module):
    """diffusers' `Attention` (to_q/to_k/to_v/to_out.0) without the norms around it."""

    heads: int
    dim_head: int
    qkv_bias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, hook=None, place=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda n, name, bias: nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)
        q = dense(inner, "to_q", self.qkv_bias)(x)
        k = dense(inner, "to_k", self.qkv_bias)(context)
        v = dense(inner, "to_v", self.qkv_bias)(context)
        out = attend(q, k, v, self.heads, hook, place)
        return dense(x.shape[-1], "to_out.0", True)(out)
