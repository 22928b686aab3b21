"""The library's exceptions: each carries a one-line message meant for the user."""

from typing import Sequence


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


class DeviceMemoryError(Exception):
    """A program call that ran out of device memory with one row per device, the fewest there
    are. `done`: the results of the calls that finished before it (the caller keeps them)."""

    def __init__(self, message: str, done: Sequence = ()):
        super().__init__(message)
        self.done = list(done)


class PromptTruncatedWarning(UserWarning):
    """A prompt longer than the text encoder's limit (77 tokens) was cut to it, as diffusers does."""


class UsageError(Exception):
    """A bad argument or input file: one line on stderr, exit status 2."""


def one_line(e: BaseException) -> str:
    """An exception as one line for the user, without Python's class names (an exception with no
    message says only what kind of failure it was)."""
    msg = " ".join(str(e).split())
    if isinstance(e, DeviceMemoryError):  # its message says it all (a smaller batch would not help)
        return msg
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in msg:
        return "out of memory" + (f" ({msg})" if msg else "") + "; use a smaller --batch-size"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return msg or f"unexpected failure ({type(e).__name__})"
