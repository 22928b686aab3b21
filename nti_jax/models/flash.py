"""Pallas flash attention on a TPU, for the shapes it takes (JAX's TPU kernel, with its backward).

JAX's kernel (`jax.experimental.pallas.ops.tpu.flash_attention`) works on (B, heads, L, d) tiles
of 128 lanes. It takes head sizes of at most 128 as they are (SD 1.5's 40 and 80, SDXL's 64: a
TPU array's rows occupy 128 lanes whatever their size, in HBM as in VMEM, so padding them with
zeros first only added a copy of q, k and v per call); larger ones are padded with zeros up to a
multiple of 128 (SD 1.5's 160 to 256; zero columns change neither the logits nor the kept
output columns). Key lengths are padded up to a multiple of 128 with the padded keys masked out
through segment ids (77 text tokens -> 128), as maxdiffusion does. Query lengths must be a
multiple of 128 already. Neither pad changes a value or a gradient beyond float rounding
(tests/test_tpu_kernels.py checks both against XLA's attention in Pallas' interpret mode).

Memory: nothing of size Lq x Lk exists, forward or backward; the kernel keeps (o, l, m) per
query. Traffic: the tiles (`padded`) hold a head's whole K and V where they fit, so K and V are
read once per head, not once per block of queries (`traffic`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

LANES = 128
# Tile caps, per kernel, from the TPU compiler (v5e, v4 and v6e compile-only chips, bf16, head
# size 128, batch 8, SD 1.5's and SDXL's 4096- and 1024-token self-attentions; on v5e a forward
# of 1024 queries x 4096 keys, or a dQ of 4096 queries, fails with CompileTimeScopedVmemOom).
# Each tile is the largest multiple of 128 that divides its length and stays within its cap.
# The forward and the dK/dV pass hold a head's whole K and V (up to KV_MAJOR keys), so each
# reads K and V once (the forward) or q, dO, l, m and di once (the dK/dV pass), not once per
# block; the dQ pass reads K and V once per DQ_Q queries.
FWD_Q = 512  # queries per forward (and dK/dV) block
KV_MAJOR = 4096  # keys held at once by the forward and the dK/dV pass
K_INNER = 512  # keys per inner step within them
DQ_Q = 2048  # queries per dQ block (the dQ pass re-reads K and V once per block)
DQ_K = 256  # keys per dQ step: its di input is broadcast to this many lanes (float32) in HBM
# The caps hold for rows of 128 bf16 lanes (256 bytes). Wider rows (a padded head of 256 or more
# lanes, or float32) take tiles as many times smaller, down to 128: the VAE's mid-block attention
# (one head of 512 float32 channels over 4096 tokens at 512 px) with the caps above fails to
# compile for v5e with CompileTimeScopedVmemOom.
CAP_ROW_BYTES = LANES * 2


def round_up(n: int, m: int) -> int:
    """`n` rounded up to a multiple of `m`."""
    return -(-n // m) * m


def block(length: int, cap: int) -> int:
    """The largest multiple of 128 that divides `length` (itself a multiple of 128) and is at most `cap`."""
    if length % LANES:
        raise ValueError(f"length {length} is not a multiple of {LANES}")
    return max(b for b in range(LANES, min(cap, length) + 1, LANES) if length % b == 0)


def unsupported(q_shape: tuple, k_shape: tuple) -> Optional[str]:
    """Why the kernel cannot take (B, Lq, heads, d) queries over (B, Lk, heads, d) keys, or None."""
    lq = q_shape[1]
    if lq % LANES:
        return f"{lq} queries are not a multiple of {LANES}"
    return None


class Padded(NamedTuple):
    """Sizes and tiles the kernels see for one layer."""

    lq: int
    lk: int  # keys padded to a multiple of 128
    d: int  # the lanes a head's row occupies: its size rounded up to a multiple of 128
    block_q: int  # queries per forward / dK-dV block
    block_k_major: int  # keys held at once by the forward / dK-dV pass
    block_k: int  # keys per inner step
    block_q_dq: int  # queries per dQ block
    block_k_dq: int  # keys per dQ step


def padded(q_shape: tuple, k_shape: tuple, itemsize: int) -> Padded:
    """The kernels' sizes and tiles for (B, Lq, heads, d) queries over (B, Lk, heads, d) keys of
    `itemsize` bytes per element: the caps, divided by how many times wider than
    `CAP_ROW_BYTES` a padded row is."""
    lq, lk, d = q_shape[1], round_up(k_shape[1], LANES), round_up(q_shape[3], LANES)
    wide = max(1, d * itemsize // CAP_ROW_BYTES)
    cap = lambda c: max(LANES, c // wide)
    major = block(lk, cap(KV_MAJOR))
    return Padded(lq, lk, d, block(lq, cap(FWD_Q)), major, block(major, cap(K_INNER)), block(lq, cap(DQ_Q)), block(lk, cap(DQ_K)))


def block_sizes(p: Padded) -> pallas_flash.BlockSizes:
    """The kernels' tiles for a layer (`padded`)."""
    return pallas_flash.BlockSizes(
        block_q=p.block_q, block_k_major=p.block_k_major, block_k=p.block_k, block_b=1,
        block_q_major_dkv=p.block_q, block_k_major_dkv=p.block_k_major, block_k_dkv=p.block_k, block_q_dkv=p.block_q,
        block_k_major_dq=p.block_k_dq, block_k_dq=p.block_k_dq, block_q_dq=p.block_q_dq,
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
    p = padded(q.shape, k.shape, q.dtype.itemsize)
    width = d if d <= LANES else p.d
    heads_first = lambda x, length: jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, length - x.shape[1]), (0, width - d)))
    qp, kp, vp = heads_first(q, lq), heads_first(k, p.lk), heads_first(v, p.lk)
    segments = None
    if p.lk != lk:  # the padded keys are another segment than every query
        kv_ids = jnp.broadcast_to((jnp.arange(p.lk) < lk).astype(jnp.int32), (b, p.lk))
        segments = pallas_flash.SegmentIds(q=jnp.ones((b, lq), jnp.int32), kv=kv_ids)
    blocks = block_sizes(p)
    out = pallas_flash.flash_attention(qp, kp, vp, None, segments, sm_scale=scale, block_sizes=blocks)
    return jnp.swapaxes(out[..., :d], 1, 2)


