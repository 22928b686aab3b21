"""The side-by-side benchmark (benchmarks/bench_inversion.py): one `--quick` run, its JSON checked.

No timing limits: every figure is there and within bounds a unit or bookkeeping error would
break, and the two implementations, given the same inputs, computed the same inversion.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import bench_inversion as bench
from nti_jax import testing

pytestmark = pytest.mark.slow  # every test here compiles or runs a model (minutes in all)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
STEPS, INNER = 4, 2  # what --quick runs
MIN_RSS_MIB = 100  # torch or jax imported
RAM_MIB = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("bench") / "quick.json")
    # One torch thread: on a shared 2-core machine all-core OpenMP threads can stall for seconds.
    cmd = [sys.executable, "benchmarks/bench_inversion.py", "--quick", "--threads", "1", "--json", path]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for title in ("| model | case |", "| model | batch |", "| model | GFLOP fwd B=1 |", "Command: `python"):
        assert title in proc.stdout
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model(report):
    assert list(report["models"]) == ["sd-tiny"]
    m = report["models"]["sd-tiny"]
    assert "error" not in m, m.get("error")
    return m


def test_metadata(report):
    s = report["settings"]
    assert (s["num_steps"], s["num_inner_steps"], s["repeats"], s["batches"]) == (STEPS, INNER, 1, [1, 2])
    assert s["cases"] == ["fixed", "early"] and s["threads"] == 1
    m = report["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["jax"] != "?" and m["torch"] != "?" and m["diffusers"] != "?"
    assert "--quick" in report["command"]


def _timed(model: dict) -> list[float]:
    """Every timed run's seconds (each timed once, one after another)."""
    out = []
    for c in model["cases"].values():
        out += [x for impl in ("jax", "torch") for x in (c[impl]["first_s"], *c[impl]["seconds"])]
    return out + [x for r in model["batch_scaling"] for x in (r["first_s"], *r["seconds"])]


def test_the_runs_fit_in_the_whole(report, model):
    # the runs happen one after another inside the run's own clock: a unit or clock error breaks this
    times = _timed(model)
    assert min(times) > 0 and sum(times) < report["total_s"], (times, report["total_s"])


def test_times_memory_and_ratio(model):
    for case in ("fixed", "early"):
        c = model["cases"][case]
        for impl in ("jax", "torch"):
            r = c[impl]
            assert r["first_s"] > 0 and len(r["seconds"]) == 1 and min(r["seconds"]) > 0
            assert r["median_s_per_image"] == pytest.approx(r["seconds"][0])
            mem = r["memory"]
            assert MIN_RSS_MIB < mem["peak_mib"] < RAM_MIB  # a process with torch or jax loaded, in MiB
            assert mem["run_peak_mib"] is None or 0 < mem["run_peak_mib"] <= mem["peak_mib"]
        ratio = c["jax"]["median_s_per_image"] / c["torch"]["median_s_per_image"]
        assert c["ratio_jax_over_torch"] == pytest.approx(ratio, rel=1e-12)


def test_adam_steps(model):
    fixed, early = model["cases"]["fixed"], model["cases"]["early"]
    assert fixed["jax"]["adam_steps"] == fixed["torch"]["adam_steps"] == STEPS * INNER
    for impl in ("jax", "torch"):
        assert 0 < early[impl]["adam_steps"] <= STEPS * INNER
        assert early[impl]["adam_steps"] >= STEPS  # at least one step per timestep


def test_flops(model):
    f = model["flops"]
    c = f["per_call"]
    # every weight multiplies and adds at least once per latent position it is applied to, at most
    # once per position of the full 16 x 16 latent (plus attention's weightless products)
    params = sum(p.numel() for p in testing.tiny_unet(testing.UNET_SD1).parameters())
    assert 2 * params <= c["fwd_b1"] <= 2 * params * 16 * 16 * 4, (c, params)
    assert c["fwd_b2"] == pytest.approx(2 * c["fwd_b1"], rel=0.05)  # the UNet is linear in the batch
    assert c["fwd_b1"] < c["fwdbwd_b1"] < 4 * c["fwd_b1"]
    assert f["calls_fixed"] == bench.unet_calls(STEPS, STEPS * INNER) == {"fwd_b1": 8, "fwdbwd_b1": 8, "fwd_b2": 4}
    assert f["gflop_per_image"] == pytest.approx((8 * c["fwd_b1"] + 8 * c["fwdbwd_b1"] + 4 * c["fwd_b2"]) / 1e9)
    for impl in ("jax", "torch"):  # the rate is the work over the measured time
        assert f[f"gflops_{impl}"] * model["cases"]["fixed"][impl]["median_s_per_image"] == pytest.approx(f["gflop_per_image"])


def test_batch_scaling(model):
    rows = model["batch_scaling"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert MIN_RSS_MIB < r["memory"]["peak_mib"] < RAM_MIB
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["median_s"])
    assert rows[0]["speedup"] == 1.0
    assert rows[1]["speedup"] == pytest.approx(rows[1]["images_per_s"] / rows[0]["images_per_s"])


def test_both_implementations_computed_the_same_inversion(model):
    """Fixed case, same z0 / C / phi. Measured on this machine (2-core AMD EPYC, jax 0.10.2,
    torch 2.13.0): ||phi_jax - phi_torch|| / ||phi_torch - null|| 8.1e-5, max |diff| / max move
    2.6e-3, final losses 3.2e-6, x_T 1.2e-6 (relative). Adam's early updates are ~lr * sign(g),
    so a single element with a near-zero gradient can move differently on float rounding alone
    (2 steps x 1 iteration on sd-small gave 2.2e-2 for the max ratio, 2.8e-4 for the L2 one):
    the max ratio gets test_inversion.py's 0.1, the L2 ratio 2e-3 (25x margin), the losses and
    pivots, which average over everything, 1e-4 (30x). A wrong schedule, guidance, target or
    learning rate misses these by orders of magnitude."""
    a = model["agreement"]
    assert a["phi_moved"] > 1e-3  # the optimisation did move phi
    assert a["phi_l2_diff_over_l2_move"] <= 2e-3
    assert a["phi_diff_over_moved"] <= 0.1
    assert a["final_loss_max_rel_diff"] <= 1e-4
    assert a["x_T_max_rel_diff"] <= 1e-4


def test_pure_helpers():
    assert bench.unet_calls(50, 500) == {"fwd_b1": 100, "fwdbwd_b1": 500, "fwd_b2": 50}
    assert bench.flops_per_image({"a": 2.0, "b": 3.0}, {"a": 10, "b": 1}) == 23.0
    s = bench.summarize([4.0, 2.0, 6.0], batch=2)
    assert (s["median_s_per_image"], s["min_s_per_image"], s["max_s_per_image"]) == (2.0, 1.0, 3.0)
