"""The Flax networks against torch diffusers/transformers on tiny random models saved as safetensors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from nti_jax.loading import convert
from nti_jax import testing
from nti_jax.testing import rel_err
from nti_jax.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig


def _init_shapes(module, *args):
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]


def load_params(torch_module, tmp_path, base, module, *init_args):
    torch_module.save_pretrained(tmp_path)
    state = convert.load_state(str(tmp_path), base)
    return convert.from_torch_layout(state, _init_shapes(module, *init_args))


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_unet_matches_diffusers(kind, dtype, tol, tmp_path):
    cfg = testing.UNET_SD1 if kind == "sd1" else testing.UNET_SD2
    ref = testing.tiny_unet(cfg, seed=1)
    module = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config)), getattr(jnp, dtype))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([981, 17])
    ctx = rng.standard_normal((2, 77, cfg["cross_attention_dim"])).astype(np.float32)
    params = load_params(ref, tmp_path, "diffusion_pytorch_model", module, x, t, ctx)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    ours = jax.jit(module.apply)({"params": params}, x, t, ctx)
    assert ours.dtype == jnp.float32
    assert rel_err(ours, want.permute(0, 2, 3, 1).numpy()) <= tol


@pytest.mark.slow
def test_sdxl_shaped_unet_with_text_time_conditioning_matches_diffusers(tmp_path):
    """SDXL's UNet is a config of the same model: no attention at the top level, per-block
    transformer depth, and the pooled text + time ids added to the time embedding."""
    cfg = testing.UNET_XL
    ref = testing.tiny_unet(cfg, seed=4)
    module = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config)))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    t = np.array([961, 41])
    ctx = rng.standard_normal((2, 77, 64)).astype(np.float32)
    pooled = rng.standard_normal((2, 32)).astype(np.float32)
    ids = np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1024, 16, 0, 1024, 1024]], np.float32)
    params = load_params(ref, tmp_path, "diffusion_pytorch_model", module, x, t, ctx, None, (pooled, ids))
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), torch.from_numpy(ctx),
                   added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(ids)}).sample
    ours = jax.jit(module.apply)({"params": params}, x, t, ctx, None, (pooled, ids))
    assert rel_err(ours, want.permute(0, 2, 3, 1).numpy()) <= 1e-4
    other = jax.jit(module.apply)({"params": params}, x, t, ctx, None, (pooled, ids[::-1]))
    assert rel_err(other, ours) > 1e-3  # the time ids reach the output
    with pytest.raises(ValueError, match="added conditioning"):
        module.apply({"params": params}, x, t, ctx)


def test_unet_hook_path_equals_fused_path_and_sees_every_layer(tmp_path):
    ref = testing.tiny_unet(testing.UNET_SD1, seed=2)
    module = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config)))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 16, 16, 4)).astype(np.float32)
    ctx = rng.standard_normal((1, 77, 32)).astype(np.float32)
    params = load_params(ref, tmp_path, "diffusion_pytorch_model", module, x, 5, ctx)
    seen = []

    def hook(probs, place):
        seen.append((place, probs.shape))
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        return probs

    fused = module.apply({"params": params}, x, 5, ctx)
    hooked = module.apply({"params": params}, x, 5, ctx, hook)
    np.testing.assert_allclose(hooked, fused, rtol=0, atol=1e-5 * float(jnp.abs(fused).max()))
    # 2 down blocks x 2 layers + mid + 2 up blocks x 3 layers = 11 transformers, self + cross each
    assert len(seen) == 22
    blocks = sorted({(p.block, p.kind, p.size) for p, _ in seen})
    assert ("down", "cross", (16, 16)) in blocks and ("mid", "self", (4, 4)) in blocks
    assert ("up", "cross", (8, 8)) in blocks
    for place, shape in seen:
        lk = 77 if place.kind == "cross" else place.size[0] * place.size[1]
        assert shape == (1, 8, place.size[0] * place.size[1], lk)
    assert len({p.name for p, _ in seen}) == 22


def test_vae_encode_decode_match_diffusers(tmp_path):
    # The pipeline runs the VAE in float32 whatever its dtype (diffusers' force_upcast).
    tol = 1e-4
    ref = testing.tiny_vae(seed=3)
    module = AutoencoderKL(VAEConfig.from_diffusers(dict(ref.config)))
    rng = np.random.default_rng(2)
    img = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    params = load_params(ref, tmp_path, "diffusion_pytorch_model", module, img)
    with torch.no_grad():
        dist = ref.encode(torch.from_numpy(img).permute(0, 3, 1, 2)).latent_dist
        z = dist.mean
        dec = ref.decode(z).sample
    mean, logvar = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode))(params, img)
    assert rel_err(mean, z.permute(0, 2, 3, 1).numpy()) <= tol
    assert rel_err(logvar, dist.logvar.permute(0, 2, 3, 1).numpy()) <= tol
    zn = z.permute(0, 2, 3, 1).numpy()
    out = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(params, zn)
    assert rel_err(out, dec.permute(0, 2, 3, 1).numpy()) <= tol


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_text_encoder_matches_transformers(act, dtype, tol, tmp_path):
    ref = testing.tiny_text_encoder(dict(testing.TEXT_TINY, hidden_act=act), seed=4)
    module = CLIPTextModel(CLIPTextConfig.from_transformers(ref.config.to_dict()), getattr(jnp, dtype))
    ids = np.random.default_rng(3).integers(0, 49408, (2, 77)).astype(np.int32)
    params = load_params(ref, tmp_path, "model", module, ids)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert rel_err(jax.jit(module.apply)({"params": params}, ids), want) <= tol


@pytest.mark.parametrize("eos", [2, 49407])  # transformers' legacy pooling rule, and the explicit id
def test_sdxl_text_outputs_match_transformers(eos, tmp_path):
    """SDXL's reading of its two encoders: penultimate hidden states, and the end-of-text token
    through text_projection (CLIPTextModelWithProjection)."""
    from transformers import CLIPTextConfig as TorchConfig, CLIPTextModelWithProjection

    torch.manual_seed(6)
    ref = CLIPTextModelWithProjection(TorchConfig(**dict(testing.TEXT_TINY, eos_token_id=eos, projection_dim=24))).eval()
    testing.perturb_(ref, 6)
    module = CLIPTextModel(CLIPTextConfig.from_transformers(ref.config.to_dict()), outputs="sdxl")
    ids = np.full((2, 77), 49407, np.int32)
    ids[:, 0], ids[0, 1:6], ids[1, 1:3] = 49406, [320, 1929, 530, 518, 2866], [320, 1615]  # bos, words, eos + padding
    params = load_params(ref, tmp_path, "model", module, ids)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    penultimate, pooled = jax.jit(module.apply)({"params": params}, ids)
    assert rel_err(penultimate, want.hidden_states[-2].numpy()) <= 1e-5
    assert rel_err(pooled, want.text_embeds.numpy()) <= 1e-5


def test_conversion_round_trips_exactly(tmp_path):
    ref = testing.tiny_unet(testing.UNET_SD2, seed=5)
    ref.save_pretrained(tmp_path)
    state = convert.load_state(str(tmp_path), "diffusion_pytorch_model")
    module = UNet2DConditionModel(UNetConfig.from_diffusers(dict(ref.config)))
    shapes = _init_shapes(module, jnp.zeros((1, 16, 16, 4)), jnp.zeros((1,)), jnp.zeros((1, 77, 48)))
    back = convert.to_torch_layout(convert.from_torch_layout(state, shapes))
    assert set(back) == set(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


@pytest.mark.parametrize("k", [1, 3])
def test_conv_same_gradients_equal_autodiff_of_the_plain_conv(k):
    """The custom input gradient (explicit flipped-kernel conv) against autodiff of lax's conv."""
    from nti_jax.models.resnet import _lax_conv, conv_same

    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 5, 6)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, 9, 7, 6)), jnp.float32)
    pad = k // 2
    ours = jax.vjp(lambda x, w: conv_same(x, w, pad), x, w)[1](g)
    ref = jax.vjp(lambda x, w: _lax_conv(x, w, 1, ((pad, pad), (pad, pad))), x, w)[1](g)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
