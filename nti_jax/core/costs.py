"""FLOPs, bytes moved and roofline seconds of UNet calls compiled for a TPU chip: estimates.

XLA's `cost_analysis` counts a loop body once and a Pallas kernel only as far as the kernel
declares, so per-call figures come from separately compiled UNet calls (a forward; the gradient
w.r.t. the conditioning that null-text's inner loop takes), with each flash kernel's count
replaced by one from its tiling (`flash.traffic`). A program's estimate multiplies them by the
calls it makes in the worst case (every inner loop runs all its steps). Roofline: max(FLOPs /
peak, bytes / HBM bandwidth) per call (`chips`). Used by `nti-invert --plan` and
benchmarks/tpu_aot.py.
"""

from __future__ import annotations

import collections
import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nti_jax.core.chips import Chip
from nti_jax.core.planning import with_remat
from nti_jax.core.sampling import Denoiser
from nti_jax.loading.conditioning import TextCond
from nti_jax.models import flash


def placed(tree: Any, mesh, spec: P = P()) -> Any:
    """`tree`'s arrays as ShapeDtypeStructs laid out as `spec` on `mesh`."""
    where = NamedSharding(mesh, spec)
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype, sharding=where), tree)


def cond_spec(model: Denoiser, lead: tuple) -> Any:
    """Abstract conditioning with leading axes `lead`: (..., 77, D), or SDXL's TextCond."""
    c, f32, spec = model.module.config, jnp.float32, jax.ShapeDtypeStruct
    tokens = spec(tuple(lead) + (77, c.cross_attention_dim), f32)
    return TextCond(tokens, spec(tuple(lead) + (c.pooled_dim,), f32)) if c.pooled_dim else tokens


def xla_cost(compiled) -> dict:
    """XLA's own count of FLOPs and bytes accessed of a compiled program."""
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"flops": float(c.get("flops", 0.0)), "bytes": float(c.get("bytes accessed", 0.0))}


def _subjaxprs(params: dict):
    for v in params.values():
        for x in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(x, "eqns"):
                yield x
            elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
                yield x.jaxpr


def pallas_calls(jaxpr, counts=None) -> collections.Counter:
    """(q shape, k shape, dtype, declares a cost) -> calls, in `jaxpr` and the jaxprs inside it,
    a loop body once (XLA's counting); of a conditional only the last branch."""
    counts = collections.Counter() if counts is None else counts
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            q, k = e.invars[0].aval, e.invars[1].aval
            counts[(q.shape, k.shape, str(q.dtype), e.params.get("cost_estimate") is not None)] += 1
            continue
        subs = list(_subjaxprs(e.params))
        for sub in subs[-1:] if e.primitive.name == "cond" else subs:
            pallas_calls(sub, counts)
    return counts


@functools.lru_cache(maxsize=None)
def _isolated(mesh, q: tuple, k: tuple, dtype: str, backward: bool) -> dict:
    """What XLA's cost analysis counts for one flash kernel call of (B, H, L, D) shapes alone."""
    from jax.experimental.pallas.ops.tpu import flash_attention as pf

    b, h, lq, d = q
    blocks = flash.block_sizes(flash.padded((b, lq, h, d), (b, k[2], h, d), jnp.dtype(dtype).itemsize))
    f = lambda q, k, v: pf.flash_attention(q, k, v, sm_scale=0.1, block_sizes=blocks)
    if backward:
        f = jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
    with jax.set_mesh(mesh):
        args = placed([jax.ShapeDtypeStruct(s, jnp.dtype(dtype)) for s in (q, k, k)], mesh)
        return xla_cost(jax.jit(f).lower(*args).compile())


