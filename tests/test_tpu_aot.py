"""Issue 28, items 3 and 7: `benchmarks/tpu_aot.py --tiny` compiles every required point for a v5e
from this CPU host, each in its own process (libtpu's compile-only client), and its figures
follow from their parts by the closed forms the script states."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import tpu_aot
from nti_jax.models import flash
from nti_jax.models.unet import REMAT_MODES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args: str, timeout: int = 900) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT)
    for var in ("NTI_JAX_ATTENTION", "NTI_JAX_CONV_GRAD", "JAX_PLATFORMS"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tpu_aot.py"), *args], capture_output=True,
                         text=True, env=env, timeout=timeout, cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    return res.stdout


def _roofline(c: dict) -> float:
    return max(c["flops"] / 197e12, c["bytes"] / 0.819e12)  # v5e: 197 TFLOP/s bf16, 819 GB/s


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("tpu-aot") / "points.jsonl"
    _run("--tiny", "--jobs", "2", "--json", str(out), "--deadline", "600")
    return {r["point"]: r for r in map(json.loads, out.read_text().splitlines())}


def test_every_required_point_compiles_and_fits(rows):
    assert set(rows) == {p.name for p in tpu_aot.required_points(True)}
    for name, r in rows.items():
        assert "error" not in r and not r.get("partial"), r
        assert r["chip"] == "v5e" and r["fits"] is True
        assert r["hlo_conditionals"] == 0, name  # the TPU's conv gradient (CPU's is made in a conditional)
        assert r["code_gib"] > 0 and r["arguments_gib"] > 0 and r["outputs_gib"] > 0
        parts = r["arguments_gib"] + r["outputs_gib"] + r["temporaries_gib"] - r["aliased_gib"] + r["code_gib"]
        assert r["total_gib"] == pytest.approx(parts, rel=1e-9)


def test_invert_points_multiply_their_calls_by_the_worst_case(rows):
    for name, r in rows.items():
        if r["program"] != "invert":
            continue
        fwd, grad, b = r["per_call"]["forward"], r["per_call"]["gradient"], r["batch"]
        assert r["remat"] in REMAT_MODES
        assert r["calls"] == {"forward": 3 * 50, "gradient": 50 * 10}
        assert grad["flops"] > 1.5 * fwd["flops"] > 0  # a gradient is a forward and a backward pass
        assert r["flops_per_image"] == pytest.approx((150 * fwd["flops"] + 500 * grad["flops"]) / b, rel=1e-9)
        assert r["bytes_per_image"] == pytest.approx((150 * fwd["bytes"] + 500 * grad["bytes"]) / b, rel=1e-9)
        assert r["roofline_s_per_image"] == pytest.approx((150 * _roofline(fwd) + 500 * _roofline(grad)) / b, rel=1e-9)


def test_loop_points_count_their_unet_calls_and_decodes(rows):
    rec, edit = rows["tiny-reconstruct-b1"], rows["tiny-edit-r2"]
    assert rec["calls"] == {"unet": 100, "decode": 2} and edit["calls"] == {"unet": 50, "decode": 1}
    inv = rows["tiny-invert-b2"]["per_call"]["forward"]
    # the edit's call: 2 prompts x (unconditional, conditional) = 4 rows, with the hooks' explicit
    # attention; the reconstruction's: 1 row; null-text's forward here: 2 rows
    assert edit["per_call"]["unet"]["flops"] == pytest.approx(2 * inv["flops"], rel=0.25)
    assert 2 * rec["per_call"]["unet"]["flops"] == pytest.approx(inv["flops"], rel=0.25)
    for r in (rec, edit):
        u, d = r["per_call"]["unet"], r["per_call"]["decode"]
        assert r["flops_per_image"] == pytest.approx(r["calls"]["unet"] * u["flops"] + r["calls"]["decode"] * d["flops"], rel=1e-9)


def test_flash_layers_are_counted_from_the_kernels_tiling():
    """A 1024-token self-attention, forward + backward: XLA's kernel as XLA counts it, the flash
    kernel's count replaced by `flash.traffic`'s closed form (plus the pads and slices around it)."""
    lines = [json.loads(line) for line in _run("layers", "--models", "tiny", "--batches", "1").splitlines() if line.startswith("{")]
    by = {r["kernel"]: r for r in lines}
    assert set(by) == {"xla", "chunked", "flash"}
    ours = flash.traffic((1, 1024, 2, 8), (1, 1024, 2, 8), 2, backward=True)
    assert by["flash"]["flash_calls"] == 1
    assert by["flash"]["gflop"] * 1e9 == pytest.approx(ours["flops"], rel=0.05)
    assert by["flash"]["gbytes"] * 1e9 >= ours["bytes"]
    xla_matmuls = 2 * 1024 * 1024 * 8 * 2  # one (Lq x d) @ (d x Lk) product of 2 heads
    assert 4 * xla_matmuls <= by["xla"]["gflop"] * 1e9 <= 12 * xla_matmuls


HLO = """HloModule jit_f, entry_computation_layout={(bf16[8,128]{1,0})->f32[8,128]{1,0}}

