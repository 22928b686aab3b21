"""The toy training script end to end at a few steps: stages, resume, export, decoder fine-tune."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nti_jax
from nti_jax.toy import train


@pytest.mark.slow
def test_train_resumes_exports_and_fine_tunes_the_decoder(tmp_path):
    work, out, out2 = (str(tmp_path / k) for k in ("work", "model", "model2"))
    small = ["--vae-batch", "2", "--batch", "2", "--ckpt-every", "1", "--export-every", "2"]
    train.main(["--workdir", work, "--export", out, "--vae-steps", "2", "--unet-steps", "2", *small])
    state = train._load(os.path.join(work, "state.msgpack"))
    assert (state["stage"], int(state["step"])) == ("unet", 2)
    pipe = nti_jax.load_pipeline(out)
    with open(os.path.join(out, "vae", "config.json")) as f:
        assert json.load(f)["scaling_factor"] == float(state["scaling"]) > 0

    log = os.path.join(work, "log.txt")
    before = open(log).read()
    train.main(["--workdir", work, "--export", out, "--vae-steps", "2", "--unet-steps", "3", *small])
    added = open(log).read()[len(before):]
    assert "vae step" not in added and "exported EMA weights at step 3" in added  # resumed in stage 2
    assert int(train._load(os.path.join(work, "state.msgpack"))["step"]) == 3

    train.main(["--workdir", str(tmp_path / "dec"), "--init", out, "--export", out2, "--decoder-steps", "2", "--vae-batch", "2"])
    tuned = nti_jax.load_pipeline(out2).params["vae"]
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    first = nti_jax.load_pipeline(out).params["vae"]
    assert same(tuned["encoder"], first["encoder"]) and same(tuned["quant_conv"], first["quant_conv"])
    assert not same(tuned["decoder"], first["decoder"])
    assert pipe.params["unet"].keys() == nti_jax.load_pipeline(out2).params["unet"].keys()


def test_cutmix_boxes_are_rectangles_on_the_latent_grid_and_pixels_follow():
    a = np.zeros((64, 16, 16, 4), np.float32)
    box, pix = train._cutmix(a, jax.random.PRNGKey(0), 4)
    box, pix = np.asarray(box)[..., 0], np.asarray(pix)[..., 0]
    assert box.shape == (64, 16, 16) and pix.shape == (64, 64, 64)
    np.testing.assert_array_equal(pix, box.repeat(4, 1).repeat(4, 2))
    empty = ~box.any(axis=(1, 2))
    assert 16 <= empty.sum() <= 48  # about half the images keep their own latents
    for b in box[~empty]:
        rows, cols = np.nonzero(b.any(1))[0], np.nonzero(b.any(0))[0]
        expect = np.zeros_like(b)
        expect[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        np.testing.assert_array_equal(b, expect)  # one filled axis-aligned rectangle


def test_host_learning_rate_equals_optaxs_schedule_inside_the_step():
    """The steps take their rate from the host (`_lr_schedule` called per step: one compile for any
    run length): AdamW scaled by it after the update gives optax's own scheduled AdamW."""
    import optax

    sched = train._lr_schedule(1e-2, 2, 6, 0.1)
    p0 = {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.ones(4)}
    loss = lambda p, x: jnp.sum((x @ p["kernel"] + p["bias"]) ** 2)
    x = jnp.linspace(0.5, -0.5, 6).reshape(2, 3)
    opt = lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=1e-2, mask=train._wd_mask))
    ref_opt, our_opt = opt(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 6, 1e-3)), opt(train._unit)
    ref_p, ref_s, our_p, our_s = p0, ref_opt.init(p0), p0, our_opt.init(p0)
    for s in range(6):
        u, ref_s = ref_opt.update(jax.grad(loss)(ref_p, x), ref_s, ref_p)
        ref_p = optax.apply_updates(ref_p, u)
        u, our_s = our_opt.update(jax.grad(loss)(our_p, x), our_s, our_p)
        our_p = optax.apply_updates(our_p, train._scaled(u, sched(s)))
    for k in p0:
        np.testing.assert_allclose(np.asarray(our_p[k]), np.asarray(ref_p[k]), rtol=1e-6, atol=1e-9)
    assert not np.allclose(np.asarray(our_p["kernel"]), np.asarray(p0["kernel"]))
