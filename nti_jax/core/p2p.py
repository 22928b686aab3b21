"""Prompt-to-Prompt editing of an inversion, compiled: controllers as data, attention maps.

A controller spec (`Replace`, `Refine`, `Reweight`, optionally with a `LocalBlend`, plus the
edit-time guidance: single-branch and/or ProxEdit's `Proximal`) is turned into arrays (token
mappers, per-step windows, equalizers) plus static settings, so one jitted sampling loop serves
every prompt batch of the same shape. As in the authors' code (google/prompt-to-prompt,
``null_text_w_ptp.ipynb``), edits touch only the conditional half of the CFG batch, the stored
maps (LocalBlend, `attention_maps`) are the edited ones, and a direct inversion's source row is
pinned before the blend (PnPInversion). A null-text inversion's source row is pinned there too, to
the optimisation's own latents (`Inversion.latents`): in float32 that is what it samples anyway, in
bf16 it keeps the row off the batch effect (docs/departures.md). `benchmarks/p2p_reference.py` is
the PyTorch oracle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from nti_jax.core import seq_aligner as sa
from nti_jax.core.controllers import (
    Controller,
    Refine,
    Reweight,
    Steps,
    Words,
    auto_controller,
    window,
)
from nti_jax.loading import conditioning as cnd
from nti_jax.loading.conditioning import Cond
from nti_jax.errors import PromptError
from nti_jax.core.inversion import Inversion
from nti_jax.models import AttentionPlace
from nti_jax.loading.pipeline import Pipeline
from nti_jax.core.sampling import Denoiser, guide
from nti_jax.core.schedule import Schedule, denoise_step


@dataclasses.dataclass(frozen=True)
class _Static:
    """What changes the compiled program."""

    kind: str  # "replace" | "refine"
    max_self_queries: int
    blend_size: int
    blend_start: int  # first step index at which the blend applies (num_steps if none)
    reweight: bool
    pinned: bool  # the source row follows `EditInputs.path` (direct: the pivots; null-text: its latents)
    substruct: bool = False
    single_branch: bool = False
    prox: str = ""  # "" | "l0" | "l1"
    dilate: int = 0


@struct.dataclass
class _Arrays:
    cross_alpha: jax.Array  # (T, n, L) 1 where a target token takes the source maps at step i
    self_steps: jax.Array  # (T,) bool
    mapper: jax.Array  # replace: (n, L, L) float; refine: (n, L) int
    refine_alphas: jax.Array  # (n, L) refine only (ones otherwise)
    equalizer: jax.Array  # (n, L)
    blend_alpha: jax.Array  # (R, L)
    blend_threshold: jax.Array  # ()
    sub_alpha: jax.Array = None  # (R, L) substruct words
    sub_threshold: jax.Array = None  # ()
    prox: jax.Array = None  # (3,) quantile, recon_lr, recon_t


def _window(steps, num_steps: int) -> tuple[int, int]:
    lo, hi = window(steps)
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


def _cross_sizes(pipe: Pipeline, latent: int) -> list[int]:
    cfg = pipe.unet.config
    return sorted({latent // 2**i for i, k in enumerate(cfg.down_block_types) if k.startswith("CrossAttn")})


def _word_alpha(prompts: Sequence[str], words: Words, tok, L: int, what: str) -> np.ndarray:
    """(R, L) ones at the tokens of each prompt's words (a LocalBlend word list per prompt)."""
    if len(words) != len(prompts):
        raise PromptError(f"LocalBlend {what} needs one word list per prompt (source first): {len(prompts)}, got {len(words)}")
    alpha = np.zeros((len(prompts), L), np.float32)
    for r, (p, ws) in enumerate(zip(prompts, words)):
        for w in [ws] if isinstance(ws, str) else ws:
            alpha[r, sa.word_token_indices(p, w, tok)] = 1.0
    return alpha


def _reweight_chain(controller: Controller) -> tuple[Controller | None, list[Reweight]]:
    """(the geometry: the innermost non-Reweight base, None if there is none; the Reweights, outermost
    first), as the original's AttentionReweight calls its prev_controller's replace_cross_attention."""
    chain = []
    while isinstance(controller, Reweight):
        chain.append(controller)
        controller = controller.base
    return controller, chain


