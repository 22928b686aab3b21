"""diffusers' AutoencoderKL in Flax, channels-last, any number of blocks."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from nti_jax.models.attention import Attention
from nti_jax.models.norms import GroupNorm
from nti_jax.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D, conv


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    sample_size: int = 512

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        for key in ("down_block_types", "up_block_types"):
            kinds = set(cfg.get(key, ()))
            if kinds - {"DownEncoderBlock2D", "UpDecoderBlock2D"}:
                raise ValueError(f"unsupported VAE {key}: {sorted(kinds)}")
        if cfg.get("act_fn", "silu") != "silu":
            raise ValueError(f"unsupported VAE act_fn {cfg['act_fn']!r}")
        sf = cfg.get("scaling_factor", 0.18215)
        return cls(
            in_channels=cfg.get("in_channels", 3),
            out_channels=cfg.get("out_channels", 3),
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=cfg.get("layers_per_block", 1),
            latent_channels=cfg.get("latent_channels", 4),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            scaling_factor=float(sf),
            mid_block_add_attention=cfg.get("mid_block_add_attention", True),
            use_quant_conv=cfg.get("use_quant_conv", True),
            use_post_quant_conv=cfg.get("use_post_quant_conv", True),
            sample_size=cfg.get("sample_size", 512),
        )


class MidBlock(nn.Module):
    """`UNetMidBlock2D`: resnet, single-head attention with its own group norm, resnet."""

    channels: int
    groups: int
    attention: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        res = lambda name: ResnetBlock2D(self.channels, self.groups, 1e-6, self.dtype, name=name)
        x = res("resnets.0")(x)
        if self.attention:
            b, h, w, c = x.shape
            y = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="attentions.0.group_norm")(x)
            y = Attention(1, c, qkv_bias=True, dtype=self.dtype, name="attentions.0")(y.reshape(b, h * w, c))
            x = x + y.reshape(b, h, w, c)
        return res("resnets.1")(x)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        chans = cfg.block_out_channels
        x = conv(chans[0], 3, "conv_in", dt)(x)
        for i, ch in enumerate(chans):
            for j in range(cfg.layers_per_block):
                x = ResnetBlock2D(ch, cfg.norm_num_groups, 1e-6, dt, name=f"down_blocks.{i}.resnets.{j}")(x)
            if i < len(chans) - 1:
                x = Downsample2D(ch, asymmetric=True, dtype=dt, name=f"down_blocks.{i}.downsamplers.0")(x)
        x = MidBlock(chans[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, dt, name="mid_block")(x)
        x = GroupNorm(cfg.norm_num_groups, epsilon=1e-6, dtype=dt, name="conv_norm_out")(x)
        return conv(2 * cfg.latent_channels, 3, "conv_out", dt)(nn.silu(x))


class Decoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        chans = tuple(reversed(cfg.block_out_channels))
        x = conv(chans[0], 3, "conv_in", dt)(z)
        x = MidBlock(chans[0], cfg.norm_num_groups, cfg.mid_block_add_attention, dt, name="mid_block")(x)
        for i, ch in enumerate(chans):
            for j in range(cfg.layers_per_block + 1):
                x = ResnetBlock2D(ch, cfg.norm_num_groups, 1e-6, dt, name=f"up_blocks.{i}.resnets.{j}")(x)
            if i < len(chans) - 1:
                x = Upsample2D(ch, dtype=dt, name=f"up_blocks.{i}.upsamplers.0")(x)
        x = GroupNorm(cfg.norm_num_groups, epsilon=1e-6, dtype=dt, name="conv_norm_out")(x)
        return conv(cfg.out_channels, 3, "conv_out", dt)(nn.silu(x))


class AutoencoderKL(nn.Module):
    """`encode(x in [-1,1]) -> (mean, logvar)`, `decode(z) -> x`; unscaled latents, NHWC."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg, dt = self.config, self.dtype
        self.encoder = Encoder(cfg, dt)
        self.decoder = Decoder(cfg, dt)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, None, dt)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, None, dt)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = self.encoder(x.astype(self.dtype))
        if self.config.use_quant_conv:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        z = z.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])
