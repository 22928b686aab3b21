"""The `Inversion` a call of the inversion program returns, its safetensors file format, and the
DDIM schedule it was made with."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nti_jax.loading import conditioning as cnd
from nti_jax.loading.conditioning import Cond, TextCond
from nti_jax.core.sampling import model_schedule
from nti_jax.core.schedule import Schedule
from nti_jax.core.settings import InvertSettings
from nti_jax.errors import NtiError
from nti_jax.io import atomic_path
from nti_jax.loading.convert import read_safetensors
from nti_jax.loading.pipeline import Pipeline

FORMAT_VERSION = "1"
BATCHED_FIELDS = ("x_T", "pivots", "null_embeddings", "cond_embeddings", "inner_iterations", "final_losses", "nonfinite", "latents")
OPTIONAL_FIELDS = ("latents",)  # None where the method makes none, and in files written before it


@struct.dataclass
class Inversion:
    """The result of `invert` for a batch of B images (B = 1 for one image).

    `pivots[:, k]` is the DDIM-inversion latent z*_k (k = 0 is the image's latent, k = T is x_T);
    `null_embeddings[:, i]` is phi used at sampling step i (timesteps[i], descending). For SDXL
    the two embeddings are `TextCond`s (token and pooled embeddings, `conditioning`).
    `inner_iterations`/`final_losses` are the null-text optimisation's Adam steps and last loss per
    step (zero for the other methods); `nonfinite` marks steps whose loss or gradient was NaN/inf
    (optimisation of that step stopped there, keeping the last finite phi). `latents[:, k]` is
    null-text's optimised latent z_bar_k (k = T is x_T), the trajectory its last call of each step
    took: an edit's source row follows it (`p2p.source_path`); None for the other methods.
    """

    x_T: jax.Array  # (B, h, w, C)
    pivots: jax.Array  # (B, T+1, h, w, C)
    null_embeddings: Cond  # (B, T, L, D); SDXL: TextCond((B, T, L, D), (B, T, P))
    cond_embeddings: Cond  # (B, L, D); SDXL: TextCond((B, L, D), (B, P))
    timesteps: jax.Array  # (T,)
    inner_iterations: jax.Array  # (B, T) int32
    final_losses: jax.Array  # (B, T) float32
    nonfinite: jax.Array  # (B, T) bool
    latents: jax.Array | None = None  # (B, T+1, h, w, C) null-text only
    settings: InvertSettings = struct.field(pytree_node=False, default=InvertSettings())
    prompts: tuple = struct.field(pytree_node=False, default=())
    model: str = struct.field(pytree_node=False, default="")
    prediction_type: str = struct.field(pytree_node=False, default="epsilon")
    image_size: int = struct.field(pytree_node=False, default=0)

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def num_images(self) -> int:
        return self.x_T.shape[0]

    def __getitem__(self, idx) -> "Inversion":
        """The inversion of image(s) `idx`, still batched (an int gives B = 1)."""
        idx = slice(idx, idx + 1) if isinstance(idx, int) else idx
        rows = np.arange(self.num_images)[idx]
        arrays = {k: cnd.take(getattr(self, k), rows) for k in BATCHED_FIELDS}
        return self.replace(**arrays, prompts=tuple(self.prompts[i] for i in rows))

    def save(self, path: str) -> None:
        """One safetensors file; settings, prompts and model name go in its metadata."""
        from safetensors.numpy import save_file

        tensors = {}
        for k in BATCHED_FIELDS + ("timesteps",):
            value = getattr(self, k)
            if value is None:
                continue
            if isinstance(value, TextCond):  # SDXL: the pooled part beside the tokens
                tensors[k.replace("embeddings", "pooled")] = np.ascontiguousarray(np.asarray(value.pooled))
                value = value.tokens
            tensors[k] = np.ascontiguousarray(np.asarray(value))
        tensors["nonfinite"] = tensors["nonfinite"].astype(np.uint8)
        settings = self.settings.to_dict()
        method = settings.pop("method")
        settings.update(prediction_type=self.prediction_type, image_size=self.image_size)
        meta = {
            "format": "nti-jax-inversion",
            "version": FORMAT_VERSION,
            "method": method,
            "prompts": json.dumps(list(self.prompts)),
            "settings": json.dumps(settings),
            "model": self.model,
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str) -> "Inversion":
        try:
            tensors, meta = read_safetensors(path)
        except (OSError, NtiError) as e:
            raise NtiError(f"cannot read inversion file {path}: {e}") from None
        if meta.get("format") != "nti-jax-inversion":
            raise NtiError(f"{path} is not an nti-jax inversion file")
        try:
            stored = json.loads(meta["settings"])
            settings = InvertSettings.from_dict(dict(stored, method=meta["method"]))
            prompts = tuple(json.loads(meta["prompts"]))
            arrays = {k: jnp.asarray(np.array(tensors[k])) for k in BATCHED_FIELDS + ("timesteps",) if k in tensors or k not in OPTIONAL_FIELDS}
            if "latents" in arrays and arrays["latents"].shape != arrays["pivots"].shape:
                raise ValueError(f"latents {arrays['latents'].shape} and pivots {arrays['pivots'].shape} differ in shape")
            for k in ("null_embeddings", "cond_embeddings"):
                pooled = k.replace("embeddings", "pooled")
                if pooled in tensors:
                    arrays[k] = TextCond(arrays[k], jnp.asarray(np.array(tensors[pooled])))
        except (KeyError, TypeError, ValueError) as e:
            raise NtiError(f"{path} is a damaged nti-jax inversion file ({type(e).__name__}: {e})") from None
        arrays["nonfinite"] = arrays["nonfinite"].astype(bool)
        return cls(
            **arrays,
            settings=settings,
            prompts=prompts,
            model=meta.get("model", ""),
            prediction_type=stored.get("prediction_type", "epsilon"),
            image_size=int(stored.get("image_size", 0)),
        )


def inversion_schedule(pipe: Pipeline, inv: Inversion) -> Schedule:
    """The DDIM schedule an inversion was made with (checked against its stored timesteps)."""
    sched = model_schedule(pipe, inv.timesteps.shape[0])
    if not np.array_equal(np.asarray(sched.timesteps), np.asarray(inv.timesteps)):
        raise NtiError("this inversion was made with another scheduler config than the model's")
    return sched
