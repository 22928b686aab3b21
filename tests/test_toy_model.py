"""The shipped toy model (nti_jax/toy/model): a standard diffusers folder that torch diffusers loads
and samples alike, and a trained model on which null-text inversion and editing behave as the
paper says, in float32 and in bf16. Figures for many images are in benchmarks/quality.py; here
five held-out images, inverted once in float32 for every test that needs them."""

import numpy as np
import pytest
import torch

import nti_jax
from benchmarks.quality import swaps
from nti_jax.core.controllers import controller_from_settings
from nti_jax.io import psnr, to_uint8
from nti_jax.toy import shapes
from nti_jax.toy.train import EVAL_SEED0

pytestmark = pytest.mark.slow  # every test here compiles or runs a model (minutes in all)

MODEL = "nti_jax/toy/model"


@pytest.fixture(scope="module")
def pipe():
    return nti_jax.load_pipeline(MODEL)


@pytest.fixture(scope="module")
def scene():
    return shapes.render(EVAL_SEED0 + 3, 64)


@pytest.fixture(scope="module")
def held_out(pipe):
    """The five held-out colour swaps (EVAL_SEED0 .. +4) and their float32 null-text inversion (the
    library's defaults), one call: the bf16 test's reference; scenes 3 and 4 are the other tests'."""
    scenes = swaps(range(EVAL_SEED0, EVAL_SEED0 + 5))
    return scenes, nti_jax.invert(pipe, [s["image"] for s in scenes], [s["source"] for s in scenes])


