"""Remat mode and rows per call chosen from the compiled program, not from a formula.

For `remat="auto"` (or a memory budget) the candidates, (rows, remat mode), are lowered and
compiled ahead of time, fastest first, and XLA's own `memory_analysis()` of each is read until
one fits the budget; the one chosen is the executable that then runs, so a fitting first
candidate costs no extra compilation. A formula (the gradient's residual bytes) only orders the
candidates: those it says cannot fit are tried after the others, never dropped. Analyses and
executables are cached per program and shapes for the process. A batch whose rows do not fit
is run in several calls of fewer rows; when nothing fits, the leanest candidate runs with a
warning, since XLA may still fit it where its analysis is pessimistic.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from nti_jax.core import oom
from nti_jax.core.chips import RESERVE_GIB, chip_of_kind
from nti_jax.loading.conditioning import Cond
from nti_jax.core.sampling import Denoiser
from nti_jax.errors import DeviceMemoryError
from nti_jax.models.unet import REMAT_MODES

GIB = 2**30


class Candidate(NamedTuple):
    rows: int  # images per program call (per device)
    remat: str


class Choice(NamedTuple):
    """The candidate chosen, what XLA says it needs, and every candidate compiled on the way."""

    rows: int
    remat: str
    need_bytes: int  # arguments + outputs + temporaries - aliased, per device
    budget_bytes: int
    fits: bool
    compiled: Any  # the executable (jax.stages.Compiled)
    tried: tuple  # ((rows, remat, need_bytes), ...) in the order compiled


def program_bytes(compiled, platform: str = "") -> int:
    """Device bytes one call of `compiled` needs, per device, by XLA's memory analysis: arguments
    + outputs + temporaries - aliased, plus the generated code on a TPU (it lives in HBM)."""
    m = compiled.memory_analysis()
    code = m.generated_code_size_in_bytes if platform == "tpu" else 0
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes + code)


def free_bytes(device=None) -> int:
    """Free memory of `device` (default: the first local one): its allocator's limit less what is
    in use; for a TPU that this process cannot reach (a compile-only description), its HBM less
    a reserve (`chips`); the host's available RAM for a CPU."""
    device = device or jax.local_devices()[0]
    if not _addressable(device):
        return int((chip_of_kind(device.device_kind).hbm_gib - RESERVE_GIB) * GIB)
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _addressable(device) -> bool:
    """Whether `device` is one this process runs on (not a compile-only TPU description)."""
    try:
        return device in jax.local_devices(backend=device.platform)
    except RuntimeError:  # no such backend in this process: a description only
        return False


_FREE_AT_FIRST_PLAN: dict = {}  # device -> its free bytes when a program was first planned for it


def budget_bytes(max_device_memory: Optional[float], resident_bytes: int = 0, device=None) -> int:
    """The bytes a program may use per device: `max_device_memory` GiB when given, else the free
    memory plus `resident_bytes` (arguments already on the device, the weights, which XLA's
    analysis counts again). The free memory is read once per device and process, so the
    results that later batches leave on the device never make one batch choose a different
    program than the last (and compile it)."""
    if max_device_memory is not None:
        if not max_device_memory > 0:
            raise ValueError(f"max_device_memory must be a positive number of GiB, got {max_device_memory!r}")
        return int(max_device_memory * GIB)
    device = device or jax.local_devices()[0]
    if device not in _FREE_AT_FIRST_PLAN:  # a compile-only TPU holds no weights yet
        _FREE_AT_FIRST_PLAN[device] = free_bytes(device) + (resident_bytes if _addressable(device) else 0)
    return _FREE_AT_FIRST_PLAN[device]


