"""The SDXL-shaped toy (issue 20) against diffusers: the folder loads in StableDiffusionXLPipeline,
and its UNet and prompt encoding agree with nti-jax's (`sampling.Denoiser`, `encode_prompt`).

    python benchmarks/sdxl_toy_parity.py /work/cache/sdxl-toy/model

Prints max |ours - torch| / max |torch| for the UNet output on one random input (latents,
timestep, token embeddings, pooled embedding; diffusers' own time ids) and for both parts of the
encoded prompt. Needs torch and diffusers (the test extras).
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main(folder: str) -> None:
    import jax.numpy as jnp
    import torch
    from diffusers import StableDiffusionXLPipeline

    import nti_jax
    from nti_jax.loading.conditioning import TextCond
    from nti_jax.core.sampling import Denoiser
    from nti_jax.testing import rel_err

    tp = StableDiffusionXLPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe = nti_jax.load_pipeline(folder)
    print(f"diffusers: {type(tp).__name__} with {type(tp.scheduler).__name__}, force_zeros_for_empty_prompt "
          f"{tp.config.force_zeros_for_empty_prompt}; nti-jax: is_sdxl {pipe.is_sdxl}")
    rng = np.random.default_rng(0)
    size = pipe.image_size
    h = size // pipe.latent_factor
    x = rng.standard_normal((1, h, h, 4)).astype(np.float32)
    t = 437
    tokens = rng.standard_normal((1, 77, pipe.unet.config.cross_attention_dim)).astype(np.float32)
    pooled = rng.standard_normal((1, pipe.unet.config.pooled_dim)).astype(np.float32)
    ids = tp._get_add_time_ids((size, size), (0, 0), (size, size), torch.float32,
                               text_encoder_projection_dim=tp.text_encoder_2.config.projection_dim)
    assert np.array_equal(ids[0].numpy(), np.asarray(pipe.time_ids)), (ids, pipe.time_ids)
    with torch.no_grad():
        ref = tp.unet(torch.from_numpy(x).permute(0, 3, 1, 2), t, encoder_hidden_states=torch.from_numpy(tokens),
                      added_cond_kwargs={"text_embeds": torch.from_numpy(pooled), "time_ids": ids}).sample
    ref = ref.permute(0, 2, 3, 1).numpy()
    ours = np.asarray(Denoiser.of(pipe)(jnp.asarray(x), jnp.asarray([t]), TextCond(jnp.asarray(tokens), jnp.asarray(pooled))))
    print(f"UNet output, one random input: rel err {rel_err(ours, ref):.2e} (max |torch| {np.abs(ref).max():.3f})")
    prompt = "a red circle on a blue background"
    with torch.no_grad():
        pe, npe, ppe, nppe = tp.encode_prompt(prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
    cond, null = pipe.encode_with_null([prompt])
    print(f"encode_prompt {prompt!r}: tokens rel err {rel_err(cond.tokens, pe.numpy()):.2e}, "
          f"pooled rel err {rel_err(cond.pooled, ppe.numpy()):.2e}; unconditional all zeros in both: "
          f"{bool(not np.any(npe.numpy()) and not np.any(nppe.numpy()) and not np.any(np.asarray(null.tokens)) and not np.any(np.asarray(null.pooled)))}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/work/cache/sdxl-toy/model")
