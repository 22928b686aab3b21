"""The dtype policy: which operations of a bf16 (or fp16) model compute in float32, in one place.

Under a half-precision dtype the weight matrices are stored in it and every matmul and conv runs
in it, as do the activations between layers. Always float32, whatever the dtype: the attention
logits and their softmax (all kernels), the norms' statistics, the sinusoidal timestep features,
the UNet's output, and everything outside the networks (the text embeddings and phi, the guidance
combination, the DDIM step, the loss and the Adam update of phi); the VAE computes in float32.

The families below are switchable, each by measurement (`benchmarks/bf16.py`,
RESULTS "bf16 against float32"):
- "norms": GroupNorm/LayerNorm normalise in float32 and cast their output (else only the
  statistics are float32 and (x - mean) * scale runs in the layer's dtype);
- "residual": the residual stream (resnet, transformer block and Transformer2D sums) is carried in
  float32 between layers (each layer still reads it in its dtype);
- "time_embedding": the timestep MLP and each resnet's projection of it run in float32.

`FLOAT32` is the policy. `NTI_JAX_FLOAT32` (a comma-separated list of families, or "none")
replaces it for the whole process, for A/B runs; it is read at trace time, so set it before the
first call.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

FAMILIES = ("norms", "residual", "time_embedding")
# Measured on the toy model (RESULTS, "bf16 against float32"): float32 norms cut the UNet's bf16
# error in null-text's gradient by 36-44% (in the guided eps by 12%), and compute as torch's and
# flax's norms do; with their backward written out (`norms._mixed`), they keep fewer gradient
# residuals than bf16 norms did (SD 1.5, batch 1, remat none: 0.93 GiB against 1.16). The
# residual stream and the time embedding change the error little and stay in bf16.
FLOAT32: frozenset = frozenset({"norms"})
HALF = (jnp.bfloat16, jnp.float16)


def float32_families() -> frozenset:
    """The families computing in float32 under a half-precision dtype: `FLOAT32`, or
    $NTI_JAX_FLOAT32's."""
    raw = os.environ.get("NTI_JAX_FLOAT32", "").strip().lower()
    if not raw:
        return FLOAT32
    if raw == "none":
        return frozenset()
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = names - set(FAMILIES)
    if unknown:
        raise ValueError(f"NTI_JAX_FLOAT32 names unknown families {', '.join(sorted(unknown))}; they are {', '.join(FAMILIES)}")
    return names


def compute_dtype(family: str, dtype) -> jnp.dtype:
    """The dtype `family`'s operations run in, for a layer of `dtype`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown precision family {family!r}")
    return jnp.float32 if jnp.dtype(dtype) in HALF and family in float32_families() else dtype


def residual_add(x: jax.Array, h: jax.Array) -> jax.Array:
    """x + h for a residual connection: in float32 when the "residual" family is, else in the
    wider of the two dtypes."""
    if "residual" in float32_families() and (x.dtype in HALF or h.dtype in HALF):
        return x.astype(jnp.float32) + h.astype(jnp.float32)
    return x + h
