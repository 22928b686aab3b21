"""Issue 13's memory modes on tiny models: remat changes what a gradient keeps, never its value
(torch autograd is the oracle); no Lq x Lk attention array is kept for the backward pass; bf16
weights are stored in bf16 with the same results; the automatic choice; the benchmarks' dry runs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nti_jax
from nti_jax.core import planning
from nti_jax.models.unet import REMAT_MODES
from nti_jax.core.sampling import Denoiser
from nti_jax.testing import rel_err

ROOT = os.path.join(os.path.dirname(__file__), "..")
PROMPT = "a red circle on a blue background"


@pytest.mark.slow
def test_context_gradient_matches_torch_autograd_in_every_remat_mode(folder, pipe):
    """d sum(unet(x, t, c)^2) / dc against torch autograd of the diffusers UNet, per mode."""
    from diffusers import UNet2DConditionModel as TorchUNet

    ref = TorchUNet.from_pretrained(folder + "/unet").eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((2, 77, 32)).astype(np.float32)
    c = torch.from_numpy(ctx).requires_grad_()
    out = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor(500), encoder_hidden_states=c).sample
    (out**2).sum().backward()
    want = c.grad.numpy()
    base = Denoiser.of(pipe)
    grads = {}
    for mode in REMAT_MODES:
        model = planning.with_remat(base, mode)
        grads[mode] = np.asarray(jax.jit(jax.grad(lambda c, m=model: jnp.sum(m(x, jnp.int32(500), c) ** 2)))(ctx))
        assert rel_err(grads[mode], want) <= 1e-4, mode
    for mode in ("blocks", "full"):  # the same operations run again: equal to float rounding
        assert rel_err(grads[mode], grads["none"]) <= 1e-5


def test_chunked_attention_matches_torch():
    """Queries in chunks (forced small here; SD 1.5's 64x64 layers chunk by default on CPU): the
    values and gradients of torch's plain attention."""
    from nti_jax.models import attention

    rng = np.random.default_rng(2)
    q, k, v, g = (rng.standard_normal((2, 512, 2, 8)).astype(np.float32) for _ in range(4))
    block = 2**14  # (2, 2 heads, 512, 512) -> 8 chunks of 64
    out, vjp = jax.vjp(lambda q, k, v: attention._xla_attention(q, k, v, 0.3, block), q, k, v)
    tq, tk, tv = (torch.from_numpy(a).permute(0, 2, 1, 3).requires_grad_() for a in (q, k, v))
    want = torch.softmax(tq @ tk.transpose(-1, -2) * 0.3, dim=-1) @ tv
    (want * torch.from_numpy(g).permute(0, 2, 1, 3)).sum().backward()
    assert rel_err(out, want.detach().permute(0, 2, 1, 3).numpy()) <= 1e-5
    for ours, ref in zip(vjp(g), (tq, tk, tv)):
        assert rel_err(ours, ref.grad.permute(0, 2, 1, 3).numpy()) <= 1e-5


def _residual_shapes(model: Denoiser, x, ctx) -> list:
    jaxpr = jax.make_jaxpr(lambda p, c: jax.vjp(lambda c: model.replace(params=p)(x, jnp.int32(500), c), c)[1])(model.params, ctx)
    inputs = set(jaxpr.jaxpr.invars)
    return [v.aval.shape for v in jaxpr.jaxpr.outvars if isinstance(v, jax.extend.core.Var) and v not in inputs]


def test_no_attention_probabilities_are_kept_for_the_backward_pass(pipe):
    """16x16 latents: a self-attention's probabilities would be (B, heads, 256, 256)."""
    x, ctx = jnp.zeros((1, 16, 16, 4)), jnp.zeros((1, 77, 32))
    for mode in REMAT_MODES:
        shapes = _residual_shapes(planning.with_remat(Denoiser.of(pipe), mode), x, ctx)
        assert shapes, mode
        assert not [s for s in shapes if len(s) == 4 and s[-2:] in {(256, 256), (256, 77), (64, 64), (64, 77)}], mode


def test_remat_modes_keep_fewer_residual_bytes(pipe):
    model = Denoiser.of(pipe)
    kept = {m: planning.gradient_residual_bytes(model, 1, (16, 16, 4), (77, 32), m) for m in REMAT_MODES}
    assert kept["none"] > 2 * kept["blocks"] > 0 and kept["blocks"] > 2 * kept["full"] > 0
    # Residuals are per image: batch 3 keeps three times batch 1, within the few shared scalars.
    three = planning.gradient_residual_bytes(model, 3, (16, 16, 4), (77, 32), "none")
    assert abs(three - 3 * kept["none"]) <= 1e-3 * three


def test_bf16_weights_are_stored_in_bf16_with_the_same_results(folder):
    pipe = nti_jax.load_pipeline(folder, dtype="bfloat16")
    for part in ("unet", "text_encoder"):
        leaves = jax.tree_util.tree_leaves(pipe.params[part])
        assert {str(a.dtype) for a in leaves if a.ndim >= 2} == {"bfloat16"}
        assert {str(a.dtype) for a in leaves if a.ndim < 2} == {"float32"}
    assert {str(a.dtype) for a in jax.tree_util.tree_leaves(pipe.params["vae"])} == {"float32"}
    # The oracle: the same bf16 UNet fed float32 masters (each layer casts its weights itself).
    masters = nti_jax.load_pipeline(folder).params["unet"]
    rng = np.random.default_rng(1)
    x, ctx = rng.standard_normal((1, 16, 16, 4)).astype(np.float32), rng.standard_normal((1, 77, 32)).astype(np.float32)
    run = jax.jit(lambda p, x, c: pipe.unet.apply({"params": p}, x, jnp.int32(300), c))
    np.testing.assert_array_equal(np.asarray(run(pipe.params["unet"], x, ctx)), np.asarray(run(masters, x, ctx)))
    ids = pipe.tokenize([PROMPT])
    text = jax.jit(lambda p: pipe.text_encoder.apply({"params": p}, ids))
    np.testing.assert_array_equal(np.asarray(text(pipe.params["text_encoder"])),
                                  np.asarray(text(nti_jax.load_pipeline(folder).params["text_encoder"])))


@pytest.mark.slow
def test_inversion_with_remat_equals_without(pipe):
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    kw = dict(num_steps=4, num_inner_steps=3, early_stop_epsilon=-1.0)
    none = nti_jax.invert(pipe, img, PROMPT, remat="none", **kw)
    auto = nti_jax.invert(pipe, img, PROMPT, **kw)  # a CPU host has room: auto is "none"
    np.testing.assert_array_equal(np.asarray(auto.null_embeddings), np.asarray(none.null_embeddings))
    moved = np.abs(np.asarray(none.null_embeddings[0]) - np.asarray(pipe.encode_prompt([""]))).max()
    # "full" gives the same gradients (test above); one program with remat is enough here.
    inv = nti_jax.invert(pipe, img, PROMPT, remat="blocks", **kw)
    np.testing.assert_array_equal(np.asarray(inv.pivots), np.asarray(none.pivots))  # no gradient there
    np.testing.assert_allclose(np.asarray(inv.final_losses), np.asarray(none.final_losses), rtol=1e-4)
    assert np.abs(np.asarray(inv.null_embeddings) - np.asarray(none.null_embeddings)).max() <= 1e-2 * moved
    with pytest.raises(ValueError, match="remat must be auto or one of none, blocks, full"):
        nti_jax.invert(pipe, img, PROMPT, remat="some", **kw)


def test_largest_batch_is_a_line_through_the_measured_batches():
    from benchmarks import memory

    rows = [dict(batch=1, arguments_gib=3.0, temporaries_gib=2.0), dict(batch=4, arguments_gib=3.0, temporaries_gib=5.0)]
    # temporaries = 1 + 1 * batch: 3 + 1 + b <= chip
    assert [memory.largest_batch(rows, c) for c in (4.5, 5.0, 16.0, 80.0)] == [0, 1, 12, 76]


def test_memory_point_on_a_tiny_model():
    from benchmarks import memory

    row = memory.point("tiny", "float32", 1, "blocks", "invert")
    params = sum(a.size * 4 for a in jax.tree_util.tree_leaves(memory.abstract_model("tiny", "float32").params))
    assert row["arguments_gib"] * memory.GIB >= params and row["temporaries_gib"] > 0


def test_sdxl_programs_lower_with_the_pooled_conditioning():
    """The memory plan's SDXL path on a tiny SDXL config: the inversion and edit programs lower
    with TextCond inputs, and the gradient keeps residuals for the pooled embedding's path too."""
    from benchmarks import memory

    model = memory.abstract_model("tiny-xl", "float32")
    assert model.time_ids is not None and memory.cond_shapes(model).pooled == (32,)
    text = memory.lower_invert(model, 2, "none").as_text()
    assert "2x32xf32" in text and "2x77x64xf32" in text  # pooled and token conditioning, batch 2
    assert "2x32xf32" in memory.lower_edit(model, rows=2, steps=4).as_text()
    assert memory.residuals("tiny-xl", "float32", ("none",))["none"]["per_image_gib"] > 0


@pytest.mark.slow
def test_device_bench_dry_run(tmp_path):
    """benchmarks/device_bench.sh on the tiny model: every dry-run point returns its figures, the
    compile from the persistent cache is a hit, and the profile table names operations."""
    from benchmarks import device_bench

    out = tmp_path / "bench.jsonl"
    env = dict(os.environ, PYTHON=sys.executable, BUDGET_S="600", CACHE_DIR=str(tmp_path / "cache"))  # a cold cache
    res = subprocess.run([os.path.join(ROOT, "benchmarks", "device_bench.sh"), "--dry-run", str(out)], env=env,
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = {r["point"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == list(device_bench.DRY_POINTS)
    assert not [r for r in rows.values() if "error" in r or "skipped" in r]
    first = rows["bf16-b1"]
    assert first["run_s"] > 0 and first["s_per_image_50"] == first["run_s"] * 25 and first["cudnn_fmha_calls"] == 0
    assert first["need_gib"] > first["temporaries_gib"] > 0 and first["top_ops"] and first["profiled_ops_ms"] > 0
    assert rows["bf16-b1-warm-compile"]["compile_s"] < first["compile_s"] / 2  # the cache served it
    assert rows["bf16-edit-2"]["run_s"] > 0 and rows["torch-f32-b1"]["torch_device"] == "cpu"
    assert rows["sdxl-bf16-b1"]["model"] == "tiny-xl" and rows["sdxl-bf16-b1"]["run_s"] > 0  # SDXL's own path
    assert "| bf16-b1 | bfloat16 | 1 |" in res.stdout and "Top device operations, bf16-b1" in res.stdout
