"""Issue 19's kernels per backend: the choice tables and their overrides, cuDNN's rules, the conv
gradient kinds against each other, and the norms against torch (values in float32 and bf16, bf16
normalised in float32 as the dtype policy says, and no float32 copy of a bf16 norm's input kept
for the backward pass)."""

import flax.linen as nn
import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nti_jax.models import attention, resnet
from nti_jax.models.backend import kernel_choice
from nti_jax.models.norms import GroupNorm, LayerNorm
from nti_jax.testing import rel_err


def test_kernel_choice_reads_the_table_per_backend_and_the_override(monkeypatch):
    monkeypatch.delenv("NTI_JAX_ATTENTION", raising=False)
    table, choices = attention.ATTENTION, attention.ATTENTION_CHOICES
    assert kernel_choice("attention", table, choices, "gpu") == "cudnn"
    assert kernel_choice("attention", table, choices, "cpu") == "chunked"
    assert kernel_choice("attention", table, choices, "tpu") == "flash"
    assert kernel_choice("attention", table, choices, "some-new-backend") == "xla"
    monkeypatch.setenv("NTI_JAX_ATTENTION", "xla")
    assert kernel_choice("attention", table, choices, "gpu") == "xla"
    monkeypatch.setenv("NTI_JAX_ATTENTION", "splash")
    with pytest.raises(ValueError, match="NTI_JAX_ATTENTION must be one of cudnn, flash, xla, chunked"):
        kernel_choice("attention", table, choices, "gpu")


@pytest.mark.parametrize(
    "dtype, d, capability, ok",
    [
        (jnp.bfloat16, 160, "9.0", True),  # SD 1.5's 1280-channel layers on Hopper
        (jnp.bfloat16, 160, "8.0", False),  # ... but not on Ampere
        (jnp.float16, 64, "8.0", True),
        (jnp.bfloat16, 100, "9.0", False),  # not a multiple of 8
        (jnp.float32, 64, "9.0", False),
    ],
)
def test_cudnn_rules_follow_jax(dtype, d, capability, ok):
    q = jnp.zeros((1, 64, 8, d), dtype)
    why = attention.cudnn_unsupported(q, capability)
    assert (why is None) == ok, why


