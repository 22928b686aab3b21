"""Out of device memory at run time: a program call retried with fewer rows.

The planner (`planning`) chooses rows per call from XLA's analysis ahead of time; at run time an
allocation can still fail (fragmentation, another process on the device, an estimate a few
percent off). `RowLimits.calls` runs a program over its rows in calls of at most k rows per
device; a call that fails with XLA's RESOURCE_EXHAUSTED is dropped (its buffers released) and
run again from the same row with half as many, down to one; the calls that finished are kept.
The lowered k is kept per program kind and shape for the rest of the process, so later calls
start there. Any other error propagates at once.
"""

from __future__ import annotations

import gc
from typing import Callable, Hashable, TypeVar

import jax

from nti_jax.errors import DeviceMemoryError

T = TypeVar("T")

# What one row of each program is, for the one-line reason when one row does not fit.
ROW_NOUN = {"invert": "image", "reconstruct": "image", "edit": "edit"}


def is_out_of_memory(e: BaseException) -> bool:
    """XLA's device out-of-memory error (RESOURCE_EXHAUSTED), raised compiling or running."""
    msg = str(e)
    return isinstance(e, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in msg or "Out of memory" in msg)


def row_key(tree) -> tuple:
    """The per-row shapes and dtypes of a pytree of row-major arrays (part of a limit's key)."""
    return tuple((tuple(a.shape[1:]), str(a.dtype)) for a in jax.tree_util.tree_leaves(tree))


class RowLimits:
    """Per program kind and shape key (`key[0]` the kind: "invert", "reconstruct", "edit"), the
    most rows per device a call may take, lowered by each out-of-memory; and the retries so far."""

    def __init__(self) -> None:
        self.limit: dict[Hashable, int] = {}
        self.retries = 0

    def first(self, key: Hashable, rows: int) -> int:
        """`rows`, or fewer if a call of `key` ran out of memory with more."""
        return max(1, min(rows, self.limit.get(key, rows)))

    def calls(self, key: tuple, total: int, rows: int, call: Callable[[int, int], T]) -> list[T]:
        """`call(start, k)` (rows [start, start + k) of every device; the caller pads past `total`)
        over rows [0, total), k at most `rows` and the limit for `key`: the calls' results, in
        order. A call that runs out of device memory runs again from `start` with k halved, once
        its buffers are released (the exception and its frames dropped, then `gc.collect()`);
        with k = 1 it raises `DeviceMemoryError`, whose `done` holds the finished results."""
        k = self.first(key, min(rows, total))
        out: list[T] = []
        start = 0
        while start < total:
            reason = None
            try:
                out.append(call(start, k))
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                reason = (str(e).strip().splitlines() or ["RESOURCE_EXHAUSTED"])[0]
            if reason is None:
                start += k
                continue
            gc.collect()
            if k == 1:
                raise DeviceMemoryError(f"out of device memory: even one {ROW_NOUN.get(key[0], 'row')} per device does not fit "
                                        f"({reason})", done=out)
            k = -(-k // 2)
            self.limit[key] = k
            self.retries += 1
        return out
