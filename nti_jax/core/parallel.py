"""Many images on many devices: the sharded programs every call runs.

One host's devices form a 1-D mesh over the batch axis (one device is a mesh of one).
`ShardedInverter.invert` is the one call into the devices: each device encodes its own images
and prompts, then `inversion.invert_core` runs in `jax.shard_map` (every device its own
`while_loop`s: each device's early stop is independent of the others) and each device's rows
come back as `Inversion`s that stay on that device. A device computes exactly what a
single-device run with the same per-device batch computes (pivots bit-identical on CPU; the null
embeddings agree to float rounding of the gradients, ~1e-3 of how far they moved).
`reconstruct` and `edit` run on every device at once too. Every call of the three programs goes
through `call_program`; one that runs out of device memory runs again with half its rows per
device (`oom.RowLimits`). Several hosts: `run/hosts.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nti_jax.core import oom, p2p, planning
from nti_jax.core.inversion import Inversion, inversion_schedule
from nti_jax.core.null_text import InvertInputs, abstract_inputs, assemble, cond_shapes, invert_core, prepare_inputs
from nti_jax.core.planning import check_remat, pad_rows, plan_program
from nti_jax.core.sampling import Denoiser, sample_core
from nti_jax.core.settings import InvertSettings
from nti_jax.loading.pipeline import Pipeline, decode_with

AXIS = "batch"


def local_mesh(devices: Optional[Sequence] = None) -> Mesh:
    """A 1-D mesh (axis "batch") over `devices` (default: this process's devices)."""
    devices = list(devices if devices is not None else jax.local_devices())
    return Mesh(np.array(devices), (AXIS,))


@functools.lru_cache(maxsize=32)
def sharded_program(mesh: Mesh, method: str, progress: Optional[Callable], remat: str = "none"):
    """`invert_core(model, inputs)` in `jax.shard_map` over `mesh`, jitted; one per (mesh, static
    settings), shared by every `ShardedInverter` (the library's and the command line's), so a
    program is traced and compiled once per process and shape. The model is replicated;
    `inputs` split as `InvertInputs.specs` says."""
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


def _take(tree, mesh: Mesh, start: int, rows: int, per: int):
    """Rows [start, start + rows) of each device's `per` rows of a batch-split pytree, split the
    same way (past `per`, the last row repeats)."""
    idx = np.array([start + r for r in pad_rows(min(rows, per - start), rows)])
    return _glue([jax.tree_util.tree_map(lambda a: _local(a, d)[idx], tree) for d in mesh.devices.flat], mesh)


def _join(parts: Sequence, mesh: Mesh, per: int):
    """Calls' batch-split pytrees, each device's rows in call order, cut to its first `per`."""
    one = lambda d: jax.tree_util.tree_map(lambda *a: jnp.concatenate([_local(x, d) for x in a])[:per], *parts)
    return _glue([one(d) for d in mesh.devices.flat], mesh)


def call_program(kind: str, program: Callable, rows: int, *args):
    """One call of the `kind` program ("invert", "reconstruct", "edit") with `rows` rows per
    device: the one place the three run (tests inject out-of-memory failures here)."""
    return program(*args)


def _glue(pieces: Sequence, mesh: Mesh):
    """One pytree of per-device pieces (in mesh order, equal shapes) -> global arrays split over
    the batch axis, each piece staying on (or moved once to) its device."""
    devices = list(mesh.devices.flat)
    batched = NamedSharding(mesh, P(AXIS))

    def one(*leaves):
        arrays = [jax.device_put(a, d) for a, d in zip(leaves, devices)]
        return jax.make_array_from_single_device_arrays((len(arrays) * arrays[0].shape[0],) + arrays[0].shape[1:], batched, arrays)

    return jax.tree_util.tree_map(one, *pieces)


@functools.lru_cache(maxsize=16)
def reconstruct_program(mesh: Mesh, direct: bool, vae, scaling: float):
    """Each device samples its rows from their x_T with their phi and decodes them, and decodes
    z*_0 (the VAE's own reconstruction): `Reconstruction`, split like the rows."""

    def body(model, vae_params, sched, x_T, cond, null, pivots, guidance):
        z = sample_core(model, sched, x_T, cond, null, pivots, guidance, direct=direct)
        return Reconstruction(decode_with(vae, scaling, vae_params, z), z, decode_with(vae, scaling, vae_params, pivots[:, 0]))

    rows = P(AXIS)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), rows, rows, rows, rows, P()), out_specs=rows, check_vma=False))


