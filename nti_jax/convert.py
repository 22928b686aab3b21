"""diffusers / transformers safetensors <-> Flax param trees, in plain numpy.

Flax parameter paths joined by "." are the torch state-dict names (the models name their
submodules that way), so the mapping is total and explicit: every Flax leaf has exactly one
torch key and layout transform, and `to_torch_layout` is its exact inverse.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from .errors import ModelError

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Buffers some exporters write that are not parameters.
_IGNORED = ("text_model.embeddings.position_ids",)
# Attention names of old VAE checkpoints, renamed on load as diffusers does.
_ALIASES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a .safetensors file with numpy (bf16 via ml_dtypes); returns (tensors, metadata)."""
    with open(path, "rb") as f:
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.path.getsize(path) else b""
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
    except (struct.error, ValueError) as e:
        raise ModelError(f"{path} is not a safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + n
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _ST_DTYPES:
            raise ModelError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        arr = np.frombuffer(raw, dtype=dt, count=(end - start) // dt.itemsize, offset=base + start)
        out[name] = arr.reshape(info["shape"])
    return out, meta


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
    out: dict = {}
    for path, v in flat.items():
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = v
    return out


def torch_name(path: tuple) -> str:
    """The torch state-dict name of a Flax leaf path."""
    return ".".join(path[:-1]) + "." + _LEAF_TO_TORCH[path[-1]]


def _to_flax_layout(leaf: str, w: np.ndarray, shape: tuple) -> np.ndarray:
    if leaf == "kernel" and len(shape) == 4:
        return np.transpose(w, (2, 3, 1, 0))
    if leaf == "kernel" and len(shape) == 2:
        if w.ndim == 4 and w.shape[2:] == (1, 1):  # a 1x1 conv stored where a Linear is used
            w = w[:, :, 0, 0]
        return w.T
    return w


def _summary(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def from_torch_layout(state: Mapping[str, np.ndarray], template: Mapping, *, dtype=np.float32, what: str = "model") -> dict:
    """Map a torch state dict onto a Flax param tree shaped like `template` (shapes or arrays).

    Raises ModelError listing every missing, unexpected or mis-shaped key.
    """
    state = dict(state)
    roots = set(template)
    if len(roots) == 1 and not any(k.startswith(f"{next(iter(roots))}.") for k in state):
        # transformers 5 saves CLIPTextModel without its `text_model.` prefix; 4.x with it.
        state = {f"{next(iter(roots))}.{k}": v for k, v in state.items()}
    for name in list(state):
        for old, new in _ALIASES.items():
            if old in name and "attentions" in name:
                state[name.replace(old, new)] = state.pop(name)
                break
    wanted = {torch_name(p): p for p in flatten(template)}
    missing = set(wanted) - set(state)
    unexpected = set(state) - set(wanted) - set(_IGNORED)
    errors = []
    if missing:
        errors.append(f"missing keys: {_summary(missing)}")
    if unexpected:
        errors.append(f"unexpected keys: {_summary(unexpected)}")
    flat_t = flatten(template)
    out, bad = {}, []
    for name, path in wanted.items():
        if name not in state:
            continue
        shape = tuple(flat_t[path].shape)
        w = _to_flax_layout(path[-1], np.asarray(state[name]), shape)
        if w.shape != shape:
            bad.append(f"{name} {tuple(state[name].shape)} (expected {shape} in Flax layout)")
            continue
        out[path] = w.astype(dtype)
    if bad:
        errors.append(f"wrong shapes: {_summary(bad, 4)}")
    if errors:
        raise ModelError(f"{what} weights do not match its config: " + "; ".join(errors))
    return unflatten(out)


def to_torch_layout(params: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """The exact inverse of `from_torch_layout`: Flax params -> torch-named, torch-layout arrays."""
    out = {}
    for path, w in flatten(params).items():
        w = np.asarray(w)
        if path[-1] == "kernel":
            w = np.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else w.T
        out[torch_name(path)] = np.ascontiguousarray(w if dtype is None else w.astype(dtype))
    return out


_PICKLES = (".bin", ".ckpt", ".pt", ".pth")


def find_weights(folder: str, base: str) -> list[str]:
    """The safetensors file(s) of a component folder: plain, `fp16` variant, or sharded."""
    for name in (f"{base}.safetensors", f"{base}.fp16.safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    for name in (f"{base}.safetensors.index.json", f"{base}.safetensors.index.fp16.json"):
        index = os.path.join(folder, name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    return []


def load_state(folder: str, base: str, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All tensors of a component folder. Pickled checkpoints only with `allow_pickle=True`."""
    if not os.path.isdir(folder):
        raise ModelError(f"model component folder {folder} does not exist")
    files = find_weights(folder, base)
    if files:
        state: dict[str, np.ndarray] = {}
        for path in files:
            if not os.path.isfile(path):
                raise ModelError(f"weight shard {path} is missing")
            state.update(read_safetensors(path)[0])
        return state
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(_PICKLES))
    if not pickles:
        raise ModelError(f"no {base}.safetensors (or fp16 variant) in {folder}")
    if not allow_pickle:
        raise ModelError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); pickles can run code when "
            "loaded: convert them to safetensors, or pass allow_pickle=True if you trust the source"
        )
    import torch  # only on this explicit opt-in path

    state = {}
    for name in pickles:
        loaded = torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False)
        loaded = loaded.get("state_dict", loaded)
        state.update({k: v.float().numpy() for k, v in loaded.items() if hasattr(v, "numpy")})
    return state
