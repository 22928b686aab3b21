"""The compiled programs make no implicit host <-> device copy: called on device-resident inputs
under `jax.transfer_guard("disallow")`, inversion, sampling and editing run to the end (a stray
`np.asarray`, `float()` or Python-scalar operand inside a program would raise here)."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

import nti_jax
from nti_jax.core import p2p, parallel
from nti_jax.core.inversion import inversion_schedule

pytestmark = pytest.mark.slow  # every test here compiles or runs a model (minutes in all)

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["null-text", "direct"])
def test_inversion_and_reconstruction_programs_stay_on_device(pipe, image, method):
    settings = nti_jax.InvertSettings(method=method, num_steps=4, num_inner_steps=2, early_stop_epsilon=-1.0)
    mesh = parallel.local_mesh(jax.local_devices()[:1])
    inverter = parallel.inverter_on(mesh)
    inputs, placed = inverter.prepare(pipe, [image], [PROMPT], settings), inverter.placed(pipe)
    invert = parallel.sharded_program(mesh, method, None, "none")
    sample = parallel.reconstruct_program(mesh, method == "direct", pipe.vae, pipe.scaling_factor)
    out = invert(placed.model, inputs)  # compiled outside the guard
    args = (placed.model, placed.vae, inputs.sched, out.pivots[:, -1], inputs.cond, out.phi, out.pivots, inputs.guidance)
    jax.block_until_ready(sample(*args))
    with jax.transfer_guard("disallow"):
        out = jax.block_until_ready(invert(placed.model, inputs))
        recon = jax.block_until_ready(sample(*args))
    assert out.phi.shape == (1, 4, 77, 32) and recon.latents.shape == (1, 16, 16, 4)


def test_edit_program_stays_on_device(pipe, image):
    inv = nti_jax.invert(pipe, image, PROMPT, num_steps=4, num_inner_steps=2)
    target = "a green circle on a blue background"
    static, arr = p2p.compile_controller(pipe, nti_jax.Replace(), PROMPT, [target], 4, 16, False)
    cond = jnp.concatenate([inv.cond_embeddings, pipe.encode_prompt([target])])
    mesh = parallel.local_mesh(jax.local_devices()[:1])
    placed = parallel.inverter_on(mesh).placed(pipe)
    rows, whole = NamedSharding(mesh, P(parallel.AXIS)), NamedSharding(mesh, P())
    inputs = p2p.EditInputs(jax.device_put(inversion_schedule(pipe, inv), whole),
                            *jax.device_put((inv.x_T, cond[None], inv.null_embeddings, inv.pivots, jnp.float32([7.5])), rows))
    arr = jax.device_put(jax.tree_util.tree_map(lambda a: a[None], arr), rows)
    program = parallel.edit_program(mesh, static, True, pipe.vae, pipe.scaling_factor)
    jax.block_until_ready(program(placed.model, placed.vae, arr, inputs))
    with jax.transfer_guard("disallow"):
        out = jax.block_until_ready(program(placed.model, placed.vae, arr, inputs))
    assert out.latents.shape == (1, 2, 16, 16, 4) and out.maps.shape[:2] == (1, 2)
