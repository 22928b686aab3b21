"""diffusers' UNet2DConditionModel for SD 1.x / 2.x in Flax, channels-last.

Parameter names equal the diffusers state-dict names (dots included), so `convert.py` is a pure
layout transform. Every attention layer takes an optional hook (see models/attention.py).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nti_jax.models.attention import Attention, AttentionHook, AttentionPlace
from nti_jax.models.norms import GroupNorm, LayerNorm
from nti_jax.models.precision import compute_dtype, residual_add
from nti_jax.models.resnet import MATMUL, Conv2d, Downsample2D, ResnetBlock2D, Upsample2D, conv, tag

# Rematerialisation of the UNet's blocks (each ResnetBlock2D and Transformer2D) in a gradient:
# "none" keeps every intermediate autodiff needs; "blocks" keeps only the outputs of the
# convolutions and dense layers inside a block and recomputes the norms and activations;
# "full" keeps only each block's inputs and recomputes the whole block. Results are equal
# within float rounding (the same operations, run again).
REMAT_MODES = ("none", "blocks", "full")


def remat_block(cls: type, mode: str, static_argnums: tuple = ()) -> type:
    """`cls` under `nn.remat` with the policy of `mode` ("none": `cls` itself)."""
    if mode == "none":
        return cls
    if mode not in REMAT_MODES:
        raise ValueError(f"remat must be one of {', '.join(REMAT_MODES)}, got {mode!r}")
    policies = jax.checkpoint_policies
    policy = policies.save_only_these_names(MATMUL) if mode == "blocks" else policies.nothing_saveable
    return nn.remat(cls, policy=policy, static_argnums=static_argnums)


def _time_embedding(unet: "UNet2DConditionModel", t: jax.Array, added: Optional[tuple[jax.Array, jax.Array]]) -> jax.Array:
    """The timestep embedding (B, 4 c0) of timesteps t (B,), plus SDXL's added embedding of the
    pooled text and the time ids; its parameters the UNet's own."""
    cfg, dt = unet.config, unet.dtype
    c0 = cfg.block_out_channels[0]
    dt = compute_dtype("time_embedding", dt)
    dense = lambda name: nn.Dense(4 * c0, dtype=dt, name=name, parent=unet)
    temb = timestep_embedding(t, c0, cfg.flip_sin_to_cos, cfg.freq_shift).astype(dt)
    temb = dense("time_embedding.linear_2")(nn.silu(dense("time_embedding.linear_1")(temb)))
    if cfg.addition_embed_type != "text_time":
        return temb
    if added is None:
        raise ValueError("this UNet takes SDXL's added conditioning: (pooled text embeddings, time ids)")
    pooled, time_ids = added
    ids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
    aug = jnp.concatenate([pooled.astype(jnp.float32), ids.reshape(pooled.shape[0], -1)], axis=-1).astype(dt)
    return temb + dense("add_embedding.linear_2")(nn.silu(dense("add_embedding.linear_1")(aug)))


def _output_head(unet: "UNet2DConditionModel", x: jax.Array) -> jax.Array:
    """conv_out(silu(conv_norm_out(x))), its parameters the UNet's own."""
    cfg, dt = unet.config, unet.dtype
    x = GroupNorm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dt, name="conv_norm_out", parent=unet)(x)
    return Conv2d(cfg.out_channels, 3, dtype=dt, name="conv_out", parent=unet)(nn.silu(x))