@functools.lru_cache(maxsize=64)
def edit_program(mesh: Mesh, static, edit: bool, vae, scaling: float):
    """`p2p.edit_core` for the edits each device holds (one key), decoded there: `EditResult` of
    arrays with leading axes (G, R), split over the devices like the edits."""

    def body(model, vae_params, arr, inputs):
        latents, maps = p2p.edit_core(model, arr, inputs, static=static, edit=edit)
        g, r = latents.shape[:2]
        images = decode_with(vae, scaling, vae_params, latents.reshape((g * r,) + latents.shape[2:]))
        return EditResult(images.reshape((g, r) + images.shape[1:]), maps, latents)

    in_specs = (P(), P(), P(AXIS), p2p.EditInputs.specs(AXIS))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=P(AXIS), check_vma=False))


class Reconstruction(NamedTuple):
    """Reconstruction of B rows, on the devices that hold them."""

    images: jax.Array  # (B, H, W, 3) in [0, 1]
    latents: jax.Array  # (B, h, w, C)
    vae_images: jax.Array  # (B, H, W, 3): the VAE's own decode of z*_0 (the bound)


class EditResult(NamedTuple):
    """One edit's rows: the source, then each target prompt (R = 1 + targets)."""

    images: jax.Array  # (R, H, W, 3) in [0, 1]
    maps: jax.Array  # (R, s, s, L) stored cross-attention maps (`attention_maps`)
    latents: jax.Array  # (R, h, w, C) final latents


class EditJob(NamedTuple):
    """An edit of row `row` of an inversion the inverter holds."""

    row: int
    spec: p2p.EditSpec


@dataclasses.dataclass(frozen=True)
class Batch:
    """One call's inversions, kept where they were made: `inv` holds the call's rows (images per
    device x devices) split over the mesh's batch axis; the first `n` are the call's images, the
    rest copies of its last one that fill the devices; `remat` is the mode its program ran with
    (the planner's choice under "auto"). `host()` brings them to the host once."""

    inv: Inversion
    n: int
    remat: str = "none"

    def host(self) -> list[Inversion]:
        """The `n` images' inversions as host (numpy) arrays, B = 1 each: one transfer per array."""
        whole = jax.device_get(self.inv)
        return [whole[i] for i in range(self.n)]


class Placed(NamedTuple):
    """A pipeline's UNet (as a `Denoiser`) and VAE parameters, replicated over one mesh."""

    model: Denoiser
    vae: dict


@dataclasses.dataclass
class _Setup:
    """What `ShardedInverter` keeps per pipeline: its parameters placed on the mesh and on the
    first device alone, and one pipeline per device whose parameters live there (each device
    encodes its own rows)."""

    pipe: Pipeline
    replicas: list
    placed: dict  # Mesh -> Placed


