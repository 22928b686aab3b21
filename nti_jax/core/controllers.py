"""Prompt-to-Prompt edit specs: the controllers (Replace, Refine, Reweight), LocalBlend, the
edit-time guidance (single-branch, ProxEdit's Proximal) and their plain-settings form (manifests)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

Steps = float | tuple | Mapping[str, Any]
Words = Sequence[str | Sequence[str]]


@dataclasses.dataclass(frozen=True)
class LocalBlend:
    """Keep pixels outside the edited words' attention: words per prompt, source first.

    `substruct_words` (one list per prompt, or None): pixels attending to them are kept from the
    source as well (the original's subtracted mask, thresholded at `substruct_threshold`, no pooling).
    """

    words: Words
    threshold: float = 0.3
    start: float = 0.2
    substruct_words: Words | None = None
    substruct_threshold: float = 0.3


@dataclasses.dataclass(frozen=True)
class Proximal:
    """ProxEdit's proximal guidance (Han et al. 2023): the guidance delta eps_c - eps_u is shrunk by
    its `quantile` over the batch (`norm` "l0" as PIE-Bench runs it, or "l1"; a `quantile` <= 0 is
    ProxEdit's fixed threshold -quantile), and at timesteps below `recon_t` each latent is pulled
    toward the inversion's pivot by `recon_lr` wherever the shrunk delta is small (its mask dilated
    by `dilate` latent pixels). ValueError on settings the original cannot run."""

    norm: str = "l0"
    quantile: float = 0.75
    recon_lr: float = 1.0
    recon_t: int = 400
    dilate: int = 1

    def __post_init__(self) -> None:
        q = self.quantile
        if self.norm not in ("l0", "l1") or isinstance(q, bool) or not isinstance(q, (int, float)) or not (math.isfinite(q) and q <= 1) \
                or isinstance(self.dilate, bool) or not isinstance(self.dilate, int) or self.dilate < 0:
            raise ValueError(f"proximal guidance needs norm l0|l1, a finite quantile <= 1 (<= 0: the fixed threshold -quantile) "
                             f"and an integer dilate >= 0; got {self}")


@dataclasses.dataclass(frozen=True)
class Replace:
    """Word swap (same word count): target cross-attention = source maps through a token mapper.

    `mapping`: "original" (the authors' get_replacement_mapper) or "aligned" (tokens after a swapped
    word whose token count changes are mapped source i -> target j; the original maps j -> j, so
    every later target token reads the wrong source token). `single_branch`: the inversion's
    unconditional embedding in the source row only, "" in the target rows. `proximal`: ProxEdit.
    """

    cross_replace_steps: Steps = 0.8
    self_replace_steps: float | tuple = 0.4
    blend: LocalBlend | None = None
    max_self_size: int | None = None  # largest self-attn side edited; default latent/2
    mapping: str = "original"
    single_branch: bool = False
    proximal: Proximal | None = None


@dataclasses.dataclass(frozen=True)
class Refine(Replace):
    """Added/removed words: aligned tokens take the source maps, new tokens keep their own."""


@dataclasses.dataclass(frozen=True)
class Reweight(Replace):
    """Scale chosen tokens' cross-attention (e.g. {"red": 3.0}) on top of `base`, or alone: then the
    source maps are scaled position by position, as the original (prompts of any word count).
    A `base` that is itself a Reweight composes as the original's AttentionReweight chain: the
    innermost geometry, then every equalizer (innermost first); only this outer controller's
    windows, blend and guidance apply."""

    equalizer: Mapping[str, float] = dataclasses.field(default_factory=dict)
    base: Replace | None = None


Controller = Replace | Refine | Reweight


def auto_controller(source: str, targets: Sequence[str], **settings) -> Controller:
    """Replace when every target has the source's word count, else Refine (defaults 0.8 / 0.4)."""
    same = all(len(t.split()) == len(source.split()) for t in targets)
    return Replace(**settings) if same else Refine(**settings)


SETTINGS_KEYS = ("kind", "cross_replace_steps", "self_replace_steps", "equalizer", "blend_words",
                 "blend_threshold", "blend_start", "max_self_size", "substruct_words", "substruct_threshold",
                 "mapping", "guidance", "prox_norm", "prox_quantile", "recon_lr", "recon_t", "prox_dilate")
GUIDANCE = ("plain", "single-branch", "proximal", "single-branch+proximal")


def window(steps) -> tuple[float, float]:
    """A step window as (start, end) fractions: a number is (0, number); ValueError unless 0 <= start <= end <= 1."""
    try:
        lo, hi = (0.0, float(steps)) if isinstance(steps, (int, float)) and not isinstance(steps, bool) else map(float, steps)
    except (TypeError, ValueError):
        lo, hi = math.nan, math.nan
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"a step window must satisfy 0 <= start <= end <= 1, got {steps!r}")
    return lo, hi


