"""nti-jax: Null-text Inversion and Prompt-to-Prompt editing of real images, in JAX."""

from .errors import ImageError, ModelError, NtiError, OptimisationError, PromptError
from .pipeline import Pipeline, load_pipeline

__all__ = [
    "ImageError",
    "ModelError",
    "NtiError",
    "OptimisationError",
    "Pipeline",
    "PromptError",
    "load_pipeline",
]