class ShardedInverter:
    """Inversion, reconstruction and editing over a mesh: the one road of the library and the
    command line (one device is a mesh of one). `invert` splits images over the devices (padding
    them to fill every device) and returns each call's rows as a `Batch` that stays split;
    `reconstruct` and `edit` run on each device's own rows in one program per call, so an image's
    arrays never leave the device that inverted it until `Batch.host`. The model's parameters are
    replicated once per pipeline. `limits`: the rows per device each program kind and shape may
    take after an out-of-memory, and the retries so far (`oom_retries`)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh
        self._programs: set = set()  # the programs `invert` ran: compiled executables or jitted functions
        self._setup_for: Optional[_Setup] = None
        self.limits = oom.RowLimits()

    @property
    def oom_retries(self) -> int:
        """Calls run again with fewer rows after an out-of-memory, so far."""
        return self.limits.retries

    @property
    def num_devices(self) -> int:
        return self.mesh.size

    @property
    def devices(self) -> list:
        return list(self.mesh.devices.flat)

    def _setup(self, pipe: Pipeline) -> _Setup:
        if self._setup_for is None or self._setup_for.pipe is not pipe:
            place = lambda mesh: Placed(*jax.device_put((Denoiser.of(pipe), pipe.params["vae"]), NamedSharding(mesh, P())))
            whole = place(self.mesh)
            if self.num_devices == 1:
                replicas = [pipe]
            else:
                replicas = []
                for device in self.devices:
                    params = {k: jax.device_put(v, device) for k, v in pipe.params.items() if k != "unet"}
                    params["unet"] = jax.tree_util.tree_map(lambda a: _local(a, device), whole.model.params)
                    replicas.append(dataclasses.replace(pipe, params=params))
            one = local_mesh(self.devices[:1])
            self._setup_for = _Setup(pipe, replicas, {self.mesh: whole, one: whole if one == self.mesh else place(one)})
        return self._setup_for

    def _on(self, pipe: Pipeline, inv: Inversion) -> tuple[Mesh, Inversion, Placed]:
        """(the mesh `inv`'s rows are split over, `inv` there, the parameters there): this mesh for
        a `Batch` made by `invert`, the first device alone for any other inversion (one loaded from
        its file, or the library's)."""
        placed = self._setup(pipe).placed
        rows = NamedSharding(self.mesh, P(AXIS))
        if isinstance(inv.x_T, jax.Array) and inv.x_T.sharding == rows:
            return self.mesh, inv, placed[self.mesh]
        one = local_mesh(self.devices[:1])
        return one, jax.device_put(inv, NamedSharding(one, P(AXIS))), placed[one]

    def placed(self, pipe: Pipeline) -> Placed:
        """The pipeline's UNet and VAE parameters, replicated over the mesh."""
        return self._setup(pipe).placed[self.mesh]

    def prepare(self, pipe: Pipeline, images: Sequence[np.ndarray], prompts: Sequence[str], settings: InvertSettings) -> InvertInputs:
        """The inversion program's inputs for rows (a multiple of the devices): each device encodes
        its own rows; the pieces become batch-sharded arrays."""
        replicas = self._setup(pipe).replicas
        b = len(images) // self.num_devices
        parts = [prepare_inputs(r, images[d * b : (d + 1) * b], prompts[d * b : (d + 1) * b], settings) for d, r in enumerate(replicas)]
        whole = NamedSharding(self.mesh, P())
        fields = [[getattr(p, f) for p in parts] for f in InvertInputs._fields]
        return InvertInputs(*[jax.device_put(pieces[0], whole) if spec == P() else _glue(pieces, self.mesh)
                              for pieces, spec in zip(fields, InvertInputs.specs(AXIS))])

    def plan(self, pipe: Pipeline, settings: InvertSettings, per_device: int, progress: Optional[Callable] = None,
             remat: str = "auto", max_device_memory: Optional[float] = None) -> planning.Choice:
        """Remat mode and images per device per call for `per_device` images per device, from the
        compiled sharded programs (`planning.plan_program`). Nothing is placed on the mesh, so
        a mesh of compile-only TPU devices (`jax.experimental.topologies`) plans for its chips."""
        model = Denoiser.of(pipe)
        whole, batched = NamedSharding(self.mesh, P()), NamedSharding(self.mesh, P(AXIS))

        def spec(rows: int) -> InvertInputs:
            specs = abstract_inputs(pipe, settings, rows * self.num_devices, batched)
            return InvertInputs(*[a if s == P(AXIS) else jax.tree_util.tree_map(lambda x: x.update(sharding=whole), a)
                                  for a, s in zip(specs, InvertInputs.specs(AXIS))])

        model_spec = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), model)
        lower = lambda rows, mode: sharded_program(self.mesh, settings.method, progress, mode).lower(model_spec, spec(rows))
        key = (progress, model.module, model.prediction_type, self.mesh, planning.shape_key(model_spec, spec(1)))
        s, ch = pipe.image_size // pipe.latent_factor, pipe.unet.config.in_channels
        return plan_program(model, settings.method, remat, per_device, lower, key, max_device_memory=max_device_memory,
                            latent=(s, s, ch), context=cond_shapes(pipe), device=self.devices[0])

    def invert(
        self, pipe: Pipeline, images: Sequence[np.ndarray], prompts: Sequence[str], settings: InvertSettings,
        progress: Optional[Callable] = None, *, remat: str = "auto", max_device_memory: Optional[float] = None,
    ) -> list[Batch]:
        """Invert uint8 square images (at the model's size) with their prompts: one `Batch` per call
        of the program, in order, together holding every image once. `remat`: what the null-text
        gradient recomputes instead of keeping (`models.unet.REMAT_MODES`), or "auto"; with "auto"
        or `max_device_memory` (GiB per device) the mode and the images per call come from the
        compiled programs (`plan`), and a share that fits in no mode runs in several calls; so
        does one whose call runs out of device memory (`oom.RowLimits`: `DeviceMemoryError`,
        holding the finished `Batch`es, when one image per device does not fit). Results do not
        depend on either (in bf16, a row's rounding depends on its call's batch)."""
        if len(images) != len(prompts) or not images:
            raise ValueError(f"{len(images)} images and {len(prompts)} prompts")
        model = self.placed(pipe).model
        check_remat(remat)
        nd, total = self.num_devices, -(-len(images) // self.num_devices)
        key = ("invert", self.mesh, model.module, settings, progress, remat, max_device_memory, np.shape(images[0]))
        program = functools.partial(self._invert_program, pipe, settings, progress, remat, max_device_memory)

        def call(start: int, k: int) -> Batch:
            run, fits, mode = program(k)
            if fits != k:  # the planner would split k rows further: its mode, for k rows
                run = sharded_program(self.mesh, settings.method, progress, mode)
            self._programs.add(run)
            n = min(k * nd, len(images) - start * nd)
            rows = [start * nd + r for r in pad_rows(n, k * nd)]
            padded = [prompts[r] for r in rows]
            inputs = self.prepare(pipe, [images[r] for r in rows], padded, settings)
            out = call_program("invert", run, k, model, inputs)
            return Batch(assemble(pipe, settings, padded, inputs.cond, inputs.sched.timesteps, out), n, mode)

        return self.limits.calls(key, total, program(self.limits.first(key, total))[1], call)

    def _invert_program(self, pipe: Pipeline, settings: InvertSettings, progress: Optional[Callable], remat: str,
                        max_device_memory: Optional[float], rows: int) -> tuple[Callable, int, str]:
        """(the inversion program for `rows` images per device, the rows it was planned for, its
        remat mode): under "auto" or a memory budget the planner's choice (`plan`: perhaps
        fewer rows), else the jitted program."""
        if remat == "auto" or max_device_memory is not None:
            choice = self.plan(pipe, settings, rows, progress, remat, max_device_memory)
            return choice.compiled, choice.rows, choice.remat
        return sharded_program(self.mesh, settings.method, progress, remat), rows, remat

    def reconstruct(self, pipe: Pipeline, inv: Inversion) -> Reconstruction:
        """Reconstructions of a `Batch`'s (or any) inversion: each device its own rows, in one call
        (in several of fewer rows after an out-of-memory, joined)."""
        mesh, inv, placed = self._on(pipe, inv)
        direct = inv.method == "direct"
        program = reconstruct_program(mesh, direct, pipe.vae, pipe.scaling_factor)
        whole = NamedSharding(mesh, P())
        sched = jax.device_put(inversion_schedule(pipe, inv), whole)
        guidance = jax.device_put(np.float32(inv.settings.guidance_scale), whole)
        rows, per = (inv.x_T, inv.cond_embeddings, inv.null_embeddings, inv.pivots), inv.num_images // mesh.size
        key = ("reconstruct", mesh, direct, placed.model.module, pipe.vae, oom.row_key(rows))

        def call(start: int, k: int) -> Reconstruction:
            part = rows if k == per else _take(rows, mesh, start, k, per)
            return call_program("reconstruct", program, k, placed.model, placed.vae, sched, *part, guidance)

        parts = self.limits.calls(key, per, per, call)
        return parts[0] if len(parts) == 1 else _join(parts, mesh, per)

    def edit(self, pipe: Pipeline, inv: Inversion, jobs: Sequence[EditJob]) -> list[Union[EditResult, Exception]]:
        """Run edits of `inv`'s images. The edits of one key run as one program, each on the device
        that holds its row (a device with fewer of them repeats one to fill the program). Per job:
        an `EditResult` of host arrays, or the exception its program raised."""
        mesh, inv, placed = self._on(pipe, inv)
        devices = list(mesh.devices.flat)
        per = inv.num_images // len(devices)
        local = [jax.tree_util.tree_map(lambda a: _local(a, d), inv) for d in devices]
        sched = jax.device_put(inversion_schedule(pipe, inv), NamedSharding(mesh, P()))
        out: list = [None] * len(jobs)
        groups: dict = {}
        for j, job in enumerate(jobs):
            groups.setdefault(job.spec.key, []).append(j)
        for key, members in groups.items():
            mine = [[j for j in members if jobs[j].row // per == d] for d in range(len(devices))]
            program = edit_program(mesh, key[0], key[1], pipe.vae, pipe.scaling_factor)

            def call(start: int, k: int) -> None:
                """Each device's edits [start, start + k) of this key, one program; their results into `out`."""
                now = [js[start : start + k] for js in mine]
                pieces = [_edit_piece(jobs, js, members[0], k, d * per, local[d], sched) for d, js in enumerate(now)]
                arr, inputs = _glue(pieces, mesh)
                result = jax.device_get(call_program("edit", program, k, placed.model, placed.vae, arr, inputs._replace(sched=sched)))
                for d, js in enumerate(now):
                    for g, j in enumerate(js):
                        out[j] = EditResult(*(a[d * k + g] for a in result))

            m = max(len(js) for js in mine)
            try:
                self.limits.calls(("edit", mesh, key, placed.model.module, pipe.vae, oom.row_key(local[0])), m, m, call)
            except Exception as e:  # noqa: BLE001 - each job of the program not yet finished gets its error
                for j in members:
                    out[j] = e if out[j] is None else out[j]
        return out

    def compiled_programs(self) -> int:
        """How many inversion programs this inverter compiled (tests: batches reuse one)."""
        return sum(p._cache_size() if hasattr(p, "_cache_size") else 1 for p in self._programs)


def _edit_piece(jobs: Sequence[EditJob], js: list[int], spare: int, k: int, first_row: int, local: Inversion, sched):
    """One device's `k` rows of an edit program: jobs `js` (on rows from `first_row` on of the
    device's inversion `local`), filled by repeating one (or job `spare`, on row 0, if none)."""
    fill = js + [js[0] if js else spare] * (k - len(js))
    rows = [jobs[j].row - first_row if j in js else 0 for j in fill]  # a filler takes a row the device holds
    specs = [jobs[j].spec for j in fill]
    return p2p.stack(specs), p2p.edit_inputs(local, rows, specs, sched)._replace(sched=None)


@functools.lru_cache(maxsize=8)
def inverter_on(mesh: Mesh) -> ShardedInverter:
    """The process's inverter over `mesh` (the library's: a mesh of the first local device)."""
    return ShardedInverter(mesh)
