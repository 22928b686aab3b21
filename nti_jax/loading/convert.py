"""diffusers / transformers safetensors <-> Flax param trees, in plain numpy.

Flax parameter paths joined by "." are the torch state-dict names (the models name their
submodules that way), so the mapping is total and explicit: every Flax leaf has exactly one
torch key and layout transform, and `to_torch_layout` is its exact inverse.

`read_safetensors` checks every field of a file's header before it trusts a byte of it (the
safetensors library does too, but reads bf16 into numpy only in recent releases and raises
non-library errors for dtypes numpy lacks), so a damaged file is one `ModelError` line.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Any, Callable, Iterable, Mapping, Optional

import ml_dtypes
import numpy as np

from nti_jax.errors import ModelError

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
# The safetensors library refuses headers over 100 MB; real ones are well under 1 MB.
HEADER_LIMIT = 100 * 1000 * 1000
_LFS_POINTER = b"version https://git-lfs"
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Buffers some exporters write that are not parameters.
_IGNORED = ("text_model.embeddings.position_ids",)
# Attention names of old VAE checkpoints, renamed on load as diffusers does.
_ALIASES = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


class _Damaged(Exception):
    """What is wrong with a file, before the path and the advice are added."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Damaged(f"the header names {k!r} twice")
        out[k] = v
    return out


