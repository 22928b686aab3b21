"""Issue 28, items 1 and 2: kernels chosen for the target platform (not the host's), and Pallas'
TPU flash attention against XLA's attention (values and gradients, in Pallas' interpret mode on
this CPU). The TPU compile runs in its own process (libtpu's compile-only client)."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from nti_jax.models import attention, backend, flash
from nti_jax.testing import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _xla(q, k, v, scale):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")


@pytest.mark.parametrize(
    "lq, lk, heads, d, dtype, tol",
    [
        (256, 77, 2, 40, jnp.float32, 1e-5),  # SD 1.5's cross-attention: keys 77 -> 128 masked, d 40 as it is
        (128, 128, 1, 160, jnp.float32, 1e-5),  # its 1280-channel head size, 160 -> 256
        (256, 256, 2, 64, jnp.bfloat16, 2e-2),  # SDXL's head size in bf16
    ],
)
def test_flash_equals_xla_attention_values_and_gradients(lq, lk, heads, d, dtype, tol):
    _flash_equals_xla(lq, lk, heads, d, dtype, tol)


def _flash_equals_xla(lq, lk, heads, d, dtype, tol):
    """Flash (interpret mode) against XLA's attention: the loss and its gradients in q, k, v."""
    rng = np.random.default_rng(lq + lk + d)
    q = jnp.asarray(rng.standard_normal((2, lq, heads, d)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((2, lk, heads, d)), dtype) for _ in range(2))
    w = jnp.asarray(rng.standard_normal((2, lq, heads, d)), jnp.float32)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v, d**-0.5).astype(jnp.float32) * w)
    with pltpu.force_tpu_interpret_mode():
        got = jax.value_and_grad(loss(flash.flash_attention), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(loss(_xla), argnums=(0, 1, 2))(q, k, v)
    assert rel_err(got[0], want[0]) <= tol
    for a, b in zip(got[1], want[1]):
        assert a.dtype == dtype
        assert rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32)) <= tol


def test_flash_with_several_blocks_per_kernel_equals_xla(monkeypatch):
    """The tiles at full size hold a head's whole K and V; with the caps cut to 128 every kernel
    walks several blocks along both axes (forward, dK/dV and dQ), and still equals XLA's."""
    for cap in ("FWD_Q", "KV_MAJOR", "K_INNER", "DQ_Q", "DQ_K"):
        monkeypatch.setattr(flash, cap, 128)
    p = flash.padded((1, 384, 2, 40), (1, 256, 2, 40), 4)
    assert (p.block_q, p.block_k_major, p.block_k, p.block_q_dq, p.block_k_dq) == (128,) * 5
    _flash_equals_xla(384, 256, 2, 40, jnp.float32, 1e-5)


def test_flash_tiles_and_traffic_at_full_size():
    """SD 1.5's 4096-token self-attention (8 x 40, batch 8, bf16): the whole K and V per head in
    the forward and dK/dV tiles, so the forward reads q, K, V and writes o once each."""
    p = flash.padded((8, 4096, 8, 40), (8, 4096, 8, 40), 2)
    assert (p.d, p.block_q, p.block_k_major, p.block_k, p.block_q_dq, p.block_k_dq) == (128, 512, 4096, 512, 2048, 256)
    one = 8 * 8 * 4096 * 128 * 2  # one (B, heads, L, 128) bf16 array
    assert flash.traffic((8, 4096, 8, 40), (8, 4096, 8, 40), 2, backward=False)["bytes"] == 4 * one
    assert flash.block(9216, 4096) == 3072 and flash.block(1152, 512) == 384
    # Wider rows take smaller tiles: float32 halves the caps; the VAE's one head of 512 float32
    # channels (2048 bytes a row, 8 times the caps' rows) divides them by 8, down to 128.
    assert flash.padded((8, 4096, 8, 40), (8, 4096, 8, 40), 4)[3:] == (256, 2048, 256, 1024, 128)
    assert flash.padded((1, 4096, 1, 512), (1, 4096, 1, 512), 4)[3:] == (128, 512, 128, 256, 128)


def test_flash_pads_to_lanes_and_refuses_ragged_queries():
    p = flash.padded((1, 4096, 8, 160), (1, 77, 8, 160), 2)
    assert (p.lk, p.d, p.block_q, p.block_k) == (128, 256, 256, 128)  # 256 lanes of bf16: caps halved
    # The kernel takes heads of at most 128 as they are (their rows fill 128 lanes anyway); only
    # larger ones are padded with zero columns.
    for d, width in ((40, 40), (80, 80), (128, 128), (160, 256)):
        q = jax.ShapeDtypeStruct((1, 256, 2, d), jnp.bfloat16)
        text = str(jax.make_jaxpr(lambda q: flash.flash_attention(q, q, q, 0.1))(q))
        assert f"bf16[1,2,256,{width}] = pallas_call[" in text, d
    assert flash.unsupported((1, 256, 8, 40), (1, 77, 8, 40)) is None
    assert "not a multiple of 128" in flash.unsupported((1, 100, 8, 40), (1, 77, 8, 40))