def _fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def _check_ranges(settings: Mapping[str, Any]) -> None:
    """The plain settings' ranges, before any controller is built (a manifest fails when read)."""
    cross = settings.get("cross_replace_steps", 0.8)
    for steps in cross.values() if isinstance(cross, Mapping) else [cross]:
        window(steps)
    window(settings.get("self_replace_steps", 0.4))
    for name in ("blend_threshold", "substruct_threshold", "blend_start"):
        if name in settings:
            _fraction(name, settings[name])
    size = settings.get("max_self_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"max_self_size must be a positive integer, got {size!r}")
    eq = settings.get("equalizer") or {}
    if not isinstance(eq, Mapping) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in eq.values()):
        raise ValueError(f"equalizer must map words to finite numbers, got {eq!r}")
    lr, t = settings.get("recon_lr", 1.0), settings.get("recon_t", 400)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"recon_lr must be a finite number >= 0, got {lr!r}")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1000:
        raise ValueError(f"recon_t must be a timestep in 0..1000, got {t!r}")


def _proximal(settings: Mapping[str, Any]) -> Proximal:
    try:
        return Proximal(settings.get("prox_norm", "l0"), float(settings.get("prox_quantile", 0.75)),
                        float(settings.get("recon_lr", 1.0)), int(settings.get("recon_t", 400)), int(settings.get("prox_dilate", 1)))
    except ValueError:
        raise ValueError("proximal guidance needs prox_norm l0|l1, a finite prox_quantile <= 1 (<= 0: the fixed threshold "
                         f"-prox_quantile) and prox_dilate >= 0; got {dict(settings)}") from None


def controller_from_settings(source: str, targets: Sequence[str], settings: Mapping[str, Any]) -> Controller:
    """A controller from plain settings (CLI manifests): kind ("auto"|"replace"|"refine"),
    cross_replace_steps, self_replace_steps, equalizer {word: factor}, blend_words /
    substruct_words (one word list per prompt, source first), blend_threshold, substruct_threshold,
    blend_start, max_self_size, mapping ("original"|"aligned"), guidance (one of GUIDANCE) with
    prox_norm, prox_quantile, recon_lr, recon_t, prox_dilate."""
    unknown = set(settings) - set(SETTINGS_KEYS) - {"prompt"}
    if unknown:
        raise ValueError(f"unknown edit settings: {', '.join(sorted(unknown))}")
    _check_ranges(settings)
    kind = settings.get("kind", "auto")
    if kind not in ("auto", "replace", "refine"):
        raise ValueError(f"edit kind must be auto, replace or refine; got {kind!r}")
    guidance = settings.get("guidance", "plain")
    if guidance not in GUIDANCE:
        raise ValueError(f"edit guidance must be one of {', '.join(GUIDANCE)}; got {guidance!r}")
    blend = None
    if settings.get("blend_words"):
        blend = LocalBlend(settings["blend_words"], settings.get("blend_threshold", 0.3), settings.get("blend_start", 0.2),
                           settings.get("substruct_words"), settings.get("substruct_threshold", 0.3))
    common = {
        "cross_replace_steps": settings.get("cross_replace_steps", 0.8),
        "self_replace_steps": settings.get("self_replace_steps", 0.4),
        "blend": blend,
        "max_self_size": settings.get("max_self_size"),
        "mapping": settings.get("mapping", "original"),
        "single_branch": "single-branch" in guidance,
        "proximal": _proximal(settings) if "proximal" in guidance else None,
    }
    base = auto_controller(source, targets, **common) if kind == "auto" else (Replace if kind == "replace" else Refine)(**common)
    if settings.get("equalizer"):
        return Reweight(**common, equalizer=dict(settings["equalizer"]), base=base)
    return base
