"""TPU chips a program can be planned for from any host: vendor figures, one row each.

`topology` is what `jax.experimental.topologies.get_topology_desc` takes for a small slice of the
chip (its first device is one chip); `kind` is its devices' `device_kind`. The planner budgets a
chip known only by its description at `hbm_gib` less `RESERVE_GIB`; the roofline estimates use
the peak dense bf16 FLOP/s and the HBM bandwidth. Estimates, never measurements.
"""

from __future__ import annotations

from typing import NamedTuple


class Chip(NamedTuple):
    topology: str
    kind: str
    hbm_gib: float
    tflops: float  # peak dense bf16, TFLOP/s
    hbm_tbs: float  # HBM bandwidth, TB/s


CHIPS = {
    "v4": Chip("v4:2x2x1", "TPU v4", 32.0, 275.0, 1.2),
    "v5e": Chip("v5e:2x2", "TPU v5 lite", 16.0, 197.0, 0.819),
    "v6e": Chip("v6e:2x2", "TPU v6 lite", 32.0, 918.0, 1.64),
}
RESERVE_GIB = 1.0  # HBM kept back for the runtime's own buffers and fragmentation


def chip_of_kind(kind: str) -> Chip:
    """The chip whose devices report `device_kind` `kind`."""
    for chip in CHIPS.values():
        if chip.kind == kind:
            return chip
    raise ValueError(f"no figures known for {kind!r} (known: {', '.join(c.kind for c in CHIPS.values())}): "
                     "give the memory per device (max_device_memory)")
