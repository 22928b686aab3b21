"""nti_jax.parallel: the sharded inversion program, host shares, cache settings.

The multi-device and multi-process runs themselves are exercised end to end in test_cli.py
(subprocesses, since XLA flags and jax.distributed must be set before JAX starts).
"""

import jax
import numpy as np
import pytest

import nti_jax
from nti_jax import inversion, parallel, testing

PROMPTS = ["a red circle on a blue background", "a green square on a white background"]


UNET_MINI = testing.UNET_MINI


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("mini-sd"))
    testing.save_sd_folder(folder, testing.tiny_unet(UNET_MINI, 3), testing.tiny_vae(seed=3), testing.tiny_text_encoder(seed=3))
    return nti_jax.load_pipeline(folder)


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
    pieces = inverter.invert(pipe, images, PROMPTS, settings)
    assert [p.num_images for p in pieces] == [1, 1]
    inv = pieces[0].replace(**{k: np.concatenate([np.asarray(getattr(p, k)) for p in pieces]) for k in inversion.BATCHED_FIELDS},
                            prompts=tuple(q for p in pieces for q in p.prompts))
    assert inv.method == ref.method and inv.settings == ref.settings and inv.prompts == ref.prompts
    iters = np.array(inv.inner_iterations)
    np.testing.assert_array_equal(iters, np.array(ref.inner_iterations))
    assert len(set(iters.ravel().tolist())) > 1, "early stop should bite at some steps only"
    for k in inversion.BATCHED_FIELDS + ("timesteps",):
        np.testing.assert_allclose(np.array(getattr(inv, k)), np.array(getattr(ref, k)), rtol=1e-6, atol=1e-6, err_msg=k)
    before = inverter.compiled_programs()
    inverter.invert(pipe, images[::-1], PROMPTS[::-1], settings)
    assert inverter.compiled_programs() == before == 1
    (recon, latent, vae), _ = inverter.reconstruct(pipe, pieces)
    np.testing.assert_array_equal(np.array(latent), np.array(nti_jax.reconstruct(pipe, inv)[1][0]))


def test_host_share_splits_every_item_once():
    for n in (0, 1, 5, 6, 13):
        for procs in (1, 2, 3, 4):
            shares = [parallel.host_share(n, p, procs) for p in range(procs)]
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
    assert parallel.cache_dir_from_env() == str(tmp_path / ".cache" / "nti-jax" / "jax-cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert parallel.cache_dir_from_env() == str(tmp_path / "xdg" / "nti-jax" / "jax-cache")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert parallel.cache_dir_from_env() == str(tmp_path / "jax")
    monkeypatch.setenv("NTI_JAX_CACHE_DIR", str(tmp_path / "nti"))
    assert parallel.cache_dir_from_env() == str(tmp_path / "nti")
    assert parallel.cache_dir_from_env(str(tmp_path / "cli")) == str(tmp_path / "cli")
    assert parallel.cache_dir_from_env("none") is None
    monkeypatch.setenv("NTI_JAX_CACHE_DIR", "off")
    assert parallel.cache_dir_from_env() is None

    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    assert parallel.distributed_env() == {"coordinator_address": None, "num_processes": None, "process_id": None}
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert parallel.distributed_env() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}
    parallel.FileBarrier(str(tmp_path), parallel.FileBarrier.new_token(), 0, 1).wait("one process: returns at once")
