"""Shared test settings."""

import os

import jax
import pytest
import torch

import nti_jax
from nti_jax import parallel, testing

# Tiny tensors on a 2-core machine: one intra-op thread is faster and steadier.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One persistent compilation cache per test module that runs the CLI (in-process runs and
    subprocesses share it), put back as it was afterwards; never ~/.cache."""
    path = str(tmp_path_factory.mktemp("jax-cache"))
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache, os.environ.get("NTI_JAX_CACHE_DIR"))
    os.environ["NTI_JAX_CACHE_DIR"] = path
    yield path
    parallel.enable_compilation_cache(None)
    jax.config.update("jax_enable_compilation_cache", before[1])
    jax.config.update("jax_compilation_cache_dir", before[0])
    if before[2] is None:
        os.environ.pop("NTI_JAX_CACHE_DIR", None)
    else:
        os.environ["NTI_JAX_CACHE_DIR"] = before[2]


@pytest.fixture
def no_distributed_env(monkeypatch):
    """No jax.distributed variables leak in from the environment."""
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """The command-line tests' tiny model folder (`testing.make_mini_sd`), one per module."""
    return testing.make_mini_sd(str(tmp_path_factory.mktemp("mini-sd")))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random SD 1.x diffusers folder (seed 3), one per module; modules with another model
    define their own `folder` / `pipe`."""
    return testing.make_tiny_sd(str(tmp_path_factory.mktemp("sd1")), "sd1", seed=3)


@pytest.fixture(scope="module")
def pipe(folder):
    return nti_jax.load_pipeline(folder)
