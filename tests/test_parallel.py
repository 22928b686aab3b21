"""nti_jax.core.parallel: the sharded inversion program, host shares, cache settings.

The multi-device and multi-process runs themselves are exercised end to end in test_cli.py
(subprocesses, since XLA flags and jax.distributed must be set before JAX starts).
"""

import jax
import numpy as np
import pytest

import nti_jax
from nti_jax.core import inversion, p2p, parallel
from nti_jax.run import hosts
from nti_jax.testing import rel_err

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


@pytest.fixture(scope="module")
def images():
    return list(np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))


@pytest.mark.slow
def test_sharded_program_equals_invert(pipe, images):
    """On one device the shard_map-wrapped core computes what `nti_jax.invert` computes, and a
    second batch of the same shape reuses the compiled program."""
    kw = dict(num_steps=5, num_inner_steps=3, early_stop_epsilon=1.0)
    ref = nti_jax.invert(pipe, images, PROMPTS, **kw)
    mesh = parallel.local_mesh(jax.local_devices()[:1])
    parallel.sharded_program.cache_clear()  # programs are shared per process: count this test's own
    inverter = parallel.ShardedInverter(mesh)
    settings = nti_jax.InvertSettings(num_steps=5, num_inner_steps=3, early_stop_epsilon=1.0)
    (batch,) = inverter.invert(pipe, images, PROMPTS, settings)
    assert batch.n == 2 and batch.inv.num_images == 2
    inv = batch.inv
    assert inv.method == ref.method and inv.settings == ref.settings and inv.prompts == ref.prompts
    iters = np.array(inv.inner_iterations)
    np.testing.assert_array_equal(iters, np.array(ref.inner_iterations))
    assert len(set(iters.ravel().tolist())) > 1, "early stop should bite at some steps only"
    for k in inversion.BATCHED_FIELDS + ("timesteps",):
        np.testing.assert_allclose(np.array(getattr(inv, k)), np.array(getattr(ref, k)), rtol=1e-6, atol=1e-6, err_msg=k)
    before = inverter.compiled_programs()
    inverter.invert(pipe, images[::-1], PROMPTS[::-1], settings)
    assert inverter.compiled_programs() == before == 1
    host = batch.host()
    assert [h.num_images for h in host] == [1, 1] and isinstance(host[0].pivots, np.ndarray)
    recon, latent, vae = inverter.reconstruct(pipe, inv)
    images_ref, latent_ref = nti_jax.reconstruct(pipe, ref)
    assert rel_err(latent, latent_ref) <= 1e-6 and rel_err(recon, images_ref) <= 1e-6
    assert rel_err(vae, pipe.decode_latents(ref.pivots[:, 0])) <= 1e-6


@pytest.mark.slow
def test_edits_of_a_batch_equal_edits_one_by_one(pipe, images):
    """`ShardedInverter.edit`: the edits of two images with the same shape run as one program of
    two images; every job gives what `nti_jax.edit` (the oracle-tested single edit) gives, and an
    edit of another shape (LocalBlend) and the source-only maps run beside them."""
    inverter = parallel.ShardedInverter(parallel.local_mesh(jax.local_devices()[:1]))
    (batch,) = inverter.invert(pipe, images, PROMPTS, nti_jax.InvertSettings(num_steps=5, num_inner_steps=2))
    host = batch.host()
    blend = nti_jax.Replace(blend=nti_jax.LocalBlend([["circle"], ["circle"]], threshold=0.3))
    asks = [(0, ["a blue circle on a blue background"], None), (1, ["a green square on a black background"], None),
            (0, ["a green circle on a blue background"], blend)]
    specs = [parallel.EditJob(row, p2p.edit_spec(pipe, host[row], t, controller=c)) for row, t, c in asks]
    specs.append(parallel.EditJob(1, p2p.edit_spec(pipe, host[1], [], edit=False)))
    assert specs[0].spec.key == specs[1].spec.key != specs[2].spec.key
    out = inverter.edit(pipe, batch.inv, specs)
    for (row, targets, controller), (images_out, maps, _) in zip(asks, out):
        ref = nti_jax.edit(pipe, host[row], targets, controller=controller)
        assert images_out.shape == ref.shape == (2, 64, 64, 3)
        np.testing.assert_allclose(images_out, ref, atol=2e-5)
        np.testing.assert_allclose(maps, nti_jax.attention_maps(pipe, host[row], targets, controller=controller), atol=1e-5)
    images_1, maps_1, _ = out[3]
    assert images_1.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(maps_1, nti_jax.attention_maps(pipe, host[1]), atol=1e-5)


def test_host_share_splits_every_item_once():
    for n in (0, 1, 5, 6, 13):
        for procs in (1, 2, 3, 4):
            shares = [hosts.host_share(n, p, procs) for p in range(procs)]
            assert sorted(i for s in shares for i in s) == list(range(n))
            assert all(i % procs == p for p, s in enumerate(shares) for i in s)


def test_padding_and_per_device_batch():
    assert parallel.pad_rows(3, 4) == [0, 1, 2, 2]
    assert parallel.pad_rows(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        parallel.pad_rows(0, 4)
    with pytest.raises(ValueError):
        parallel.pad_rows(5, 4)
    assert parallel.per_device_batch(8, 3, 1) == 3  # never more rows than images
    assert parallel.per_device_batch(2, 6, 4) == 2
    assert parallel.per_device_batch(4, 6, 4) == 2
    assert parallel.per_device_batch(1, 100, 8) == 1
    assert parallel.per_device_batch(4, 0, 2) == 1


def test_cache_dir_and_distributed_settings_from_the_environment(monkeypatch, tmp_path):
    for var in ("NTI_JAX_CACHE_DIR", "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert hosts.cache_dir_from_env() == str(tmp_path / ".cache" / "nti-jax" / "jax-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hosts.cache_dir_from_env() == str(tmp_path / "xdg" / "nti-jax" / "jax-cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert hosts.cache_dir_from_env() == str(tmp_path / "jax")
    monkeypatch.setenv("NTI_JAX_CACHE_DIR", str(tmp_path / "nti"))
    assert hosts.cache_dir_from_env() == str(tmp_path / "nti")
    assert hosts.cache_dir_from_env(str(tmp_path / "cli")) == str(tmp_path / "cli")
    assert hosts.cache_dir_from_env("none") is None
    monkeypatch.setenv("NTI_JAX_CACHE_DIR", "off")
    assert hosts.cache_dir_from_env() is None

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert hosts.distributed_env() == {"coordinator_address": None, "num_processes": None, "process_id": None}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert hosts.distributed_env() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    hosts.FileBarrier(str(tmp_path), hosts.FileBarrier.new_token(), 0, 1).wait("one process: returns at once")
