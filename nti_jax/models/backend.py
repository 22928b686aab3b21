"""Which kernel a layer runs on this backend: the choice is made here, once per backend.

A layer whose fastest (or leanest) kernel differs by backend declares a table of its choices
and asks `kernel_choice` at trace time; call sites never pass the choice along. The variable
`NTI_JAX_<NAME>` overrides a table for the whole process (the device benchmark's A/B points),
and is checked against the layer's own choices.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import jax


def kernel_choice(name: str, table: Mapping[str, str], choices: tuple[str, ...], backend: Optional[str] = None) -> str:
    """The kernel `name` uses on `backend` (default: JAX's default backend): `table[backend]`,
    else `table["default"]`, unless $NTI_JAX_<NAME> names one of `choices`."""
    var = f"NTI_JAX_{name.upper()}"
    override = os.environ.get(var, "").strip().lower()
    if override:
        if override not in choices:
            raise ValueError(f"{var} must be one of {', '.join(choices)}, got {override!r}")
        return override
    backend = backend or jax.default_backend()
    return table.get(backend, table["default"])
