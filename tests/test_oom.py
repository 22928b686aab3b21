"""Out of device memory at run time (issue 29, item 1): a call of the inversion, reconstruction or
edit program that fails with XLA's RESOURCE_EXHAUSTED runs again with half its rows per device,
down to one; the rows that worked are kept for later calls; an image fails, with a one-line
reason, only when one row does not fit, and nothing finished is lost or redone.

The failure is injected at `parallel.call_program`, the one place the three programs run: a call
with more rows per device than a program kind's limit raises what XLA raises. The mini model and
test_faults.py's settings (5 steps, 3 inner steps), two images: programs of 2 rows and of 1.
"""

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import nti_jax
from nti_jax import records
from nti_jax.core import controllers, inversion, oom, p2p, parallel
from nti_jax.errors import DeviceMemoryError, one_line
from nti_jax.run import cli
from nti_jax.testing import rel_err, scene_folder

SETTINGS = nti_jax.InvertSettings(num_steps=5, num_inner_steps=3, early_stop_epsilon=1.0)
FAST = ["--steps", "5", "--inner-steps", "3", "--early-stop-eps", "1.0"]
SRC = "a red circle on a blue background"
TGT = "a green circle on a blue background"
OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.\nBuffers in use: ..."

pytestmark = pytest.mark.usefixtures("cache_dir", "no_distributed_env")


class Injected:
    """`parallel.call_program` that raises XLA's out-of-memory error for a call of a program kind
    with more rows per device than `limits[kind]` (no limit: every call runs), and for every call
    of a kind once `runs[kind]` of its calls ran; `calls` logs (kind, rows, failed)."""

    def __init__(self, monkeypatch, error: str = OOM, **limits: int):
        self.limits, self.runs, self.error, self.calls = limits, {}, error, []
        real = parallel.call_program

        def call_program(kind, program, rows, *args):
            failed = rows > self.limits.get(kind, rows) or self.runs.get(kind) == 0
            if kind in self.runs and not failed:
                self.runs[kind] -= 1
            self.calls.append((kind, rows, failed))
            if failed:
                raise jax.errors.JaxRuntimeError(self.error)
            return real(kind, program, rows, *args)

        monkeypatch.setattr(parallel, "call_program", call_program)

    def failures(self) -> int:
        return sum(f for _, _, f in self.calls)


def inverter() -> parallel.ShardedInverter:
    return parallel.ShardedInverter(parallel.local_mesh(jax.local_devices()[:1]))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return scene_folder(tmp_path_factory.mktemp("scenes"), 4, 2_000_000_500)


@pytest.fixture(scope="module")
def images(scenes):
    return [np.asarray(Image.open(scenes / f"img{k}.png")) for k in range(2)]


def edit_jobs(pipe, batch: parallel.Batch) -> list:
    """The command line's edit (its default edit guidance) of each row of `batch`: one key."""
    ctrl = controllers.controller_from_settings(SRC, [TGT], {"guidance": cli.DEFAULT_EDIT_GUIDANCE})
    return [parallel.EditJob(k, p2p.edit_spec(pipe, h, [TGT], controller=ctrl)) for k, h in enumerate(batch.host())]


@pytest.fixture(scope="module")
def reference(pipe, images):
    """An un-failed run: one call of 2 rows for each program."""
    ref = inverter()
    (batch,) = ref.invert(pipe, images, [SRC] * 2, SETTINGS)
    recon = jax.device_get(ref.reconstruct(pipe, batch.inv))
    edits = ref.edit(pipe, batch.inv, edit_jobs(pipe, batch))
    assert batch.n == 2 and all(isinstance(e, parallel.EditResult) for e in edits) and ref.oom_retries == 0
    return batch, recon, edits


def rows_of(batches) -> dict:
    host = [h for b in batches for h in b.host()]
    return {k: np.concatenate([np.asarray(getattr(h, k)) for h in host]) for k in inversion.BATCHED_FIELDS}