def test_attention_kinds_agree(monkeypatch):
    """The chunked and unchunked XLA kernels: equal values and gradients (the cuDNN kernel needs a GPU)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 1024, 2, 8)), jnp.float32) for _ in range(3))
    out = {}
    for kind in ("xla", "chunked"):
        monkeypatch.setenv("NTI_JAX_ATTENTION", kind)
        monkeypatch.setattr(attention, "ATTENTION_BLOCK", 2**16)  # 4 chunks of 256 queries
        f = lambda q, k, v: jnp.sum(jnp.sin(attention.fused_attention(q, k, v, 0.3)))
        out[kind] = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    assert rel_err(out["chunked"][0], out["xla"][0]) <= 1e-6
    for a, b in zip(out["chunked"][1], out["xla"][1]):
        assert rel_err(a, b) <= 1e-5


def test_conv_layers_have_the_same_gradient_with_either_conv_gradient(monkeypatch):
    """The flipped-kernel input gradient (CPU's) and lax.conv's own (GPU's, TPU's), through
    every kind of conv the models use: 3x3 and 1x1 stride 1, the UNet's and the VAE's stride 2."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 6)), jnp.float32)

    module = _Convs()
    params = module.init(jax.random.PRNGKey(0), x)
    grads = {}
    for kind in resnet.CONV_GRAD_CHOICES:
        monkeypatch.setenv("NTI_JAX_CONV_GRAD", kind)
        grads[kind] = jax.grad(lambda p, x: jnp.sum(module.apply(p, x) ** 2), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(grads["autodiff"]), jax.tree_util.tree_leaves(grads["flipped"])):
        assert rel_err(a, b) <= 1e-5


class _Convs(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = resnet.conv(6, 3, "a", jnp.float32)(x)
        x = resnet.conv(5, 1, "b", jnp.float32)(jnp.sin(x))
        x = resnet.Downsample2D(5, name="c")(x)
        return resnet.Downsample2D(4, asymmetric=True, name="d")(jnp.sin(x))


def _norm_pair(kind: str, c: int):
    rng = np.random.default_rng(2)
    scale, bias = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
    if kind == "group":
        ref = lambda x: torch.nn.functional.group_norm(x.permute(0, 3, 1, 2), 4, torch.from_numpy(scale), torch.from_numpy(bias), 1e-6).permute(0, 2, 3, 1)
        return lambda dt: (lambda x: GroupNorm(4, 1e-6, dt).apply(params, x)), ref, (2, 8, 8, c)
    ref = lambda x: torch.nn.functional.layer_norm(x, (c,), torch.from_numpy(scale), torch.from_numpy(bias), 1e-5)
    return lambda dt: (lambda x: LayerNorm(1e-5, dt).apply(params, x)), ref, (2, 77, c)


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_norms_match_torch_and_keep_no_float32_copy_in_bf16(kind):
    c = 32
    ours, ref, shape = _norm_pair(kind, c)
    x = (np.random.default_rng(3).standard_normal(shape) * 3 + 1).astype(np.float32)
    want = ref(torch.from_numpy(x)).numpy()
    assert rel_err(ours(jnp.float32)(jnp.asarray(x)), want) <= 1e-6
    xb = jnp.asarray(x, jnp.bfloat16)
    got = ours(jnp.bfloat16)(xb)
    assert got.dtype == jnp.bfloat16
    want_b = ref(torch.from_numpy(np.asarray(xb, np.float32))).numpy()
    assert rel_err(np.asarray(got, np.float32), want_b) <= 1e-2
    # The dtype policy normalises in float32 ("norms"): torch's float32 norm of the bf16 input,
    # rounded once to bf16 (within one bf16 step of it, for XLA's own rounding of the statistics).
    step = np.abs(want_b) * 2.0**-7 + 1e-6
    assert np.all(np.abs(np.asarray(got, np.float32) - want_b) <= step)
    # What a gradient keeps: nothing of the input's size in float32 (flax's norms keep two such copies).
    jaxpr = jax.make_jaxpr(lambda x: jax.vjp(ours(jnp.bfloat16), x)[1])(xb).jaxpr
    kept = [v.aval for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var) and v not in set(jaxpr.invars)]
    assert kept and not [a for a in kept if a.size >= xb.size and a.dtype == jnp.float32], kept


@pytest.mark.parametrize("kind", ["group", "layer"])
def test_bf16_norms_gradient_matches_torch_autograd(kind):
    """The float32 normalisation of a bf16 layer has its backward written out (`norms._mixed`):
    its input, scale and bias gradients against torch's float64 autograd of the same bf16 input
    and cotangent, dx within one bf16 step, the parameters' gradients to float32 rounding."""
    c = 32
    shape = (2, 8, 8, c) if kind == "group" else (2, 77, c)
    rng = np.random.default_rng(4)
    xb = jnp.asarray(rng.standard_normal(shape) * 3 + 1, jnp.bfloat16)
    dyb = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    norm = GroupNorm(4, 1e-6, jnp.bfloat16) if kind == "group" else LayerNorm(1e-5, jnp.bfloat16)
    scale = jnp.asarray(rng.standard_normal(c), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    params = {"params": {"scale": scale, "bias": bias}}
    _, vjp = jax.vjp(lambda x, p: norm.apply(p, x), xb, params)
    dx, dp = vjp(dyb)
    assert dx.dtype == jnp.bfloat16

    xt = torch.tensor(np.asarray(xb, np.float64), requires_grad=True)
    st = torch.tensor(np.asarray(scale, np.float64), requires_grad=True)
    bt = torch.tensor(np.asarray(bias, np.float64), requires_grad=True)
    if kind == "group":
        y = torch.nn.functional.group_norm(xt.permute(0, 3, 1, 2), 4, st, bt, 1e-6).permute(0, 2, 3, 1)
    else:
        y = torch.nn.functional.layer_norm(xt, (c,), st, bt, 1e-5)
    y.backward(torch.from_numpy(np.asarray(dyb, np.float64)))
    want = xt.grad.numpy()
    step = np.abs(want) * 2.0**-7 + 1e-3 * np.abs(want).max()
    assert np.all(np.abs(np.asarray(dx, np.float64) - want) <= step)
    assert rel_err(dp["params"]["scale"], st.grad.numpy()) <= 1e-5
    assert rel_err(dp["params"]["bias"], bt.grad.numpy()) <= 1e-5
