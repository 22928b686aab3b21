"""Tiny random Stable Diffusion folders built with torch diffusers/transformers (tests, benchmarks).

Needs the test extras (torch, diffusers, transformers); nothing at run time imports this module.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp

from .toy import config as toy_config

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "toy", "model", "tokenizer")

SD1_SCHEDULER = toy_config.SCHEDULER  # SD 1.x's DDIM settings (tests/test_schedule.py), shared with the toy model

UNET_SD1 = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=32,
    norm_num_groups=8,
)
# UNET_SD1 cut to two levels of one layer: the same code paths, half the compile time.
UNET_MINI = dict(
    UNET_SD1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 32),
    layers_per_block=1,
)
UNET_SD2 = dict(
    UNET_SD1,
    attention_head_dim=(2, 4, 8),
    use_linear_projection=True,
    upcast_attention=True,
    transformer_layers_per_block=(1, 2, 1),
    cross_attention_dim=48,
    freq_shift=1,
    flip_sin_to_cos=False,
    layers_per_block=1,
)
# SDXL's layout in miniature: no attention at the top level, two transformer layers in the
# next, linear projections, and the "text_time" added conditioning (pooled 32 + 6 ids x 8).
UNET_XL = dict(
    UNET_SD1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)
VAE_TINY = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    scaling_factor=0.5,
)
TEXT_TINY = dict(
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)


def perturb_(module, seed: int, std: float = 0.02) -> None:
    """Add noise to every parameter so no weight is a trivial init value (ones, zeros)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def tiny_unet(config: dict, seed: int = 0):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(**config).eval()
    perturb_(m, seed)
    return m


def tiny_vae(config: dict = VAE_TINY, seed: int = 0):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    m = AutoencoderKL(**config).eval()
    perturb_(m, seed)
    return m


def tiny_text_encoder(config: dict = TEXT_TINY, seed: int = 0):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    m = CLIPTextModel(CLIPTextConfig(**config)).eval()
    perturb_(m, seed)
    return m


def save_sd_folder(folder: str, unet, vae, text_encoder, scheduler: dict = SD1_SCHEDULER) -> str:
    """Write a diffusers-format SD folder (safetensors) with the shipped CLIP tokenizer."""
    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))
    shutil.copytree(TOKENIZER_DIR, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler, f, indent=2)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    return folder


def make_tiny_sd(folder: str, kind: str = "sd1", seed: int = 0, **unet: Any) -> str:
    """A complete tiny random SD folder: `sd1` (conv proj, eps) or `sd2` (linear proj, v-pred);
    `unet`: UNet config fields to override (e.g. sample_size)."""
    unet_cfg = dict(UNET_SD1 if kind == "sd1" else UNET_SD2, **unet)
    text_cfg = dict(TEXT_TINY, hidden_size=unet_cfg["cross_attention_dim"])
    sched = dict(SD1_SCHEDULER, prediction_type="epsilon" if kind == "sd1" else "v_prediction")
    if kind == "sd2":
        text_cfg["hidden_act"] = "gelu"
    return save_sd_folder(folder, tiny_unet(unet_cfg, seed), tiny_vae(seed=seed), tiny_text_encoder(text_cfg, seed), sched)


@jax.jit
def _unet_call(model, x, t, context):
    return model(x, t, context)


def unet_output(pipe, latents, timestep, context) -> jax.Array:
    """The pipeline's raw UNet output (eps or v) for NHWC `latents`, one jitted call (tests)."""
    from .sampling import Denoiser

    return _unet_call(Denoiser.of(pipe), jnp.asarray(latents, jnp.float32), jnp.asarray(timestep), jnp.asarray(context, jnp.float32))


def make_mini_sd(folder: str, seed: int = 3) -> str:
    """The command-line tests' model: the UNET_MINI UNet with the tiny VAE and text encoder."""
    return save_sd_folder(folder, tiny_unet(UNET_MINI, seed), tiny_vae(seed=seed), tiny_text_encoder(seed=seed))


def script_env(cache_dir: str, **extra: str) -> dict:
    """The environment of a `scripts/invert.py` subprocess in a test: this checkout's package, the
    compilation cache `cache_dir`, and no jax.distributed or XLA variables but those in `extra`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NTI_JAX_CACHE_DIR=cache_dir, PYTHONPATH=root, **extra)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
        if var not in extra:
            env.pop(var, None)
    return env


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| in float64: the tests' one measure of agreement."""
    import numpy as np

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def unchecked(settings, **fields):
    """A copy of a frozen settings object with `fields` set WITHOUT validation: for tests that
    inject values the library refuses (e.g. a NaN guidance scale reaching the compiled program)."""
    import copy

    out = copy.copy(settings)
    for k, v in fields.items():
        object.__setattr__(out, k, v)
    return out
