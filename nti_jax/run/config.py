"""One validated run configuration: the inversion settings, the defaults of every edit and the
run's options, each field with its command-line flag. Whether two runs make the same outputs is
one comparison (`outputs`, with the images and the model files: `runs.run_key`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from nti_jax.models.unet import REMAT_MODES
from nti_jax.loading.pipeline import DTYPES
from nti_jax.core.settings import InvertSettings

# field -> flag, for the inversion settings, the edit defaults and the run options
SETTING_FLAGS = {"method": "--method", "num_steps": "--steps", "guidance_scale": "--guidance",
                 "num_inner_steps": "--inner-steps", "early_stop_epsilon": "--early-stop-eps"}
EDIT_FLAGS = {"guidance": "--edit-guidance", "mapping": "--mapping", "prox_quantile": "--prox-quantile",
              "recon_t": "--recon-t", "recon_lr": "--recon-lr"}
RUN_FLAGS = {"model": "--model", "dtype": "--dtype", "attention": "--attention", "batch_size": "--batch-size",
             "remat": "--remat", "max_device_memory": "--max-device-memory", "force": "--force", "verify": "--verify", "step_progress": "--step-progress",
             "claim_timeout": "--claim-timeout"}
OUTPUT_FIELDS = ("dtype", "attention")  # run options that change what is written


def flag_words(message: str) -> str:
    """A settings error in the words of the command line (field names replaced by their flags)."""
    for field, flag in sorted({**SETTING_FLAGS, **RUN_FLAGS}.items(), key=lambda kv: -len(kv[0])):
        message = message.replace(field, flag)
    return message


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run is given besides its images. `edit_defaults`: (edit setting, value)
    pairs every edit gets where it does not set its own; `claim_timeout`: seconds after which a
    worker that stopped touching its claims counts as dead."""

    settings: InvertSettings = InvertSettings()
    model: str = ""
    dtype: str = "float32"
    edit_defaults: tuple = ()
    attention: bool = False
    batch_size: int = 1
    remat: str = "auto"
    max_device_memory: Optional[float] = None  # GiB an inversion may use per device (None: the free memory)
    force: bool = False
    verify: bool = False
    step_progress: bool = False
    claim_timeout: float = 600.0

    def __post_init__(self):
        if not isinstance(self.settings, InvertSettings):
            raise ValueError(f"settings must be InvertSettings, got {type(self.settings).__name__}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(sorted(DTYPES))}; got {self.dtype!r}")
        if self.remat not in ("auto",) + REMAT_MODES:
            raise ValueError(f"remat must be auto or one of {', '.join(REMAT_MODES)}; got {self.remat!r}")
        if self.max_device_memory is not None and not (isinstance(self.max_device_memory, (int, float))
                                                       and math.isfinite(self.max_device_memory) and self.max_device_memory > 0):
            raise ValueError(f"max_device_memory must be a positive number of GiB, got {self.max_device_memory!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not (isinstance(self.claim_timeout, (int, float)) and math.isfinite(self.claim_timeout) and self.claim_timeout > 0):
            raise ValueError(f"claim_timeout must be a positive number of seconds, got {self.claim_timeout!r}")
        unknown = sorted(k for k, _ in self.edit_defaults if k not in EDIT_FLAGS)
        if unknown:
            raise ValueError(f"unknown edit default(s) {', '.join(unknown)}")
        object.__setattr__(self, "edit_defaults", tuple(sorted(self.edit_defaults)))

    def edit(self, edit: dict) -> dict:
        """An edit with the defaults filled in where it sets nothing."""
        return {**dict(self.edit_defaults), **edit}

    def outputs(self) -> dict[str, Any]:
        """flag -> value of every field that changes the outputs (what "same settings?" compares)."""
        out = {SETTING_FLAGS[k]: v for k, v in self.settings.to_dict().items()}
        out.update({EDIT_FLAGS[k]: v for k, v in self.edit_defaults})
        out.update({RUN_FLAGS[k]: getattr(self, k) for k in OUTPUT_FIELDS})
        return out
