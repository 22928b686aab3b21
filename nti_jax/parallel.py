"""Many images on many devices and many hosts.

* One host: the local devices form a 1-D mesh over the batch axis. `ShardedInverter.invert` is the
  one call into the devices: each device encodes its own images and prompts, then
  `inversion.invert_core` runs in `jax.shard_map` (every device its own `while_loop`s: each
  device's early stop is independent of the others) and each device's rows come back as
  `Inversion`s that stay on that device. A device computes exactly what a single-device run with
  the same per-device batch computes (pivots bit-identical on CPU; the null embeddings agree to
  float rounding of the gradients, ~1e-3 of how far they moved). `reconstruct` and `replica`
  let reconstruction and editing run on every device at once too.
* Several hosts (`jax.distributed`): every process takes the manifest items i with
  i % num_processes == process_index (`host_share`) and inverts them on its own devices (no
  cross-host collectives); the driver then meets the other processes at `FileBarrier` in the
  shared output folder and process 0 merges their results files.
* `enable_compilation_cache`: JAX's persistent compilation cache. Only process 0 writes entries;
  on GPU the key ignores device ids, so with the cache on a shared filesystem every process
  reuses them; on CPU and TPU the key holds the device ids of the process-local program, so
  processes other than 0 compile on every run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from . import conditioning as cnd
from . import planning
from .inversion import (
    BATCHED_FIELDS, Inversion, InvertInputs, abstract_inputs, assemble, check_remat, cond_shapes, invert_core, plan_program, prepare_inputs,
)
from .planning import pad_rows
from .pipeline import Pipeline
from .sampling import Denoiser, reconstruct
from .settings import InvertSettings

AXIS = "batch"
BARRIER_TIMEOUT_S = 7 * 24 * 3600.0


# ----------------------------------------------------------------------------------------------
# process-level setup


def cache_dir_from_env(explicit: Optional[str] = None) -> Optional[str]:
    """The persistent compilation cache folder: `explicit` (a path, or "" / "none" / "off" to
    disable), else $NTI_JAX_CACHE_DIR, else $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/nti-jax/jax-cache (~/.cache/nti-jax/jax-cache)."""
    value = explicit
    if value is None:
        value = os.environ.get("NTI_JAX_CACHE_DIR", os.environ.get("JAX_COMPILATION_CACHE_DIR"))
    if value is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        value = os.path.join(base, "nti-jax", "jax-cache")
    if value.strip().lower() in ("", "none", "off", "0", "false"):
        return None
    return os.path.abspath(os.path.expanduser(value))


def enable_compilation_cache(path: Optional[str], min_compile_time_secs: float = 0.0) -> None:
    """Turn on JAX's persistent compilation cache in `path` (None turns it off).

    Every compiled program is stored (`min_compile_time_secs` 0 by default), so a second run of
    the same job on the same machine compiles nothing. JAX never stores programs that contain
    host callbacks (the inversion program with a step-progress callback is such a program).
    """
    from jax.experimental.compilation_cache import compilation_cache as cc

    current = jax.config.jax_compilation_cache_dir
    if path is not None:
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", path is not None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # no size floor
    if path != current:
        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()  # a cache opened earlier in this process at another path is closed


def distributed_env() -> dict:
    """`jax.distributed.initialize` arguments from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
    and JAX_PROCESS_ID (each None where unset: JAX then detects TPU pods, SLURM, Open MPI, k8s)."""
    num = os.environ.get("JAX_NUM_PROCESSES")
    pid = os.environ.get("JAX_PROCESS_ID")
    return {
        "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
        "num_processes": int(num) if num else None,
        "process_id": int(pid) if pid else None,
    }


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None, timeout_s: int = 300) -> None:
    """`jax.distributed.initialize`, with arguments left None detected from the environment.

    Must run before anything else touches a JAX backend. (On CPU the barrier's collective runs on
    JAX's default gloo implementation.)
    """
    if jax.distributed.is_initialized():
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )


def process_info() -> tuple[int, int]:
    """(process_index, process_count)."""
    return jax.process_index(), jax.process_count()


def host_share(n_items: int, process_index: int, process_count: int) -> list[int]:
    """The manifest indices this process inverts: i % process_count == process_index."""
    return [i for i in range(n_items) if i % process_count == process_index]


class FileBarrier:
    """Processes meeting in a folder they all share (the run's output folder), with no device
    collective and no private JAX API: each process writes `<folder>/.nti-sync/<token>.<name>.<pid>`
    and waits until every process's file is there. `token` (process 0's, broadcast at start with
    `new_token`) keeps a rerun from meeting a previous run's files."""

    def __init__(self, folder: str, token: str, process_index: int, process_count: int):
        self.dir = os.path.join(folder, ".nti-sync")
        self.token, self.pid, self.nproc = token, process_index, process_count

    @staticmethod
    def new_token() -> str:
        """One token for the run, the same on every process (process 0's clock, broadcast)."""
        from jax.experimental import multihost_utils

        mine = np.int64(time.time_ns() % (2**62))
        return format(int(multihost_utils.broadcast_one_to_all(mine)), "x") if jax.process_count() > 1 else format(int(mine), "x")

    def wait(self, name: str, timeout_s: float = BARRIER_TIMEOUT_S, poll_s: float = 0.2) -> None:
        """Arrive at barrier `name` and wait for the others (a no-op with one process)."""
        if self.nproc == 1:
            return
        os.makedirs(self.dir, exist_ok=True)
        path = lambda p: os.path.join(self.dir, f"{self.token}.{name}.{p}")
        with open(path(self.pid), "w") as f:
            f.write("arrived\n")
        deadline = time.time() + timeout_s
        while not all(os.path.exists(path(p)) for p in range(self.nproc)):
            if time.time() > deadline:
                raise TimeoutError(f"processes did not all reach {name!r} within {timeout_s:.0f} s")
            time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------
# one host, many devices


def local_mesh(devices: Optional[Sequence] = None) -> Mesh:
    """A 1-D mesh (axis "batch") over this process's devices."""
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.array(devices), (AXIS,))