def _kernels(platform, lq, lk=None):
    """The primitives the fused attention path traces to for `platform` at `lq` queries over `lk`
    keys (default: self-attention)."""
    q = jax.ShapeDtypeStruct((1, lq, 2, 40), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((1, lk or lq, 2, 40), jnp.bfloat16)
    with backend.on_platform(platform):
        jaxpr = jax.make_jaxpr(jax.grad(lambda q, k: jnp.sum(attention.fused_attention(q, k, k, 0.1).astype(jnp.float32))))(q, k)
    return str(jaxpr)


def test_fused_attention_takes_flash_on_tpu_for_long_self_attention_only(monkeypatch):
    monkeypatch.delenv("NTI_JAX_ATTENTION", raising=False)
    n = attention.FLASH_MIN_TOKENS
    assert "pallas_call" in _kernels("tpu", n)
    assert "pallas_call" not in _kernels("tpu", 256)
    assert "pallas_call" not in _kernels("tpu", n, 77)  # a cross-attention stays on XLA's
    assert "pallas_call" not in _kernels("cpu", n)
    monkeypatch.setenv("NTI_JAX_ATTENTION", "xla")  # the override still wins
    assert "pallas_call" not in _kernels("tpu", n)


def test_target_platform_precedence_and_jit_cache(monkeypatch):
    monkeypatch.delenv("NTI_JAX_CONV_GRAD", raising=False)
    assert backend.target_platform() == jax.default_backend() == "cpu"
    assert backend.platform_of(jax.devices()) == backend.platform_of(jax.sharding.Mesh(jax.devices(), ("b",))) == "cpu"
    seen = []

    @jax.jit
    def f(x):
        seen.append(backend.target_platform())
        return x + 1

    x = jnp.zeros(3)
    f(x)
    with backend.on_platform("tpu"):
        f.lower(x)  # a trace for the TPU, not the CPU's reused
        with backend.on_platform("gpu"):
            assert backend.target_platform() == "gpu"
    f(x)  # and the CPU's trace is still the CPU's
    assert seen == ["cpu", "tpu"]
    with pytest.raises(ValueError, match="platform must be one of"):
        backend.on_platform("cuda")


_LOWER_TWICE = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from nti_jax.models import attention, resnet

    def loss(params, q, k, x):  # one attention layer and one conv, differentiated
        a = attention.fused_attention(q, k, k, 0.1).astype(jnp.float32)
        c = resnet.Conv2d(4, 3, dtype=jnp.bfloat16).apply(params, x).astype(jnp.float32)
        return jnp.sum(a) + jnp.sum(c * c)

    program = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))  # one program, lowered twice
    x = jnp.zeros((1, 8, 8, 4), jnp.bfloat16)
    params = resnet.Conv2d(4, 3, dtype=jnp.bfloat16).init(jax.random.PRNGKey(0), x)
    out = {}
    tpu = topologies.get_topology_desc("v5e:2x2", "tpu").devices[:1]
    for name, devices in (("cpu", jax.devices()[:1]), ("tpu", tpu)):
        mesh = Mesh(np.array(devices), ("batch",))
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, P()))
        qk = jnp.zeros((1, 1024, 2, 40), jnp.bfloat16)
        args = jax.tree_util.tree_map(spec, (params, qk, qk, x))
        with jax.set_mesh(mesh):
            hlo = program.lower(*args).compile().as_text()
        out[name] = {"pallas": "tpu_custom_call" in hlo, "conditional": " conditional(" in hlo}
    print(json.dumps(out))
""")


def test_one_program_lowered_for_cpu_then_tpu_gets_each_platforms_kernels():
    """The same jitted function, compiled for this CPU and then for a v5e chip from this CPU host:
    CPU's kernels (chunked attention, the flipped conv gradient in a conditional) in the first,
    the TPU's (Pallas flash attention, lax.conv's own gradient) in the second."""
    env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=ROOT)
    for var in ("NTI_JAX_ATTENTION", "NTI_JAX_CONV_GRAD", "JAX_PLATFORMS"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-c", _LOWER_TWICE], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"cpu": {"pallas": False, "conditional": True}, "tpu": {"pallas": True, "conditional": False}}
