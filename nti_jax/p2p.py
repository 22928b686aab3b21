"""Prompt-to-Prompt editing of an inversion, compiled: controllers as data, attention maps.

A controller spec (`Replace`, `Refine`, `Reweight`, optionally with a `LocalBlend`) is turned
into arrays (token mappers, per-step windows, equalizers) plus static settings, so one jitted
sampling loop serves every prompt batch of the same shape. As in the authors' notebook, edits
touch only the conditional half of the CFG batch: target rows take the source row's maps.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from . import seq_aligner as sa
from .errors import NtiError, PromptError
from .inversion import Inversion, inversion_schedule
from .models import AttentionPlace
from .pipeline import Pipeline
from .sampling import cfg_eps
from .schedule import denoise_step

Steps = Union[float, tuple, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class LocalBlend:
    """Keep pixels outside the edited words' attention: words per prompt, source first."""

    words: Sequence[Sequence[str]]
    threshold: float = 0.3
    start: float = 0.2


@dataclasses.dataclass(frozen=True)
class Replace:
    """Word swap (same word count): target cross-attention = source maps through a token mapper."""

    cross_replace_steps: Steps = 0.8
    self_replace_steps: Union[float, tuple] = 0.4
    blend: Optional[LocalBlend] = None
    max_self_size: Optional[int] = None  # largest self-attn side edited; default latent/2


@dataclasses.dataclass(frozen=True)
class Refine(Replace):
    """Added/removed words: aligned tokens take the source maps, new tokens keep their own."""


@dataclasses.dataclass(frozen=True)
class Reweight(Replace):
    """Scale chosen tokens' cross-attention (e.g. {"red": 3.0}), alone or on top of `base`."""

    equalizer: Mapping[str, float] = dataclasses.field(default_factory=dict)
    base: Optional[Replace] = None


Controller = Union[Replace, Refine, Reweight]


@dataclasses.dataclass(frozen=True)
class _Static:
    """What changes the compiled program."""

    kind: str  # "replace" | "refine"
    max_self_queries: int
    blend_size: int
    blend_start: int  # first step index at which the blend applies (num_steps if none)
    reweight: bool
    direct: bool


@struct.dataclass
class _Arrays:
    cross_alpha: jax.Array  # (T, n, L) 1 where a target token takes the source maps at step i
    self_steps: jax.Array  # (T,) bool
    mapper: jax.Array  # replace: (n, L, L) float; refine: (n, L) int
    refine_alphas: jax.Array  # (n, L) refine only (ones otherwise)
    equalizer: jax.Array  # (n, L)
    blend_alpha: jax.Array  # (R, L)
    blend_threshold: jax.Array  # ()


def _window(steps, num_steps: int) -> tuple[int, int]:
    lo, hi = (0.0, float(steps)) if isinstance(steps, (int, float)) else map(float, steps)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"a step window must satisfy 0 <= start <= end <= 1, got {steps!r}")
    return int(lo * num_steps), int(hi * num_steps)


def _cross_alpha(cross: Steps, targets: Sequence[str], tok, num_steps: int, max_len: int) -> np.ndarray:
    """The original's get_time_words_attention_alpha: (T, n, L), per-word windows allowed."""
    spec = dict(cross) if isinstance(cross, Mapping) else {"default_": cross}
    alpha = np.zeros((num_steps + 1, len(targets), max_len), np.float32)
    lo, hi = _window(spec.pop("default_", 1.0), num_steps + 1)
    alpha[lo:hi] = 1.0
    for word, steps in spec.items():
        lo, hi = _window(steps, num_steps + 1)
        found = False
        for n, target in enumerate(targets):
            try:
                idx = sa.word_token_indices(target, word, tok)
            except PromptError:
                continue
            found = True
            alpha[:, n, idx] = 0.0
            alpha[lo:hi, n, idx] = 1.0
        if not found:
            raise PromptError(f"cross_replace_steps word {word!r} is in none of the target prompts {list(targets)}")
    return alpha[:num_steps]