def _mapper(pipe: Pipeline, controller: Controller, source: str, targets: Sequence[str]) -> tuple[str, np.ndarray, np.ndarray]:
    """(kind, mapper, refine_alphas) of the controller's geometry."""
    tok, L, n = pipe.tokenizer, pipe.max_tokens, len(targets)
    geometry, _ = _reweight_chain(controller)
    if geometry is None:  # the original scales the source maps position by position
        return "replace", np.broadcast_to(np.eye(L, dtype=np.float32), (n, L, L)), np.ones((n, L), np.float32)
    if isinstance(geometry, Refine):
        return ("refine",) + sa.refinement_mapper(source, targets, tok, L)
    if geometry.mapping not in ("original", "aligned"):
        raise ValueError(f"Replace mapping must be 'original' or 'aligned', got {geometry.mapping!r}")
    mapper = sa.replacement_mapper(source, targets, tok, L, upstream_tail=geometry.mapping == "original")
    return "replace", mapper, np.ones((n, L), np.float32)


def _controller_words(controller: Controller, n_prompts: int) -> list[tuple[int, str]]:
    """(prompt index, word) for every word the controller names (blend, equalizer, per-word steps)."""
    out = []
    blend = controller.blend
    for lists in (blend.words, blend.substruct_words or []) if blend is not None else ():
        for r, words in enumerate(lists):
            out += [(r, w) for w in ([words] if isinstance(words, str) else words)]
    named = {w: None for rw in _reweight_chain(controller)[1] for w in rw.equalizer}
    if isinstance(controller.cross_replace_steps, Mapping):
        named.update({w: None for w in controller.cross_replace_steps if w != "default_"})
    return out + [(r, w) for w in named for r in range(1, n_prompts)]


def _within_limit(pipe: Pipeline, controller: Controller, source: str, targets: list[str]) -> tuple[str, list[str]]:
    """The prompts as the model reads them: a prompt over the token limit is cut as `tokenize` cuts
    it (the inversion was made from the cut caption); a word the controller names that only the cut
    part held is a PromptError naming it."""
    prompts = [source, *targets]
    cut = [pipe.truncation(p) for p in prompts]
    if not any(c is not None for c in cut):
        return source, targets
    kept = [p if c is None else pipe.tokenizer.decode(pipe.tokenize([p])[0][1 : pipe.max_tokens - 1]) for p, c in zip(prompts, cut)]
    norm = lambda text: " " + " ".join(w.strip(".,;:!?'\"()[]{}").lower() for w in str(text).split()) + " "
    for r, word in _controller_words(controller, len(prompts)):
        if r >= len(prompts) or cut[r] is None or not isinstance(word, str):
            continue
        if norm(word) in norm(cut[r]) and norm(word) not in norm(kept[r]):
            raise PromptError(f"word {word!r} is past the model's {pipe.max_tokens}-token limit in prompt "
                              f"{kept[r][:60]!r}... (cut off there); shorten the prompt")
    return kept[0], kept[1:]


def compile_controller(
    pipe: Pipeline, controller: Controller, source: str, targets: Sequence[str], num_steps: int, latent: int, pinned: bool
) -> tuple[_Static, _Arrays]:
    """Arrays and static settings of a controller for prompts [source, *targets]; `pinned`: the
    source row follows the inversion's path (`source_path`) instead of sampling itself."""
    tok, L = pipe.tokenizer, pipe.max_tokens
    source, targets = _within_limit(pipe, controller, source, list(targets))
    prompts = [source, *targets]
    n = len(targets)
    kind, mapper, refine_alphas = _mapper(pipe, controller, source, targets)
    eq = np.ones((n, L), np.float32)
    for rw in _reweight_chain(controller)[1]:
        eq = eq * np.stack([sa.equalizer(t, rw.equalizer, tok, L) for t in targets])
    blend, prox = controller.blend, controller.proximal
    blend_alpha = sub_alpha = np.zeros((n + 1, L), np.float32)
    if blend is not None:
        blend_alpha = _word_alpha(prompts, blend.words, tok, L, "words")
        if blend.substruct_words is not None:
            sub_alpha = _word_alpha(prompts, blend.substruct_words, tok, L, "substruct_words")
    lo, hi = _window(controller.self_replace_steps, num_steps)
    self_steps = (np.arange(num_steps) >= lo) & (np.arange(num_steps) < hi)
    max_self = controller.max_self_size or latent // 2
    static = _Static(
        kind=kind,
        max_self_queries=int(max_self) ** 2,
        blend_size=_cross_sizes(pipe, latent)[0],
        blend_start=int(blend.start * num_steps) if blend is not None else num_steps,
        reweight=isinstance(controller, Reweight),
        pinned=pinned,
        substruct=blend is not None and blend.substruct_words is not None,
        single_branch=bool(controller.single_branch),
        prox=prox.norm if prox is not None else "",
        dilate=prox.dilate if prox is not None else 0,
    )
    arrays = _Arrays(  # host arrays: a batch of edits stacks them before they go to the devices
        cross_alpha=_cross_alpha(controller.cross_replace_steps, targets, tok, num_steps, L),
        self_steps=self_steps,
        mapper=np.asarray(mapper, np.float32 if kind == "replace" else np.int32),
        refine_alphas=np.asarray(refine_alphas, np.float32),
        equalizer=np.asarray(eq, np.float32),
        blend_alpha=blend_alpha,
        blend_threshold=np.float32(blend.threshold if blend is not None else 0.0),
        sub_alpha=sub_alpha,
        sub_threshold=np.float32(blend.substruct_threshold if blend is not None else 0.0),
        prox=np.asarray([prox.quantile, prox.recon_lr, prox.recon_t] if prox is not None else [0.0, 0.0, 0.0], np.float32),
    )
    return static, arrays


