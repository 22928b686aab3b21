"""Issue 28, items 4, 5 and 8: `nti-invert --plan v5e`; the planner works from a TPU chip's HBM and
counts the code it holds; the CLI's sharded inversion program compiled for several chips of one
host, and for one host of a multi-host slice, has no collective at all (each chip runs its own rows and its own early stop).
TPU compiles of the shipped toy model, from this CPU host, in one process of their own (libtpu's
compile-only client)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, os
    import jax
    from jax.experimental import topologies
    import nti_jax
    from nti_jax.core import parallel, planning
    from nti_jax.core.settings import InvertSettings
    from nti_jax.run import cli
    from benchmarks.tpu_aot import collectives

    pipe = nti_jax.load_pipeline(os.path.join(os.path.dirname(nti_jax.__file__), "toy", "model"), dtype="bfloat16")
    settings = InvertSettings(num_steps=3, num_inner_steps=2)

    def row(choice, mesh):
        m = choice.compiled.memory_analysis()
        hlo = choice.compiled.as_text()
        return {"rows": choice.rows, "remat": choice.remat, "need": choice.need_bytes, "budget": choice.budget_bytes,
                "fits": choice.fits, "tried": choice.tried, "code": m.generated_code_size_in_bytes,
                "analysis": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes,
                "collectives": collectives(hlo),
                "loops": hlo.count(" while("), "processes": sorted({d.process_index for d in mesh.devices.flat}),
                "devices": mesh.size}

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # the command line's plan, first: the plans below reuse its compile
        code = cli.main(["--plan", "v5e", "--dtype", "bfloat16", "--batch-size", "2", "--steps", "3", "--inner-steps", "2"])
    out = {"cli": {"code": code, "lines": buf.getvalue().splitlines()}}
    chips = topologies.get_topology_desc("v5e:2x2", "tpu").devices
    one = parallel.ShardedInverter(parallel.local_mesh(chips[:1]))
    out["auto"] = row(one.plan(pipe, settings, 2), one.mesh)  # the chip's own HBM
    below = (out["auto"]["need"] - 1) / planning.GIB  # a budget the first candidate misses by a byte
    out["budget"] = row(one.plan(pipe, settings, 2, remat="none", max_device_memory=below), one.mesh)
    slice_ = topologies.get_topology_desc("v5e:4x4", "tpu").devices  # four hosts of four chips
    host = parallel.ShardedInverter(parallel.local_mesh([d for d in slice_ if d.process_index == 1]))
    out["host"] = row(host.plan(pipe, settings, 2, remat="none"), host.mesh)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def plans():
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=ROOT)
    for var in ("NTI_JAX_ATTENTION", "NTI_JAX_CONV_GRAD", "NTI_JAX_FLOAT32", "JAX_PLATFORMS"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=1200, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_cli_plan_prints_the_planners_choice_and_a_roofline_estimate(plans):
    """`nti-invert --plan v5e`: exit 0, the lines, then the plan as JSON: the choice the planner
    makes for the same settings, and the worst case's UNet calls (3 forwards and 2 gradients per
    step, 3 steps)."""
    cli_, auto = plans["cli"], plans["auto"]
    assert cli_["code"] == 0
    plan = json.loads(cli_["lines"][-1])
    assert (plan["remat"], plan["rows_per_call"], plan["fits"]) == (auto["remat"], auto["rows"], True)
    assert plan["need_gib"] * 2**30 == pytest.approx(auto["need"]) and plan["budget_gib"] == 15.0
    assert plan["calls"] == {"forward": 9, "gradient": 6} and plan["roofline_s_per_image"] > 0
    assert plan["bound"] in ("memory", "compute") and plan["chip"] == "TPU v5 lite"
    assert cli_["lines"][1].startswith("remat none, 2 image(s) per chip per call") and "estimate:" in cli_["lines"][2]


def test_cli_plan_refuses_an_unknown_target_in_one_line(capsys):
    from nti_jax.run import cli

    assert cli.main(["--plan", "v9x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown TPU 'v9x'" in err[0]


def test_cli_plan_says_in_one_line_when_nothing_fits(monkeypatch, capsys):
    """The planner's DeviceMemoryError (the TPU's compiler refused even the leanest candidate,
    tests/test_planning.py) is one line and exit 1, not a traceback."""
    from nti_jax.errors import DeviceMemoryError
    from nti_jax.run import cli, fit

    def refuse(*_, **__):
        raise DeviceMemoryError("out of device memory: the compiler refuses even the leanest program, 1 image(s) per call")

    monkeypatch.setattr(fit, "plan_target", refuse)
    assert cli.main(["--plan", "v5e"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nti-invert --plan v5e: out of device memory: the compiler refuses")


def test_planner_budgets_a_v5e_chip_by_its_hbm_and_counts_its_code(plans):
    auto = plans["auto"]
    assert auto["budget"] == int((16.0 - 1.0) * 2**30)  # v5e's 16 GiB less the 1 GiB reserve
    assert (auto["rows"], auto["remat"], auto["fits"]) == (2, "none", True)  # the toy model fits easily
    assert auto["code"] > 0 and auto["need"] == auto["analysis"] + auto["code"]  # the code lives in HBM


def test_planner_takes_fewer_rows_under_a_budget_on_a_tpu(plans):
    auto, under = plans["auto"], plans["budget"]
    assert under["tried"][0] == [2, "none", auto["need"]]  # the first candidate, missed by one byte
    assert (under["rows"], under["remat"], under["fits"]) == (1, "none", True)
    assert under["need"] <= under["budget"] == int((auto["need"] - 1) / 2**30 * 2**30)


def test_one_hosts_program_of_a_slice_has_no_collective(plans):
    """The program the second host of a 16-chip v5e slice runs on its 4 chips (a host with
    several chips runs the same program): parameters replicated, rows split, nothing crosses
    chips, in the loops or anywhere."""
    p = plans["host"]
    assert (p["devices"], p["processes"], p["rows"]) == (4, [1], 2)
    assert p["loops"] >= 2 and p["collectives"] == 0