def auto_controller(source: str, targets: Sequence[str]) -> Controller:
    """Replace when every target has the source's word count, else Refine (defaults 0.8 / 0.4)."""
    same = all(len(t.split()) == len(source.split()) for t in targets)
    return Replace() if same else Refine()


SETTINGS_KEYS = ("kind", "cross_replace_steps", "self_replace_steps", "equalizer", "blend_words",
                 "blend_threshold", "blend_start", "max_self_size")


def controller_from_settings(source: str, targets: Sequence[str], settings: Mapping[str, Any]) -> Controller:
    """A controller from plain settings (CLI manifests): kind ("auto"|"replace"|"refine"),
    cross_replace_steps, self_replace_steps, equalizer {word: factor}, blend_words (one word list
    per prompt, source first), blend_threshold, blend_start, max_self_size."""
    unknown = set(settings) - set(SETTINGS_KEYS) - {"prompt"}
    if unknown:
        raise ValueError(f"unknown edit settings: {', '.join(sorted(unknown))}")
    kind = settings.get("kind", "auto")
    if kind not in ("auto", "replace", "refine"):
        raise ValueError(f"edit kind must be auto, replace or refine; got {kind!r}")
    base = auto_controller(source, targets) if kind == "auto" else (Replace() if kind == "replace" else Refine())
    blend = None
    if settings.get("blend_words"):
        blend = LocalBlend(settings["blend_words"], settings.get("blend_threshold", 0.3), settings.get("blend_start", 0.2))
    common = dict(
        cross_replace_steps=settings.get("cross_replace_steps", 0.8),
        self_replace_steps=settings.get("self_replace_steps", 0.4),
        blend=blend,
        max_self_size=settings.get("max_self_size"),
    )
    base = type(base)(**common)
    if settings.get("equalizer"):
        return Reweight(**common, equalizer=dict(settings["equalizer"]), base=base)
    return base


def _cross_sizes(pipe: Pipeline, latent: int) -> list[int]:
    cfg = pipe.unet.config
    return sorted({latent // 2**i for i, k in enumerate(cfg.down_block_types) if k.startswith("CrossAttn")})


def compile_controller(
    pipe: Pipeline, controller: Controller, source: str, targets: Sequence[str], num_steps: int, latent: int, direct: bool
) -> tuple[_Static, _Arrays]:
    """Arrays and static settings of a controller for prompts [source, *targets]."""
    tok, L = pipe.tokenizer, pipe.max_tokens
    prompts = [source, *targets]
    for p in prompts:
        sa.check_length(p, tok, L)
    n = len(targets)
    geometry = controller.base if isinstance(controller, Reweight) and controller.base is not None else controller
    kind = "refine" if isinstance(geometry, Refine) else "replace"
    if kind == "replace":
        mapper = sa.replacement_mapper(source, targets, tok, L)
        refine_alphas = np.ones((n, L), np.float32)
    else:
        mapper, refine_alphas = sa.refinement_mapper(source, targets, tok, L)
    eq = np.ones((n, L), np.float32)
    if isinstance(controller, Reweight):
        eq = np.stack([sa.equalizer(t, controller.equalizer, tok, L) for t in targets])
    blend = controller.blend
    blend_alpha = np.zeros((n + 1, L), np.float32)
    if blend is not None:
        if len(blend.words) != n + 1:
            raise PromptError(f"LocalBlend needs one word list per prompt (source first): {n + 1}, got {len(blend.words)}")
        for r, (p, words) in enumerate(zip(prompts, blend.words)):
            for w in [words] if isinstance(words, str) else words:
                blend_alpha[r, sa.word_token_indices(p, w, tok)] = 1.0
    lo, hi = _window(controller.self_replace_steps, num_steps)
    self_steps = (np.arange(num_steps) >= lo) & (np.arange(num_steps) < hi)
    max_self = controller.max_self_size or latent // 2
    static = _Static(
        kind=kind,
        max_self_queries=int(max_self) ** 2,
        blend_size=_cross_sizes(pipe, latent)[0],
        blend_start=int(blend.start * num_steps) if blend is not None else num_steps,
        reweight=isinstance(controller, Reweight),
        direct=direct,
    )
    arrays = _Arrays(
        cross_alpha=jnp.asarray(_cross_alpha(controller.cross_replace_steps, targets, tok, num_steps, L)),
        self_steps=jnp.asarray(self_steps),
        mapper=jnp.asarray(mapper),
        refine_alphas=jnp.asarray(refine_alphas),
        equalizer=jnp.asarray(eq),
        blend_alpha=jnp.asarray(blend_alpha),
        blend_threshold=jnp.float32(blend.threshold if blend is not None else 0.0),
    )
    return static, arrays


def _edit_cond(static: _Static, arr: _Arrays, k, probs: jax.Array, place: AttentionPlace) -> jax.Array:
    """Edit the conditional rows (R, heads, Lq, Lk): row 0 is the source, rows 1.. the targets."""
    base, tgt = probs[0], probs[1:]
    if place.kind == "cross":
        if static.kind == "replace":
            new = jnp.einsum("hqw,nwk->nhqk", base, arr.mapper)
        else:
            new = jnp.moveaxis(base[:, :, arr.mapper], 2, 0)
            a = arr.refine_alphas[:, None, None, :]
            new = new * a + tgt * (1.0 - a)
        if static.reweight:
            new = new * arr.equalizer[:, None, None, :]
        a = arr.cross_alpha[k][:, None, None, :]
        tgt = new * a + tgt * (1.0 - a)
    elif place.size[0] * place.size[1] <= static.max_self_queries:
        tgt = jnp.where(arr.self_steps[k], jnp.broadcast_to(base, tgt.shape), tgt)
    return jnp.concatenate([probs[:1], tgt])


def _blend_mask(static: _Static, arr: _Arrays, maps: jax.Array, latent: int) -> jax.Array:
    """LocalBlend's mask (R, h, w, 1) from accumulated cross maps (R, s, s, L)."""
    m = jnp.sum(maps * arr.blend_alpha[:, None, None, :], axis=-1)
    m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1)))
    f = latent // static.blend_size
    m = jnp.repeat(jnp.repeat(m, f, axis=1), f, axis=2)
    m = m / jnp.max(m, axis=(1, 2), keepdims=True)
    mask = m > arr.blend_threshold
    return (mask[:1] | mask)[..., None]


