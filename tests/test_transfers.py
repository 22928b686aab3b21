"""The compiled programs make no implicit host <-> device copy: called on device-resident inputs
under `jax.transfer_guard("disallow")`, inversion, sampling and editing run to the end (a stray
`np.asarray`, `float()` or Python-scalar operand inside a program would raise here)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nti_jax
from nti_jax.core import inversion, p2p, sampling
from nti_jax import testing

pytestmark = pytest.mark.slow  # every test here compiles or runs a model (minutes in all)

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return nti_jax.load_pipeline(testing.make_tiny_sd(str(tmp_path_factory.mktemp("sd1")), "sd1", seed=3))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)


@pytest.mark.parametrize("method", ["null-text", "direct"])
def test_inversion_and_sampling_programs_stay_on_device(pipe, image, method):
    settings = nti_jax.InvertSettings(method=method, num_steps=4, num_inner_steps=2, early_stop_epsilon=-1.0)
    inputs = jax.device_put(inversion.prepare_inputs(pipe, [image], [PROMPT], settings))
    model = jax.device_put(sampling.Denoiser.of(pipe))
    out = inversion.invert_program(model, inputs, method=method)  # compiled outside the guard
    args = (model, inputs.sched, out.pivots[:, -1], inputs.cond, out.phi, out.pivots, inputs.guidance)
    jax.block_until_ready(sampling._sample_program(*args, direct=method == "direct"))
    with jax.transfer_guard("disallow"):
        out = jax.block_until_ready(inversion.invert_program(model, inputs, method=method))
        z = jax.block_until_ready(sampling._sample_program(*args, direct=method == "direct"))
    assert out.phi.shape == (1, 4, 77, 32) and z.shape == (1, 16, 16, 4)


def test_edit_program_stays_on_device(pipe, image):
    inv = nti_jax.invert(pipe, image, PROMPT, num_steps=4, num_inner_steps=2)
    target = "a green circle on a blue background"
    static, arr = p2p.compile_controller(pipe, nti_jax.Replace(), PROMPT, [target], 4, 16, False)
    cond = jnp.concatenate([inv.cond_embeddings, pipe.encode_prompt([target])])
    inputs = jax.device_put(p2p.EditInputs(
        sampling.inversion_schedule(pipe, inv), inv.x_T, cond[None], inv.null_embeddings, inv.pivots, jnp.float32([7.5])
    ))
    model, arr = jax.device_put((sampling.Denoiser.of(pipe), jax.tree_util.tree_map(lambda a: a[None], arr)))
    jax.block_until_ready(p2p._edit_program(model, arr, inputs, static=static, edit=True))
    with jax.transfer_guard("disallow"):
        z, maps = jax.block_until_ready(p2p._edit_program(model, arr, inputs, static=static, edit=True))
    assert z.shape == (1, 2, 16, 16, 4) and maps.shape[:2] == (1, 2)
