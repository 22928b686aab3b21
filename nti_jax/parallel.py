"""Many images on many devices and many hosts.

* One host: the local devices form a 1-D mesh over the batch axis. `ShardedInverter` wraps
  `inversion.invert_core` in `jax.shard_map` and jits it, so every device runs its own copy of
  the program (its own `while_loop`s: each device's early stop is independent of the others) on
  its slice of the batch. `ShardedInverter.prepare` has each device encode its own images and
  prompts, so a device computes exactly what a single-device run with the same per-device batch
  computes (pivots bit-identical on CPU; the null embeddings agree to float rounding of the
  gradients, ~1e-3 of how far they moved).
* After the inversion, `device_replicas` gives one `Pipeline` per device (the replicated UNet
  parameters' own buffers) and `split_rows` the rows each device already holds, so
  reconstruction and editing also run on every device at once.
* Several hosts (`jax.distributed`): every process takes the manifest items i with
  i % num_processes == process_index (`host_share`) and inverts them on its own devices (no
  cross-host collectives), writes its own results file, waits at a barrier (`barrier`, the
  runtime's key-value barrier) and process 0 merges the files (`merge_jsonl`).
* `enable_compilation_cache`: JAX's persistent compilation cache. Only process 0 writes entries;
  on GPU the key ignores device ids, so with the cache on a shared filesystem every process
  reuses them; on CPU and TPU the key holds the device ids of the process-local program, so
  processes other than 0 compile on every run.

Nothing here prints or reads the command line; `cli.py` drives it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .inversion import BATCHED_FIELDS, Inversion, InvertInputs, InvertSettings, core_args, invert_core, prepare_inputs
from .io import atomic_path
from .pipeline import Pipeline

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


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process reaches the barrier `name` (a no-op with one process).

    Uses the distributed runtime's key-value barrier, which needs no device collectives and
    waits as long as the slowest process takes (up to `timeout_s`; a process that dies is
    reported by the runtime's heartbeats). `multihost_utils.sync_global_devices` is not used:
    on CPU its gloo context gives up after 30 s, when processes finish their shares at
    different times.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the runtime client; JAX's own checkpointing uses it so

    client = distributed.global_state.client
    if client is None:  # pragma: no cover - multi-process without jax.distributed
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))


def results_file(out_dir: str, process_index: int, process_count: int) -> str:
    """This process's results file: results.jsonl alone, results.<process>.jsonl on several hosts."""
    name = "results.jsonl" if process_count == 1 else f"results.{process_index}.jsonl"
    return os.path.join(out_dir, name)


def read_jsonl(path: str) -> list[dict]:
    """Rows of a JSON-lines file; a torn last line (a crash mid-write) is ignored."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Write all rows at once, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


def merge_jsonl(out_path: str, parts: Sequence[str], key: str = "index") -> list[dict]:
    """Merge per-process results files into `out_path`, ordered by `key` (manifest order)."""
    rows = [r for p in parts for r in read_jsonl(p)]
    rows.sort(key=lambda r: r.get(key, 0))
    write_jsonl(out_path, rows)
    return rows


# ----------------------------------------------------------------------------------------------
# one host, many devices


def local_mesh(devices: Optional[Sequence] = None) -> Mesh:
    """A 1-D mesh (axis "batch") over this process's devices."""
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.array(devices), (AXIS,))


@functools.lru_cache(maxsize=32)
def sharded_program(mesh: Mesh, unet, prediction_type: str, method: str, progress):
    """`invert_core` in `jax.shard_map` over `mesh`, jitted; one per (mesh, static settings), shared
    by every `ShardedInverter` so a program is traced and compiled once per process.

    Arguments: (unet params, schedule, z0, cond, null, guidance, num_inner_steps,
    early_stop_epsilon); z0/cond/null sharded over the batch, the rest replicated.
    """
    def per_device(params, sched, z0, cond, null, guidance, num_inner_steps, early_stop_epsilon):
        return invert_core(
            unet, params, prediction_type, method, progress, sched, z0, cond, null, guidance, num_inner_steps, early_stop_epsilon
        )

    rep, bat = P(), P(AXIS)
    return jax.jit(
        jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(rep, rep, bat, bat, bat, rep, rep, rep),
            out_specs=bat,
            # The loops are per device by design: each device's while_loop stops on its own rows.
            check_vma=False,
        )
    )