@partial(jax.jit, static_argnames=("unet", "prediction_type", "static", "edit"))
def _edit_program(unet, params, prediction_type, static: _Static, edit: bool, arr, sched, x_T, cond, phi, pivots, guidance):
    """Batched CFG sampling of R rows from one x_T with the controller; returns (latents, maps)."""
    rows = cond.shape[0]
    latent = x_T.shape[1]
    n = sched.timesteps.shape[0]
    s = static.blend_size
    unet_fn = lambda x, t, c, hook=None: unet.apply({"params": params}, x, t, c, hook)

    def step(carry, k):
        x, store = carry
        collected = []

        def hook(probs, place):
            u, c = probs[:rows], probs[rows:]
            if place.kind == "cross" and place.size == (s, s) and place.block != "mid":
                collected.append(jnp.mean(c, axis=1).reshape(rows, s, s, -1))
            if edit:
                c = _edit_cond(static, arr, k, c, place)
            return jnp.concatenate([u, c])

        t, a_t, a_prev = sched.timesteps[k], sched.alpha_t[k], sched.alpha_prev[k]
        uncond = jnp.broadcast_to(phi[k], cond.shape)
        x = denoise_step(cfg_eps(unet_fn, prediction_type, x, t, a_t, cond, uncond, guidance, hook), x, a_t, a_prev)
        store = store + sum(collected) / len(collected)
        if edit and static.blend_start < n:
            blended = x[:1] + _blend_mask(static, arr, store, latent) * (x - x[:1])
            x = jnp.where(k >= static.blend_start, blended, x)
        if static.direct:
            x = x.at[0].set(pivots[n - 1 - k])
        return (x, store), None

    x0 = jnp.broadcast_to(x_T, (rows,) + x_T.shape[1:])
    store0 = jnp.zeros((rows, s, s, cond.shape[1]), jnp.float32)
    (x, store), _ = jax.lax.scan(step, (x0, store0), jnp.arange(n))
    return x, store / n