def candidates(batch: int, modes: Sequence[str], estimate: Optional[Callable[[int, str], int]] = None,
               budget: Optional[int] = None) -> list[Candidate]:
    """Rows halving from `batch` down to 1, each with `modes` fastest first; candidates whose
    `estimate(rows, remat)` bytes exceed `budget` moved after the others, in the same order."""
    rows, sizes = batch, []
    while True:
        sizes.append(rows)
        if rows == 1:
            break
        rows = -(-rows // 2)
    order = [Candidate(r, m) for r in sizes for m in modes]
    if estimate is None or budget is None:
        return order
    hopeless = [c for c in order if estimate(c.rows, c.remat) > budget]
    return [c for c in order if c not in hopeless] + hopeless


_ANALYSED: dict = {}  # (key, candidate) -> need_bytes
_EXECUTABLES: dict = {}  # (key, candidate) -> compiled, for candidates that fitted


def choose(key: tuple, batch: int, modes: Sequence[str], lower: Callable[[int, str], Any], budget: int,
           estimate: Optional[Callable[[int, str], int]] = None, platform: str = "") -> Choice:
    """The first candidate (see `candidates`) whose compiled program fits `budget` bytes.
    `lower(rows, remat)` lowers the program for that candidate; `key` names the program and its
    input shapes (everything but the candidate) for the caches; `platform` the target's
    (`program_bytes`)."""
    tried = []
    for cand in candidates(batch, modes, estimate, budget):
        k = (key, cand)
        if k not in _ANALYSED:
            compiled, _ANALYSED[k] = _analysed(lower, cand, budget, platform)
            if _ANALYSED[k] <= budget:
                _EXECUTABLES[k] = compiled
        tried.append((cand.rows, cand.remat, _ANALYSED[k]))
        if _ANALYSED[k] <= budget:
            return Choice(cand.rows, cand.remat, _ANALYSED[k], budget, True, _EXECUTABLES[k], tuple(tried))
    rows, remat, need = min(tried, key=lambda t: t[2])
    warnings.warn(f"no batch size and remat mode fits {budget / GIB:.2f} GiB per device; the leanest, {rows} "
                  f"image(s) per call with remat {remat!r}, needs {need / GIB:.2f} GiB and runs anyway", stacklevel=2)
    k = (key, Candidate(rows, remat))
    if k not in _EXECUTABLES:
        compiled, _ = _analysed(lower, Candidate(rows, remat), budget, platform)
        if compiled is None:
            raise DeviceMemoryError(f"out of device memory: the compiler refuses even the leanest program, {rows} image(s) "
                                    f"per call with remat {remat!r}: it needs {need / GIB:.2f} GiB or more per device")
        _EXECUTABLES[k] = compiled
    return Choice(rows, remat, need, budget, False, _EXECUTABLES[k], tuple(tried))


_NAMED_BYTES = re.compile(r"\((\d+(?:\.\d+)?)([KMGT]?)i?B?\)")  # "(18.36G)" in the TPU's message, read as GiB
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _analysed(lower: Callable[[int, str], Any], cand: Candidate, budget: int, platform: str) -> tuple[Any, int]:
    """(compiled, bytes needed) of a candidate. A compiler that refuses the program for want of
    memory (the TPU's, whose temporaries must fit the chip's HBM) gives (None, the first size its
    message names, at least `budget` + 1): a candidate that does not fit, like one analysed."""
    try:
        compiled = lower(cand.rows, cand.remat).compile()
    except Exception as e:
        if not oom.is_out_of_memory(e):
            raise
        m = _NAMED_BYTES.search(str(e))
        named = float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0
        return None, max(budget + 1, int(named))
    return compiled, program_bytes(compiled, platform)


def pad_rows(n_real: int, capacity: int) -> list[int]:
    """Row -> item mapping for a batch of `capacity` rows holding `n_real` items: the padding
    rows repeat the last real item (their results are dropped)."""
    if not 0 < n_real <= capacity:
        raise ValueError(f"cannot pad {n_real} items to {capacity} rows")
    return list(range(n_real)) + [n_real - 1] * (capacity - n_real)


def shape_key(*trees) -> str:
    """The shapes, dtypes and shardings of the arrays in `trees` (a cache key)."""
    leaf = lambda a: (tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", None)))
    return str(jax.tree_util.tree_map(leaf, trees))


def clear_cache() -> None:
    """Forget every analysis and executable (tests)."""
    _ANALYSED.clear()
    _EXECUTABLES.clear()
    _FREE_AT_FIRST_PLAN.clear()


def with_remat(model: Denoiser, remat: str) -> Denoiser:
    """`model` whose gradients recompute what `remat` (REMAT_MODES) says; the same results."""
    return model if remat == "none" else model.replace(module=model.module.clone(remat=remat))


@functools.lru_cache(maxsize=64)
def _residual_bytes(model: Denoiser, z: jax.ShapeDtypeStruct, context: Cond, remat: str) -> int:
    grad_model = with_remat(model, remat)

    def vjp(params, z, phi):
        (params, time_ids) = params
        f = lambda p: grad_model.replace(params=params, time_ids=time_ids).eps(z, jnp.int32(500), jnp.float32(0.5), p)
        return jax.vjp(f, phi)[1]

    jaxpr = jax.make_jaxpr(vjp)(model.params.tree, z, context).jaxpr
    inputs = set(jaxpr.invars)
    kept = {v for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var) and v not in inputs}
    return sum(v.aval.size * np.dtype(v.aval.dtype).itemsize for v in kept)


def gradient_residual_bytes(model: Denoiser, batch: int, latent: Sequence[int], context: Any, remat: str = "none") -> int:
    """Bytes autodiff keeps between the forward and backward pass of one inner-loop gradient
    (w.r.t. phi) for `batch` images of latents (h, w, C) and conditioning of per-row shape
    `context` ((L, D), or SDXL's TextCond of shapes, `conditioning.row_shapes`), in the program's
    own dtypes: the residuals of `jax.vjp` that are not its inputs (parameters aside). Traced
    abstractly (nothing runs); the same figure on every backend."""
    spec = jax.ShapeDtypeStruct
    params = jax.tree_util.tree_map(lambda a: spec(a.shape, a.dtype), (model.params, model.time_ids))
    key = model.replace(params=_Hashable(params), time_ids=None)
    ctx = jax.tree_util.tree_map(lambda shape: spec((batch, *shape), jnp.float32), context, is_leaf=lambda x: isinstance(x, tuple))
    return _residual_bytes(key, spec((batch, *latent), jnp.float32), ctx, remat)


class _Hashable:
    """A pytree of ShapeDtypeStructs that hashes by its structure (the residual cache's key)."""

    def __init__(self, tree):
        self.tree, self.key = tree, str(jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), tree))

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self.key == other.key


