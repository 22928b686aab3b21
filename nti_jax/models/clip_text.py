"""transformers' CLIPTextModel (causal text transformer + final layer norm) in Flax, and
CLIPTextModelWithProjection's outputs as SDXL reads them (penultimate hidden states, and the
projected hidden state of the end-of-text token)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from nti_jax.models.norms import LayerNorm

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2  # 2: transformers' legacy rule, the end-of-text token is the largest id
    projection_dim: Optional[int] = None  # CLIPTextModelWithProjection's text_projection (no bias)

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPTextConfig":
        cfg = cfg.get("text_config", cfg)
        act = cfg.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported CLIP hidden_act {act!r}")
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})


class EncoderLayer(nn.Module):
    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        cfg, dt = self.config, self.dtype
        b, n, d = x.shape
        heads = cfg.num_attention_heads
        ln = lambda name: LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name=name)
        dense = lambda f, name: nn.Dense(f, dtype=dt, name=name)
        h = ln("layer_norm1")(x)
        split = lambda t: t.reshape(b, n, heads, d // heads)
        q = split(dense(d, "self_attn.q_proj")(h))
        k = split(dense(d, "self_attn.k_proj")(h))
        v = split(dense(d, "self_attn.v_proj")(h))
        a = jax.nn.dot_product_attention(q, k, v, mask=mask).reshape(b, n, d)
        x = x + dense(d, "self_attn.out_proj")(a)
        h = _ACTIVATIONS[cfg.hidden_act](dense(cfg.intermediate_size, "mlp.fc1")(ln("layer_norm2")(x)))
        return x + dense(d, "mlp.fc2")(h)


class TextOutputs(NamedTuple):
    last: jax.Array  # (B, L, D) after the final layer norm (SD 1.x/2.x's prompt embeddings)
    penultimate: jax.Array  # (B, L, D) the input of the last layer (SDXL's)
    pooled: jax.Array  # (B, D) the final-normed end-of-text token


class CLIPTextTransformer(nn.Module):
    """token ids (B, L) -> `TextOutputs`, float32."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> TextOutputs:
        cfg, dt = self.config, self.dtype
        n = input_ids.shape[1]
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, name="embeddings.token_embedding")
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt, name="embeddings.position_embedding")
        x = tok(input_ids) + pos(jnp.arange(n))[None]
        mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
        penultimate = x
        for i in range(cfg.num_hidden_layers):
            penultimate = x
            x = EncoderLayer(cfg, dt, name=f"encoder.layers.{i}")(x, mask)
        x = LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="final_layer_norm")(x)
        if cfg.eos_token_id == 2:
            eos = jnp.argmax(input_ids, axis=-1)
        else:
            eos = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(x, eos[:, None, None], axis=1)[:, 0]
        return TextOutputs(x.astype(jnp.float32), penultimate.astype(jnp.float32), pooled)


class CLIPTextModel(nn.Module):
    """Wraps the transformer under `text_model`, matching transformers' state-dict names: the
    last hidden state (B, L, D), or with `outputs="sdxl"` (penultimate hidden state (B, L, D),
    pooled (B, P)), the pooled state through `text_projection` when the config has one."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    outputs: str = "last"  # "last" | "sdxl"

    @nn.compact
    def __call__(self, input_ids: jax.Array):
        out = CLIPTextTransformer(self.config, self.dtype, name="text_model")(input_ids)
        if self.outputs == "last":
            return out.last
        pooled = out.pooled
        if self.config.projection_dim:
            pooled = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
        return out.penultimate, pooled.astype(jnp.float32)