def test_diffusers_loads_and_samples_the_shipped_folder_like_nti_jax(pipe):
    from diffusers import StableDiffusionPipeline

    tp = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    tp.set_progress_bar_config(disable=True)
    prompts = ["a red circle on a blue background", "a yellow square on a black background"]
    x_T = np.random.default_rng(0).standard_normal((2, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        ref = tp(prompts, num_inference_steps=10, guidance_scale=7.5, output_type="np",
                 latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())).images
    ours = nti_jax.generate(pipe, prompts, num_steps=10, guidance_scale=7.5, x_T=x_T)
    assert ref.shape == ours.shape == (2, 64, 64, 3)
    # measured 4.4e-5: f32 per-call differences (~1e-6) amplified by 10 CFG steps at w = 7.5
    assert np.abs(ours - ref).max() < 5e-4, np.abs(ours - ref).max()


def test_null_text_reaches_the_vae_bound_and_ddim_does_not(pipe, scene, held_out):
    bound = psnr(to_uint8(pipe.decode_latents(pipe.encode_image(scene.image[None]))[0]), scene.image)
    np.testing.assert_array_equal(held_out[0][3]["image"], scene.image)
    got = {}
    for method, inv in (("null-text", held_out[1][3]), ("ddim", nti_jax.invert(pipe, scene.image, scene.caption, method="ddim"))):
        got[method] = psnr(to_uint8(nti_jax.reconstruct(pipe, inv)[0][0]), scene.image)
    assert got["null-text"] > bound - 1.0, (got, bound)
    assert got["ddim"] < got["null-text"] - 6.0, got


def test_identity_edits_within_1e5_on_the_trained_model(pipe, scene):
    inv = nti_jax.invert(pipe, scene.image, scene.caption, num_steps=20)
    recon = np.asarray(nti_jax.reconstruct(pipe, inv)[0][0])
    same = nti_jax.edit(pipe, inv, [scene.caption], controller=nti_jax.Replace())
    rw = nti_jax.edit(pipe, inv, [scene.caption], controller=nti_jax.Reweight(equalizer={scene.color: 1.0}))
    others = [c for c in shapes.COLOR_NAMES if c not in (scene.color, scene.background)][:2]
    three = nti_jax.edit(pipe, inv, [shapes.caption(c, scene.shape, scene.background) for c in others])
    for got in (same[0], same[1], rw[1], three[0]):
        assert np.abs(got - recon).max() <= 1e-5
    assert np.abs(three[1] - recon).max() > 0.1  # the colour swaps did change the image


def test_colour_swap_with_direct_inversion_and_local_blend_keeps_the_background(pipe, held_out):
    """Issue 4's colour swap on a held-out scene, with the LocalBlend threshold that
    benchmarks/quality.py calibrates on training scenes; null-text's optimised unconditional
    embedding pushes the same edit past the target and repaints the background."""
    s = shapes.render(EVAL_SEED0 + 4, 64)
    target = "orange"
    truth = shapes.render(EVAL_SEED0 + 4, 64, color=target).image
    tgt = shapes.caption(target, s.shape, s.background)
    blend = nti_jax.Replace(blend=nti_jax.LocalBlend([[s.color], [target]], threshold=0.5))
    background = shapes.interior(1.0 - s.mask)
    bg_psnr = lambda img: psnr(img[background], s.image[background])
    np.testing.assert_array_equal(held_out[0][4]["image"], s.image)
    got = {}
    for method, inv in (("direct", nti_jax.invert(pipe, s.image, s.caption, method="direct")), ("null-text", held_out[1][4])):
        got[method] = to_uint8(nti_jax.edit(pipe, inv, [tgt], controller=blend)[1])
    # measured: direct 36.8 dB background, 31.8 dB against the true edit; null-text 17.4 / 17.2 dB
    assert shapes.dominant_colors(got["direct"], s.mask)[0] == target
    assert bg_psnr(got["direct"]) > 30.0, bg_psnr(got["direct"])
    assert psnr(got["direct"], truth) > psnr(got["null-text"], truth) + 3.0
    assert bg_psnr(got["null-text"]) < bg_psnr(got["direct"]) - 5.0


def test_bf16_null_text_reconstructs_within_0p3_db_of_float32(pipe, held_out):
    """Issue 31's bf16 quality target, on five held-out toy images in one call: mean PSNR within
    0.3 dB of float32, and no image more than 1 dB below (a collapse, as the one-call sampler's
    14.7 dB image was: the sampler must replay the optimisation's own UNet calls). The mean
    decides because one image's gap moves with any rounding (float32 itself moves by 0.06 dB on
    image 4 between CPU instruction sets): image 4 lost 0.51 dB in bf16 on an AMD EPYC, and
    0.29-0.56 dB under XLA_FLAGS=--xla_cpu_max_isa=SSE4_2 whichever operations ran in float32
    (RESULTS, "bf16 against float32"), where the mean of the five stays below 0.11 dB.
    A colour swap of each (the CLI's single-branch guidance) keeps its source row on the
    reconstruction: the edit program's one call on source and target rows would move a sampled
    bf16 row by the batch effect (27.3 dB from the reconstruction on image 1), so the row
    follows the optimisation's own latents."""
    scenes, f32 = held_out
    images, captions = [s["image"] for s in scenes], [s["source"] for s in scenes]
    bf16 = nti_jax.load_pipeline(MODEL, dtype="bfloat16")
    scores = {}
    for dtype, p, inv in (("float32", pipe, f32), ("bfloat16", bf16, nti_jax.invert(bf16, images, captions))):
        assert np.asarray(inv.inner_iterations).sum(axis=1).max() < 50 * 10  # the early stop works
        rec = to_uint8(nti_jax.reconstruct(p, inv)[0])
        scores[dtype] = np.array([psnr(r, im) for r, im in zip(rec, images)])
    gap = scores["float32"] - scores["bfloat16"]
    assert gap.mean() <= 0.3 and gap.max() <= 1.0, scores
    for i, sc in enumerate(scenes):  # bf16's inversion and reconstruction, as left by the loop
        swap = controller_from_settings(sc["source"], [sc["target"]], {"guidance": "single-branch"})
        source_row = to_uint8(nti_jax.edit(bf16, inv[i], [sc["target"]], controller=swap))[0]
        assert np.abs(source_row.astype(int) - rec[i]).max() <= 1, (i, psnr(source_row, rec[i]))