def param_bytes(model: Denoiser) -> int:
    """Bytes of the UNet's parameters."""
    return sum(a.size * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(model.params))


def check_remat(remat: str) -> None:
    if remat != "auto" and remat not in REMAT_MODES:
        raise ValueError(f"remat must be auto or one of {', '.join(REMAT_MODES)}, got {remat!r}")


def plan_program(model: Denoiser, method: str, remat: str, batch: int, lower: Callable[[int, str], Any], key: tuple, *,
                 max_device_memory: Optional[float] = None, latent: Sequence[int] = (), context: Any = (),
                 device=None) -> Choice:
    """Remat mode and rows per call for `batch` images per `device` (default: the first local
    one; a compile-only TPU plans for its HBM), from the compiled candidates (`planning.choose`):
    every mode for null-text under "auto", else the one given ("none" for the methods with no
    gradient). The gradient's residual bytes order the candidates."""
    check_remat(remat)
    modes = ("none",) if method != "null-text" else REMAT_MODES if remat == "auto" else (remat,)
    device = device or jax.local_devices()[0]
    budget = budget_bytes(max_device_memory, param_bytes(model), device)
    estimate = None
    if method == "null-text" and latent:
        estimate = lambda rows, mode: gradient_residual_bytes(model, rows, latent, context, mode)
    return choose((method,) + key, batch, modes, lower, budget, estimate, device.platform)
