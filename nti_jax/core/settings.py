"""The inversion's settings: one frozen, validated object from the command line to the
`Inversion` file and back. Defaults are defined here and nowhere else."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

METHODS = ("null-text", "negative-prompt", "ddim", "direct")
MAX_STEPS = 1000  # DDIM cannot take more steps than the model's training timesteps (1000 for SD)
MAX_INNER_STEPS = 10_000
MAX_GUIDANCE = 100.0


@dataclasses.dataclass(frozen=True)
class InvertSettings:
    """How to invert: the paper's settings by default.

    `method`: "null-text" (the paper), "negative-prompt" (phi_t = the prompt's embedding), "ddim"
    (phi_t = the "" embedding) or "direct" (the "ddim" embeddings, the source branch pinned to the
    pivots while sampling, as PnP Inversion). The null-text early stop is exactly
    `loss < early_stop_epsilon + i * 2e-5` (a negative epsilon disables it).
    """

    method: str = "null-text"
    num_steps: int = 50
    guidance_scale: float = 7.5
    num_inner_steps: int = 10
    early_stop_epsilon: float = 1e-5

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        _check_int("num_steps", self.num_steps, 1, MAX_STEPS)
        _check_int("num_inner_steps", self.num_inner_steps, 0, MAX_INNER_STEPS)
        _check_float("guidance_scale", self.guidance_scale, 0.0, MAX_GUIDANCE)
        _check_float("early_stop_epsilon", self.early_stop_epsilon, -math.inf, math.inf)
        object.__setattr__(self, "num_steps", int(self.num_steps))
        object.__setattr__(self, "num_inner_steps", int(self.num_inner_steps))
        object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        object.__setattr__(self, "early_stop_epsilon", float(self.early_stop_epsilon))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "InvertSettings":
        """The settings among `values` (other keys, e.g. a file's model facts, are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def _check_int(name: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")


def _check_float(name: str, value, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {value:g}")
