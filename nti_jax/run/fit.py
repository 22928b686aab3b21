"""`nti-invert --plan TARGET`: what a run would use on a TPU slice, from any host, running nothing.

TARGET is a chip ("v5e", "v6e", "v4": one chip) or a topology ("v5e:2x4"; the chips of its
first host, which is what each host of the slice runs). The inversion program the run would
execute is compiled for those chips by libtpu's compile-only client (`pip install -r
requirements-tpu.txt`) and planned by the run's own planner (`ShardedInverter.plan`: remat and
images per call that fit a chip's HBM less a reserve, code included); for null-text, the
worst-case roofline seconds per image come from one UNet forward and one gradient compiled
alike (`core.costs`). Figures are the TPU compiler's estimates, not measurements.
"""

from __future__ import annotations

import os

from nti_jax.core import costs, parallel, planning
from nti_jax.core.chips import CHIPS, RESERVE_GIB
from nti_jax.core.sampling import Denoiser
from nti_jax.errors import UsageError, one_line
from nti_jax.loading.pipeline import Pipeline
from nti_jax.run.config import RunConfig

GIB = planning.GIB


def target_mesh(target: str):
    """(the chip's figures, a mesh over the chips one host of `target` runs, hosts in it)."""
    name, _, shape = target.partition(":")
    if name not in CHIPS:
        raise UsageError(f"--plan: unknown TPU {name!r}; one of {', '.join(sorted(CHIPS))}, or a topology such as v5e:2x4")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(target if shape else CHIPS[name].topology, "tpu").devices
    except Exception as e:  # noqa: BLE001 - no libtpu, or a topology it does not know
        raise UsageError(f"--plan {target}: no TPU compiler for it ({one_line(e)}); pip install -r requirements-tpu.txt") from None
    local = [d for d in devices if d.process_index == 0] if shape else devices[:1]
    return CHIPS[name], parallel.local_mesh(local), len({d.process_index for d in devices}) if shape else 1


def plan_target(pipe: Pipeline, cfg: RunConfig, target: str) -> dict:
    """The plan of a run of `cfg` on `target`: the planner's choice and, for null-text, the
    roofline estimate (seconds per image per chip, worst case)."""
    chip, mesh, hosts = target_mesh(target)
    s = cfg.settings
    choice = parallel.ShardedInverter(mesh).plan(pipe, s, cfg.batch_size, None, cfg.remat, cfg.max_device_memory)
    m = choice.compiled.memory_analysis()
    out = {"target": target, "chip": chip.kind, "hbm_gib": chip.hbm_gib, "reserve_gib": RESERVE_GIB, "chips_per_host": mesh.size,
           "hosts": hosts, "method": s.method, "dtype": cfg.dtype, "batch_size": cfg.batch_size, "remat": choice.remat,
           "rows_per_call": choice.rows, "need_gib": choice.need_bytes / GIB, "budget_gib": choice.budget_bytes / GIB,
           "code_gib": m.generated_code_size_in_bytes / GIB, "fits": choice.fits, "tried": choice.tried}
    if s.method == "null-text":
        one = parallel.local_mesh(list(mesh.devices.flat)[:1])
        est = costs.null_text_estimate(Denoiser.of(pipe), one, chip, choice.rows, choice.remat, s.num_steps, s.num_inner_steps)
        out.update({k: est[k] for k in ("roofline_s_per_image", "bound", "flops_per_image", "bytes_per_image", "calls")})
    return out


def describe(p: dict) -> list[str]:
    """The plan in a few lines."""
    lines = [f"{p['target']}: {p['chips_per_host']} {p['chip']} chip(s) per host x {p['hosts']} host(s), "
             f"{p['hbm_gib']:.0f} GiB HBM per chip ({p['reserve_gib']:.0f} GiB reserved); {p['method']}, {p['dtype']}",
             f"remat {p['remat']}, {p['rows_per_call']} image(s) per chip per call (--batch-size {p['batch_size']}): "
             f"{p['need_gib']:.2f} GiB of {p['budget_gib']:.2f} per chip, code {p['code_gib']:.2f} GiB included"
             + ("" if p["fits"] else " - DOES NOT FIT (the leanest candidate)")]
    if "roofline_s_per_image" in p:
        lines.append(f"estimate: {p['roofline_s_per_image']:.3g} s per image per chip ({p['bound']}-bound roofline, worst case: "
                     f"{p['calls']['forward']} UNet forwards and {p['calls']['gradient']} gradients of {p['rows_per_call']} row(s) "
                     "per call; not a measurement)")
    else:
        lines.append("estimate: seconds per image are estimated for null-text only")
    if p["dtype"] == "float32":
        lines.append("note: a TPU computes in bfloat16; --dtype bfloat16 plans what it would run best")
    return lines