def _per_block(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


# Config keys whose non-default values change the architecture in ways this model does not have.
_UNSUPPORTED = {
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "time_embedding_type": "positional",
    "center_input_sample": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "num_class_embeds": None,
    "reverse_transformer_layers_per_block": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "mid_block_only_cross_attention": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture-defining subset of a diffusers UNet config (hashable)."""

    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: tuple = (2, 2, 2, 2)
    heads: tuple = (8, 8, 8, 8)
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_linear_projection: bool = False
    # Attention logits are float32 on the explicit path and bf16 keeps float32's range, so
    # upcast_attention needs no separate code path; it is kept for the record.
    upcast_attention: bool = False
    sample_size: int = 64
    # SDXL's added conditioning ("text_time"): pooled text embeddings and the six size/crop
    # numbers, each through `addition_time_embed_dim` sinusoids, projected into the time embedding.
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 0

    @property
    def pooled_dim(self) -> int:
        """The width of the pooled text embedding "text_time" takes (0 without it)."""
        if self.addition_embed_type != "text_time":
            return 0
        return self.projection_class_embeddings_input_dim - 6 * self.addition_time_embed_dim

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        bad = {k: cfg[k] for k, v in _UNSUPPORTED.items() if k in cfg and cfg[k] != v}
        if cfg.get("addition_embed_type") not in (None, "text_time"):
            bad["addition_embed_type"] = cfg["addition_embed_type"]
        if bad:
            raise ValueError(f"unsupported UNet config settings: {bad}")
        n = len(cfg["block_out_channels"])
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        cad = cfg.get("cross_attention_dim", 768)
        if isinstance(cad, (list, tuple)):
            if len(set(cad)) != 1:
                raise ValueError(f"per-block cross_attention_dim is not supported: {cad}")
            cad = cad[0]
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            down_block_types=tuple(cfg["down_block_types"]),
            up_block_types=tuple(cfg["up_block_types"]),
            block_out_channels=tuple(cfg["block_out_channels"]),
            layers_per_block=_per_block(cfg.get("layers_per_block", 2), n),
            heads=_per_block(heads, n),
            transformer_layers_per_block=_per_block(cfg.get("transformer_layers_per_block", 1), n),
            cross_attention_dim=cad,
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            sample_size=cfg.get("sample_size", 64),
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim") or 256,
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim") or 0,
        )


def timestep_embedding(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> jax.Array:
    """diffusers' `get_timestep_embedding` (max period 10000), in float32."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    emb = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    block: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, size, hook: Optional[AttentionHook]):
        ln = lambda name: LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
        d = self.dim // self.heads
        path = ".".join(self.scope.path)
        place = lambda kind: AttentionPlace(self.block, kind, size, f"{path}.{kind}")
        attn = lambda name: Attention(self.heads, d, dtype=self.dtype, name=name)
        x = residual_add(x, attn("attn1")(ln("norm1")(x), None, hook, place("self")))
        x = residual_add(x, attn("attn2")(ln("norm2")(x), context, hook, place("cross")))
        h = tag(nn.Dense(self.dim * 8, dtype=self.dtype, name="ff.net.0.proj")(ln("norm3")(x)))
        h, gate = jnp.split(h, 2, axis=-1)
        h = h * nn.gelu(gate, approximate=False)
        return residual_add(x, tag(nn.Dense(self.dim, dtype=self.dtype, name="ff.net.2")(h)))


class Transformer2D(nn.Module):
    """diffusers `Transformer2DModel` (continuous input): norm, proj_in, blocks, proj_out, residual."""

    heads: int
    depth: int
    groups: int
    use_linear: bool
    block: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context, hook=None):
        b, h, w, c = x.shape
        y = GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear:
            y = tag(nn.Dense(c, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c)))
        else:
            y = conv(c, 1, "proj_in", self.dtype)(y).reshape(b, h * w, c)
        for i in range(self.depth):
            y = BasicTransformerBlock(
                c, self.heads, self.block, self.dtype, name=f"transformer_blocks.{i}"
            )(y, context, (h, w), hook)
        if self.use_linear:
            y = tag(nn.Dense(c, dtype=self.dtype, name="proj_out")(y)).reshape(b, h, w, c)
        else:
            y = conv(c, 1, "proj_out", self.dtype)(y.reshape(b, h, w, c))
        return residual_add(y, x)


class UNet2DConditionModel(nn.Module):
    """eps (or v) = unet(latents NHWC, timesteps (B,), text context (B, L, D), hook, added), where
    `added` is SDXL's (pooled text embeddings (B, P), time ids (B, 6)) when the config has
    `addition_embed_type="text_time"`.

    `remat` (one of REMAT_MODES) changes what a gradient through the UNet keeps, not its result.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array,
        context: jax.Array,
        hook: Optional[AttentionHook] = None,
        added: Optional[tuple[jax.Array, jax.Array]] = None,
    ) -> jax.Array:
        cfg, dt = self.config, self.dtype
        resnet, transformer = remat_block(ResnetBlock2D, self.remat), remat_block(Transformer2D, self.remat, (3,))
        res = lambda ch, name: resnet(ch, cfg.norm_num_groups, cfg.norm_eps, dt, name=name)
        xf = lambda i, block, name: transformer(
            cfg.heads[i],
            cfg.transformer_layers_per_block[i],
            cfg.norm_num_groups,
            cfg.use_linear_projection,
            block,
            dt,
            name=name,
        )
        sample = sample.astype(dt)
        context = context.astype(dt)
        temb = _time_embedding(self, jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],)), added)
        c0 = cfg.block_out_channels[0]
        x = conv(c0, 3, "conv_in", dt)(sample)
        skips = [x]
        n = len(cfg.block_out_channels)
        for i, kind in enumerate(cfg.down_block_types):
            ch = cfg.block_out_channels[i]
            for j in range(cfg.layers_per_block[i]):
                x = res(ch, f"down_blocks.{i}.resnets.{j}")(x, temb)
                if kind == "CrossAttnDownBlock2D":
                    x = xf(i, "down", f"down_blocks.{i}.attentions.{j}")(x, context, hook)
                elif kind != "DownBlock2D":
                    raise ValueError(f"unsupported down block type {kind!r}")
                skips.append(x)
            if i < n - 1:
                x = Downsample2D(ch, dtype=dt, name=f"down_blocks.{i}.downsamplers.0")(x)
                skips.append(x)

        ch = cfg.block_out_channels[-1]
        x = res(ch, "mid_block.resnets.0")(x, temb)
        x = xf(n - 1, "mid", "mid_block.attentions.0")(x, context, hook)
        x = res(ch, "mid_block.resnets.1")(x, temb)

        rev = list(reversed(range(n)))
        for i, kind in enumerate(cfg.up_block_types):
            bi = rev[i]
            ch = cfg.block_out_channels[bi]
            for j in range(cfg.layers_per_block[bi] + 1):
                x = jnp.concatenate([x, skips.pop()], axis=-1)
                x = res(ch, f"up_blocks.{i}.resnets.{j}")(x, temb)
                if kind == "CrossAttnUpBlock2D":
                    x = xf(bi, "up", f"up_blocks.{i}.attentions.{j}")(x, context, hook)
                elif kind != "UpBlock2D":
                    raise ValueError(f"unsupported up block type {kind!r}")
            if i < n - 1:
                x = Upsample2D(ch, dtype=dt, name=f"up_blocks.{i}.upsamplers.0")(x)

        # The output head is rematerialised like a block: its GroupNorm keeps float32 copies.
        return remat_block(_output_head, self.remat)(self, x).astype(jnp.float32)
