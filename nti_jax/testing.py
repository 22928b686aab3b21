"""Tiny random Stable Diffusion folders built with torch diffusers/transformers (tests, benchmarks).

Needs the test extras (torch, diffusers, transformers); nothing at run time imports this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from nti_jax.toy import config as toy_config

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
    from nti_jax.core.sampling import Denoiser

    return _unet_call(Denoiser.of(pipe), jnp.asarray(latents, jnp.float32), jnp.asarray(timestep), jnp.asarray(context, jnp.float32))


def make_mini_sd(folder: str, seed: int = 3) -> str:
    """The command-line tests' model: the UNET_MINI UNet with the tiny VAE and text encoder."""
    return save_sd_folder(folder, tiny_unet(UNET_MINI, seed), tiny_vae(seed=seed), tiny_text_encoder(seed=seed))


def scene_folder(folder, n: int, seed0: int):
    """`folder` holding n held-out shapes images (64 px, the toy model's size), img0.png ..."""
    from PIL import Image

    from nti_jax.toy import shapes

    for k in range(n):
        Image.fromarray(shapes.render(seed0 + k, 64).image).save(os.path.join(folder, f"img{k}.png"))
    return folder


def script_env(cache_dir: str, **extra: str) -> dict:
    """The environment of a `scripts/invert.py` subprocess in a test: this checkout's package, the
    compilation cache `cache_dir`, and no jax.distributed or XLA variables but those in `extra`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NTI_JAX_CACHE_DIR=cache_dir, PYTHONPATH=root, **extra)
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"):
        if var not in extra:
            env.pop(var, None)
    return env


def finish_workers(procs: list, logs: list, timeout: float = 900) -> list[str]:
    """Wait for worker subprocesses (killing any still running after `timeout` seconds); each must
    exit 0 with no traceback in its log. The logs' texts."""
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    texts = [open(log).read() for log in logs]
    assert codes == [0] * len(procs) and not any("Traceback" in t for t in texts), texts
    return texts


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


# --------------------------------------------------------------------------------------------
# SDXL (issue 20): a tiny random folder laid out like stabilityai/stable-diffusion-xl-base-1.0
# --------------------------------------------------------------------------------------------

# The hub's sdxl-base scheduler/scheduler_config.json (an EulerDiscreteScheduler, written by
# diffusers 0.19.0.dev0), minus the "_class_name"/"_diffusers_version" bookkeeping. It carries
# DDIM/PNDM keys Euler itself does not take (clip_sample, set_alpha_to_one, skip_prk_steps,
# sample_max_value); diffusers keeps them in the scheduler's config, so
# DDIMScheduler.from_config(pipe.scheduler.config) sees set_alpha_to_one=False, clip_sample=False.
# The toy's SDXL config holds these same values (SD's betas are sdxl-base's), so it is the one copy.
SDXL_SCHEDULER = {k: v for k, v in toy_config.SCHEDULER_XL.items() if k != "_class_name"}
# SDXL's VAE settings: scaling factor 0.13025, and the pipeline upcasts it to float32.
VAE_XL = dict(VAE_TINY, scaling_factor=0.13025, force_upcast=True)
# text_encoder: CLIP ViT-L's kind (quick_gelu, no projection); text_encoder_2: OpenCLIP bigG's kind
# (gelu, a text projection giving the pooled embedding; pad_token_id 0 as in the hub's config).
# Penultimate hidden states 32 + 32 = UNET_XL's cross_attention_dim; projection 32 = its pooled part.
TEXT_XL_1 = dict(TEXT_TINY, hidden_size=32)
TEXT_XL_2 = dict(TEXT_TINY, hidden_size=32, projection_dim=32, hidden_act="gelu", pad_token_id=0)
# tokenizer_2 differs from tokenizer only in its pad token: "!" (id 0) instead of <|endoftext|>.
SDXL_PAD_TOKEN_2 = "!"


def _write_tokenizer(dst: str, pad_token: str | None = None) -> None:
    """The shipped CLIP tokenizer files (vocab.json, merges.txt, special_tokens_map.json,
    tokenizer_config.json) in `dst`, replacing whatever is there; `pad_token` overrides the pad
    token in both json files (SDXL's tokenizer_2)."""
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    shutil.copytree(TOKENIZER_DIR, dst)
    if pad_token is not None:
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(dst, name)
            with open(path) as f:
                cfg = json.load(f)
            cfg["pad_token"] = pad_token
            with open(path, "w") as f:
                json.dump(cfg, f, indent=2)


def tiny_sdxl_pipeline(seed: int = 0, force_zeros_for_empty_prompt: bool = True):
    """A torch diffusers StableDiffusionXLPipeline of tiny random (perturbed) components."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    unet = tiny_unet(UNET_XL, seed)
    vae = tiny_vae(VAE_XL, seed)
    te1 = tiny_text_encoder(TEXT_XL_1, seed)
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_XL_2)).eval()
    perturb_(te2, seed + 1)
    tok1 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    tok2 = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=SDXL_PAD_TOKEN_2)
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok1,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )


def make_tiny_sdxl(folder: str, seed: int = 0, fp16_variant: bool = False) -> str:
    """A complete tiny random SDXL folder in the hub's sdxl-base layout: model_index.json
    (StableDiffusionXLPipeline, force_zeros_for_empty_prompt true), unet/ vae/ text_encoder/
    text_encoder_2/ (safetensors) tokenizer/ tokenizer_2/ (pad "!") scheduler/ (Euler, SDXL_SCHEDULER).

    `fp16_variant`: also float16 copies of every weight file beside the full ones
    (``*.fp16.safetensors``), as the hub ships them. They are written first and the float32 files
    last, so each config.json describes the float32 weights."""
    import copy

    import torch

    pipe = tiny_sdxl_pipeline(seed)
    os.makedirs(folder, exist_ok=True)
    if fp16_variant:
        copy.deepcopy(pipe).to(torch.float16).save_pretrained(folder, safe_serialization=True, variant="fp16")
    pipe.save_pretrained(folder, safe_serialization=True)
    # the tokenizers as the hub has them (slow-tokenizer files), whatever transformers wrote
    _write_tokenizer(os.path.join(folder, "tokenizer"))
    _write_tokenizer(os.path.join(folder, "tokenizer_2"), SDXL_PAD_TOKEN_2)
    return folder


class CompileLog:
    """XLA compiles and persistent-cache look-ups seen while a `compile_log()` block runs, from
    JAX's monitoring events (`backend_compile_duration` for every compile, the cache's hit and
    miss events for every look-up)."""

    def __init__(self):
        self.compiles, self.cache_lookups = 0, 0


_LOGS: list = []


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        for log in _LOGS:
            log.compiles += 1


def _on_event(event: str, **_) -> None:
    if event in ("/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"):
        for log in _LOGS:
            log.cache_lookups += 1


_LISTENING: list = []


@contextlib.contextmanager
def compile_log() -> Iterator[CompileLog]:
    """Count the compiles and persistent-cache look-ups inside the block."""
    if not _LISTENING:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _LISTENING.append(True)
    log = CompileLog()
    _LOGS.append(log)
    try:
        yield log
    finally:
        _LOGS.remove(log)
