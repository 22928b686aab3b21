"""Prompt-to-Prompt editing: identities, controller closed forms, errors, compile-once."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nti_jax
from nti_jax.core import controllers, heatmaps, p2p, parallel
from nti_jax.core.inversion import inversion_schedule
from nti_jax import testing
from nti_jax.errors import PromptError

SRC = "a red circle on a blue background"
# XLA's CPU convolutions round differently for different batch sizes (measured on the
# three-level tiny SD 1.x this file used before the suite's mini model: 1.5e-6 on one UNet call,
# batch 2 vs 4; every op alone is batch-invariant, a stride-2 conv on 8x8 maps is not), and a
# random model amplifies that through 10 CFG steps at w = 7.5 to ~4e-5 on the image; rows at
# different places of one batch differ alike. Identities between rows are therefore checked at
# 1e-4 here (benchmarks/quality.py measures them on the toy model).
BATCH_TOL = 1e-4


@pytest.fixture(scope="module")
def inv(pipe):
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return nti_jax.invert(pipe, img, SRC, num_steps=10, num_inner_steps=3)


@pytest.fixture(scope="module")
def recon(pipe, inv):
    return np.asarray(nti_jax.reconstruct(pipe, inv)[0][0])


@pytest.mark.slow
def test_identity_edits_reproduce_the_reconstruction(pipe, inv, recon):
    out = nti_jax.edit(pipe, inv, [SRC], controller=nti_jax.Replace())
    assert out.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(out[0], recon, atol=BATCH_TOL)
    np.testing.assert_allclose(out[1], out[0], atol=BATCH_TOL)
    rw = nti_jax.edit(pipe, inv, [SRC], controller=nti_jax.Reweight(equalizer={"red": 1.0}))
    np.testing.assert_allclose(rw[1], out[0], atol=BATCH_TOL)


@pytest.mark.slow
def test_source_row_of_a_batch_of_three_is_the_reconstruction(pipe, inv, recon):
    out = nti_jax.edit(pipe, inv, ["a green circle on a blue background", "a red square on a blue background"])
    assert out.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(out[0], recon, atol=BATCH_TOL)
    assert np.abs(out[1] - recon).max() > 1e-3  # the targets did change


@pytest.mark.slow
def test_one_compile_per_prompt_batch_shape(pipe, inv):
    nti_jax.edit(pipe, inv, ["a blue circle on a blue background"], controller=nti_jax.Replace())
    with testing.compile_log() as log:
        nti_jax.edit(pipe, inv, ["a yellow circle on a blue background"], controller=nti_jax.Replace())
        nti_jax.edit(pipe, inv, ["a red circle on a gray background"], controller=nti_jax.Replace(cross_replace_steps=0.5))
    assert log.compiles == 0


@pytest.mark.slow
def test_local_blend_keeps_the_source_outside_the_mask(pipe, inv):
    target = "a green circle on a blue background"
    cond = jnp.concatenate([inv.cond_embeddings, pipe.encode_prompt([target])])
    sched = inversion_schedule(pipe, inv)
    mesh = parallel.local_mesh(jax.local_devices()[:1])
    placed = parallel.inverter_on(mesh).placed(pipe)

    def run(threshold):
        ctrl = nti_jax.Replace(blend=nti_jax.LocalBlend([["circle"], ["circle"]], threshold=threshold, start=0.2))
        static, arr = p2p.compile_controller(pipe, ctrl, SRC, [target], 10, 16, False)
        inputs = p2p.EditInputs(sched, inv.x_T, cond[None], inv.null_embeddings, inv.pivots, np.float32([7.5]))
        one = jax.tree_util.tree_map(lambda a: a[None], arr)  # the program's leading image axis
        out = parallel.edit_program(mesh, static, True, pipe.vae, pipe.scaling_factor)(placed.model, placed.vae, one, inputs)
        return np.asarray(out.latents[0]), np.asarray(p2p._blend_mask(static, arr, jnp.asarray(out.maps[0]) * 10, 16))[1, ..., 0]

    # A random model's attention is nearly flat: pick a threshold that gives a partial mask.
    for th in np.linspace(0.5, 0.999, 30):
        z, mask = run(float(th))
        if 0.2 < mask.mean() < 0.8:
            break
    assert 0 < mask.mean() < 1, "the test needs a partial mask"
    same = np.all(z[1] == z[0], axis=-1)
    np.testing.assert_array_equal(same[~mask], True)
    assert not same[mask].all()


def test_controller_closed_forms():
    rng = np.random.default_rng(0)
    probs = jnp.asarray(rng.random((3, 2, 16, 5)), jnp.float32)  # R=3 rows, 2 heads, 4x4 queries, 5 tokens
    place = nti_jax.models.AttentionPlace("down", "cross", (4, 4), "x")
    perm = np.eye(5, dtype=np.float32)[[0, 2, 1, 3, 4]]
    arr = p2p._Arrays(
        cross_alpha=jnp.ones((1, 2, 5)), self_steps=jnp.array([True]),
        mapper=jnp.asarray(np.stack([np.eye(5, dtype=np.float32), perm])), refine_alphas=jnp.ones((2, 5)),
        equalizer=jnp.asarray([[1, 2, 1, 1, 1], [1, 1, 1, 1, 1]], jnp.float32),
        blend_alpha=jnp.zeros((3, 5)), blend_threshold=jnp.float32(0.3),
    )
    st = p2p._Static("replace", 16, 4, 10, True, False)
    out = np.asarray(p2p._edit_cond(st, arr, 0, probs, place))
    p = np.asarray(probs)
    np.testing.assert_array_equal(out[0], p[0])
    np.testing.assert_allclose(out[1], p[0] * np.array([1, 2, 1, 1, 1]), rtol=1e-6)
    np.testing.assert_allclose(out[2], p[0][..., [0, 2, 1, 3, 4]], rtol=1e-6)
    # outside the cross window targets keep their own maps
    out = np.asarray(p2p._edit_cond(st, arr.replace(cross_alpha=jnp.zeros((1, 2, 5))), 0, probs, place))
    np.testing.assert_array_equal(out, p)
    # refine: mapped tokens from the source, new tokens (alpha 0) their own
    ref = arr.replace(mapper=jnp.asarray([[0, 1, 2, 3, 4], [0, 1, -1, 2, 3]]),
                      refine_alphas=jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]], jnp.float32))
    out = np.asarray(p2p._edit_cond(p2p._Static("refine", 16, 4, 10, False, False), ref, 0, probs, place))
    np.testing.assert_allclose(out[2][..., [0, 1, 3, 4]], p[0][..., [0, 1, 2, 3]], rtol=1e-6)
    np.testing.assert_allclose(out[2][..., 2], p[2][..., 2], rtol=1e-6)
    # self-attention: replaced inside the window and only up to the size limit
    self_place = nti_jax.models.AttentionPlace("up", "self", (4, 4), "y")
    sp = jnp.asarray(rng.random((3, 2, 16, 16)), jnp.float32)
    out = np.asarray(p2p._edit_cond(st, arr, 0, sp, self_place))
    np.testing.assert_array_equal(out[1], np.asarray(sp)[0])
    small = p2p._Static("replace", 9, 4, 10, True, False)
    np.testing.assert_array_equal(np.asarray(p2p._edit_cond(small, arr, 0, sp, self_place)), np.asarray(sp))


@pytest.mark.slow
def test_prompt_errors_name_the_problem(pipe, inv):
    with pytest.raises(PromptError, match="a big red circle"):
        nti_jax.edit(pipe, inv, ["a big red circle on a blue background"], controller=nti_jax.Replace())
    with pytest.raises(PromptError, match="'purple'"):
        nti_jax.edit(pipe, inv, ["a green circle on a blue background"], controller=nti_jax.Reweight(equalizer={"purple": 2.0}))
    with pytest.raises(PromptError, match="'star'"):
        nti_jax.edit(pipe, inv, ["a green circle on a blue background"],
                     controller=nti_jax.Replace(blend=nti_jax.LocalBlend([["star"], ["circle"]])))
    with pytest.raises(PromptError, match="'star'.*past the model's 77-token limit"):  # a word only the cut part held
        nti_jax.edit(pipe, inv, ["a green circle on a blue background" + " big" * 80 + " star"],
                     controller=nti_jax.Refine(blend=nti_jax.LocalBlend([["circle"], ["star"]])))
    with pytest.raises(PromptError, match="non-empty"):
        nti_jax.edit(pipe, inv, [""])


@pytest.mark.slow
def test_refine_and_settings(pipe, inv, recon):
    ctrl = controllers.controller_from_settings(SRC, ["a big red circle on a blue background"], {"kind": "auto"})
    assert isinstance(ctrl, nti_jax.Refine)
    out = nti_jax.edit(pipe, inv, ["a big red circle on a blue background"], controller=ctrl)
    np.testing.assert_allclose(out[0], recon, atol=BATCH_TOL)
    rw = controllers.controller_from_settings(SRC, ["a red circle on a blue background"], {"equalizer": {"red": 3}, "cross_replace_steps": {"default_": 0.8, "red": 0.3}})
    assert isinstance(rw, nti_jax.Reweight) and rw.equalizer == {"red": 3}
    with pytest.raises(ValueError, match="unknown edit settings: colour"):
        controllers.controller_from_settings(SRC, [SRC], {"colour": 1})


@pytest.mark.slow
def test_attention_maps_and_grid(pipe, inv, tmp_path):
    maps = nti_jax.attention_maps(pipe, inv)
    assert maps.shape == (1, 16, 16, 77)  # the mini model's down/up cross-attentions all run at 16 x 16
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-4)  # softmax rows, averaged
    labels = heatmaps.token_labels(pipe, SRC)
    assert labels[1:3] == ["a", "red"]
    img = np.asarray(nti_jax.reconstruct(pipe, inv)[0][0])
    path = str(tmp_path / "maps.png")
    heatmaps.save_attention_grid(img, maps[0], labels, path)
    assert os.path.getsize(path) > 1000


def test_edit_settings_guidance_and_errors():
    tgt = ["a green circle on a blue background"]
    c = controllers.controller_from_settings(SRC, tgt, {"guidance": "single-branch+proximal", "prox_quantile": 0.6,
                                                "blend_words": [["circle"], ["circle"]], "substruct_words": [["blue"], ["blue"]],
                                                "mapping": "aligned"})
    assert c.single_branch and c.proximal == controllers.Proximal(quantile=0.6) and c.mapping == "aligned"
    assert c.blend.substruct_words == [["blue"], ["blue"]]
    plain = controllers.controller_from_settings(SRC, tgt, {})
    assert not plain.single_branch and plain.proximal is None and plain.mapping == "original"
    with pytest.raises(ValueError, match="guidance must be one of"):
        controllers.controller_from_settings(SRC, tgt, {"guidance": "prox"})
    with pytest.raises(ValueError, match="prox_quantile"):
        controllers.controller_from_settings(SRC, tgt, {"guidance": "proximal", "prox_quantile": 1.5})


def test_proximal_is_checked_where_it_is_built():
    # issue 22: the library refuses what ProxEdit cannot run; quantile <= 0 is its fixed threshold
    for bad in ({"quantile": 1.5}, {"quantile": float("nan")}, {"norm": "l2"}, {"dilate": -1}, {"dilate": 1.5}):
        with pytest.raises(ValueError, match="proximal guidance needs"):
            controllers.Proximal(**bad)
    assert controllers.Proximal(quantile=-0.1).quantile == -0.1 and controllers.Proximal(quantile=1.0).quantile == 1.0
    c = controllers.controller_from_settings(SRC, [SRC], {"guidance": "proximal", "prox_quantile": -0.05})
    assert c.proximal == controllers.Proximal(quantile=-0.05)


def test_blend_and_mapping_errors_name_the_problem(pipe):
    tgt = ["a green circle on a blue background"]
    with pytest.raises(PromptError, match="substruct_words needs one word list per prompt"):
        p2p.compile_controller(pipe, nti_jax.Replace(blend=nti_jax.LocalBlend([["circle"], ["circle"]], substruct_words=[["blue"]])),
                               SRC, tgt, 10, 16, False)
    with pytest.raises(PromptError, match="'sky'"):
        p2p.compile_controller(pipe, nti_jax.Replace(blend=nti_jax.LocalBlend([["circle"], ["circle"]], substruct_words=[["sky"], ["blue"]])),
                               SRC, tgt, 10, 16, False)
    with pytest.raises(ValueError, match="mapping must be"):
        p2p.compile_controller(pipe, nti_jax.Replace(mapping="fixed"), SRC, tgt, 10, 16, False)
    # Reweight alone needs no word-swap mapper: prompts of any word count (as the original)
    _, arr = p2p.compile_controller(pipe, nti_jax.Reweight(equalizer={"big": 2.0}), SRC, ["a big red circle on a blue background"], 10, 16, False)
    np.testing.assert_array_equal(np.asarray(arr.mapper)[0], np.eye(77))


@pytest.mark.slow
def test_attention_sheet_for_an_edit(pipe, inv):
    tgt = "a green circle on a blue background"
    maps = nti_jax.attention_maps(pipe, inv, [tgt], controller=nti_jax.Replace())
    img = heatmaps.attention_sheet(pipe, [SRC, tgt], nti_jax.edit(pipe, inv, [tgt], controller=nti_jax.Replace()), maps)
    n_src, n_tgt = len(heatmaps.token_labels(pipe, SRC)), len(heatmaps.token_labels(pipe, tgt))
    assert img.shape == (2 * (96 + 16), 96 * max(n_src, n_tgt), 3)


@pytest.mark.slow
def test_the_edit_hook_sees_only_layers_it_edits_or_stores(pipe, inv, monkeypatch):
    """Self-attention above the replacement limit (latent/2 squared queries, the original's 32x32
    at 512 px) runs fused, with no probabilities; every cross layer and small self layer is
    offered to the hook, and attention_maps() is offered the stored cross layers only."""
    from nti_jax.models import attention

    seen, wants = {}, attention.hook_wants
    record = lambda hook, place: wants(hook, place) if hook is None else seen.setdefault(place, wants(hook, place))
    monkeypatch.setattr(attention, "hook_wants", record)
    parallel.edit_program.cache_clear()
    nti_jax.edit(pipe, inv, ["a green circle on a blue background"], controller=nti_jax.Replace())
    latent = inv.x_T.shape[1]
    limit = (latent // 2) ** 2
    assert {p.size for p in seen if p.kind == "self"} >= {(latent, latent), (latent // 2, latent // 2)}
    for place, offered in seen.items():
        assert offered == (place.kind == "cross" or place.size[0] * place.size[1] <= limit), place
    seen.clear()
    parallel.edit_program.cache_clear()
    nti_jax.attention_maps(pipe, inv)
    smallest = min(p.size for p in seen if p.kind == "cross" and p.block == "down")
    assert {p for p, offered in seen.items() if offered} == {
        p for p in seen if p.kind == "cross" and p.size == smallest and p.block != "mid"}
