"""What a diffusers Stable Diffusion folder must hold: its JSON configs read and checked before
anything is built from them (a damaged or foreign file is one `ModelError` naming the file and key)."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable

from nti_jax.errors import ModelError

WEIGHT_FILES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
# SDXL adds OpenCLIP bigG with its projection (and tokenizer_2).
XL_WEIGHT_FILES = {**WEIGHT_FILES, "text_encoder_2": "model"}
XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")

CONFIG_ADVICE = "it is damaged or not a diffusers Stable Diffusion 1.x/2.x/XL file: download it again"


def _read_json(path: str) -> dict:
    """A JSON object from a file; ModelError naming the file if it is missing or not one."""
    if not os.path.isfile(path):
        raise ModelError(f"missing {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"{path} is not UTF-8 text (byte {e.start}); {CONFIG_ADVICE}") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); {CONFIG_ADVICE}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a JSON {type(data).__name__}, not an object; {CONFIG_ADVICE}")
    return data


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(v: Any) -> bool:
    return _is_int(v) and v > 0


def _pos_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _pos_ints(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_pos_int(x) for x in v)


def _names(*allowed: str) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, list) and len(v) > 0 and all(x in allowed for x in v)


_POS_INT = (_pos_int, "a positive integer")
_PER_BLOCK = (lambda v: _pos_int(v) or _pos_ints(v), "a positive integer or a list of them")
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_BOOL_OR_NULL = (lambda v: v is None or isinstance(v, bool), "true, false or null")
# Per file: key -> (required, check, what it must be). Required keys are those the model
# configs read without a default; the others are checked only when present.
_UNET_KEYS = {
    "block_out_channels": (True, _pos_ints, "a list of positive integers"),
    "down_block_types": (True, _names("CrossAttnDownBlock2D", "DownBlock2D"), "a list of CrossAttnDownBlock2D/DownBlock2D"),
    "up_block_types": (True, _names("CrossAttnUpBlock2D", "UpBlock2D"), "a list of CrossAttnUpBlock2D/UpBlock2D"),
    "in_channels": (False, *_POS_INT),
    "out_channels": (False, *_POS_INT),
    "sample_size": (False, *_POS_INT),
    "norm_num_groups": (False, *_POS_INT),
    "layers_per_block": (False, *_PER_BLOCK),
    "transformer_layers_per_block": (False, *_PER_BLOCK),
    "cross_attention_dim": (False, *_PER_BLOCK),
    "attention_head_dim": (False, lambda v: v is None or _pos_int(v) or _pos_ints(v), "a positive integer, a list of them or null"),
    "num_attention_heads": (False, lambda v: v is None or _pos_int(v) or _pos_ints(v), "a positive integer, a list of them or null"),
    "norm_eps": (False, _pos_number, "a positive number"),
    "freq_shift": (False, lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "flip_sin_to_cos": (False, *_BOOL),
    "use_linear_projection": (False, *_BOOL_OR_NULL),
    "upcast_attention": (False, *_BOOL_OR_NULL),
    "addition_embed_type": (False, lambda v: v in (None, "text_time"), 'null or "text_time"'),
    "addition_time_embed_dim": (False, lambda v: v is None or _pos_int(v), "a positive integer or null"),
    "projection_class_embeddings_input_dim": (False, lambda v: v is None or _pos_int(v), "a positive integer or null"),
}
_VAE_KEYS = {
    "block_out_channels": (True, _pos_ints, "a list of positive integers"),
    "down_block_types": (False, _names("DownEncoderBlock2D"), "a list of DownEncoderBlock2D"),
    "up_block_types": (False, _names("UpDecoderBlock2D"), "a list of UpDecoderBlock2D"),
    "in_channels": (False, *_POS_INT),
    "out_channels": (False, *_POS_INT),
    "latent_channels": (False, *_POS_INT),
    "layers_per_block": (False, *_POS_INT),
    "norm_num_groups": (False, *_POS_INT),
    "sample_size": (False, *_POS_INT),
    "scaling_factor": (False, _pos_number, "a positive number"),
    "act_fn": (False, lambda v: v == "silu", '"silu"'),
    "mid_block_add_attention": (False, *_BOOL),
    "use_quant_conv": (False, *_BOOL),
    "use_post_quant_conv": (False, *_BOOL),
}
_TEXT_KEYS = {
    **{k: (False, *_POS_INT) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"
    )},
    "hidden_act": (False, lambda v: v in ("quick_gelu", "gelu", "gelu_new"), "quick_gelu, gelu or gelu_new"),
    "layer_norm_eps": (False, _pos_number, "a positive number"),
}
_SCHEDULER_KEYS = {
    "num_train_timesteps": (False, *_POS_INT),
    "beta_start": (False, lambda v: _pos_number(v) and v < 1, "a number in (0, 1)"),
    "beta_end": (False, lambda v: _pos_number(v) and v < 1, "a number in (0, 1)"),
    "beta_schedule": (False, lambda v: v in ("linear", "scaled_linear"), "linear or scaled_linear"),
    "timestep_spacing": (False, lambda v: v in ("leading", "trailing", "linspace"), "leading, trailing or linspace"),
    "steps_offset": (False, lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "set_alpha_to_one": (False, *_BOOL),
    "prediction_type": (False, lambda v: v in ("epsilon", "v_prediction"), "epsilon or v_prediction"),
    "trained_betas": (False, lambda v: v is None, "null (explicit betas are not supported)"),
}


def _check_config(path: str, cfg: dict, keys: dict) -> None:
    """ModelError naming `path` and the key if a key the models read is missing or malformed."""
    for key, (required, ok, want) in keys.items():
        if key not in cfg:
            if required:
                raise ModelError(f"{path} lacks {key!r} ({want}); {CONFIG_ADVICE}")
            continue
        if not ok(cfg[key]):
            shown = json.dumps(cfg[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ModelError(f"{path}: {key!r} is {shown}, expected {want}")


def _check_blocks(path: str, cfg: dict, per_block: tuple) -> None:
    """Block lists of one length; group norms that divide every block's channels."""
    n = len(cfg["block_out_channels"])
    for key in ("down_block_types", "up_block_types", *per_block):
        v = cfg.get(key)
        if isinstance(v, list) and len(v) != n:
            raise ModelError(f"{path}: {key!r} has {len(v)} entries, block_out_channels {n}")
    groups = cfg.get("norm_num_groups", 32)
    if any(c % groups for c in cfg["block_out_channels"]):
        raise ModelError(f"{path}: norm_num_groups {groups} does not divide block_out_channels {cfg['block_out_channels']}")


