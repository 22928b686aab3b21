"""Issue 19: remat mode and images per call chosen from the compiled programs' memory analysis.

The choice logic on programs with known needs (none, blocks, full, then a split batch as the
budget shrinks; the formula only orders; analyses cached), then on the real compiled program of
a tiny model: a budget that fits one image per call but not two splits the batch, with the same
results as one call.
"""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

import nti_jax
from nti_jax.core import parallel, planning
from nti_jax.core.null_text import abstract_inputs
from nti_jax.errors import DeviceMemoryError
from nti_jax.testing import rel_err

NEED = {"none": 10, "blocks": 6, "full": 4}  # bytes per image of fake programs, over a base of 10


class FakeLowered:
    """A lowered program whose compiled form reports `10 + rows x NEED[remat]` bytes."""

    compiles: list = []

    def __init__(self, rows: int, remat: str):
        self.rows, self.remat = rows, remat

    def compile(self):
        FakeLowered.compiles.append((self.rows, self.remat))
        m = SimpleNamespace(argument_size_in_bytes=4, output_size_in_bytes=2, temp_size_in_bytes=4 + self.rows * NEED[self.remat],
                            alias_size_in_bytes=0)
        return SimpleNamespace(memory_analysis=lambda: m, rows=self.rows, remat=self.remat)


def need(rows, remat):
    return 10 + rows * NEED[remat]


@pytest.fixture
def fresh():
    planning.clear_cache()
    FakeLowered.compiles = []
    yield
    planning.clear_cache()


def test_candidates_halve_the_batch_and_the_formula_only_reorders():
    modes = ("none", "blocks", "full")
    assert planning.candidates(5, ("none",)) == [(5, "none"), (3, "none"), (2, "none"), (1, "none")]
    order = planning.candidates(2, modes, estimate=lambda r, m: 100 if m == "none" else 0, budget=50)
    assert order == [(2, "blocks"), (2, "full"), (1, "blocks"), (1, "full"), (2, "none"), (1, "none")]


@pytest.mark.parametrize(
    "budget, rows, remat",
    [
        (need(4, "none"), 4, "none"),
        (need(4, "none") - 1, 4, "blocks"),
        (need(4, "blocks") - 1, 4, "full"),
        (need(4, "full") - 1, 2, "blocks"),  # four images fit in no mode: two per call
        (need(2, "blocks") - 1, 2, "full"),
        (need(2, "full") - 1, 1, "blocks"),
        (need(1, "full"), 1, "full"),
    ],
)
def test_the_fastest_candidate_that_fits_is_chosen(fresh, budget, rows, remat):
    choice = planning.choose(("fake",), 4, ("none", "blocks", "full"), FakeLowered, budget)
    assert (choice.rows, choice.remat, choice.fits) == (rows, remat, True)
    assert choice.need_bytes == need(rows, remat) <= budget
    assert (choice.compiled.rows, choice.compiled.remat) == (rows, remat)  # the executable that runs is the one chosen
    assert [t[:2] for t in choice.tried][-1] == (rows, remat)


def test_analyses_are_cached_and_nothing_fitting_runs_the_leanest_with_a_warning(fresh):
    planning.choose(("fake",), 4, ("none", "blocks"), FakeLowered, need(4, "blocks"))
    assert FakeLowered.compiles == [(4, "none"), (4, "blocks")]
    planning.choose(("fake",), 4, ("none", "blocks"), FakeLowered, need(4, "blocks"))
    assert len(FakeLowered.compiles) == 2  # the same program and shapes: nothing compiled again
    with pytest.warns(UserWarning, match="no batch size and remat mode fits"):
        choice = planning.choose(("fake",), 4, ("none", "blocks", "full"), FakeLowered, 5)
    assert (choice.rows, choice.remat, choice.fits) == (1, "full", False)


class RefusedLowered(FakeLowered):
    """As FakeLowered, but the compiler refuses programs of more than LIMIT bytes for want of memory,
    as the TPU's compiler does when the temporaries exceed the chip's HBM."""

    LIMIT = need(4, "blocks")

    def compile(self):
        compiled = super().compile()
        if need(self.rows, self.remat) > self.LIMIT:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                                             "HLO temporaries (18.36G) exceeds available HBM (15.75G).")
        return compiled


def test_a_candidate_the_compiler_refuses_for_memory_is_one_that_does_not_fit(fresh):
    choice = planning.choose(("refused",), 4, ("none", "blocks", "full"), RefusedLowered, 15 * 2**30)
    assert (choice.rows, choice.remat, choice.fits) == (4, "blocks", True) and choice.need_bytes == need(4, "blocks")
    assert choice.tried[0] == (4, "none", int(18.36 * 2**30))  # the size the compiler named
    assert planning.choose(("refused",), 4, ("none",), RefusedLowered, need(2, "none")).rows == 2
    RefusedLowered.LIMIT = 0
    try:
        with pytest.warns(UserWarning, match="no batch size"), pytest.raises(DeviceMemoryError, match="refuses even the leanest"):
            planning.choose(("none fits",), 2, ("none",), RefusedLowered, 15 * 2**30)
    finally:
        RefusedLowered.LIMIT = need(4, "blocks")


def test_budget_from_the_flag_or_the_free_memory_read_once(fresh, monkeypatch):
    assert planning.budget_bytes(1.5) == int(1.5 * 2**30)
    monkeypatch.setattr(planning, "free_bytes", lambda device=None: 1000)
    assert planning.budget_bytes(None, resident_bytes=7) == 1007
    monkeypatch.setattr(planning, "free_bytes", lambda device=None: 10)  # later batches' results on the device
    assert planning.budget_bytes(None, resident_bytes=7) == 1007
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive number of GiB"):
            planning.budget_bytes(bad)


@pytest.mark.slow
def test_a_batch_that_does_not_fit_is_split_with_the_same_results(pipe):
    """Two images whose program needs more than the budget: one image per call, twice."""
    images = list(np.random.default_rng(4).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    prompts = ["a red circle on a blue background", "a green square"]
    settings = nti_jax.InvertSettings(method="ddim", num_steps=4)
    mesh = parallel.local_mesh(jax.local_devices()[:1])
    model = parallel.ShardedInverter(mesh).placed(pipe).model
    analysis = lambda rows: parallel.sharded_program(mesh, "ddim", None).lower(
        model, abstract_inputs(pipe, settings, rows)).compile().memory_analysis()
    total = lambda m: m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
    one, two = total(analysis(1)), total(analysis(2))
    assert one < two
    budget_gib = (one + two) / 2 / 2**30
    inverter = parallel.ShardedInverter(parallel.local_mesh(jax.local_devices()[:1]))
    choice = inverter.plan(pipe, settings, 2, max_device_memory=budget_gib)
    assert (choice.rows, choice.remat, choice.fits) == (1, "none", True)
    split = inverter.invert(pipe, images, prompts, settings, max_device_memory=budget_gib)
    (whole,) = inverter.invert(pipe, images, prompts, settings, remat="none")
    assert [b.n for b in split] == [1, 1] and whole.n == 2
    for k, a in enumerate(split):
        assert a.inv.prompts == whole.inv.prompts[k : k + 1]
        assert rel_err(a.inv.pivots, whole.inv.pivots[k : k + 1]) <= 1e-5  # float32 rounding differs between calls of 1 and 2 rows
    lib = nti_jax.invert(pipe, images, prompts, settings, max_device_memory=budget_gib)
    assert rel_err(lib.pivots, whole.inv.pivots) <= 1e-5
