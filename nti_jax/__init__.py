"""nti-jax: Null-text Inversion and Prompt-to-Prompt editing of real images, in JAX."""

from .errors import ImageError, ModelError, NtiError, OptimisationError, PromptError
from .inversion import Inversion, generate, invert, reconstruct
from .p2p import LocalBlend, Refine, Replace, Reweight, attention_maps, edit
from .pipeline import Pipeline, load_pipeline

__all__ = [
    "LocalBlend",
    "Refine",
    "Replace",
    "Reweight",
    "attention_maps",
    "edit",
    "generate",
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