def _check_text_config(path: str, cfg: dict) -> None:
    inner = cfg.get("text_config", cfg)
    if not isinstance(inner, dict):
        raise ModelError(f"{path}: 'text_config' is not an object; {CONFIG_ADVICE}")
    _check_config(path, inner, _TEXT_KEYS)
    d, h = inner.get("hidden_size", 768), inner.get("num_attention_heads", 12)
    if d % h:
        raise ModelError(f"{path}: hidden_size {d} is not a multiple of num_attention_heads {h}")


def _check_scheduler(path: str, cfg: dict) -> None:
    _check_config(path, cfg, _SCHEDULER_KEYS)
    if cfg.get("beta_start", 0.0001) >= cfg.get("beta_end", 0.02):
        raise ModelError(f"{path}: beta_start {cfg.get('beta_start', 0.0001)} is not below beta_end {cfg.get('beta_end', 0.02)}")


def model_family(folder: str) -> tuple[str, dict]:
    """("sdxl" for an SDXL base folder, else "sd"; its model_index.json, {} if it has none).
    model_index.json names the pipeline (a folder without one is SDXL if it has
    text_encoder_2/); a refiner-only folder or one missing a component is a ModelError."""
    index_path = os.path.join(folder, "model_index.json")
    index = _read_json(index_path) if os.path.isfile(index_path) else {}
    name = index.get("_class_name", "")
    xl = name in XL_PIPELINES or (not name and os.path.isdir(os.path.join(folder, "text_encoder_2")))
    if not xl:
        if os.path.isdir(os.path.join(folder, "text_encoder_2")) or index.get("text_encoder_2"):
            raise ModelError(f"{index_path} names {name or 'no pipeline'} but the folder has text_encoder_2/: an SDXL folder's model_index.json names StableDiffusionXLPipeline")
        return "sd", index
    if index.get("requires_aesthetics_score") or index.get("text_encoder", ["", ""])[0] is None:
        raise ModelError(f"{folder} is an SDXL refiner (no text_encoder/, aesthetic-score conditioning); invert with the base model, e.g. stabilityai/stable-diffusion-xl-base-1.0")
    missing = [k for k in (*XL_WEIGHT_FILES, "tokenizer", "tokenizer_2", "scheduler") if not os.path.isdir(os.path.join(folder, k))]
    if missing:
        raise ModelError(f"{folder} is an SDXL folder without {', '.join(m + '/' for m in missing)}; download the whole model again")
    return "sdxl", index


def weight_files(family: str) -> dict:
    """Component folder -> weight file base name, for a model family ("sd" or "sdxl")."""
    return XL_WEIGHT_FILES if family == "sdxl" else WEIGHT_FILES


def read_configs(folder: str, family: str = "sd") -> tuple[dict, dict]:
    """The model configs (one per component of `weight_files(family)`) and the scheduler config
    of a folder, each checked."""
    path = lambda name: os.path.join(folder, name)
    configs = {k: _read_json(path(f"{k}/config.json")) for k in weight_files(family)}
    _check_config(path("unet/config.json"), configs["unet"], _UNET_KEYS)
    _check_blocks(path("unet/config.json"), configs["unet"], ("layers_per_block", "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "cross_attention_dim"))
    _check_config(path("vae/config.json"), configs["vae"], _VAE_KEYS)
    _check_blocks(path("vae/config.json"), configs["vae"], ())
    for k in configs:
        if k.startswith("text_encoder"):
            _check_text_config(path(f"{k}/config.json"), configs[k])
    sched = _read_json(path("scheduler/scheduler_config.json"))
    _check_scheduler(path("scheduler/scheduler_config.json"), sched)
    return configs, sched


def check_folder(folder: str, model: str) -> None:
    """A clear error for a folder that is not a diffusers SD folder at all."""
    if any(os.path.isdir(os.path.join(folder, k)) for k in (*WEIGHT_FILES, "tokenizer", "scheduler")):
        return
    hint = ""
    if os.path.isfile(os.path.join(folder, "config.json")):
        hint = " (it looks like one component of a model: pass the folder above it)"
    raise ModelError(f"{model} is not a diffusers Stable Diffusion folder: it has no unet/, vae/, text_encoder/, tokenizer/ or scheduler/{hint}")