def _parse_header(raw: bytes, size: int) -> tuple[dict, dict, int]:
    """Checks the header of a file of `size` bytes; returns (tensor entries, metadata, data start)."""
    if size == 0:
        raise _Damaged("the file is empty (0 bytes)")
    if raw[: len(_LFS_POINTER)] == _LFS_POINTER:
        raise _Damaged("it is a Git LFS pointer, not the weights (cloned without git-lfs: run `git lfs pull`)")
    if size < 8:
        raise _Damaged(f"the file is {size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > HEADER_LIMIT:
        raise _Damaged(f"its header length field says {n} bytes, over the {HEADER_LIMIT // 10**6} MB limit")
    if 8 + n > size:
        raise _Damaged(f"its header length field says {n} bytes but only {size - 8} follow: the file is truncated")
    try:
        header = json.loads(bytes(raw[8 : 8 + n]).decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as e:
        raise _Damaged(f"its header is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _Damaged(f"its header is not valid JSON ({e.msg} at byte {e.pos})") from None
    if not isinstance(header, dict):
        raise _Damaged(f"its header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Damaged("its __metadata__ is not an object of strings")
    return header, meta, 8 + n


def _check_tensors(header: dict, data_len: int) -> None:
    """Each entry's dtype, shape and size; together the offsets tile [0, data_len) exactly."""
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise _Damaged(f"tensor {name!r} lacks dtype, shape or data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise _Damaged(f"tensor {name!r} has unknown dtype {dtype!r} (known: {', '.join(_ST_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _Damaged(f"tensor {name!r} has shape {shape!r}, not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise _Damaged(f"tensor {name!r} has data_offsets {offsets!r}, not two integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise _Damaged(f"tensor {name!r} has data_offsets {offsets}, not 0 <= begin <= end")
        need = math.prod(shape) * np.dtype(_ST_DTYPES[dtype]).itemsize
        if end - begin != need:
            raise _Damaged(f"tensor {name!r} of shape {shape} {dtype} needs {need} bytes but data_offsets {offsets} hold {end - begin}")
        spans.append((begin, end, name))
    spans.sort()
    last = max((e for _, e, _ in spans), default=0)
    if last > data_len:
        raise _Damaged(f"its tensors need {last} bytes of data but the file holds {data_len} ({last - data_len} missing): the file is truncated")
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise _Damaged(f"tensors {prev!r} and {name!r} overlap (bytes {begin}..{pos})")
        if begin > pos:
            raise _Damaged(f"bytes {pos}..{begin} before tensor {name!r} belong to no tensor")
        pos, prev = end, name
    if pos != data_len:
        raise _Damaged(f"its last {data_len - pos} bytes belong to no tensor")


def read_safetensors(path: str, *, advice: str = "") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a .safetensors file with numpy (bf16 via ml_dtypes, memory-mapped); returns
    (tensors, metadata). Every header field is checked first: a damaged file is a one-line
    ModelError naming the file and what is wrong, followed by `advice` (what to do)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except OSError as e:
        raise ModelError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header, meta, start = _parse_header(raw, size)
        _check_tensors(header, size - start)
    except _Damaged as e:
        tail = f"; {advice}" if advice else ""
        raise ModelError(f"{path} is not a valid safetensors file: {e}{tail}") from None
    out = {}
    for name, info in header.items():
        dt = np.dtype(_ST_DTYPES[info["dtype"]])
        begin, _ = info["data_offsets"]
        count = math.prod(info["shape"])
        out[name] = np.frombuffer(raw, dtype=dt, count=count, offset=start + begin).reshape(info["shape"])
    return out, dict(meta)


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


def from_torch_layout(state: Mapping[str, np.ndarray], template: Mapping, *, dtype=np.float32, what: str = "model",
                      place: Optional[Callable[[np.ndarray], Any]] = None) -> dict:
    """Map a torch state dict onto a Flax param tree shaped like `template` (shapes or arrays).
    `place` (e.g. `jnp.asarray`) takes each converted tensor as it is made, so a large model is
    never held twice on the host (SDXL's UNet is 10.3 GB in float32).

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
        out[path] = w.astype(dtype) if place is None else place(w.astype(dtype))
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


def redownload_advice(path: str) -> str:
    """What to do about a damaged downloaded file (a Hugging Face cache entry links to its blob)."""
    real = os.path.realpath(path)
    if real != os.path.abspath(path):
        return f"delete it and the file it links to (in the Hugging Face cache: {real}) and download it again"
    return "delete it and download it again"


def _read_index(index: str) -> list[str]:
    """The shard files a `*.safetensors.index.json` names (plain names inside its folder)."""
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{index} is not a readable JSON file ({e}); {redownload_advice(index)}") from None
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
        raise ModelError(f"{index} has no weight_map object of tensor name -> shard file; {redownload_advice(index)}")
    shards = sorted(set(wmap.values()))
    bad = [s for s in shards if os.path.basename(s) != s or s in ("", ".", "..")]
    if bad:
        raise ModelError(f"{index}: weight_map names shard {bad[0]!r}, not a file name in its folder")
    return shards


def find_weights(folder: str, base: str) -> list[str]:
    """The safetensors file(s) of a component folder: plain, `fp16` variant, or sharded."""
    for name in (f"{base}.safetensors", f"{base}.fp16.safetensors"):
        if os.path.isfile(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    for name in (f"{base}.safetensors.index.json", f"{base}.safetensors.index.fp16.json"):
        index = os.path.join(folder, name)
        if os.path.isfile(index):
            return [os.path.join(folder, s) for s in _read_index(index)]
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
                raise ModelError(f"weight shard {path} is missing; download it again")
            state.update(read_safetensors(path, advice=redownload_advice(path))[0])
        return state
    pickles = sorted(f for f in os.listdir(folder) if f.endswith(_PICKLES))
    if not pickles:
        raise ModelError(f"no {base}.safetensors (or fp16 variant) in {folder}")
    if not allow_pickle:
        raise ModelError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); pickles can run code when "
            "loaded: convert them to safetensors, or pass allow_pickle=True if you trust the source"
        )
    return _load_pickles(folder, pickles)


def _load_pickles(folder: str, names: list[str]) -> dict[str, np.ndarray]:
    try:
        import torch  # only on this explicit opt-in path
    except ImportError:
        raise ModelError(f"{folder} holds only pickled weights, and reading them needs torch, which is not installed") from None
    state: dict[str, np.ndarray] = {}
    for name in names:
        path = os.path.join(folder, name)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a damaged pickle fails in many ways (EOFError, UnpicklingError, RuntimeError...)
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelError(f"cannot read {path} ({type(e).__name__}: {first}); {redownload_advice(path)}") from None
        if not isinstance(loaded, Mapping):
            raise ModelError(f"{path} holds a {type(loaded).__name__}, not a state dict")
        loaded = loaded.get("state_dict", loaded)
        state.update({k: v.float().numpy() for k, v in loaded.items() if hasattr(v, "numpy")})
    return state
