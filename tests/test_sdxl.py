"""SDXL (issue 20) on a tiny random folder in sdxl-base's layout: loading, the conditioning,
null-text inversion against the PyTorch oracle (benchmarks/torch_reference.py, written from
diffusers' StableDiffusionXLPipeline and the authors' notebook), the file format and an edit."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nti_jax
from benchmarks import torch_reference as tr
from nti_jax.loading.conditioning import TextCond
from nti_jax.errors import ModelError
from nti_jax.core.sampling import Denoiser
from nti_jax.testing import rel_err as rel

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def xl(sdxl_folder):
    return nti_jax.load_pipeline(sdxl_folder)


@pytest.fixture(scope="module")
def ref(sdxl_folder):
    return tr.load_sdxl_components(sdxl_folder)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_conditioning_and_unet_match_diffusers(xl, ref):
    """Both encoders' penultimate states, the pooled projection, the zero unconditional pair
    (force_zeros_for_empty_prompt) and the UNet with SDXL's time ids, against the oracle."""
    assert xl.is_sdxl and xl.force_zeros_for_empty_prompt and xl.scaling_factor == 0.13025
    cond, null = xl.encode_with_null([PROMPT])
    c_tok, c_pool, u_tok, u_pool = tr.encode_prompt_sdxl(ref, PROMPT)
    assert cond.tokens.shape == (1, 77, 64) and cond.pooled.shape == (1, 32)
    assert rel(cond.tokens, c_tok.numpy()) <= 1e-5 and rel(cond.pooled, c_pool.numpy()) <= 1e-5
    assert not np.any(np.asarray(null.tokens)) and not np.any(np.asarray(null.pooled))
    assert not u_tok.abs().max() and not u_pool.abs().max()
    np.testing.assert_array_equal(np.asarray(xl.time_ids), tr.sdxl_time_ids(64, 64)[0].numpy())
    z = np.random.default_rng(2).standard_normal((1, 16, 16, 4)).astype(np.float32)
    ours = Denoiser.of(xl)(jnp.asarray(z), jnp.int32(501), cond)
    with torch.no_grad():
        theirs = tr.unet_eps_sdxl(ref["unet"], torch.from_numpy(z).permute(0, 3, 1, 2), 501, c_tok, c_pool, tr.sdxl_time_ids(64, 64))
    theirs = theirs.permute(0, 2, 3, 1).numpy()
    assert rel(ours, theirs) <= 1e-4
    # A negative control: the pooled embedding reaches the output.
    other = Denoiser.of(xl)(jnp.asarray(z), jnp.int32(501), TextCond(cond.tokens, cond.pooled * 0))
    assert rel(other, theirs) > 1e-2


def test_null_text_matches_torch_reference(xl, ref, image):
    """6 steps x 10 iterations, the pooled unconditional embedding optimised with the tokens, both
    starting from the "" prompt's encoding as the notebook's null-text does, not the model's zeros
    (docs/departures.md: the choices and their measurements). phi is compared relative to how far it moved."""
    inv = nti_jax.invert(xl, image, PROMPT, num_steps=6, early_stop_epsilon=-1.0)
    out = tr.invert_image_sdxl(ref, image, PROMPT, num_steps=6, early_stop_epsilon=-1.0, optimize_pooled=True, negative_prompt="")
    _, empty = xl.encode_with_null([PROMPT], zeros=False)
    assert rel(out["uncond_tokens"].numpy(), empty.tokens) <= 1e-5 and np.abs(np.asarray(empty.tokens)).max() > 0.1
    assert rel(inv.pivots[0, 0], out["z0"].permute(0, 2, 3, 1).numpy()[0]) <= 1e-4
    assert rel(inv.pivots[0], np.stack([p.permute(0, 2, 3, 1).numpy()[0] for p in out["pivots"]])) <= 1e-4
    np.testing.assert_allclose(np.asarray(inv.final_losses[0]), out["final_losses"], rtol=1e-3)
    tok_ref = np.stack([p[0].numpy() for p in out["null_embeddings"]])
    pool_ref = np.stack([p[0].numpy() for p in out["null_pooled"]])
    assert isinstance(inv.null_embeddings, TextCond)
    tok_moved = np.abs(tok_ref - out["uncond_tokens"].numpy()).max()
    assert np.abs(np.asarray(inv.null_embeddings.tokens[0]) - tok_ref).max() <= 0.1 * tok_moved
    moved = np.abs(pool_ref - out["uncond_pooled"].numpy()).max()
    assert moved > 0.01  # the pooled embedding was optimised
    assert np.abs(np.asarray(inv.null_embeddings.pooled[0]) - pool_ref).max() <= 0.1 * moved
    _, z = nti_jax.reconstruct(xl, inv)
    assert rel(z[0], out["reconstruction_latent"].permute(0, 2, 3, 1).numpy()[0]) <= 1e-3


def test_inversion_file_and_edit(xl, image, tmp_path):
    """An SDXL inversion round-trips through its file, and a P2P edit whose target is the source
    prompt gives the source row back (the edit touches only what differs)."""
    inv = nti_jax.invert(xl, image, PROMPT, method="ddim", num_steps=4)
    path = str(tmp_path / "inv.safetensors")
    inv.save(path)
    back = nti_jax.Inversion.load(path)
    assert isinstance(back.cond_embeddings, TextCond) and back.null_embeddings.pooled.shape == (1, 4, 32)
    np.testing.assert_array_equal(np.asarray(back.cond_embeddings.pooled), np.asarray(inv.cond_embeddings.pooled))
    out = nti_jax.edit(xl, back, [PROMPT])
    rec, _ = nti_jax.reconstruct(xl, back)
    assert out.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(out[1], out[0], atol=1e-5)
    np.testing.assert_allclose(out[0], np.asarray(rec[0]), atol=1e-4)
    maps = nti_jax.attention_maps(xl, back)
    assert maps.shape == (1, 8, 8, 77)


def test_fp16_only_folder_loads_its_weights(xl, sdxl_folder, tmp_path):
    folder = shutil.copytree(sdxl_folder, str(tmp_path / "fp16"))
    for sub in ("unet", "text_encoder_2"):
        full = [f for f in os.listdir(os.path.join(folder, sub)) if f.endswith(".safetensors") and ".fp16." not in f]
        for f in full:
            os.remove(os.path.join(folder, sub, f))
    half = nti_jax.load_pipeline(folder)
    a, b = half.params["text_encoder_2"], xl.params["text_encoder_2"]
    k = a["text_projection"]["kernel"]
    assert k.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(k), np.asarray(b["text_projection"]["kernel"]).astype(np.float16).astype(np.float32))


def test_refiner_and_incomplete_folders_are_one_line_errors(sdxl_folder, tmp_path):
    refiner = shutil.copytree(sdxl_folder, str(tmp_path / "refiner"))
    index = json.load(open(os.path.join(refiner, "model_index.json")))
    index.update(_class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True, text_encoder=[None, None])
    json.dump(index, open(os.path.join(refiner, "model_index.json"), "w"))
    with pytest.raises(ModelError, match="refiner"):
        nti_jax.load_pipeline(refiner)
    partial = shutil.copytree(sdxl_folder, str(tmp_path / "partial"))
    shutil.rmtree(os.path.join(partial, "tokenizer_2"))
    with pytest.raises(ModelError, match="without tokenizer_2/"):
        nti_jax.load_pipeline(partial)