%fused (a: bf16[8,128], b: bf16[8,128]) -> f32[8,128] {
  %a = bf16[8,128]{1,0} parameter(0)
}

ENTRY %main.9 (p0: bf16[8,128], p1: bf16[4,8,128]) -> f32[8,128] {
  %p0 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(0)
  %p1 = bf16[4,8,128]{2,1,0:T(8,128)(2,1)} parameter(1)
  %copy-start = (bf16[8,128]{1,0:T(8,128)(2,1)S(1)}, bf16[8,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%p0), cross_program_prefetch_index=0
  %copy-done = bf16[8,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %slice-start = ((bf16[4,8,128]{2,1,0:T(8,128)(2,1)}), bf16[1,8,128]{2,1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%p1), slice={[0:1], [0:8], [0:128]}
  %fusion = f32[8,128]{1,0:T(8,128)} fusion(%copy-done, %p0), kind=kLoop, calls=%fused, metadata={op_name="jit(f)/transpose(jvp(f))/convert_element_type"}, backend_config={"window_config":{"estimated_cycles":"1500"}}
  ROOT %bitcast = f32[8,128]{1,0:T(8,128)} bitcast(%fusion)
}
"""


def test_hlo_bytes_counts_hbm_operands_and_prefetches_in_closed_form():
    """`benchmarks/hlo_bytes.py` on a hand-written TPU HLO: a prefetch counts its source, an async
    slice the slice it lands in VMEM, a fusion its HBM operand and result but not its VMEM one;
    the compiler's cycle estimate from the backend config."""
    from benchmarks import hlo_bytes

    assert hlo_bytes.arrays("(f32[2,3]{1,0}, bf16[4]{0:S(1)})") == [(24, 0), (8, 1)]
    got = hlo_bytes.hbm_bytes(HLO)
    assert got == {("forward", "copy-start", ""): 8 * 128 * 2, ("forward", "slice-start", ""): 8 * 128 * 2,
                   ("backward", "fusion/kLoop", "convert_element_type"): 8 * 128 * 2 + 8 * 128 * 4}
    # The compiler's own estimate: only the instruction that carries one.
    assert hlo_bytes.compiler_cycles(HLO) == {("forward", "copy-start", ""): 0, ("forward", "slice-start", ""): 0,
                                              ("backward", "fusion/kLoop", "convert_element_type"): 1500}


_WIDE = """
import jax, jax.numpy as jnp
from benchmarks.tpu_aot import chip_mesh
from nti_jax.core.costs import placed
from nti_jax.models import flash
mesh = chip_mesh("v5e")
args = placed([jax.ShapeDtypeStruct((1, 4096, 1, 512), jnp.float32)] * 3, mesh)
with jax.set_mesh(mesh):
    jax.jit(lambda q, k, v: flash.flash_attention(q, k, v, 0.1)).lower(*args).compile()
print("compiled")
"""


def test_the_vaes_attention_compiles_with_flash_for_a_v5e():
    """The VAE's mid-block attention at 512 px (4096 tokens, one head of 512 float32 channels),
    inside every reconstruction and edit program: with the bf16 caps' tiles it ran out of VMEM
    (CompileTimeScopedVmemOom); the tiles shrink with the row's bytes."""
    env = dict(os.environ, PYTHONPATH=ROOT, ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    env.pop("JAX_PLATFORMS", None)
    res = subprocess.run([sys.executable, "-c", _WIDE], capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