def _self_replaced(static: _Static, place: AttentionPlace) -> bool:
    """Whether self-attention at `place` is small enough to take the source's probabilities."""
    return place.kind == "self" and place.size[0] * place.size[1] <= static.max_self_queries


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
    elif _self_replaced(static, place):
        tgt = jnp.where(arr.self_steps[k], jnp.broadcast_to(base, tgt.shape), tgt)
    return jnp.concatenate([probs[:1], tgt])


def _word_mask(maps: jax.Array, alpha: jax.Array, threshold: jax.Array, latent: int, pool: bool) -> jax.Array:
    """The original's LocalBlend.get_mask: (R, h, w) bool from maps (R, s, s, L), union with row 0."""
    m = jnp.sum(maps * alpha[:, None, None, :], axis=-1)
    if pool:
        m = jax.lax.reduce_window(m, -jnp.inf, jax.lax.max, (1, 3, 3), (1, 1, 1), ((0, 0), (1, 1), (1, 1)))
    f = latent // maps.shape[1]
    m = jnp.repeat(jnp.repeat(m, f, axis=1), f, axis=2)
    mask = m / jnp.max(m, axis=(1, 2), keepdims=True) > threshold
    return mask[:1] | mask


def _blend_mask(static: _Static, arr: _Arrays, maps: jax.Array, latent: int) -> jax.Array:
    """LocalBlend's mask (R, h, w, 1) from accumulated cross maps (R, s, s, L)."""
    mask = _word_mask(maps, arr.blend_alpha, arr.blend_threshold, latent, True)
    if static.substruct:
        mask = mask & ~_word_mask(maps, arr.sub_alpha, arr.sub_threshold, latent, False)
    return mask[..., None]


def _proximal_step(static: _Static, arr: _Arrays, eps_u, eps_c, t, guidance, unit):
    """ProxEdit: (guided eps with the shrunk delta, per-element weight of the pull toward the pivot).
    `unit`: eps per unit of the model's raw output delta (sqrt(alpha_t) for v-prediction, else 1), so
    a fixed threshold is in the raw output's units, as upstream applies it."""
    quantile, recon_lr, recon_t = arr.prox[0], arr.prox[1], arr.prox[2]
    delta = eps_c - eps_u
    th = jnp.where(quantile > 0, jnp.quantile(jnp.abs(delta), jnp.clip(quantile, 0.0, 1.0)), -quantile * unit)
    delta = delta - jnp.clip(delta, -th, th)
    if static.prox == "l1":  # as written upstream: a second shrink by th, then back by th if it crossed 0
        delta = jnp.where(delta > 0, delta - th, delta)
        delta = jnp.where(delta < 0, delta + th, delta)
    edit = (jnp.abs(delta) > th).astype(jnp.float32)
    if static.dilate > 0:
        r = static.dilate
        edit = jax.lax.reduce_window(edit, 0.0, jax.lax.max, (1, 2 * r + 1, 2 * r + 1, 1), (1,) * 4, ((0, 0), (r, r), (r, r), (0, 0)))
    active = ((recon_t > 0) & (t < recon_t)) | ((recon_t < 0) & (t > -recon_t))
    return eps_u + guidance * delta, jnp.where(active, recon_lr, 0.0) * (1.0 - edit)


