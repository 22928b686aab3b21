"""nti-jax: Null-text Inversion and Prompt-to-Prompt editing of real images, in JAX."""

from nti_jax.errors import ImageError, ModelError, NtiError, OptimisationError, PromptError, PromptTruncatedWarning
from nti_jax.core.api import attention_maps, edit, generate, invert, reconstruct
from nti_jax.core.inversion import Inversion
from nti_jax.core.controllers import LocalBlend, Proximal, Refine, Replace, Reweight
from nti_jax.loading.pipeline import Pipeline, load_pipeline
from nti_jax.core.settings import InvertSettings
from nti_jax.core import heatmaps, p2p  # modules of the public API: `from nti_jax import p2p, heatmaps`

__all__ = [
    "LocalBlend",
    "Proximal",
    "Refine",
    "Replace",
    "Reweight",
    "attention_maps",
    "edit",
    "heatmaps",
    "p2p",
    "generate",
    "ImageError",
    "Inversion",
    "InvertSettings",
    "ModelError",
    "NtiError",
    "OptimisationError",
    "Pipeline",
    "PromptError",
    "PromptTruncatedWarning",
    "invert",
    "load_pipeline",
    "reconstruct",
]