def _single(inv: Inversion) -> Inversion:
    if inv.num_images != 1:
        raise NtiError(f"edit one image at a time: this inversion holds {inv.num_images} (use inv[i])")
    return inv


def _run(pipe: Pipeline, inv: Inversion, targets: Sequence[str], controller: Optional[Controller], edit: bool):
    inv = _single(inv)
    if isinstance(targets, str):
        targets = [targets]
    source = inv.prompts[0]
    if edit and not targets:
        raise PromptError("give at least one target prompt to edit with")
    for t in targets:
        if not isinstance(t, str) or not t.strip():
            raise PromptError(f"target prompts must be non-empty captions, got {t!r}")
    controller = controller or auto_controller(source, targets)
    sched = inversion_schedule(pipe, inv)
    n, latent = sched.timesteps.shape[0], inv.x_T.shape[1]
    static, arr = compile_controller(pipe, controller, source, targets, n, latent, inv.method == "direct")
    cond = jnp.concatenate([inv.cond_embeddings, pipe.encode_prompt(list(targets))]) if targets else inv.cond_embeddings
    settings = inv.schedule()
    return _edit_program(
        pipe.unet,
        pipe.params["unet"],
        settings.get("prediction_type", "epsilon"),
        static,
        edit,
        arr,
        sched,
        inv.x_T,
        cond,
        inv.null_embeddings[0],
        inv.pivots[0],
        jnp.float32(settings.get("guidance_scale", 7.5)),
    )


def edit(pipe: Pipeline, inv: Inversion, target_prompts: Sequence[str], *, controller: Optional[Controller] = None) -> np.ndarray:
    """Edit an inverted image: float32 (1 + n, H, W, 3) in [0, 1], the source reconstruction
    first, then one image per target prompt, from one compiled batched sampling loop."""
    latents, _ = _run(pipe, inv, target_prompts, controller, edit=True)
    return np.asarray(pipe.decode_latents(latents))


def attention_maps(pipe: Pipeline, inv: Inversion, prompts: Sequence[str] = (), *, controller: Optional[Controller] = None) -> np.ndarray:
    """Per-token cross-attention maps (R, s, s, 77) of the conditional rows, averaged over heads,
    steps and the down/up layers at the smallest non-mid cross-attention resolution s (16 for SD
    at 512 px, as the authors' notebook); rows: the source, then `prompts` when given (edited
    by `controller`, or the automatic one)."""
    _, maps = _run(pipe, inv, list(prompts), controller, edit=bool(prompts))
    return np.asarray(maps)


def token_labels(pipe: Pipeline, prompt: str) -> list[str]:
    """The decoded tokens of a prompt, bos first, without padding."""
    ids = pipe.tokenizer(prompt)["input_ids"]
    return [pipe.tokenizer.decode([i]) for i in ids]


def save_attention_grid(image, maps: np.ndarray, labels: Sequence[str], path: str, cell: int = 96) -> None:
    """One PNG: each token's map as a heat map over the image, the token written under it."""
    from PIL import Image, ImageDraw

    from .io import atomic_path, to_uint8

    img = np.asarray(image)
    img = img if img.dtype == np.uint8 else to_uint8(img)
    base = Image.fromarray(img).resize((cell, cell))
    tiles = []
    for k, label in enumerate(labels):
        m = maps[..., k]
        m = (m - m.min()) / max(float(m.max() - m.min()), 1e-12)
        heat = np.stack([m, 0.2 * np.ones_like(m), 1.0 - m], axis=-1)
        heat = Image.fromarray(to_uint8(heat)).resize((cell, cell), Image.BILINEAR)
        tile = Image.new("RGB", (cell, cell + 16), "white")
        tile.paste(Image.blend(base, heat, 0.55), (0, 0))
        ImageDraw.Draw(tile).text((4, cell + 2), label[:14], fill="black")
        tiles.append(tile)
    grid = Image.new("RGB", (cell * len(tiles), cell + 16), "white")
    for i, tile in enumerate(tiles):
        grid.paste(tile, (i * cell, 0))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
