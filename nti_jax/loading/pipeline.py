"""A loaded Stable Diffusion: Flax modules, their params, the tokenizer and scheduler settings.

`load_pipeline` reads a local diffusers folder or a hub id (through huggingface_hub's cache,
safetensors only). Each operation is one jitted function whose modules are static, so a second
call with the same shapes never recompiles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import warnings
from functools import partial
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nti_jax.loading import conditioning as cnd
from nti_jax.loading.conditioning import Cond, TextCond
from nti_jax.loading.convert import from_torch_layout, load_state
from nti_jax.loading.model_config import CONFIG_ADVICE, check_folder, model_family, read_configs, weight_files
from nti_jax.errors import ModelError, PromptError, PromptTruncatedWarning
from nti_jax.models import AutoencoderKL, CLIPTextConfig, CLIPTextModel, UNet2DConditionModel, UNetConfig, VAEConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_COMPONENT_FILES = ["model_index.json", "*/config.json", "*/*.json", "*/*.txt", "*/*.safetensors"]


@partial(jax.jit, static_argnums=0)
def _encode_prompt(text: CLIPTextModel, params, ids):
    return text.apply({"params": params}, ids)


@partial(jax.jit, static_argnums=(0, 1))
def _encode_prompt_xl(text: CLIPTextModel, text_2: CLIPTextModel, params, params_2, ids, ids_2) -> TextCond:
    """SDXL's prompt embeddings as diffusers' StableDiffusionXLPipeline.encode_prompt makes them:
    both encoders' penultimate hidden states side by side, and text_encoder_2's projected pooled
    state."""
    states, _ = text.apply({"params": params}, ids)
    states_2, pooled = text_2.apply({"params": params_2}, ids_2)
    return TextCond(jnp.concatenate([states, states_2], axis=-1), pooled)


@partial(jax.jit, static_argnums=(0, 1))
def _encode_image(vae: AutoencoderKL, scaling: float, params, images):
    x = images.astype(jnp.float32) / 127.5 - 1.0
    mean, _ = vae.apply({"params": params}, x, method=AutoencoderKL.encode)
    return mean * scaling


@partial(jax.jit, static_argnums=(0, 1))
def decode_with(vae: AutoencoderKL, scaling: float, params, latents):
    """`Pipeline.decode_latents` with the VAE given (programs that decode inside, `parallel`)."""
    x = vae.apply({"params": params}, latents.astype(jnp.float32) / scaling, method=AutoencoderKL.decode)
    return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Pipeline:
    """Stable Diffusion (1.x, 2.x or XL) for inversion and editing. Arrays are NHWC. Params are
    float32, except that a bfloat16/float16 UNet and text encoders keep their weight matrices in
    that dtype (`storage_dtypes`). SDXL has a second text encoder and tokenizer, and its
    conditioning is a `TextCond` (`conditioning`)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    params: dict  # {"unet": ..., "vae": ..., "text_encoder": ..., SDXL: "text_encoder_2": ...}
    tokenizer: Any
    scheduler_config: dict
    name: str = ""
    text_encoder_2: Optional[CLIPTextModel] = None
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: the unconditional embedding is zeros, as in diffusers

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def time_ids(self) -> Optional[jax.Array]:
        """SDXL's added time ids (6,): original size, crop top-left (0, 0), target size, all the
        model's square size (images are cropped and resized to it, as diffusers' defaults)."""
        if not self.is_sdxl:
            return None
        s = float(self.image_size)
        return jnp.asarray([s, s, 0.0, 0.0, s, s], jnp.float32)

    @property
    def dtype(self) -> str:
        return jnp.dtype(self.unet.dtype).name

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def latent_factor(self) -> int:
        return self.vae.config.downscale

    @property
    def image_size(self) -> int:
        """The model's native square image size in pixels."""
        return self.unet.config.sample_size * self.latent_factor

    @property
    def max_tokens(self) -> int:
        return self.text_encoder.config.max_position_embeddings

    def _full_ids(self, prompt: str, tokenizer=None) -> list[int]:
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a string, got {type(prompt).__name__}")
        return (tokenizer or self.tokenizer)(prompt, verbose=False)["input_ids"]  # verbose=False: no length warning

    def truncation(self, prompt: str) -> Optional[str]:
        """The text `tokenize` cuts from `prompt` (diffusers' "removed text"), or None if it fits."""
        full, n = self._full_ids(prompt), self.max_tokens
        return self.tokenizer.decode(full[n - 1 : -1]) if len(full) > n else None

    def tokenize(self, prompts: Sequence[str], tokenizer=None) -> np.ndarray:
        """Token ids (B, 77), padded, by `tokenizer` (default: the first). A longer prompt is cut
        by the tokenizer's truncation as diffusers does (bos, its first 75 tokens, eos), with one
        PromptTruncatedWarning each (from the first tokenizer only)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        n = self.max_tokens
        tok = tokenizer or self.tokenizer
        ids = []
        for p in prompts:
            full = self._full_ids(p, tok)
            if len(full) > n and tok is self.tokenizer:
                warnings.warn(
                    PromptTruncatedWarning(
                        f"The following part of your input was truncated because CLIP can only handle sequences "
                        f"up to {n} tokens ({len(full) - n} tokens cut): {self.tokenizer.decode(full[n - 1 : -1])!r}"
                    ),
                    stacklevel=2,
                )
            ids.append(tok(p, padding="max_length", max_length=n, truncation=True)["input_ids"])
        return np.asarray(ids, dtype=np.int32)

    def encode_prompt(self, prompts: Sequence[str]) -> Cond:
        """Text conditioning in float32: embeddings (B, 77, D), or SDXL's `TextCond` (tokens
        (B, 77, D1 + D2), pooled (B, P))."""
        if self.is_sdxl:
            p = self.params
            return _encode_prompt_xl(self.text_encoder, self.text_encoder_2, p["text_encoder"], p["text_encoder_2"],
                                     self.tokenize(prompts), self.tokenize(prompts, self.tokenizer_2))
        return _encode_prompt(self.text_encoder, self.params["text_encoder"], self.tokenize(prompts))

    def encode_with_null(self, prompts: Sequence[str], zeros: Optional[bool] = None) -> tuple[Cond, Cond]:
        """(the prompts' conditioning (B, ...), the unconditional one (1, ...)): the "" prompt's,
        encoded in the same call, or zeros where the model sets force_zeros_for_empty_prompt
        (SDXL base), as diffusers' pipelines make it when no negative prompt is given. `zeros`
        overrides the model's setting (null-text starts from the "" prompt's, `inversion`)."""
        emb = self.encode_prompt(list(prompts) + [""])
        cond, null = cnd.take(emb, slice(0, -1)), cnd.take(emb, slice(-1, None))
        if self.force_zeros_for_empty_prompt if zeros is None else zeros:
            null = jax.tree_util.tree_map(jnp.zeros_like, null)
        return cond, null

    def encode_image(self, images) -> jax.Array:
        """uint8 (B, H, W, 3) -> VAE posterior mean x scaling_factor, (B, H/f, W/f, C)."""
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be (B, H, W, 3), got {images.shape}")
        return _encode_image(self.vae, self.scaling_factor, self.params["vae"], images)

    def decode_latents(self, latents) -> jax.Array:
        """Latents (B, h, w, C) -> float images in [0, 1], (B, H, W, 3)."""
        return decode_with(self.vae, self.scaling_factor, self.params["vae"], jnp.asarray(latents))


def resolve_model(model: str) -> str:
    """A local folder as is; otherwise a hub id resolved through huggingface_hub's cache."""
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"model must be a folder path or hub id, got {type(model).__name__}")
    model = os.fspath(model)
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        single = "; convert a single-file checkpoint with diffusers: StableDiffusionPipeline.from_single_file(path).save_pretrained(folder)"
        raise ModelError(
            f"model {model} is a file, not a diffusers folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
            + (single if model.endswith((".safetensors", ".ckpt")) else "")
        )
    if model.startswith((".", "/", "~")):
        raise ModelError(f"model folder {model} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise ModelError(f"{model} is not a folder and huggingface_hub is not installed") from None
    for local_only in (False, True):
        try:
            return snapshot_download(model, allow_patterns=_COMPONENT_FILES, local_files_only=local_only)
        except Exception:  # network, auth, not cached: all end in one message
            pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    raise ModelError(
        f"model {model!r} is not a local folder, could not be downloaded ({'HF_HUB_OFFLINE is set' if offline else 'no network, or no such model'}) "
        f"and is not in the Hugging Face cache; on a machine with internet run `hf download {model}` or pass a "
        "local diffusers folder with --model"
    )


def build_modules(unet_config: dict, vae_config: dict, text_config: dict, dtype: str = "float32"):
    """Flax modules from diffusers/transformers config dicts (the VAE always in float32)."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    dt = DTYPES[dtype]
    try:
        unet = UNet2DConditionModel(UNetConfig.from_diffusers(unet_config), dt)
        vae = AutoencoderKL(VAEConfig.from_diffusers(vae_config))  # float32: diffusers' force_upcast
        text = CLIPTextModel(CLIPTextConfig.from_transformers(text_config), dt)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"unsupported or malformed model config: {e}") from None
    return unet, vae, text


def build_text_encoders_xl(text_config: dict, text_config_2: dict, dtype: str = "float32") -> tuple[CLIPTextModel, CLIPTextModel]:
    """SDXL's two encoders with their SDXL outputs: CLIP ViT-L (no projection; its config's
    projection_dim describes weights CLIPTextModel does not have) and OpenCLIP bigG with its
    text_projection (CLIPTextModelWithProjection)."""
    arch = (text_config_2.get("architectures") or ["CLIPTextModelWithProjection"])[0]
    if arch != "CLIPTextModelWithProjection":
        raise ModelError(f"text_encoder_2 is a {arch}; SDXL's is a CLIPTextModelWithProjection")
    try:
        cfg, cfg_2 = CLIPTextConfig.from_transformers(text_config), CLIPTextConfig.from_transformers(text_config_2)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"unsupported or malformed text encoder config: {e}") from None
    if not cfg_2.projection_dim:
        raise ModelError("text_encoder_2/config.json lacks projection_dim (CLIPTextModelWithProjection's)")
    dt = DTYPES[dtype]
    return (CLIPTextModel(dataclasses.replace(cfg, projection_dim=None), dt, outputs="sdxl"),
            CLIPTextModel(cfg_2, dt, outputs="sdxl"))


def param_shapes(unet: UNet2DConditionModel, vae: AutoencoderKL, text: CLIPTextModel, text_2: Optional[CLIPTextModel] = None) -> dict:
    """Shape trees of the param sets (no allocation); also the init recipe for training."""
    try:
        return jax.eval_shape(lambda: init_params(unet, vae, text, jax.random.PRNGKey(0), text_2))
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"the model configs describe networks that cannot be built ({msg})") from None


def init_params(unet: UNet2DConditionModel, vae: AutoencoderKL, text: CLIPTextModel, key, text_2: Optional[CLIPTextModel] = None) -> dict:
    """Random float32 params for the networks (SDXL: with `text_2`, its second text encoder), as
    one compiled program (run eagerly, the initialisers compiled some 700 small programs)."""
    uc, vc = unet.config, vae.config
    s, f = uc.sample_size, vc.downscale

    def init(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        added = None
        if uc.addition_embed_type == "text_time":
            added = (jnp.zeros((1, uc.pooled_dim)), jnp.zeros((1, 6)))
        params = {
            "unet": unet.init(
                k1, jnp.zeros((1, s, s, uc.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 8, uc.cross_attention_dim)), None, added
            )["params"],
            "vae": vae.init(k2, jnp.zeros((1, 8 * f, 8 * f, vc.in_channels)))["params"],
            "text_encoder": text.init(k3, jnp.zeros((1, 8), jnp.int32))["params"],
        }
        if text_2 is not None:
            params["text_encoder_2"] = text_2.init(k4, jnp.zeros((1, 8), jnp.int32))["params"]
        return params

    return jax.jit(init)(key)




def storage_dtypes(params: Any, dtype: str) -> Any:
    """`params` (arrays or ShapeDtypeStructs) as stored for compute in `dtype`: for bfloat16/float16,
    every leaf of two or more dimensions (kernels, embeddings: what each layer casts to `dtype`
    before use) in `dtype`, so the results are the same bits at half the memory; vectors (biases,
    norm scales) stay float32. For float32, unchanged."""
    return params if dtype == "float32" else jax.tree_util.tree_map(lambda a: stored_leaf(a, dtype), params)


def stored_leaf(a: Any, dtype: str) -> Any:
    """One leaf of `storage_dtypes`."""
    if dtype == "float32" or a.ndim < 2 or a.dtype != jnp.float32:
        return a
    dt = DTYPES[dtype]
    return jax.ShapeDtypeStruct(a.shape, dt) if isinstance(a, jax.ShapeDtypeStruct) else a.astype(dt)


def load_pipeline(model: str, *, dtype: str = "float32", allow_pickle: bool = False) -> Pipeline:
    """Load a diffusers-format SD 1.x/2.x or SDXL folder or hub id. `dtype` is the UNet/text
    compute dtype (their weight matrices are stored in it too, see `storage_dtypes`). An SDXL
    folder is known by its model_index.json (StableDiffusionXLPipeline); it loads its two text
    encoders and tokenizers, the full-precision weights where `*.fp16.safetensors` sit beside them.

    Every file is checked before it is used (configs, safetensors headers, the tokenizer): a
    missing or damaged one is a one-line ModelError naming it. Weights are memory-mapped and
    checked before the networks are traced, so a damaged download fails in a fraction of a second."""
    folder = resolve_model(model)
    check_folder(folder, model)
    sub = lambda name: os.path.join(folder, name)
    family, index = model_family(folder)
    files = weight_files(family)
    configs, sched = read_configs(folder, family)
    if dtype not in DTYPES:
        raise ModelError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    states = {k: load_state(sub(k), base, allow_pickle=allow_pickle) for k, base in files.items()}
    tokenizer = load_tokenizer(sub("tokenizer"))
    unet, vae, text = build_modules(configs["unet"], configs["vae"], configs["text_encoder"], dtype)
    extra: dict = {}
    text_2 = None
    if family == "sdxl":
        text, text_2 = build_text_encoders_xl(configs["text_encoder"], configs["text_encoder_2"], dtype)
        extra = dict(text_encoder_2=text_2, tokenizer_2=load_tokenizer(sub("tokenizer_2")),
                     force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)))
    if (unet.config.addition_embed_type == "text_time") != (family == "sdxl"):
        raise ModelError(f"{sub('unet/config.json')}: addition_embed_type {unet.config.addition_embed_type!r} does not suit "
                         f"a {'StableDiffusionXLPipeline' if family == 'sdxl' else 'Stable Diffusion 1.x/2.x'} folder (SDXL's UNet has \"text_time\")")
    templates = param_shapes(unet, vae, text, text_2)
    stored = lambda k: dtype if k != "vae" else "float32"  # the VAE computes in float32
    # Each tensor placed as it is converted (a model is never held twice on the host), by a copy:
    # `jnp.asarray` would compile an identity program per distinct shape.
    params = {
        k: from_torch_layout(states.pop(k), templates[k], what=k, place=lambda a, d=stored(k): jax.device_put(stored_leaf(a, d)))
        for k in files
    }
    return Pipeline(unet, vae, text, params, tokenizer, sched, name=model, **extra)


# What transformers logs on import when torch is absent (5.x; 4.x when flax is absent too).
_TORCH_NOTICES = ("PyTorch was not found", "None of PyTorch, TensorFlow")


def _not_the_torch_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_TORCH_NOTICES)


def clip_tokenizer_class() -> type:
    """transformers' CLIPTokenizer, imported without the "PyTorch was not found" notice that
    transformers logs when torch is absent (nti-jax never needs torch); other messages pass."""
    if "transformers" in sys.modules:
        from transformers import CLIPTokenizer

        return CLIPTokenizer
    logger = logging.getLogger("transformers")
    logger.addFilter(_not_the_torch_notice)
    try:
        from transformers import CLIPTokenizer
    finally:
        logger.removeFilter(_not_the_torch_notice)
    return CLIPTokenizer


def load_tokenizer(folder: str):
    """The CLIP tokenizer of a model's tokenizer/ folder; ModelError if it cannot be read."""
    if not os.path.isdir(folder):
        raise ModelError(f"missing the tokenizer folder {folder}")
    try:
        return clip_tokenizer_class().from_pretrained(folder)
    except Exception as e:  # tokenizers reports damaged vocab/merges files in many ways
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load the tokenizer from {folder} ({msg}); {CONFIG_ADVICE}") from None