def _reads(n_outer: int, n_inner: int) -> int:
    """How often an array whose blocks follow the inner grid axis is read in full over a grid of
    (n_outer, n_inner) steps: once per outer step, or once if the inner axis has one step (Pallas
    fetches a block again only when its index changes)."""
    return 1 if n_inner == 1 else n_outer


def traffic(q_shape: tuple, k_shape: tuple, itemsize: int, backward: bool) -> dict:
    """HBM bytes and FLOPs of one flash call, counted from the kernels' grids and block indices
    (an estimate: XLA's cost analysis sees a custom call only as far as the kernel declares).
    Forward (grid: query blocks, then key blocks): q read and o written once; K and V read once
    per query block, or once if the whole of K fits one block. With `backward` the call is the
    forward saving l and m (float32, 128 lanes) and the two backward kernels, with the XLA glue
    between them: di = rowsum(o * dO), and l, m, di broadcast to the lanes each kernel reads.
    dK/dV (grid: key blocks, then query blocks): K, V read and dK, dV written once; q, dO, l, m, di
    read once per key block (or once). dQ (grid: query blocks, then key blocks): q, dO, l, m and
    its di (DQ_K lanes) read once, dQ written once; K and V once per query block (or once). Both
    backward kernels recompute the logits: 4 matmuls in dK/dV, 3 in dQ."""
    b, _, h, _ = q_shape
    p = padded(q_shape, k_shape, itemsize)
    rows = b * h * p.lq  # query rows over the batch and heads
    qo, kv, lanes = rows * p.d * itemsize, b * h * p.lk * p.d * itemsize, rows * LANES * 4
    nq, nk = p.lq // p.block_q, p.lk // p.block_k_major
    fwd_bytes = 2 * qo + 2 * kv * _reads(nq, nk)
    fwd_flops = 4 * rows * p.lk * p.d
    if not backward:
        return {"flops": fwd_flops, "bytes": fwd_bytes}
    lm = 2 * lanes  # l and m, written by the forward
    di_dq = rows * p.block_k_dq * 4  # the dQ kernel's di, broadcast to its key tile
    glue = 2 * qo + rows * 4 + 3 * lanes + di_dq  # di from o and dO; the broadcasts written
    dkv = 4 * kv + (2 * qo + 3 * lanes) * _reads(nk, nq)  # K, V in, dK, dV out; q, dO, l, m, di
    nq_dq, nk_dq = p.lq // p.block_q_dq, p.lk // p.block_k_dq
    dq = 3 * qo + lm + di_dq + 2 * kv * _reads(nq_dq, nk_dq)  # q, dO in, dQ out; l, m, di; K, V
    bwd_flops = 14 * rows * p.lk * p.d  # 7 matmuls of 2 * Lq * Lk * d each
    return {"flops": fwd_flops + bwd_flops, "bytes": fwd_bytes + lm + glue + dkv + dq}
