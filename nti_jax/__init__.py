"""nti-jax: Null-text Inversion and Prompt-to-Prompt editing of real images, in JAX."""

from .errors import ImageError, ModelError, NtiError, OptimisationError, PromptError, PromptTruncatedWarning
from .inversion import Inversion, invert
from .controllers import LocalBlend, Proximal, Refine, Replace, Reweight
from .p2p import attention_maps, edit
from .pipeline import Pipeline, load_pipeline
from .sampling import generate, reconstruct
from .settings import InvertSettings

__all__ = [
    "LocalBlend",
    "Proximal",
    "Refine",
    "Replace",
    "Reweight",
    "attention_maps",
    "edit",
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
