"""Tests for the PyTorch reference (benchmarks/torch_reference.py), the oracle of the JAX code.

Everything is checked against diffusers' own schedulers or against closed forms, never against
the reference's own earlier output. Tiny random UNet, 8x8 latents, <= 10 DDIM steps.
"""

import copy
import math

import numpy as np
import pytest
import torch

from diffusers import DDIMInverseScheduler, DDIMScheduler, UNet2DConditionModel

from benchmarks import torch_reference as tr

SD_CFG = dict(tr.SD_DDIM_CONFIG)
V_CFG = dict(SD_CFG, prediction_type="v_prediction")
D = 32  # cross-attention dim of the tiny UNet
N_STEPS = 10


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=D,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return _tiny_unet()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 77, D, generator=g)
    uncond = torch.randn(1, 77, D, generator=g)
    return z0, cond, uncond


@pytest.fixture(scope="module")
def sched():
    return tr.DDIMSchedule(SD_CFG, N_STEPS)


@pytest.fixture(scope="module")
def pivots(unet, data, sched):
    z0, cond, _ = data
    return tr.ddim_pivots(unet, sched, z0, cond)


N_SHORT = 4  # DDIM steps for the null-text tests (each inner iteration is a UNet forward + backward)


@pytest.fixture(scope="module")
def short(unet, data):
    s = tr.DDIMSchedule(SD_CFG, N_SHORT)
    return s, tr.ddim_pivots(unet, s, data[0], data[1])


