"""Null-text inversion against the PyTorch reference (benchmarks/torch_reference.py) on tiny models."""

import jax
import numpy as np
import pytest
import torch

import nti_jax
from benchmarks import torch_reference as tr
from nti_jax.core import inversion
from nti_jax import testing
from nti_jax.testing import rel_err as rel
from nti_jax.errors import ImageError, PromptError

pytestmark = pytest.mark.slow  # every test here compiles or runs a model (minutes in all)

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The oracle tests' tiny SD 1.x (three levels, two layers per block), not the suite's mini model."""
    return testing.make_tiny_sd(str(tmp_path_factory.mktemp("sd1")), "sd1", seed=3)


@pytest.fixture(scope="module")
def torch_unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder + "/unet").eval()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)


def nchw(a):
    return torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def test_pivots_match_torch_reference(pipe, torch_unet, images):
    inv = nti_jax.invert(pipe, images[0], PROMPT, method="ddim", num_steps=50)
    sched = tr.DDIMSchedule(pipe.scheduler_config, 50)
    piv = tr.ddim_pivots(torch_unet, sched, nchw(inv.pivots[:, 0]), torch.from_numpy(np.array(inv.cond_embeddings)))
    assert inv.pivots.shape == (1, 51, 16, 16, 4)
    np.testing.assert_array_equal(inv.timesteps, sched.timesteps.numpy())
    assert rel(inv.pivots[0], np.stack([nhwc(p)[0] for p in piv])) <= 1e-4


def test_one_inner_step_matches_torch_reference(pipe, torch_unet, images):
    inv = nti_jax.invert(pipe, images[0], PROMPT, num_steps=10, num_inner_steps=1, early_stop_epsilon=-1.0)
    null = np.array(pipe.encode_prompt([""]))
    sched = tr.DDIMSchedule(pipe.scheduler_config, 10)
    phi, loss = tr.null_text_inner_step(
        torch_unet, sched, 0, nchw(inv.x_T), nchw(inv.pivots[:, 9]),
        torch.from_numpy(np.array(inv.cond_embeddings)), torch.from_numpy(null),
    )
    assert inv.inner_iterations[0, 0] == 1
    assert abs(float(inv.final_losses[0, 0]) - loss) <= 1e-5 * loss
    # One fresh-Adam step moves each element by about lr = 1e-2 (sign of the gradient).
    np.testing.assert_allclose(np.array(inv.null_embeddings[0, 0]), phi[0].numpy(), atol=1e-5)


def test_full_run_matches_torch_reference_without_early_stop(pipe, torch_unet, images):
    """20 steps x 10 iterations. Adam's early updates are ~lr * sign(g), so elements whose
    gradient is near zero can move differently on float noise: phi is compared relative to how
    far it moved (<= 10%); what the optimisation targets (losses, latents) must agree tightly."""
    inv = nti_jax.invert(pipe, images[0], PROMPT, num_steps=20, early_stop_epsilon=-1.0)
    null = np.array(pipe.encode_prompt([""]))
    sched = tr.DDIMSchedule(pipe.scheduler_config, 20)
    piv = tr.ddim_pivots(torch_unet, sched, nchw(inv.pivots[:, 0]), torch.from_numpy(np.array(inv.cond_embeddings)))
    ref = tr.null_text_optimization(
        torch_unet, sched, piv, torch.from_numpy(np.array(inv.cond_embeddings)), torch.from_numpy(null),
        num_inner_steps=10, early_stop_epsilon=-1.0,
    )
    assert (np.array(inv.inner_iterations) == 10).all() and ref["inner_iterations"] == [10] * 20
    np.testing.assert_allclose(np.array(inv.final_losses[0]), ref["final_losses"], rtol=1e-3)
    phi_ref = np.stack([p[0].numpy() for p in ref["null_embeddings"]])
    moved = np.abs(phi_ref - null[0]).max()
    assert np.abs(np.array(inv.null_embeddings[0]) - phi_ref).max() <= 0.1 * moved
    _, z = nti_jax.reconstruct(pipe, inv)
    assert rel(z[0], nhwc(ref["latents"][-1])[0]) <= 1e-3
    # The trajectory it advanced through (what an edit's source row follows): z_bar after step i.
    assert rel(inv.latents[0, :20][::-1], np.stack([nhwc(z)[0] for z in ref["latents"]])) <= 1e-3
    np.testing.assert_array_equal(inv.latents[:, 20], inv.x_T)


def test_early_stop_rule_is_exact(pipe, images):
    huge = nti_jax.invert(pipe, images[0], PROMPT, num_steps=10, early_stop_epsilon=1e9)
    assert (np.array(huge.inner_iterations) == 1).all()  # the step is taken, then the test stops
    # A threshold between the losses of the steps: later steps (larger i*2e-5 slack) stop sooner.
    mid = float(np.median(np.array(huge.final_losses)))
    some = nti_jax.invert(pipe, images[0], PROMPT, num_steps=10, early_stop_epsilon=mid)
    its = np.array(some.inner_iterations[0])
    assert its.min() >= 1 and its.max() <= 10 and len(set(its.tolist())) > 1


def test_batch_equals_one_by_one_with_independent_early_stop(pipe, images):
    prompts = [PROMPT, "a green square on a white background", "a blue triangle on a gray background"]
    first = nti_jax.invert(pipe, list(images), prompts, num_steps=10, early_stop_epsilon=1e9)
    eps = float(np.median(np.array(first.final_losses)))  # first-iteration losses: a mix will stop
    batch = nti_jax.invert(pipe, list(images), prompts, num_steps=10, early_stop_epsilon=eps)
    assert batch.num_images == 3
    iters = np.array(batch.inner_iterations)
    assert len({tuple(r) for r in iters.tolist()}) > 1, "the images should stop at different iterations"
    for k in range(3):
        one = nti_jax.invert(pipe, images[k], prompts[k], num_steps=10, early_stop_epsilon=eps)
        np.testing.assert_array_equal(np.array(one.inner_iterations[0]), iters[k])
        assert rel(batch.pivots[k], one.pivots[0]) <= 1e-5
        # Batch size changes XLA's float rounding; Adam's ~sign(g) steps amplify it in
        # elements with tiny gradients, so phi is compared relative to how far it moved.
        moved = np.abs(np.array(one.null_embeddings[0]) - np.array(pipe.encode_prompt([""]))).max()
        assert np.abs(np.array(batch.null_embeddings[k] - one.null_embeddings[0])).max() <= 1e-2 * moved
        assert rel(nti_jax.reconstruct(pipe, batch[k])[1], nti_jax.reconstruct(pipe, one)[1]) <= 1e-4


def test_methods(pipe, images):
    cond = pipe.encode_prompt([PROMPT])
    null = pipe.encode_prompt([""])
    npi = nti_jax.invert(pipe, images[0], PROMPT, method="negative-prompt", num_steps=10)
    ddim = nti_jax.invert(pipe, images[0], PROMPT, method="ddim", num_steps=10)
    np.testing.assert_array_equal(npi.null_embeddings[0], np.broadcast_to(npi.cond_embeddings, (10, 77, 32)))
    np.testing.assert_allclose(npi.cond_embeddings, cond, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ddim.null_embeddings[0], np.broadcast_to(null, (10, 77, 32)), rtol=1e-5, atol=1e-5)
    assert int(np.array(npi.inner_iterations).sum()) == 0
    # negative-prompt = CFG with uncond == cond = w 1 sampling, the reverse of the pivot path
    _, z_npi = nti_jax.reconstruct(pipe, npi)
    _, z_ddim = nti_jax.reconstruct(pipe, ddim)
    z0 = np.array(npi.pivots[0, 0])
    assert np.abs(np.array(z_npi[0]) - z0).mean() < np.abs(np.array(z_ddim[0]) - z0).mean()
    direct = nti_jax.invert(pipe, images[0], PROMPT, method="direct", num_steps=10)
    np.testing.assert_array_equal(nti_jax.reconstruct(pipe, direct)[1], direct.pivots[:, 0])


def test_nan_loss_is_recorded_and_phi_stays_finite(pipe, images):
    settings = testing.unchecked(nti_jax.InvertSettings(num_steps=10), guidance_scale=float("nan"))
    inv = nti_jax.invert(pipe, images[0], PROMPT, settings)
    assert np.array(inv.nonfinite).all()
    assert (np.array(inv.inner_iterations) == 0).all()
    null = np.array(pipe.encode_prompt([""]))
    np.testing.assert_allclose(inv.null_embeddings[0], np.broadcast_to(null, (10, 77, 32)), rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(pipe, images, tmp_path):
    # Three images, as test_batch_equals_one_by_one: the same compiled program.
    inv = nti_jax.invert(pipe, list(images), [PROMPT, "a white square on a black background", PROMPT], num_steps=10)
    path = str(tmp_path / "inv.safetensors")
    inv.save(path)
    back = nti_jax.Inversion.load(path)
    assert (back.method, back.prompts, back.settings, back.model) == (inv.method, inv.prompts, inv.settings, inv.model)
    for k in inversion.BATCHED_FIELDS + ("timesteps",):
        np.testing.assert_array_equal(np.array(getattr(back, k)), np.array(getattr(inv, k)))
    one = back[1]
    assert one.num_images == 1 and one.prompts == ("a white square on a black background",)
    np.testing.assert_array_equal(nti_jax.reconstruct(pipe, one)[1][0], nti_jax.reconstruct(pipe, inv[1])[1][0])
    inv.replace(latents=None).save(path)  # as a file from before the latents were kept: edits sample the source row
    assert nti_jax.Inversion.load(path).latents is None


def test_second_invert_does_not_recompile_and_progress_reports(pipe, images):
    seen = []
    nti_jax.invert(pipe, images[0], PROMPT, num_steps=10, progress=seen.append)
    with testing.compile_log() as log:
        nti_jax.invert(pipe, images[1], "a blue square on a red background", num_steps=10, progress=seen.append, early_stop_epsilon=0.5)
    assert log.compiles == 0
    jax.effects_barrier()  # debug callbacks run asynchronously: wait for all of them
    assert [int(i) for i in seen] == list(range(10)) * 2


def test_v_prediction_pivots_match_torch_reference(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = testing.make_tiny_sd(str(tmp_path / "sd2"), "sd2", seed=4)
    pipe = nti_jax.load_pipeline(folder)
    unet = UNet2DConditionModel.from_pretrained(folder + "/unet").eval()
    img = np.random.default_rng(5).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    inv = nti_jax.invert(pipe, img, PROMPT, num_steps=10, num_inner_steps=2, early_stop_epsilon=-1.0)
    sched = tr.DDIMSchedule(pipe.scheduler_config, 10)
    cond = torch.from_numpy(np.array(inv.cond_embeddings))
    piv = tr.ddim_pivots(unet, sched, nchw(inv.pivots[:, 0]), cond)
    assert rel(inv.pivots[0], np.stack([nhwc(p)[0] for p in piv])) <= 1e-4
    ref = tr.null_text_optimization(
        unet, sched, piv, cond, torch.from_numpy(np.array(pipe.encode_prompt([""]))), num_inner_steps=2, early_stop_epsilon=-1.0
    )
    np.testing.assert_allclose(np.array(inv.final_losses[0]), ref["final_losses"], rtol=1e-3)


def test_bad_inputs_are_one_line_errors(pipe, tmp_path):
    """Each refused before anything is compiled (a bad prompt once cost the planner's compile)."""
    with testing.compile_log() as log:
        _refuse_bad_inputs(pipe, tmp_path)
    assert log.compiles == 0


def _refuse_bad_inputs(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageError, match="cannot read image"):
        nti_jax.invert(pipe, str(bad), PROMPT)
    with pytest.raises(ImageError, match="not found"):
        nti_jax.invert(pipe, str(tmp_path / "missing.png"), PROMPT)
    with pytest.raises(ImageError, match="uint8"):
        nti_jax.invert(pipe, np.zeros((64, 64, 3), np.float32), PROMPT)
    with pytest.raises(PromptError, match="non-empty"):
        nti_jax.invert(pipe, np.zeros((64, 64, 3), np.uint8), "  ")
    with pytest.raises(ValueError, match="method must be one of"):
        nti_jax.invert(pipe, np.zeros((64, 64, 3), np.uint8), PROMPT, method="magic")
