"""Flax networks of Stable Diffusion, channels-last, with no I/O."""

from .attention import AttentionHook, AttentionPlace
from .clip_text import CLIPTextConfig, CLIPTextModel
from .unet import UNet2DConditionModel, UNetConfig
from .vae import AutoencoderKL, VAEConfig

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
