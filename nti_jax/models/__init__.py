"""Flax networks of Stable Diffusion, channels-last, with no I/O."""

from nti_jax.models.attention import AttentionHook, AttentionPlace
from nti_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from nti_jax.models.unet import UNet2DConditionModel, UNetConfig
from nti_jax.models.vae import AutoencoderKL, VAEConfig

__all__ = [
    "AttentionHook",
    "AttentionPlace",
    "AutoencoderKL",
    "CLIPTextConfig",
    "CLIPTextModel",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
]
