"""The library's exceptions: each carries a one-line message meant for the user."""


class NtiError(Exception):
    """Base class of every error nti-jax raises on bad input."""


class ModelError(NtiError):
    """A model folder or hub id that cannot be loaded (missing files, wrong keys or shapes)."""


class PromptError(NtiError, ValueError):
    """A prompt that cannot be used: too long, or a word a controller cannot find or align."""


class ImageError(NtiError, ValueError):
    """An image that cannot be read or used."""


class OptimisationError(NtiError):
    """A numerical failure that could not be recovered from."""


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's limit (77 tokens) was cut to it, as diffusers does."""
