"""The SDXL half of the PyTorch reference (benchmarks/torch_reference.py, issue 20) and the tiny
SDXL folder it runs on (nti_jax.testing.make_tiny_sdxl).

Checked against diffusers' own StableDiffusionXLPipeline (encode_prompt, _get_add_time_ids, a CFG
DDIM sampling run) and DDIMScheduler.from_config, never against nti-jax code.
"""

import json
import os

import numpy as np
import pytest
import torch

from benchmarks import torch_reference as tr
from nti_jax import testing

PROMPT = "a photo of a cat on a red sofa"


@pytest.fixture(scope="module")
def folder(sdxl_folder):
    return sdxl_folder


@pytest.fixture(scope="module")
def comps(folder):
    return tr.load_sdxl_components(folder)


@pytest.fixture(scope="module")
def pipe(folder):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)


def _image(size=64, seed=0):
    """A smooth random 64x64 RGB image (uint8 HWC)."""
    g = np.random.default_rng(seed)
    small = g.uniform(0, 255, (8, 8, 3))
    return np.clip(np.kron(small, np.ones((size // 8, size // 8, 1))), 0, 255).astype(np.uint8)


def test_folder_layout(folder, comps):
    with open(os.path.join(folder, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert {k: sched[k] for k in testing.SDXL_SCHEDULER} == testing.SDXL_SCHEDULER
    assert comps["vae"].config.scaling_factor == 0.13025 and comps["vae"].config.force_upcast
    # tokenizer_2 pads with "!" (id 0), tokenizer with <|endoftext|> (49407), as in sdxl-base
    tok1, tok2 = comps["tokenizer"], comps["tokenizer_2"]
    assert (tok1.pad_token, tok1.pad_token_id) == ("<|endoftext|>", 49407)
    assert (tok2.pad_token, tok2.pad_token_id) == ("!", 0)
    ids1 = tok1(["a cat"], padding="max_length", max_length=77).input_ids[0]
    ids2 = tok2(["a cat"], padding="max_length", max_length=77).input_ids[0]
    assert ids1[:4] == ids2[:4] and ids1[3] == 49407
    assert set(ids1[4:]) == {49407} and set(ids2[4:]) == {0}
    for sub in ("tokenizer", "tokenizer_2"):
        assert sorted(os.listdir(os.path.join(folder, sub))) == ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def test_fp16_variant_files_load(folder, pipe):
    from diffusers import StableDiffusionXLPipeline

    names = {
        "unet": "diffusion_pytorch_model",
        "vae": "diffusion_pytorch_model",
        "text_encoder": "model",
        "text_encoder_2": "model",
    }
    for sub, name in names.items():
        assert os.path.isfile(os.path.join(folder, sub, f"{name}.safetensors"))
        assert os.path.isfile(os.path.join(folder, sub, f"{name}.fp16.safetensors"))
    half = StableDiffusionXLPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float16)
    for sub in names:
        full = dict(getattr(pipe, sub).state_dict())
        for k, v in getattr(half, sub).state_dict().items():
            assert v.dtype == torch.float16, (sub, k)
            assert torch.equal(v, full[k].to(torch.float16)), (sub, k)


def _check_encode(pipe, comps, negative_prompt=None):
    ours = tr.encode_prompt_sdxl(comps, PROMPT, negative_prompt)
    pe, npe, ppe, nppe = pipe.encode_prompt(
        PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True, negative_prompt=negative_prompt
    )
    for a, b in zip(ours, (pe, ppe, npe, nppe)):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert (a - b).abs().max().item() <= 1e-6
    return ours


def test_encode_prompt_matches_diffusers(pipe, comps):
    cond, pooled, uncond, upooled = _check_encode(pipe, comps)
    assert cond.shape == (1, 77, 64) and pooled.shape == (1, 32)
    assert not uncond.any() and not upooled.any()  # force_zeros_for_empty_prompt: zeros
    _, _, neg, negp = _check_encode(pipe, comps, negative_prompt="blurry, low quality")
    assert neg.abs().max() > 0 and negp.abs().max() > 0
    pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        _, _, empty, emptyp = _check_encode(pipe, dict(comps, force_zeros_for_empty_prompt=False))
        assert empty.abs().max() > 0 and emptyp.abs().max() > 0  # "" encoded
    finally:
        pipe.register_to_config(force_zeros_for_empty_prompt=True)


def test_time_ids_match_diffusers(pipe):
    ref = pipe._get_add_time_ids((64, 48), (0, 0), (64, 48), dtype=torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(tr.sdxl_time_ids(64, 48), ref)


@pytest.mark.parametrize("n", [4, 50])
def test_ddim_matches_ddim_from_config(pipe, comps, n):
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    assert ddim.config.set_alpha_to_one is False and ddim.config.clip_sample is False
    ddim.set_timesteps(n)
    ours = tr.DDIMSchedule(comps["ddim_config"], n)
    assert torch.equal(ours.timesteps, ddim.timesteps)
    assert torch.equal(ours.alphas_cumprod, ddim.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, ddim.final_alpha_cumprod)
    # a key the file lacks takes DDIM's default, as from_config gives it
    assert tr.sdxl_ddim_config({"clip_sample": False})["set_alpha_to_one"] is True
    with pytest.raises(NotImplementedError):
        tr.sdxl_ddim_config({k: v for k, v in testing.SDXL_SCHEDULER.items() if k != "clip_sample"})


def test_cfg_sampling_matches_sdxl_pipeline(pipe, comps):
    """The oracle's UNet call, added conditioning and CFG step == diffusers' SDXL pipeline run
    with a DDIM scheduler (zero unconditional embeddings, 4 steps, given x_T)."""
    from diffusers import DDIMScheduler

    n = 4
    euler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(euler.config)
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    try:
        ref = pipe(PROMPT, height=64, width=64, num_inference_steps=n, guidance_scale=7.5, latents=x_T.clone(), output_type="latent").images
    finally:
        pipe.scheduler = euler
    cond, pooled, uncond, upooled = tr.encode_prompt_sdxl(comps, PROMPT)
    ours = tr.cfg_sample_sdxl(
        comps["unet"], tr.DDIMSchedule(comps["ddim_config"], n), x_T, cond, pooled, uncond, upooled, tr.sdxl_time_ids(64, 64)
    )
    assert testing.rel_err(ours, ref) < 1e-5


def test_invert_image_sdxl_beats_plain_cfg(comps):
    """Null-text inversion reconstructs z0 better than plain w = 7.5 DDIM from the same x_T with
    the fixed (zero) unconditional embedding: the negative control. (The random tiny UNet makes
    even the w = 1 DDIM round trip coarse at 4 steps, hence 10 inner steps and a loose margin.)"""
    n, inner = 4, 10
    img = _image()
    out = tr.invert_image_sdxl(comps, img, PROMPT, num_steps=n, num_inner_steps=inner)
    assert out["z0"].shape == (1, 4, 16, 16) and len(out["pivots"]) == n + 1
    assert len(out["null_embeddings"]) == n and out["null_embeddings"][0].shape == (1, 77, 64)
    assert all(1 <= k <= inner for k in out["inner_iterations"])
    h0 = out["loss_history"][0]
    assert h0[-1] < 0.8 * h0[0], h0  # the same z_bar throughout step 0: the optimisation works
    assert torch.equal(out["time_ids"], tr.sdxl_time_ids(64, 64))
    # not optimised: the pooled null stays the (zero) unconditional pooled embedding
    assert all(torch.equal(p, out["uncond_pooled"]) for p in out["null_pooled"])
    assert out["null_embeddings"][0].abs().max() > 0  # moved away from the zero init
    rec = out["reconstruction_latent"]
    assert torch.allclose(rec, out["latents"][-1], atol=1e-6)  # replay == trajectory
    sched = tr.DDIMSchedule(comps["ddim_config"], n)
    plain = tr.cfg_sample_sdxl(
        comps["unet"], sched, out["x_T"], out["cond_tokens"], out["cond_pooled"], out["uncond_tokens"], out["uncond_pooled"], out["time_ids"]
    )
    err_nti = (rec - out["z0"]).pow(2).mean().item()
    err_plain = (plain - out["z0"]).pow(2).mean().item()
    assert err_nti < 0.8 * err_plain, (err_nti, err_plain)


def test_invert_image_sdxl_optimize_pooled(comps):
    out = tr.invert_image_sdxl(comps, _image(seed=1), PROMPT, num_steps=2, num_inner_steps=2, optimize_pooled=True, reconstruct=False)
    assert "reconstruction_latent" not in out
    assert out["null_pooled"][0].shape == (1, 32) and out["null_pooled"][0].abs().max() > 0
