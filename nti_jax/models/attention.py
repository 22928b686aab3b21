"""The one attention function of the models.

Two paths: `jax.nn.dot_product_attention` when nothing needs the probabilities, and an explicit
softmax whose probabilities a caller's hook may read or replace (Prompt-to-Prompt). The hook
receives the probabilities (B, heads, Lq, Lk) in float32 and the layer's `AttentionPlace`, and
returns probabilities of the same shape; with a `wants(place)` attribute it sees only the layers
it names, the others taking the first path.

On the first path nothing of size Lq x Lk outlives the layer. The kernel is chosen for the
platform the program targets (`ATTENTION`, `backend.kernel_choice`): on GPU in bfloat16/float16
cuDNN's flash attention; on TPU Pallas' flash attention (`flash.py`) for layers of at least
`FLASH_MIN_TOKENS` queries and keys (the long self-attentions); elsewhere XLA's attention under
`jax.checkpoint`, so a gradient keeps q, k, v and recomputes the probabilities (a 64x64
self-attention of SD 1.5 would otherwise keep two float32 copies of its 8 x 4096 x 4096
probabilities, 1 GiB per image per layer); on CPU one chunk of queries at a time (XLA:CPU would
otherwise hold ~1.5 GiB of logits, probabilities and their gradients per image while it runs one
such layer).
"""

from __future__ import annotations

from functools import partial
import warnings
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nti_jax.models import flash
from nti_jax.models.backend import kernel_choice
from nti_jax.models.resnet import tag


class AttentionPlace(NamedTuple):
    """Where an attention layer sits in the UNet (all static)."""

    block: str  # "down" | "mid" | "up"
    kind: str  # "self" | "cross"
    size: tuple[int, int]  # query resolution (h, w)
    name: str  # module path, unique per layer


AttentionHook = Callable[[jax.Array, AttentionPlace], jax.Array]
# The fused path's kernel per platform ($NTI_JAX_ATTENTION overrides): "cudnn" (where cuDNN takes
# the dtype and head size, else "xla"), "flash" (Pallas' TPU kernel for layers of at least
# FLASH_MIN_TOKENS queries and keys, else "xla"), "xla" (XLA's attention, all queries at once) or
# "chunked" (XLA's, over chunks of queries: memory for time, where memory is short).
ATTENTION = {"gpu": "cudnn", "cpu": "chunked", "tpu": "flash", "default": "xla"}
ATTENTION_CHOICES = ("cudnn", "flash", "xla", "chunked")
# The fewest queries and keys a layer gives the flash kernel (TPU), from the per-layer table of
# `benchmarks/tpu_aot.py layers` (v5e, bf16, forward + backward): SD 1.5's and SDXL's
# self-attentions of 4096 and 1024 tokens move 2-3x fewer bytes with it (and at 4096 keep 24 MiB
# of temporaries per image instead of 768); the 77-key cross-attentions (keys padded to 128,
# head sizes to 128) and the 256-token layers move more with it than with XLA's attention.
FLASH_MIN_TOKENS = 1024
# The most logits one chunk computes: B x heads x queries x keys elements (32 MiB in float32); SD
# 1.5 at 512 px runs its 64x64 layers in 16 chunks of queries per image. At SD 1.5 size, in
# float32 at batch 1 on CPU, 2**25 needed 0.22 GiB more temporaries and 2**24 0.03 GiB more.
ATTENTION_BLOCK = 2**23


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
    if not hook_wants(hook, place):
        out = fused_attention(q, k, v, scale)
    else:
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
        probs = hook(jax.nn.softmax(logits, axis=-1), place)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return out.reshape(b, lq, inner)


def hook_wants(hook: Optional[AttentionHook], place: Optional[AttentionPlace]) -> bool:
    """Whether `hook` sees the layer at `place`: every layer, unless the hook carries a
    `wants(place)` predicate. A layer no hook wants runs the fused path, with no Lq x Lk array."""
    return hook is not None and getattr(hook, "wants", lambda place: True)(place)


def cudnn_unsupported(q: jax.Array, capability: Optional[str] = None) -> Optional[str]:
    """Why cuDNN's flash attention cannot take (B, Lq, heads, d) queries on a GPU of `capability`
    (default: the first local device's), by JAX's own rules (half precision, d a multiple of 8
    up to 256 on Hopper and later, 128 before), or None."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"it needs bfloat16 or float16, not {q.dtype}"
    capability = capability or getattr(jax.local_devices()[0], "compute_capability", "0.0")
    d, most = q.shape[-1], 256 if float(capability) >= 9.0 else 128
    if d % 8 or d > most:
        return f"head size {d} is not a multiple of 8 up to {most} on compute capability {capability}"
    return None


@partial(jax.checkpoint, static_argnums=(3, 4))
def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, block: Optional[int]) -> jax.Array:
    """XLA's attention, over chunks of queries with at most `block` logits each when `block` is
    set (each chunk checkpointed too): the same values, forward bit for bit, with one chunk's
    probabilities alive."""
    b, lq, h, d = q.shape
    attend_all = lambda q: jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    chunk = lq
    while block and b * h * chunk * k.shape[1] > block and chunk % 2 == 0 and chunk > 64:
        chunk //= 2
    if chunk == lq:
        return attend_all(q)
    chunks = jnp.moveaxis(q.reshape(b, lq // chunk, chunk, h, d), 1, 0)  # (n, B, chunk, heads, d)
    out = jax.lax.map(jax.checkpoint(attend_all), chunks)
    return jnp.moveaxis(out, 0, 1).reshape(b, lq, h, d)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Attention of (B, Lq, heads, d) queries over (B, Lk, heads, d) keys/values, (B, Lq, heads, d),
    keeping no Lq x Lk array for the backward pass, with the target platform's kernel (`ATTENTION`).
    cuDNN's refusal of a shape is never silent: a float32 model takes XLA's kernel by design,
    anything else warns."""
    kind = kernel_choice("attention", ATTENTION, ATTENTION_CHOICES)
    if kind == "flash":
        if min(q.shape[1], k.shape[1]) >= FLASH_MIN_TOKENS and flash.unsupported(q.shape, k.shape) is None:
            return flash.flash_attention(q, k, v, scale)
        kind = "xla"
    if kind == "cudnn":
        why = cudnn_unsupported(q)
        if why is None:
            try:
                return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
            except (NotImplementedError, RuntimeError) as e:  # an older cuDNN, an unsupported shape
                why = str(e).splitlines()[0]
        if q.dtype in (jnp.bfloat16, jnp.float16):
            warnings.warn(f"cuDNN attention not used for a layer of shape {q.shape}: {why}; XLA's attention runs instead",
                          stacklevel=2)
        kind = "xla"
    return _xla_attention(q, k, v, scale, ATTENTION_BLOCK if kind == "chunked" else None)


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
        dense = lambda n, name, bias: lambda y: tag(nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)(y))
        q = dense(inner, "to_q", self.qkv_bias)(x)
        k = dense(inner, "to_k", self.qkv_bias)(context)
        v = dense(inner, "to_v", self.qkv_bias)(context)
        out = attend(q, k, v, self.heads, hook, place)
        return dense(x.shape[-1], "to_out.0", True)(out)