class ShardedInverter:
    """`invert_core` over a mesh: a batch of `per_device * mesh.size` rows, `per_device` per device.

    The compiled program is kept per (static settings, progress callable), so batches of the same
    shape never recompile; the UNet parameters are replicated onto the devices once per pipeline.
    """

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._programs: dict = {}
        self._params_for = None  # (pipe, replicated params)

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    def replicated(self, tree):
        return jax.device_put(tree, NamedSharding(self.mesh, P()))

    def batch_sharded(self, x):
        return jax.device_put(x, NamedSharding(self.mesh, P(AXIS)))

    def unet_params(self, pipe: Pipeline):
        if self._params_for is None or self._params_for[0] is not pipe:
            self._params_for = (pipe, self.replicated(pipe.params["unet"]))
        return self._params_for[1]

    def prepare(self, replicas: Sequence[Pipeline], images: Sequence[np.ndarray], prompts: Sequence[str], num_steps: int) -> InvertInputs:
        """`inversion.prepare_inputs` run by every device on its own rows (`replicas` from
        `device_replicas`), assembled into batch-sharded arrays: each device encodes exactly the
        rows a single-device run with the same per-device batch would, in parallel."""
        n = self.num_devices
        if len(images) % n or len(prompts) != len(images) or len(replicas) != n:
            raise ValueError(f"{len(images)} images / {len(prompts)} prompts do not split over {n} devices")
        if n == 1:
            return self.place(prepare_inputs(replicas[0], images, prompts, num_steps))
        b = len(images) // n
        parts = [prepare_inputs(r, images[d * b : (d + 1) * b], prompts[d * b : (d + 1) * b], num_steps) for d, r in enumerate(replicas)]
        sharding = NamedSharding(self.mesh, P(AXIS))

        def glue(field):
            arrays = [jax.device_put(getattr(p, field), dev) for p, dev in zip(parts, self.mesh.devices.flat)]
            shape = (len(images),) + arrays[0].shape[1:]
            return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

        return InvertInputs(glue("z0"), glue("cond"), glue("null"), self.replicated(parts[0].sched))

    def place(self, inputs: InvertInputs) -> InvertInputs:
        """The batch's arrays split over the devices, the schedule on all of them."""
        if inputs.z0.shape[0] % self.num_devices:
            raise ValueError(f"a batch of {inputs.z0.shape[0]} rows does not split over {self.num_devices} devices")
        return InvertInputs(
            self.batch_sharded(inputs.z0),
            self.batch_sharded(inputs.cond),
            self.batch_sharded(inputs.null),
            self.replicated(inputs.sched),
        )

    def __call__(self, pipe: Pipeline, inputs: InvertInputs, settings: InvertSettings, progress: Optional[Callable] = None):
        """(pivots, phi, inner_iterations, final_losses, nonfinite), each sharded over the batch."""
        kw = core_args(pipe, inputs, settings, progress)
        key = (kw["unet"], kw["prediction_type"], kw["method"], kw["progress"])
        if key not in self._programs:
            self._programs[key] = sharded_program(self.mesh, *key)
        program = self._programs[key]
        return program(
            self.unet_params(pipe),
            kw["sched"],
            kw["z0"],
            kw["cond"],
            kw["null"],
            self.replicated(kw["guidance"]),
            self.replicated(kw["num_inner_steps"]),
            self.replicated(kw["early_stop_epsilon"]),
        )

    def compiled_programs(self) -> int:
        """How many inversion programs this inverter compiled (tests: batches reuse one)."""
        return sum(p._cache_size() for p in self._programs.values())


def _rows_on(x: jax.Array, device, rows: slice, batched: bool) -> jax.Array:
    """`rows` of a batch-sharded array on `device` (that device's own buffer when it holds exactly
    those rows), or the whole of an unbatched one (the device's copy when replicated)."""
    if isinstance(x, jax.Array):
        for s in x.addressable_shards:
            if s.device != device:
                continue
            if x.sharding.is_fully_replicated:
                return s.data if not batched else s.data[rows]
            if batched and s.index and s.index[0] == rows:
                return s.data
    x = x[rows] if batched else x
    return jax.device_put(x, device)


def split_rows(inv: Inversion, mesh: Mesh, per_device: int) -> list[Inversion]:
    """The per-device pieces of a batch `Inversion` the sharded program made: piece d holds rows
    [d * per_device, (d + 1) * per_device), on device d, without moving data when it is there.
    """
    out = []
    for d, device in enumerate(mesh.devices.flat):
        rows = slice(d * per_device, (d + 1) * per_device)
        fields = {k: _rows_on(getattr(inv, k), device, rows, True) for k in BATCHED_FIELDS}
        fields["timesteps"] = _rows_on(inv.timesteps, device, rows, False)
        out.append(inv.replace(**fields, prompts=tuple(inv.prompts[rows])))
    return out


def device_replicas(pipe: Pipeline, mesh: Mesh, unet_params=None) -> list[Pipeline]:
    """One Pipeline per mesh device, its parameters on that device; programs given a replica and
    that device's rows run there, so the devices work at once. `unet_params`: the UNet parameters
    already replicated over the mesh (`ShardedInverter.unet_params`), whose per-device buffers are
    used as they are. With one device: the pipeline itself."""
    devices = list(mesh.devices.flat)
    if len(devices) == 1:
        return [pipe]
    out = []
    for device in devices:
        params = {k: jax.device_put(v, device) for k, v in pipe.params.items() if k != "unet"}
        if unet_params is not None:
            params["unet"] = jax.tree_util.tree_map(lambda a: _rows_on(a, device, slice(None), False), unet_params)
        else:
            params["unet"] = jax.device_put(pipe.params["unet"], device)
        out.append(dataclasses.replace(pipe, params=params))
    return out


def pad_rows(n_real: int, capacity: int) -> list[int]:
    """Row -> item mapping for a batch of `capacity` rows holding `n_real` items: the padding
    rows repeat the last real item (their results are dropped)."""
    if not 0 < n_real <= capacity:
        raise ValueError(f"cannot pad {n_real} items to {capacity} rows")
    return list(range(n_real)) + [n_real - 1] * (capacity - n_real)


def per_device_batch(requested: int, n_items: int, num_devices: int) -> int:
    """Rows per device: the requested batch, but no more than needed to hold `n_items` at once."""
    return max(1, min(requested, -(-n_items // num_devices)))


__all__ = [
    "AXIS",
    "ShardedInverter",
    "barrier",
    "cache_dir_from_env",
    "device_replicas",
    "distributed_env",
    "enable_compilation_cache",
    "host_share",
    "initialize_distributed",
    "local_mesh",
    "merge_jsonl",
    "pad_rows",
    "per_device_batch",
    "process_info",
    "read_jsonl",
    "results_file",
    "sharded_program",
    "split_rows",
    "write_jsonl",
]
