"""Pallas flash attention on a TPU, for the shapes it takes (JAX's TPU kernel, with its backward).

JAX's kernel (`jax.experimental.pallas.ops.tpu.flash_attention`) works on (B, heads, L, d) tiles
of 128 lanes: head sizes are padded with zeros up to a multiple of 128 (SD 1.5's 40 and 80 to
128, its 160 to 256, SDXL's 64 to 128; zero columns change neither the logits nor the kept
output columns), and key lengths up to a multiple of 128 with the padded keys masked out
through segment ids (77 text tokens -> 128), as maxdiffusion does. Query lengths must be a
multiple of 128 already. Neither pad changes a value or a gradient beyond float rounding
(tests/test_tpu_flash.py checks both against XLA's attention in Pallas' interpret mode).

Memory: nothing of size Lq x Lk exists, forward or backward; the kernel keeps (o, l, m) per
query. Traffic: each block of `block_q` queries reads all of K and V once (`traffic`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

LANES = 128
# The largest tiles tried along a sequence (each must divide the padded length): 512 queries x
# 512 keys of up to 256 lanes in float32 is 0.5 MiB per tile, well inside a v5e core's VMEM.
MAX_BLOCK = 512


def round_up(n: int, m: int) -> int:
    """`n` rounded up to a multiple of `m`."""
    return -(-n // m) * m


def block(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
    for b in (MAX_BLOCK, 256, 128):
        if length % b == 0:
            return b
    raise ValueError(f"length {length} is not a multiple of {LANES}")


def unsupported(q_shape: tuple, k_shape: tuple) -> Optional[str]:
    """Why the kernel cannot take (B, Lq, heads, d) queries over (B, Lk, heads, d) keys, or None."""
    lq = q_shape[1]
    if lq % LANES:
        return f"{lq} queries are not a multiple of {LANES}"
    return None


class Padded(NamedTuple):
    """Sizes the kernel sees for one layer."""

    lq: int
    lk: int  # keys padded to a multiple of 128
    d: int  # head size padded to a multiple of 128
    block_q: int
    block_k: int


def padded(q_shape: tuple, k_shape: tuple) -> Padded:
    """The kernel's sizes for (B, Lq, heads, d) queries over (B, Lk, heads, d) keys."""
    lq, lk, d = q_shape[1], round_up(k_shape[1], LANES), round_up(q_shape[3], LANES)
    return Padded(lq, lk, d, block(lq), block(lk))


def block_sizes(p: Padded) -> pallas_flash.BlockSizes:
    """The kernel's tiles for a layer, forward and backward alike."""
    return pallas_flash.BlockSizes(
        block_q=p.block_q, block_k_major=p.block_k, block_k=p.block_k, block_b=1,
        block_q_major_dkv=p.block_q, block_k_major_dkv=p.block_k, block_k_dkv=p.block_k, block_q_dkv=p.block_q,
        block_k_major_dq=p.block_k, block_k_dq=p.block_k, block_q_dq=p.block_q,
    )


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Attention of (B, Lq, heads, d) queries over (B, Lk, heads, d) keys/values with the Pallas
    TPU kernel, (B, Lq, heads, d); differentiable in q, k and v. On a CPU it runs only under
    `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (slowly)."""
    why = unsupported(q.shape, k.shape)
    if why:
        raise ValueError(f"flash attention cannot take this layer: {why}")
    b, lq, h, d = q.shape
    lk = k.shape[1]
    p = padded(q.shape, k.shape)
    heads_first = lambda x, length: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, p.d - d)))
    qp, kp, vp = heads_first(q, lq), heads_first(k, p.lk), heads_first(v, p.lk)
    segments = None
    if p.lk != lk:  # the padded keys are another segment than every query
        kv_ids = jnp.broadcast_to((jnp.arange(p.lk) < lk).astype(jnp.int32), (b, p.lk))
        segments = pallas_flash.SegmentIds(q=jnp.ones((b, lq), jnp.int32), kv=kv_ids)
    blocks = block_sizes(p)
    out = pallas_flash.flash_attention(qp, kp, vp, None, segments, sm_scale=scale, block_sizes=blocks)
    return jnp.swapaxes(out[..., :d], 1, 2)


def traffic(q_shape: tuple, k_shape: tuple, itemsize: int, backward: bool) -> dict:
    """The kernel's HBM bytes and FLOPs for one call (with `backward`, its forward and backward),
    counted from its tiling (an estimate: XLA's cost analysis sees a custom call only as far as
    the kernel declares). Forward: q and o once,
    K and V once per block of queries. Backward (dK/dV pass over key blocks reading q, o, dO
    per key block; dQ pass over query blocks reading K, V per query block); both passes recompute
    the logits from the kept l and m: 4 matmuls in the first, 3 in the second."""
    b, _, h, _ = q_shape
    p = padded(q_shape, k_shape)
    qo = b * h * p.lq * p.d * itemsize
    kv = b * h * p.lk * p.d * itemsize
    lm = 2 * b * h * p.lq * LANES * 4  # l and m, float32, 128 lanes wide
    nq, nk = p.lq // p.block_q, p.lk // p.block_k
    fwd_bytes = 2 * qo + nq * 2 * kv + lm
    fwd_flops = 4 * b * h * p.lq * p.lk * p.d
    if not backward:
        return {"flops": fwd_flops, "bytes": fwd_bytes}
    dkv = nk * (3 * qo + lm) + 4 * kv  # q, o, dO and l, m per key block; K, V in, dK, dV out
    dq = nq * 2 * kv + 4 * qo + lm  # K, V per query block; q, dO, di in (di ~ o), dQ out
    bwd_flops = 14 * b * h * p.lq * p.lk * p.d  # 7 matmuls of 2 * Lq * Lk * d each
    return {"flops": fwd_flops + bwd_flops, "bytes": fwd_bytes + dkv + dq}
