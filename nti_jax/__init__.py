"""nti-jax: Null-text Inversion and Prompt-to-Prompt editing of real images, in JAX."""

from .errors import ImageError, ModelError, NtiError, OptimisationError, PromptError
from .inversion import Inversion, invert, reconstruct
from .pipeline import Pipeline, load_pipeline

__all__ = [
    "ImageError",
    "Inversion",
    "ModelError",
    "NtiError",
    "OptimisationError",
    "Pipeline",
    "PromptError",
    "invert",
    "load_pipeline",
    "reconstruct",
]