def assert_same_inversions(pipe, got: dict, want: dict) -> None:
    """As test_inversion.py compares a batch with its images one by one: a call's batch size changes
    XLA's float rounding, which Adam's ~sign(g) steps amplify in phi, so phi is compared to how far
    it moved; the rest agrees tightly, the early stops exactly."""
    for k in ("inner_iterations", "nonfinite"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for k in ("x_T", "pivots", "cond_embeddings", "final_losses"):
        assert rel_err(got[k], want[k]) <= 1e-5, k  # measured: 3e-6
    moved = np.abs(want["null_embeddings"] - np.asarray(pipe.encode_prompt([""]))[:, None]).max()
    assert np.abs(got["null_embeddings"] - want["null_embeddings"]).max() <= 1e-2 * moved  # measured: 2e-3


# -- the retry itself, on a stand-in program -------------------------------------------------------


def test_calls_halve_until_they_fit_and_start_there_next_time():
    limits, seen = oom.RowLimits(), []

    def call(start, k):
        seen.append((start, k))
        if k > 2:
            raise jax.errors.JaxRuntimeError(OOM)
        return list(range(start, min(start + k, 5)))

    assert limits.calls(("edit", "a"), 5, 5, call) == [[0, 1], [2, 3], [4]]
    assert seen == [(0, 5), (0, 3), (0, 2), (2, 2), (4, 2)] and limits.retries == 2 and limits.limit == {("edit", "a"): 2}
    seen.clear()
    assert limits.calls(("edit", "a"), 4, 4, call) == [[0, 1], [2, 3]] and seen == [(0, 2), (2, 2)]  # no second failure
    assert limits.calls(("edit", "b"), 1, 1, call) == [[0]] and limits.retries == 2  # another shape: its own limit


def test_one_row_that_does_not_fit_keeps_what_finished():
    limits = oom.RowLimits()

    def call(start, k):
        if start == 2 or k > 2:
            raise jax.errors.JaxRuntimeError(OOM)
        return start

    with pytest.raises(DeviceMemoryError) as got:
        limits.calls(("invert",), 4, 4, call)
    assert got.value.done == [0] and limits.retries == 2  # 4 -> 2 -> 1 rows; rows 0 and 1 finished
    assert one_line(got.value) == ("out of device memory: even one image per device does not fit "
                                   "(RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB.)")


@pytest.mark.parametrize("error", [ValueError("bad"), jax.errors.JaxRuntimeError("INTERNAL: the device was lost")])
def test_other_errors_are_not_retried(error):
    limits, seen = oom.RowLimits(), []

    def call(start, k):
        seen.append(k)
        raise error

    with pytest.raises(type(error)):
        limits.calls(("reconstruct",), 4, 4, call)
    assert seen == [4] and limits.retries == 0 and limits.limit == {}


# -- the three programs ----------------------------------------------------------------------------


def test_each_program_survives_and_remembers(pipe, images, reference, monkeypatch):
    """Each program fails with 2 rows, runs in two calls of one, and gives what the un-failed run
    gave (float32: a row does not depend on the others of its call); the next calls start at one
    row and fail no more."""
    ref_batch, ref_recon, ref_edits = reference
    injected = Injected(monkeypatch, invert=1, reconstruct=1, edit=1)
    inv = inverter()
    batches = inv.invert(pipe, images, [SRC] * 2, SETTINGS)
    assert [(b.n, b.inv.num_images) for b in batches] == [(1, 1), (1, 1)] and inv.oom_retries == 1
    assert_same_inversions(pipe, rows_of(batches), rows_of([ref_batch]))

    recon = jax.device_get(inv.reconstruct(pipe, ref_batch.inv))  # two calls of one row, joined
    assert inv.oom_retries == 2
    for got, want in zip(recon, ref_recon):
        assert got.shape == want.shape and rel_err(got, want) <= 1e-4

    edits = inv.edit(pipe, ref_batch.inv, edit_jobs(pipe, ref_batch))
    assert inv.oom_retries == 3
    for got, want in zip(edits, ref_edits):
        for a, b in zip(got, want):
            assert rel_err(a, b) <= 1e-4

    assert [c for c in injected.calls if c[2]] == [("invert", 2, True), ("reconstruct", 2, True), ("edit", 2, True)]
    injected.calls.clear()
    inv.invert(pipe, images, [SRC] * 2, SETTINGS)
    inv.reconstruct(pipe, ref_batch.inv)
    inv.edit(pipe, ref_batch.inv, edit_jobs(pipe, ref_batch))
    assert injected.calls == [("invert", 1, False)] * 2 + [("reconstruct", 1, False)] * 2 + [("edit", 1, False)] * 2
    assert inv.oom_retries == 3


def test_nothing_fits(pipe, images, reference, monkeypatch):
    """With no row fitting: the inversion raises the one-line `DeviceMemoryError` (holding the
    calls that finished), and each edit of the program gets it as its result."""
    ref_batch, _, _ = reference
    Injected(monkeypatch, invert=0, reconstruct=0, edit=0)
    inv = inverter()
    with pytest.raises(DeviceMemoryError) as got:
        inv.invert(pipe, images, [SRC] * 2, SETTINGS)
    assert got.value.done == [] and inv.oom_retries == 1
    with pytest.raises(DeviceMemoryError):
        inv.reconstruct(pipe, ref_batch.inv)
    edits = inv.edit(pipe, ref_batch.inv, edit_jobs(pipe, ref_batch))
    assert all(isinstance(e, DeviceMemoryError) for e in edits) and "even one edit per device" in str(edits[0])


def test_a_non_memory_error_is_not_retried(pipe, images, monkeypatch):
    injected = Injected(monkeypatch, error="INTERNAL: the device was lost", invert=1)
    inv = inverter()
    with pytest.raises(jax.errors.JaxRuntimeError, match="device was lost"):
        inv.invert(pipe, images, [SRC] * 2, SETTINGS)
    assert injected.calls == [("invert", 2, True)] and inv.oom_retries == 0 and inv.limits.limit == {}


# -- the command line ------------------------------------------------------------------------------


def results(out) -> dict:
    return {r["name"]: r for r in records.read_jsonl(os.path.join(out, "results.jsonl"))[0]}


def files(out, names) -> dict:
    return {n: {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted((Path(out) / n).iterdir())} for n in names}


def test_command_line(model, scenes, monkeypatch, tmp_path, capsys):
    """A batch of two whose inversion does not fit in one call: both images done, their records
    count the retry. Then nothing fits: the new image fails with a one-line reason (exit 1, as
    for other per-image failures) and the finished ones are skipped, their files untouched. Then
    a batch whose inversion runs in calls of one and whose second call fails with one row: the
    first call's image is kept, the second's fails."""
    out = tmp_path / "out"
    argv = ["--model", model, "--prompt", SRC, "--edit", TGT, "--out", str(out), "--batch-size", "2"] + FAST
    injected = Injected(monkeypatch, invert=1)
    assert cli.main(argv + ["--image", str(scenes / "img[01].png")]) == 0
    rows = results(out)
    assert [rows[n]["status"] for n in ("img0", "img1")] == ["done", "done"]
    for n in ("img0", "img1"):
        plan = json.loads((out / n / "metrics.json").read_text())["plan"]
        assert (plan["rows_per_call"], plan["oom_retries"]) == (1, 1)
    assert injected.failures() == 1
    before = files(out, ["img0", "img1"])

    injected.limits = {"invert": 0, "reconstruct": 0, "edit": 0}
    capsys.readouterr()
    assert cli.main(argv + ["--image", str(scenes / "img[0-2].png")]) == 1
    std = capsys.readouterr()
    rows = results(out)
    assert [rows[n]["status"] for n in ("img0", "img1", "img2")] == ["skipped", "skipped", "failed"]
    reason = rows["img2"]["error"]
    assert reason.startswith("out of device memory: even one image per device does not fit (RESOURCE_EXHAUSTED:"), reason
    assert "\n" not in reason and not re.search(r"\b[A-Z][a-z]+(Error|Exception)\b", reason)
    assert "Traceback" not in std.err and "2 skipped, 1 failed" in std.out
    assert files(out, ["img0", "img1"]) == before

    # A batch of two, in calls of one since the first call failed, whose second call fails too:
    # the first call's image is kept.
    injected.limits, injected.runs = {"invert": 1}, {"invert": 1}
    assert cli.main(argv + ["--image", str(scenes / "img*.png")]) == 1
    rows = results(out)
    assert [rows[n]["status"] for n in ("img0", "img1", "img2", "img3")] == ["skipped", "skipped", "done", "failed"]
    assert rows["img3"]["error"].startswith("out of device memory: even one image per device does not fit")
    assert json.loads((out / "img2" / "metrics.json").read_text())["plan"]["oom_retries"] == 1
    assert files(out, ["img0", "img1"]) == before