def _diffusers_sched(cfg, n, cls=DDIMScheduler):
    s = cls(**{k: v for k, v in cfg.items()})
    s.set_timesteps(n)
    return s


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize(
    "cfg,n",
    [
        (SD_CFG, 50),
        (SD_CFG, 10),
        (dict(SD_CFG, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, set_alpha_to_one=True), 25),
        (dict(SD_CFG, timestep_spacing="trailing"), 50),
        (dict(SD_CFG, timestep_spacing="linspace"), 20),
    ],
)
def test_schedule_matches_diffusers(cfg, n):
    ours = tr.DDIMSchedule(cfg, n)
    ref = _diffusers_sched(cfg, n)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert float(ours.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


def test_sd_timesteps_are_981_to_1():
    s = tr.DDIMSchedule(SD_CFG, 50)
    assert s.timesteps.tolist() == list(range(981, 0, -20))
    assert s.stride == 20
    assert float(s.final_alpha_cumprod) == float(s.alphas_cumprod[0])  # set_alpha_to_one False


@pytest.mark.parametrize("cfg", [SD_CFG, V_CFG], ids=["epsilon", "v_prediction"])
def test_prev_step_matches_diffusers_ddim(cfg):
    n = 10
    ours = tr.DDIMSchedule(cfg, n)
    ref = _diffusers_sched(cfg, n)
    g = torch.Generator().manual_seed(2)
    for t in ref.timesteps.tolist():  # includes t = 1 -> prev = -99 -> final alpha
        x = torch.randn(1, 4, 8, 8, generator=g)
        out = torch.randn(1, 4, 8, 8, generator=g)
        want = ref.step(out, t, x, eta=0.0).prev_sample
        got = ours.prev_step(out, t, x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [SD_CFG, V_CFG], ids=["epsilon", "v_prediction"])
def test_next_step_matches_diffusers_inverse(cfg):
    n = 10
    ours = tr.DDIMSchedule(cfg, n)
    ref = _diffusers_sched(cfg, n, DDIMInverseScheduler)
    assert ref.timesteps.tolist() == ours.timesteps.flip(0).tolist()
    g = torch.Generator().manual_seed(3)
    for t in ref.timesteps.tolist():  # includes t = 1 (alpha(-99) = final alpha)
        x = torch.randn(1, 4, 8, 8, generator=g)
        out = torch.randn(1, 4, 8, 8, generator=g)
        want = ref.step(out, t, x).prev_sample
        got = ours.next_step(out, t, x)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_next_step_closed_form_alphas():
    """a_t = alpha(min(t - s, 999)), a_next = alpha(t); at t = 1, alpha(-19) = alphas_cumprod[0]."""
    s = tr.DDIMSchedule(SD_CFG, 50)
    ac = s.alphas_cumprod.double()
    x = torch.full((1, 4, 2, 2), 0.3, dtype=torch.float64)
    e = torch.full((1, 4, 2, 2), -0.7, dtype=torch.float64)
    for t, a_t in [(1, ac[0]), (981, ac[961]), (501, ac[481])]:
        a_n = ac[t]
        want = a_n.sqrt() * (x - (1 - a_t).sqrt() * e) / a_t.sqrt() + (1 - a_n).sqrt() * e
        got = s.next_step(e.float(), t, x.float())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_next_step_is_inverse_of_prev_step_for_fixed_eps():
    s = tr.DDIMSchedule(SD_CFG, 50)
    g = torch.Generator().manual_seed(4)
    for t in s.timesteps.tolist():
        x = torch.randn(1, 4, 8, 8, generator=g)
        eps = torch.randn(1, 4, 8, 8, generator=g)
        up = s.next_step(eps, t, x)  # t - s -> t
        back = s.prev_step(eps, t, up)  # t -> t - s
        torch.testing.assert_close(back, x, rtol=0, atol=5e-5)


# ---------------------------------------------------------------- pivots and sampling vs diffusers loops


def test_ddim_pivots_match_diffusers_inverse_loop(unet, data, sched, pivots):
    z0, cond, _ = data
    inv = _diffusers_sched(SD_CFG, N_STEPS, DDIMInverseScheduler)
    z = z0.clone()
    want = [z]
    with torch.no_grad():
        for t in inv.timesteps:
            eps = unet(z, t, encoder_hidden_states=cond).sample
            z = inv.step(eps, t, z).prev_sample
            want.append(z)
    assert len(pivots) == N_STEPS + 1
    assert torch.equal(pivots[0], z0)
    for a, b in zip(pivots, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cfg_sample_matches_diffusers_loop(unet, data, sched, pivots):
    _, cond, uncond = data
    g = torch.Generator().manual_seed(5)
    phis = [uncond + 0.1 * torch.randn(uncond.shape, generator=g) for _ in range(N_STEPS)]
    ref = _diffusers_sched(SD_CFG, N_STEPS)
    z = pivots[-1].clone()
    with torch.no_grad():
        for i, t in enumerate(ref.timesteps):
            out = unet(torch.cat([z] * 2), t, encoder_hidden_states=torch.cat([phis[i], cond])).sample
            e_u, e_c = out.chunk(2)
            z = ref.step(e_u + 7.5 * (e_c - e_u), t, z).prev_sample
    got = tr.cfg_sample(unet, sched, pivots[-1], cond, phis, guidance_scale=7.5)
    torch.testing.assert_close(got, z, rtol=1e-5, atol=1e-5)
    # a stacked (T, 1, 77, D) tensor is the same as the list
    torch.testing.assert_close(tr.cfg_sample(unet, sched, pivots[-1], cond, torch.stack(phis)), got, rtol=0, atol=0)


def test_inversion_exact_when_eps_independent_of_latent(data):
    """Closed form: if eps_theta does not depend on z, DDIM inversion + w=1 sampling is exact."""
    z0, cond, _ = data
    u = _tiny_unet(seed=7)
    with torch.no_grad():
        u.conv_in.weight.zero_()  # output now depends on (t, C) only
    s = tr.DDIMSchedule(SD_CFG, N_STEPS)
    piv = tr.ddim_pivots(u, s, z0, cond)
    assert (piv[-1] - z0).abs().max() > 0.5  # it really went somewhere
    rec = tr.cfg_sample(u, s, piv[-1], cond, cond, guidance_scale=1.0)
    torch.testing.assert_close(rec, z0, rtol=0, atol=1e-4)
    # with uncond == cond the guidance scale is irrelevant (eps_u == eps_c): negative-prompt inversion
    npi = tr.negative_prompt_inversion(u, s, z0, cond, guidance_scale=7.5)
    torch.testing.assert_close(npi["reconstruction"], z0, rtol=0, atol=1e-4)
    assert len(npi["null_embeddings"]) == N_STEPS and torch.equal(npi["x_T"], piv[-1])


def test_inversion_error_shrinks_with_more_steps(unet, data):
    """For a real (z-dependent) model DDIM inversion is only approximate; it converges with steps."""
    z0, cond, _ = data
    errs = []
    for n in (5, 40):
        s = tr.DDIMSchedule(SD_CFG, n)
        piv = tr.ddim_pivots(unet, s, z0, cond)
        errs.append((tr.cfg_sample(unet, s, piv[-1], cond, cond, guidance_scale=1.0) - z0).abs().max().item())
    assert errs[1] < 0.75 * errs[0], errs


# ---------------------------------------------------------------- null-text optimisation


def _nti(unet, sched, pivots, data, **kw):
    _, cond, uncond = data
    return tr.null_text_optimization(unet, sched, pivots, cond, uncond, **kw)


@pytest.mark.parametrize("i", [1, 3])  # i = 3 is t = 1: tiny gradients, Adam's eps = 1e-8 matters
def test_inner_step_is_one_fresh_adam_step(unet, data, short, i):
    """Closed form of the first step of a fresh Adam (beta1 .9, beta2 .999, eps 1e-8):
    phi' = phi - lr * g / (|g| + 1e-8), lr = 1e-2 (1 - i/100); g and the pre-step loss are
    recomputed here from diffusers' DDIMScheduler.step."""
    sched, pivots = short
    _, cond, uncond = data
    lr = 1e-2 * (1 - i / 100)
    t = int(sched.timesteps[i])
    z_bar, target = pivots[-1 - i], pivots[-2 - i]
    new, loss = tr.null_text_inner_step(unet, sched, i, z_bar, target, cond, uncond)
    assert new.shape == (1, 77, D) and new.dtype == torch.float32 and not new.requires_grad

    ref = _diffusers_sched(SD_CFG, N_SHORT)
    with torch.no_grad():
        e_c = unet(z_bar, t, encoder_hidden_states=cond).sample

    def mse(phi):
        e_u = unet(z_bar, t, encoder_hidden_states=phi).sample
        prev = ref.step(e_u + 7.5 * (e_c - e_u), t, z_bar).prev_sample
        return torch.mean((prev - target) ** 2)

    phi = uncond.clone().requires_grad_(True)
    l0 = mse(phi)
    (g,) = torch.autograd.grad(l0, phi)
    assert math.isclose(loss, l0.item(), rel_tol=1e-5)
    want = uncond - lr * g / (g.abs() + 1e-8)
    torch.testing.assert_close(new, want, rtol=1e-5, atol=lr * 1e-4)
    assert (new - uncond).abs().max() <= lr * (1 + 1e-5)
    with torch.no_grad():
        assert mse(new).item() < loss  # the step went downhill

    new2, _ = tr.null_text_inner_step(unet, sched, i, z_bar, target, cond, uncond, lr=1e-3)
    torch.testing.assert_close(new2, uncond - 1e-3 * g / (g.abs() + 1e-8), rtol=1e-5, atol=1e-7)


def test_nti_huge_epsilon_stops_after_one_iteration(unet, data, short):
    sched, pivots = short
    _, cond, uncond = data
    r = _nti(unet, sched, pivots, data, num_inner_steps=10, early_stop_epsilon=1e9)
    assert r["inner_iterations"] == [1] * N_SHORT
    assert len(r["null_embeddings"]) == N_SHORT and all(p.shape == (1, 77, D) for p in r["null_embeddings"])
    # step 0 is exactly one fresh Adam step from the initial null embedding at z_bar = x_T
    phi0, loss0 = tr.null_text_inner_step(unet, sched, 0, pivots[-1], pivots[-2], cond, uncond)
    torch.testing.assert_close(r["null_embeddings"][0], phi0, rtol=0, atol=0)
    assert r["final_losses"][0] == loss0
    # the optimisation trajectory is exactly the CFG reconstruction with the returned embeddings
    rec = tr.cfg_sample(unet, sched, pivots[-1], cond, r["null_embeddings"])
    torch.testing.assert_close(r["latents"][-1], rec, rtol=0, atol=0)


def test_nti_negative_epsilon_uses_all_iterations_and_loss_decreases(unet, data, short):
    sched, pivots = short
    z0, cond, uncond = data
    n_inner = 6
    r = _nti(unet, sched, pivots, data, num_inner_steps=n_inner, early_stop_epsilon=-1.0)
    assert r["inner_iterations"] == [n_inner] * N_SHORT
    assert all(len(h) == n_inner for h in r["loss_history"])
    assert r["final_losses"] == [h[-1] for h in r["loss_history"]]
    h0 = r["loss_history"][0]
    assert h0[-1] < 0.8 * h0[0], h0  # the same z_bar throughout step 0: optimisation works
    # null-text beats the plain w=7.5 reconstruction with the fixed "" embedding
    err_nti = (r["latents"][-1] - z0).pow(2).mean().item()
    err_plain = (tr.cfg_sample(unet, sched, pivots[-1], cond, uncond) - z0).pow(2).mean().item()
    assert err_nti < 0.7 * err_plain, (err_nti, err_plain)


def test_nti_early_stop_tests_pre_step_loss_after_stepping(unet, data, short):
    sched, pivots = short
    """Break after the Adam step when the pre-step loss < eps + i*2e-5: with eps between the first
    two losses of step 0, step 0 takes exactly 2 Adam steps (== a run with num_inner_steps=2)."""
    full = _nti(unet, sched, pivots, data, num_inner_steps=3, early_stop_epsilon=-1.0)
    h0 = full["loss_history"][0]
    assert h0[0] > h0[1]
    eps = 0.5 * (h0[0] + h0[1])
    r = _nti(unet, sched, pivots, data, num_inner_steps=3, early_stop_epsilon=eps)
    two = _nti(unet, sched, pivots, data, num_inner_steps=2, early_stop_epsilon=-1.0)
    assert r["inner_iterations"][0] == 2
    assert r["loss_history"][0] == h0[:2] and r["final_losses"][0] == h0[1]
    torch.testing.assert_close(r["null_embeddings"][0], two["null_embeddings"][0], rtol=0, atol=0)


def test_nti_zero_inner_steps_is_plain_cfg(unet, data, short):
    sched, pivots = short
    _, cond, uncond = data
    r = _nti(unet, sched, pivots, data, num_inner_steps=0)
    assert r["inner_iterations"] == [0] * N_SHORT
    assert all(math.isnan(x) for x in r["final_losses"])
    assert all(torch.equal(p, uncond) for p in r["null_embeddings"])
    torch.testing.assert_close(r["latents"][-1], tr.cfg_sample(unet, sched, pivots[-1], cond, uncond), rtol=0, atol=0)


def test_numpy_inputs_and_bf16_unet(unet, data):
    """numpy in, float32 torch out; a bf16 UNet keeps phi / DDIM math in float32 and stays close."""
    z0, cond, uncond = data
    s = tr.DDIMSchedule(SD_CFG, 2)
    piv32 = tr.ddim_pivots(unet, s, z0.numpy(), cond.numpy())
    assert all(p.dtype == torch.float32 for p in piv32)
    torch.testing.assert_close(piv32[-1], tr.ddim_pivots(unet, s, z0, cond)[-1], rtol=0, atol=0)
    u16 = copy.deepcopy(unet).to(torch.bfloat16)
    piv16 = tr.ddim_pivots(u16, s, z0, cond)
    assert piv16[-1].dtype == torch.float32
    assert (piv16[-1] - piv32[-1]).abs().max() < 0.1 * piv32[-1].abs().max()
    r = tr.null_text_optimization(u16, s, piv16, cond.numpy(), uncond.numpy(), num_inner_steps=1, early_stop_epsilon=-1.0)
    assert all(p.dtype == torch.float32 for p in r["null_embeddings"])
    assert all(np.isfinite(r["final_losses"]))


# ---------------------------------------------------------------- notebook front end


class _ToyTokenizer:
    """Duck-typed stand-in for CLIPTokenizer (no vocab files needed): BOS, one id per char, EOS, pad."""

    model_max_length = 77

    def __call__(self, texts, padding=None, max_length=None, truncation=False, return_tensors=None):
        assert padding == "max_length" and return_tensors == "pt"
        rows = []
        for s in texts:
            ids = [98] + [1 + (ord(c) % 90) for c in s][: max_length - 2] + [99]
            rows.append(ids + [99] * (max_length - len(ids)))
        return {"input_ids": torch.tensor(rows, dtype=torch.long)}


def test_load_512_centre_crop():
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = tr.load_512(img, size=16)
    from PIL import Image

    want = np.array(Image.fromarray(img[:, 5:25]).resize((16, 16)))
    assert out.shape == (16, 16, 3) and np.array_equal(out, want)


def test_invert_image_pipeline(unet):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(11)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
    ).eval()
    te = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=100, hidden_size=D, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=98, eos_token_id=99, pad_token_id=99, projection_dim=D,
        )
    ).eval()
    tok = _ToyTokenizer()
    img = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = tr.invert_image(unet, vae, te, tok, img, "a cat", num_steps=3, num_inner_steps=2)

    x = torch.from_numpy(img).float().permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        z0 = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        cond = te(tok(["a cat"], padding="max_length", max_length=77, return_tensors="pt")["input_ids"])[0]
    torch.testing.assert_close(out["z0"], z0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["cond_emb"], cond, rtol=1e-5, atol=1e-6)
    assert out["z0"].shape == (1, 4, 8, 8)
    s = tr.DDIMSchedule(SD_CFG, 3)
    torch.testing.assert_close(out["x_T"], tr.ddim_pivots(unet, s, z0, cond)[-1], rtol=1e-5, atol=1e-5)
    assert len(out["null_embeddings"]) == 3 and out["null_embeddings"][0].shape == (1, 77, D)
    assert len(out["inner_iterations"]) == 3 and all(1 <= k <= 2 for k in out["inner_iterations"])
    assert set(out["timings"]) == {"encode", "pivots", "null_text", "total"}
    assert all(v >= 0 for v in out["timings"].values())