class EditInputs(NamedTuple):
    """What the edit program samples from: G images' inversions and their prompts' embeddings
    (one image, G = 1, for `edit`; a batch's edits of the same shape for `parallel`)."""

    sched: Schedule  # the inversion's DDIM schedule, shared
    x_T: jax.Array  # (G, h, w, C)
    cond: Cond  # (G, R, L, D) or SDXL's TextCond: per image the source prompt, then the targets
    phi: Cond  # (G, T, L, D) the inversion's unconditional embedding per step
    pivots: jax.Array  # (G, T+1, h, w, C)
    guidance: jax.Array  # (G,) float32
    empty: Cond | None = None  # (G, L, D) the unconditional embedding (single-branch target rows)
    path: jax.Array | None = None  # (G, T+1, h, w, C) the latents a pinned source row follows

    @staticmethod
    def specs(axis: str) -> "EditInputs":
        """How `parallel` splits the fields over a mesh: every image's arrays over `axis`."""
        from jax.sharding import PartitionSpec as P

        return EditInputs(P(), P(axis), P(axis), P(axis), P(axis), P(axis), P(axis), P(axis))


class EditSpec(NamedTuple):
    """One image's edit prepared on the host: the compiled controller and the target prompts'
    embeddings. Edits whose `key` agrees run as one program (`stack`)."""

    static: _Static
    arr: _Arrays  # host arrays
    targets: Cond  # (n, L, D) host arrays: the target prompts' embeddings
    empty: Cond  # (L, D) the unconditional embedding
    edit: bool = True

    @property
    def key(self) -> tuple:
        return self.static, self.edit, cnd.num_rows(self.targets)


def edit_spec(pipe: Pipeline, inv: Inversion, targets: Sequence[str], *, controller: Controller | None = None,
              edit: bool = True) -> EditSpec:
    """Check the prompts, compile the controller (the automatic one if none) and encode the
    targets, for image 0 of `inv` (its prompt, schedule and method). Host work only."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    source = inv.prompts[0]
    if edit and not targets:
        raise PromptError("give at least one target prompt to edit with")
    for t in targets:
        if not isinstance(t, str) or not t.strip():
            raise PromptError(f"target prompts must be non-empty captions, got {t!r}")
    controller = controller or auto_controller(source, targets)
    n, latent = inv.timesteps.shape[0], inv.x_T.shape[1]
    static, arr = compile_controller(pipe, controller, source, targets, n, latent, source_path(inv, controller) is not None)
    emb, null = pipe.encode_with_null(targets)  # no targets: (0, L, D) and the null
    return EditSpec(static, arr, jax.device_get(emb), jax.device_get(cnd.take(null, 0)), edit)


def source_path(inv: Inversion, controller: Controller | None = None) -> jax.Array | None:
    """(B, T+1, h, w, C) the latents an edit's source row follows, or None where it samples its
    own: a direct inversion's pivots (PnPInversion), null-text's optimised latents (the
    optimisation's own trajectory, so the row reconstructs as the optimisation did in any dtype).
    Under `controller`'s ProxEdit guidance a null-text source row samples: its pull toward the
    pivots moves the row off those latents, as in the authors' code."""
    if inv.method == "direct":
        return inv.pivots
    return None if controller is not None and controller.proximal is not None else inv.latents


def stack(specs: Sequence[EditSpec]) -> _Arrays:
    """The controllers' arrays of G edits of one `key`, stacked on a leading image axis (host)."""
    return jax.tree_util.tree_map(lambda *a: np.stack(a), *[s.arr for s in specs])


def edit_inputs(inv: Inversion, rows: Sequence[int], specs: Sequence[EditSpec], sched: Schedule) -> EditInputs:
    """The program's inputs for the edits `specs` of the images `rows` of `inv` (one per spec), on
    the devices that hold `inv`'s arrays."""
    rows = np.asarray(rows)
    source = jax.tree_util.tree_map(lambda a: a[rows][:, None], inv.cond_embeddings)  # (G, 1, L, D)
    tgt = jax.tree_util.tree_map(lambda *a: np.stack(a), *[s.targets for s in specs])
    cond = cnd.concat([source, tgt], axis=1)
    empty = jax.tree_util.tree_map(lambda *a: np.stack(a), *[s.empty for s in specs])
    guidance = np.full((len(rows),), inv.settings.guidance_scale, np.float32)
    path = source_path(inv)
    path = inv.pivots[rows] if path is None else path[rows]  # unread when the rows are not pinned
    return EditInputs(sched, inv.x_T[rows], cond, cnd.take(inv.null_embeddings, rows), inv.pivots[rows], guidance, empty, path)


def _uncond(static: _Static, inputs: EditInputs, k) -> Cond:
    """The unconditional rows (G, R, L, D) at step k."""
    cond, phi = inputs.cond, cnd.take(inputs.phi, (slice(None), k))  # phi: (G, L, D)
    g, rows = cnd.tokens(cond).shape[:2]
    col = lambda c: jax.tree_util.tree_map(lambda a: a[:, None], c)
    if static.single_branch and rows > 1:
        rest = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[:, None], (g, rows - 1) + a.shape[1:]), inputs.empty)
        return cnd.concat([col(phi), rest], axis=1)
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[:, None], (g, rows) + a.shape[1:]), phi)