def flash_correction(jaxpr, mesh) -> dict:
    """FLOPs and bytes to add to XLA's count of a program: each flash call's count from its tiling
    less what XLA counted for it. A differentiated call is a forward and two backward kernels."""
    calls = pallas_calls(jaxpr)
    groups: dict = collections.defaultdict(lambda: [0, 0])
    for (q, k, dtype, declared), n in calls.items():
        groups[(q, k, dtype)][0 if declared else 1] += n
    out = {"flops": 0.0, "bytes": 0.0, "flash_calls": 0}
    for (q, k, dtype), (n_fwd, n_bwd_kernels) in groups.items():
        n_bwd = n_bwd_kernels // 2
        b, h, lq, d = q
        for backward, n in ((True, n_bwd), (False, n_fwd - n_bwd)):
            ours = flash.traffic((b, lq, h, d), (b, k[2], h, d), jnp.dtype(dtype).itemsize, backward)
            xla = _isolated(mesh, q, k, dtype, backward)
            out["flops"] += n * (ours["flops"] - xla["flops"])
            out["bytes"] += n * (ours["bytes"] - xla["bytes"])
        out["flash_calls"] += n_fwd
    return out


def costs(fn: Callable, args: tuple, mesh, hlo_path: str = "") -> dict:
    """FLOPs and bytes of `fn(*args)` compiled for the mesh's chips (a loop body once), flash
    kernels counted from their tiling. With `hlo_path`, the compiled HLO is written there
    (`benchmarks/hlo_bytes.py` reads it)."""
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).lower(*args).compile()
        jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    if hlo_path:
        os.makedirs(os.path.dirname(hlo_path) or ".", exist_ok=True)
        with open(hlo_path, "w") as f:
            f.write(compiled.as_text())
    xla, corr = xla_cost(compiled), flash_correction(jaxpr, mesh)
    return {"flops": xla["flops"] + corr["flops"], "bytes": xla["bytes"] + corr["bytes"], "flash_calls": corr["flash_calls"]}


def roofline_s(c: dict, chip: Chip) -> float:
    """max(FLOPs / peak, bytes / bandwidth) in seconds (an estimate)."""
    return max(c["flops"] / (chip.tflops * 1e12), c["bytes"] / (chip.hbm_tbs * 1e12))


def unet_call(model: Denoiser, mesh, batch: int, grad_remat: str = "", hlo_path: str = "") -> dict:
    """One UNet call of `batch` rows on one chip of `mesh` (with `grad_remat`: its gradient
    w.r.t. the conditioning, as the null-text inner loop takes it); `hlo_path` as in `costs`."""
    c = model.module.config
    model = placed(model, mesh)
    x = placed(jax.ShapeDtypeStruct((batch, c.sample_size, c.sample_size, c.in_channels), jnp.float32), mesh)
    cond = placed(cond_spec(model, (batch,)), mesh)
    if not grad_remat:
        return costs(lambda m, x, c: m(x, jnp.int32(500), c), (model, x, cond), mesh, hlo_path)
    f = lambda m, x, c: jax.grad(lambda c: jnp.sum(with_remat(m, grad_remat)(x, jnp.int32(500), c)))(c)
    return costs(f, (model, x, cond), mesh, hlo_path)


def null_text_estimate(model: Denoiser, mesh, chip: Chip, rows: int, remat: str, steps: int, inner: int) -> dict:
    """Per-call costs of null-text's UNet calls at `rows` rows per chip (3 forwards per step: the
    pivot, eps_c and the step; `inner` gradients per step at most) and the worst-case roofline
    seconds per image."""
    fwd, grad = unet_call(model, mesh, rows), unet_call(model, mesh, rows, remat)
    calls = {"forward": 3 * steps, "gradient": steps * inner}
    parts = [(fwd, calls["forward"]), (grad, calls["gradient"])]
    seconds = sum(roofline_s(c, chip) * n for c, n in parts) / rows
    bound = "memory" if sum(c["bytes"] / chip.hbm_tbs * n for c, n in parts) > sum(c["flops"] / chip.tflops * n for c, n in parts) else "compute"
    return {"per_call": {"forward": fwd, "gradient": grad}, "calls": calls, "roofline_s_per_image": seconds, "bound": bound,
            "flops_per_image": sum(c["flops"] * n for c, n in parts) / rows, "bytes_per_image": sum(c["bytes"] * n for c, n in parts) / rows}
