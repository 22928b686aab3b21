"""Which kernel a layer runs on the platform a program targets: the choice is made here, once.

A layer whose fastest (or leanest) kernel differs by platform declares a table of its choices
and asks `kernel_choice` at trace time; call sites never pass the choice along. The platform is
the target's, not the host's (`target_platform`): an ahead-of-time compile for a TPU from a CPU
host gets the TPU kernels. The variable `NTI_JAX_<NAME>` overrides a table for the whole process
(the device benchmark's A/B points), and is checked against the layer's own choices.

Where the target comes from, first match wins:
1. `on_platform(p)`, a `jax.make_user_context`: part of jit's trace and compile cache keys, so a
   function traced under one platform is never reused under another;
2. the abstract mesh being traced under (`jax.sharding.get_abstract_mesh()`): `jax.shard_map`
   and `jax.set_mesh` set it from the mesh's devices, and jit's cache keys on it, so a program
   over a TPU mesh gets the TPU's kernels with nothing else said;
3. JAX's default backend (a plain jit on the host's devices).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_TARGET = jax.make_user_context(None)  # the platform `on_platform` names, or None


def platform_of(where: Any) -> str:
    """The platform ("cpu", "gpu", "tpu") of a Mesh, AbstractMesh, Sharding, device or sequence
    of devices; a CUDA or ROCm device counts as "gpu"."""
    if isinstance(where, jax.sharding.AbstractMesh):
        if where.abstract_device is None:
            raise ValueError(f"{where} names no device kind")
        return _normal(where.abstract_device.platform)
    if isinstance(where, jax.sharding.Mesh):
        where = where.devices.flat[0]
    elif isinstance(where, jax.sharding.Sharding):
        where = next(iter(where.device_set))
    elif not hasattr(where, "platform"):
        where = list(where)[0]
    return _normal(where.platform)


def _normal(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm") else platform


def on_platform(platform: str):
    """A context manager under which `target_platform()` is `platform` (one of `PLATFORMS`).
    It is part of jit's cache key: a jitted function traced under another platform (or none)
    is traced again. Enter it around `.lower()`/the call, or inside a traced function."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, got {platform!r}")
    return _TARGET(platform)


def target_platform() -> str:
    """The platform being traced for: `on_platform`'s, else the abstract mesh's, else the default
    backend (see the module docstring)."""
    if _TARGET.value is not None:
        return _TARGET.value
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return _normal(mesh.abstract_device.platform)
    return _normal(jax.default_backend())


def kernel_choice(name: str, table: Mapping[str, str], choices: tuple[str, ...], backend: Optional[str] = None) -> str:
    """The kernel `name` uses on `backend` (default: `target_platform()`): `table[backend]`,
    else `table["default"]`, unless $NTI_JAX_<NAME> names one of `choices`."""
    var = f"NTI_JAX_{name.upper()}"
    override = os.environ.get(var, "").strip().lower()
    if override:
        if override not in choices:
            raise ValueError(f"{var} must be one of {', '.join(choices)}, got {override!r}")
        return override
    backend = backend or target_platform()
    return table.get(backend, table["default"])