def _flat(c):
    """(G, R, ...) leaves -> (G * R, ...)."""
    return jax.tree_util.tree_map(lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:]), c)


def edit_core(model: Denoiser, arr: _Arrays, inputs: EditInputs, *, static: _Static, edit: bool):
    """CFG sampling of G images x R rows, each image from its own x_T with its own controller
    arrays (`arr`, leading axis G), all rows in one UNet batch; returns (latents (G, R, h, w, C),
    maps (G, R, s, s, L)). Every image is computed as it would be alone (the controller, the
    blend and ProxEdit's quantile per image)."""
    sched, x_T, cond, _, pivots, guidance, _, path = inputs
    g, rows = cnd.tokens(cond).shape[:2]
    latent, n, s = x_T.shape[1], sched.timesteps.shape[0], static.blend_size
    per_image = lambda f, *args: jax.vmap(f)(arr, *args)

    def step(carry, k):
        x, store = carry  # (G, R, h, w, C), (G, R, s, s, L)
        collected = []

        stored = lambda place: place.kind == "cross" and place.size == (s, s) and place.block != "mid"

        def hook(probs, place):
            u, c = probs[: g * rows], probs[g * rows :].reshape((g, rows) + probs.shape[1:])
            if edit:
                c = per_image(lambda a, p: _edit_cond(static, a, k, p, place), c)
            if stored(place):
                collected.append(jnp.mean(c, axis=2).reshape(g, rows, s, s, -1))  # the stored maps are the edited ones
            return jnp.concatenate([u, c.reshape(probs[g * rows :].shape)])

        # Self-attention larger than the replacement limit is left alone: it runs fused (at SD 1.5
        # the 64x64 layers' probabilities were 2 GiB per layer for two prompts).
        hook.wants = lambda place: stored(place) or (edit and (place.kind == "cross" or _self_replaced(static, place)))

        t, a_t, a_prev = sched.timesteps[k], sched.alpha_t[k], sched.alpha_prev[k]
        flat = x.reshape((g * rows,) + x.shape[2:])
        context = cnd.concat([_flat(_uncond(static, inputs, k)), _flat(cond)])
        eps_u, eps_c = (e.reshape(x.shape) for e in jnp.split(model.eps(jnp.concatenate([flat, flat]), t, a_t, context, hook), 2))
        pivot = pivots[:, n - 1 - k]  # (G, h, w, C)
        if edit and static.prox:
            unit = jnp.sqrt(a_t) if model.prediction_type == "v_prediction" else 1.0
            eps, pull = per_image(lambda a, u, c, w: _proximal_step(static, a, u, c, t, w, unit), eps_u, eps_c, guidance)
        else:
            eps, pull = guide(eps_u, eps_c, guidance[:, None, None, None, None]), None
        x = denoise_step(eps, x, a_t, a_prev)
        if static.pinned:  # PnP and null-text: the source row takes its path before the pull and the blend
            x = x.at[:, 0].set(path[:, n - 1 - k])
        if pull is not None:
            x = x - pull * (x - pivot[:, None])
        store = store + sum(collected) / len(collected)
        if edit and static.blend_start < n:
            mask = per_image(lambda a, m: _blend_mask(static, a, m, latent), store)
            blended = x[:, :1] + mask * (x - x[:, :1])
            x = jnp.where(k >= static.blend_start, blended, x)
        return (x, store), None

    x0 = jnp.broadcast_to(x_T[:, None], (g, rows) + x_T.shape[1:])
    store0 = jnp.zeros((g, rows, s, s, cnd.tokens(cond).shape[2]), jnp.float32)
    (x, store), _ = jax.lax.scan(step, (x0, store0), jnp.arange(n))
    return x, store / n
