"""Shared test settings."""

import os

# The test extra installs libtpu (the TPU compile tests build TPU programs from this CPU host
# through topologies, which JAX_PLATFORMS does not limit). Without this, every process of the
# suite, CLI subprocesses included, probes for a TPU at start and prints libtpu's warnings.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest
import torch

import nti_jax
from nti_jax.run import hosts
from nti_jax import testing

# Tiny tensors on a 2-core machine: one intra-op thread is faster and steadier.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent compilation cache for the whole run, in its temporary folder (never
    ~/.cache), shared by pytest-xdist's workers and every CLI run, in process or not: the tiny
    models' programs recur across modules (the same configs, params are arguments), so each is
    compiled once. Tests that need a cold cache give their own (test_memory's dry run)."""
    base = tmp_path_factory.getbasetemp()
    path = str((base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax-cache")
    before = os.environ.get("NTI_JAX_CACHE_DIR")
    os.environ["NTI_JAX_CACHE_DIR"] = path
    hosts.enable_compilation_cache(path)
    yield path
    hosts.enable_compilation_cache(None)
    if before is None:
        os.environ.pop("NTI_JAX_CACHE_DIR", None)
    else:
        os.environ["NTI_JAX_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def cache_dir(compilation_cache):
    """The run's compilation cache, for the modules that start CLI subprocesses."""
    return compilation_cache


@pytest.fixture
def no_distributed_env(monkeypatch):
    """No jax.distributed variables leak in from the environment."""
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="session")
def mini_folder(tmp_path_factory):
    """The suite's tiny SD 1.x folder (`testing.make_mini_sd`, seed 3), built once per worker:
    compiled programs depend on the model's config, the settings and the shapes, never on the
    weights, so every file on this folder (library and command line alike) shares its programs
    through the persistent cache. Files that need another architecture build their own."""
    return testing.make_mini_sd(str(tmp_path_factory.mktemp("mini-sd")))


@pytest.fixture(scope="module")
def model(mini_folder):
    """The command-line tests' model folder: the suite's mini folder."""
    return mini_folder


@pytest.fixture(scope="module")
def folder(mini_folder):
    """The library tests' model folder: the same mini folder; modules with another model define
    their own `folder` / `pipe`."""
    return mini_folder


@pytest.fixture(scope="module")
def pipe(folder):
    return nti_jax.load_pipeline(folder)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """A tiny random SDXL folder in sdxl-base's layout, with fp16 variant files (`testing.make_tiny_sdxl`)."""
    return testing.make_tiny_sdxl(str(tmp_path_factory.mktemp("sdxl") / "tiny"), seed=0, fp16_variant=True)


# The heaviest files first (minutes of CPU each, measured with --durations), so that
# pytest-xdist's two workers, each taking whole files in collection order, finish together:
# with alphabetical order the four heavy test_t*/test_w* files came last and one worker ran
# the last 13 minutes alone.
HEAVY_FIRST = ("test_toy_model.py", "test_inversion.py", "test_memory.py", "test_tpu_aot.py", "test_tpu_plan.py", "test_toy_train.py", "test_workers.py",
               "test_p2p.py", "test_bench_inversion.py", "test_transfers.py", "test_p2p_vs_reference.py", "test_parallel.py",
               "test_sdxl.py", "test_notebook.py", "test_cli.py", "test_faults.py", "test_pie_bench.py", "test_run_folder_pie.py",
               "test_tpu_kernels.py", "test_oom.py", "test_one_road.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


# Suite measurement (issue 27): with NTI_SUITE_STATS=DIR, each worker writes DIR/<worker>.json:
# per test file, its wall seconds, XLA compiles and their seconds, and persistent-cache hits and
# misses (JAX's monitoring events). `python scripts/suite_stats.py DIR` sums them.
_STATS_DIR = os.environ.get("NTI_SUITE_STATS")
_STATS: dict = {}
_CURRENT = ["<collection>"]


def _stat(name: str) -> dict:
    return _STATS.setdefault(name, {"wall_s": 0.0, "compiles": 0, "compile_s": 0.0, "cache_hits": 0, "cache_misses": 0})


def pytest_configure(config):
    if not _STATS_DIR:
        return
    import jax.monitoring as monitoring

    def duration(event: str, secs: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            _stat(_CURRENT[0])["compiles"] += 1
            _stat(_CURRENT[0])["compile_s"] += secs

    def event(name: str, **_):
        key = {"/jax/compilation_cache/cache_hits": "cache_hits", "/jax/compilation_cache/cache_misses": "cache_misses"}.get(name)
        if key:
            _stat(_CURRENT[0])[key] += 1

    monitoring.register_event_duration_secs_listener(duration)
    monitoring.register_event_listener(event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import time

    _CURRENT[0] = item.path.name
    start = time.time()
    yield
    if _STATS_DIR:
        _stat(item.path.name)["wall_s"] += time.time() - start


def pytest_sessionfinish(session):
    if _STATS_DIR:
        import json

        os.makedirs(_STATS_DIR, exist_ok=True)
        with open(os.path.join(_STATS_DIR, f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json"), "w") as f:
            json.dump(_STATS, f, indent=1)