def save_pipeline(folder: str, configs: dict, params: dict, scheduler_config: dict, tokenizer_dir: str) -> str:
    """Write a diffusers-format folder (float32 safetensors) that `load_pipeline` and diffusers read.

    `configs` holds the raw config dicts under "unet", "vae", "text_encoder", and for SDXL
    "text_encoder_2" (a CLIPTextModelWithProjection): then the folder is sdxl-base's layout, its
    model_index.json naming StableDiffusionXLPipeline with force_zeros_for_empty_prompt true and
    tokenizer_2 the same tokenizer padding with "!" (id 0).
    """
    import shutil

    from safetensors.numpy import save_file

    from nti_jax.loading.convert import to_torch_layout

    xl = "text_encoder_2" in configs
    for k, base in weight_files("sdxl" if xl else "sd").items():
        os.makedirs(os.path.join(folder, k), exist_ok=True)
        with open(os.path.join(folder, k, "config.json"), "w") as f:
            json.dump(configs[k], f, indent=2)
        save_file(to_torch_layout(params[k], np.float32), os.path.join(folder, k, f"{base}.safetensors"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config, f, indent=2)
    if os.path.abspath(tokenizer_dir) != os.path.abspath(os.path.join(folder, "tokenizer")):
        shutil.copytree(tokenizer_dir, os.path.join(folder, "tokenizer"), dirs_exist_ok=True)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDIMScheduler")],
    }
    if xl:
        dst = os.path.join(folder, "tokenizer_2")
        shutil.copytree(tokenizer_dir, dst, dirs_exist_ok=True)
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(dst, name)
            if os.path.isfile(path):
                with open(path) as f:
                    cfg = json.load(f)
                cfg["pad_token"] = "!"
                with open(path, "w") as f:
                    json.dump(cfg, f, indent=2)
        index.update({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": True,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "feature_extractor": [None, None],
            "image_encoder": [None, None],
        })
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return folder