@functools.lru_cache(maxsize=32)
def sharded_program(mesh: Mesh, method: str, progress: Optional[Callable], remat: str = "none"):
    """`invert_core(model, inputs)` in `jax.shard_map` over `mesh`, jitted; one per (mesh, static
    settings), shared by every `ShardedInverter` so a program is traced and compiled once per
    process. The model is replicated; `inputs` split as `InvertInputs.specs` says."""
    core = functools.partial(invert_core, method=method, progress=progress, remat=remat)
    return jax.jit(
        jax.shard_map(
            core,
            mesh=mesh,
            in_specs=(P(), InvertInputs.specs(AXIS)),
            out_specs=P(AXIS),
            # The loops are per device by design: each device's while_loop stops on its own rows.
            check_vma=False,
        )
    )


def per_device_batch(requested: int, n_items: int, num_devices: int) -> int:
    """Rows per device: the requested batch, but no more than needed to hold `n_items` at once."""
    return max(1, min(requested, -(-n_items // num_devices)))


def _local(x: jax.Array, device) -> jax.Array:
    """`device`'s own piece of a sharded or replicated array (no copy)."""
    (piece,) = [s.data for s in x.addressable_shards if s.device == device]
    return piece


class ShardedInverter:
    """Inversion over a mesh: `invert` splits a batch over the devices (padding it to fill them),
    runs one compiled program per (static settings, progress callable), and returns one `Inversion`
    per image on the device that made it. The UNet parameters are replicated once per pipeline."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._programs: set = set()  # the programs `invert` ran: compiled executables or jitted functions
        self._for = None  # (pipe, replicated Denoiser, per-device pipelines)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)

    def _setup(self, pipe: Pipeline) -> tuple[Denoiser, list[Pipeline]]:
        if self._for is None or self._for[0] is not pipe:
            model = jax.device_put(Denoiser.of(pipe), NamedSharding(self.mesh, P()))
            if self.num_devices == 1:
                replicas = [pipe]
            else:
                replicas = []
                for device in self.devices:
                    params = {k: jax.device_put(v, device) for k, v in pipe.params.items() if k != "unet"}
                    params["unet"] = jax.tree_util.tree_map(lambda a: _local(a, device), model.params)
                    replicas.append(dataclasses.replace(pipe, params=params))
            self._for = (pipe, model, replicas)
        return self._for[1], self._for[2]

    def replica(self, pipe: Pipeline, inv: Inversion) -> Pipeline:
        """The pipeline whose parameters live on the device that holds `inv` (edits run there)."""
        _, replicas = self._setup(pipe)
        (device,) = inv.x_T.devices()
        return replicas[self.devices.index(device)] if device in self.devices else pipe

    def _prepare(self, replicas: Sequence[Pipeline], images, prompts, settings: InvertSettings) -> InvertInputs:
        """Each device encodes its own rows; the pieces become batch-sharded arrays."""
        b = len(images) // self.num_devices
        parts = [prepare_inputs(r, images[d * b : (d + 1) * b], prompts[d * b : (d + 1) * b], settings) for d, r in enumerate(replicas)]
        batched, whole = NamedSharding(self.mesh, P(AXIS)), NamedSharding(self.mesh, P())

        def glue(pieces, spec):
            if spec == P():
                return jax.device_put(pieces[0], whole)

            def one(*leaves):
                arrays = [jax.device_put(p, dev) for p, dev in zip(leaves, self.devices)]
                return jax.make_array_from_single_device_arrays((len(images),) + arrays[0].shape[1:], batched, arrays)

            return jax.tree_util.tree_map(one, *pieces)

        fields = [[getattr(p, f) for p in parts] for f in InvertInputs._fields]
        return InvertInputs(*[glue(pieces, spec) for pieces, spec in zip(fields, InvertInputs.specs(AXIS))])

    def plan(self, pipe: Pipeline, settings: InvertSettings, per_device: int, progress: Optional[Callable] = None,
             remat: str = "auto", max_device_memory: Optional[float] = None) -> planning.Choice:
        """Remat mode and images per device per call for `per_device` images per device, from the
        compiled sharded programs (`inversion.plan_program`)."""
        model, _ = self._setup(pipe)
        whole, batched = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(AXIS))

        def spec(rows: int) -> InvertInputs:
            specs = abstract_inputs(pipe, settings, rows * self.num_devices, batched)
            return InvertInputs(*[a if s == P(AXIS) else jax.tree_util.tree_map(lambda x: x.update(sharding=whole), a)
                                  for a, s in zip(specs, InvertInputs.specs(AXIS))])

        model_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), model)
        lower = lambda rows, mode: sharded_program(self.mesh, settings.method, progress, mode).lower(model_spec, spec(rows))
        key = (progress, model.module, model.prediction_type, self.mesh, planning.shape_key(model_spec, spec(1)))
        s, ch = pipe.image_size // pipe.latent_factor, pipe.unet.config.in_channels
        return plan_program(model, settings.method, remat, per_device, lower, key, max_device_memory, (s, s, ch), cond_shapes(pipe))

    def invert(
        self, pipe: Pipeline, images: Sequence[np.ndarray], prompts: Sequence[str], settings: InvertSettings,
        progress: Optional[Callable] = None, *, remat: str = "auto", max_device_memory: Optional[float] = None,
    ) -> list[Inversion]:
        """Invert uint8 square images (at the model's size) with their prompts: one `Inversion`
        (B = 1) per image, each on the device that inverted it. `remat`: what the null-text
        gradient recomputes instead of keeping (`inversion.REMAT_MODES`), or "auto"; with "auto"
        or `max_device_memory` (GiB per device) the mode and the images per call come from the
        compiled programs (`plan`), and a share that fits in no mode runs in several calls.
        Results do not depend on either (in bf16, a row's rounding depends on its call's batch)."""
        if len(images) != len(prompts) or not images:
            raise ValueError(f"{len(images)} images and {len(prompts)} prompts")
        model, replicas = self._setup(pipe)
        check_remat(remat)
        per = -(-len(images) // self.num_devices)
        if remat == "auto" or max_device_memory is not None:
            choice = self.plan(pipe, settings, per, progress, remat, max_device_memory)
            program, per = choice.compiled, choice.rows
        else:
            program = sharded_program(self.mesh, settings.method, progress, remat)
        self._programs.add(program)
        step = per * self.num_devices
        invs = []
        for start in range(0, len(images), step):
            rows = [start + r for r in pad_rows(min(step, len(images) - start), step)]
            padded = [prompts[r] for r in rows]
            inputs = self._prepare(replicas, [images[r] for r in rows], padded, settings)
            out = program(model, inputs)
            for d, (device, rep) in enumerate(zip(self.devices, replicas)):
                local = jax.tree_util.tree_map(lambda a: _local(a, device), out)
                piece = assemble(rep, settings, padded[d * per : (d + 1) * per], jax.tree_util.tree_map(lambda a: _local(a, device), inputs.cond),
                                 _local(inputs.sched.timesteps, device), local)
                invs.extend(piece[j] for j in range(per))
            invs = invs[: min(len(images), start + step)]
        return invs

    def reconstruct(self, pipe: Pipeline, invs: Sequence[Inversion]) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
        """(reconstruction (H,W,3), its latent (h,w,C), the VAE's own decode of z0 (H,W,3)) per
        inversion, each device reconstructing the rows it holds in one batch."""
        by_device: dict = {}
        for k, inv in enumerate(invs):
            by_device.setdefault(self.replica(pipe, inv), []).append(k)
        out: list = [None] * len(invs)
        for rep, ks in by_device.items():
            rows = [invs[k] for k in ks]
            batch = rows[0].replace(**{f: cnd.concat([getattr(r, f) for r in rows]) for f in BATCHED_FIELDS},
                                    prompts=tuple(p for r in rows for p in r.prompts))
            images, latents = reconstruct(rep, batch)
            vae = rep.decode_latents(batch.pivots[:, 0])
            for j, k in enumerate(ks):
                out[k] = (images[j], latents[j], vae[j])
        return out

    def compiled_programs(self) -> int:
        """How many inversion programs this inverter compiled (tests: batches reuse one)."""
        return sum(p._cache_size() if hasattr(p, "_cache_size") else 1 for p in self._programs)


__all__ = [
    "AXIS",
    "FileBarrier",
    "ShardedInverter",
    "cache_dir_from_env",
    "distributed_env",
    "enable_compilation_cache",
    "host_share",
    "initialize_distributed",
    "local_mesh",
    "pad_rows",
    "per_device_batch",
    "process_info",
    "sharded_program",
]
