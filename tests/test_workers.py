"""Several workers on one output folder (nti_jax.run.claims, nti_jax.run.ledger), through scripts/invert.py.

Three workers split nine images, each done exactly once; a worker killed with -9 mid-image leaves
its claim to another; a worker with other settings is refused while one runs; a worker stalled
past --claim-timeout (SIGSTOP), before or inside its publish, never changes what the worker that
took its image over finished. The subprocesses share one compilation cache, warmed first in this
process (a tiny model, 5 steps, no edits).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nti_jax.run import cli, ledger, writer
from nti_jax import records, testing
from nti_jax.models.unet import REMAT_MODES
from nti_jax.testing import scene_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "invert.py")
FAST = ["--steps", "5", "--inner-steps", "3", "--early-stop-eps", "1.0", "--batch-size", "1", "--no-edits"]

pytestmark = pytest.mark.usefixtures("cache_dir", "no_distributed_env")


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    """Nine shapes images (64 px, the model's size)."""
    return scene_folder(tmp_path_factory.mktemp("nine"), 9, 2_000_000_500)


@pytest.fixture(scope="module")
def warm(model, nine, cache_dir, tmp_path_factory):
    """One image run by the script, so the workers load the compiled programs from the cache (a
    run in this process might find them in memory and write none)."""
    out = tmp_path_factory.mktemp("warm")
    proc = start(command(model, nine, out, images="img0.png"), cache_dir, out / "log")
    assert proc.wait(timeout=900) == 0, (out / "log").read_text()


def command(model, nine, out, *extra, images="img*.png") -> list[str]:
    return [sys.executable, SCRIPT, "--model", model, "--image", str(nine / images), "--prompt", "a shape",
            "--out", str(out)] + FAST + list(extra)


def start(cmd, cache_dir, log) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=testing.script_env(cache_dir))


def wait_for(path_glob, proc, root, timeout=300.0) -> None:
    t0 = time.time()
    while not list(root.glob(path_glob)):
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"the worker ended or stalled before {path_glob} appeared")
        time.sleep(0.01)


def assert_each_done_once(out, n=9) -> list[dict]:
    """results.jsonl: one "done" row per image, from the worker and claim generation its record
    names; every image's files intact; the completed run's claims, stages and registrations pruned."""
    rows = records.read_jsonl(str(out / "results.jsonl"))[0]
    assert [r["index"] for r in rows] == list(range(n)) and [r["status"] for r in rows] == ["done"] * n, rows
    assert ledger.check_folder(str(out)) == ([], n, [])
    for r in rows:
        record = json.loads((out / r["name"] / "metrics.json").read_text())
        assert (record["worker"], record["generation"]) == (r["worker"], r["generation"])
    left = sorted(os.listdir(out / ".nti-run"))
    if "stage" in left:  # a stalled worker's, recreated after the prune and emptied
        assert os.listdir(out / ".nti-run" / "stage") == [] and left.remove("stage") is None
    assert left == ["complete.json", "merge.lock", "publish.lock", "rows"]
    return rows


def test_three_workers_share_nine_images(model, nine, warm, cache_dir, tmp_path):
    out = tmp_path / "out"
    procs = [start(command(model, nine, out), cache_dir, tmp_path / f"w{k}.log") for k in range(3)]
    logs = testing.finish_workers(procs, [tmp_path / f"w{k}.log" for k in range(3)])
    assert not any("Traceback" in text for text in logs)
    rows = assert_each_done_once(out)
    assert len({r["worker"] for r in rows}) >= 2  # the images were split
    done = [r for p in (out / ".nti-run" / "rows").glob("*.jsonl") for r in records.read_jsonl(str(p))[0]]
    assert sorted(r["name"] for r in done) == [f"img{k}" for k in range(9)]  # no row lost or doubled
    assert all(r["status"] == "done" for r in done)
    plan = json.loads((out / "img0" / "metrics.json").read_text())["plan"]  # what each image ran with
    assert plan["rows_per_call"] == 1 and plan["devices"] >= 1 and plan["oom_retries"] == 0
    assert plan["remat"] in REMAT_MODES  # the mode the planner chose for --remat auto
    assert set(plan["kernels"]) == {"attention", "conv_grad"}
    versions = json.loads((out / "run.json").read_text())["versions"]
    assert versions["jax"] == versions["jaxlib"] and versions["platform"] == "cpu"


def test_worker_killed_mid_image_is_taken_over(model, nine, warm, cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    dead = start(command(model, nine, out, images="img[0-2].png"), cache_dir, tmp_path / "dead.log")
    wait_for(".nti-run/claims/img0.0", dead, out)
    dead.send_signal(signal.SIGKILL)
    assert dead.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "img0" / "metrics.json").exists()  # killed mid-image
    assert cli.main(command(model, nine, out, images="img[0-2].png")[2:]) == 0
    assert "Traceback" not in capsys.readouterr().err
    rows = assert_each_done_once(out, 3)
    assert rows[0]["generation"] == 1 and rows[0]["worker"].split("-")[-2] == str(os.getpid())


def test_worker_with_other_settings_is_refused(model, nine, warm, cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    first = start(command(model, nine, out, images="img[0-2].png"), cache_dir, tmp_path / "first.log")
    wait_for(".nti-run/workers/[!.]*.json", first, out)  # not the file being written
    first.send_signal(signal.SIGSTOP)  # alive, but not finishing while the second one starts
    try:
        assert cli.main(command(model, nine, out, "--inner-steps", "2", images="img[0-2].png")[2:]) == 2
    finally:
        first.send_signal(signal.SIGCONT)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another worker" in err and "--num-inner-steps" not in err, err
    assert "--inner-steps 3 there, 2 here" in err and "Traceback" not in err, err
    assert first.wait(timeout=900) == 0, (tmp_path / "first.log").read_text()
    assert_each_done_once(out, 3)


SHORT = ["--claim-timeout", "4"]  # heartbeat every second; a stopped worker is stale after 4 s


def stopped(proc) -> bool:
    with open(f"/proc/{proc.pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def wait_until(ok, procs, what, timeout=600.0) -> None:
    t0 = time.time()
    while not ok():
        if any(p.poll() is not None for p in procs) or time.time() - t0 > timeout:
            for p in procs:
                p.kill()
            pytest.fail(f"a worker ended or stalled before {what}")
        time.sleep(0.05)


def files_of(folder) -> dict:
    """Each file of an image folder: (inode, mtime): what a rename or rewrite changes."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in sorted(folder.iterdir())}


def test_stalled_worker_cannot_replace_what_another_finished(model, nine, warm, cache_dir, tmp_path):
    """SIGSTOP a worker mid-image past a short --claim-timeout: another takes the image over and
    finishes it; on SIGCONT the stalled worker drops its result, and the finished files stay the
    ones the newer claim published (same inodes, same record)."""
    out = tmp_path / "out"
    cmd = command(model, nine, out, *SHORT, images="img[0-1].png")
    a = start(cmd, cache_dir, tmp_path / "a.log")
    wait_for(".nti-run/claims/img0.0", a, out)
    a.send_signal(signal.SIGSTOP)
    try:
        b = start(cmd, cache_dir, tmp_path / "b.log")
        assert b.wait(timeout=900) == 0, (tmp_path / "b.log").read_text()
        taken = files_of(out / "img0")
        record = (out / "img0" / "metrics.json").read_text()
    finally:
        a.send_signal(signal.SIGCONT)
    testing.finish_workers([a], [tmp_path / "a.log"])
    assert "dropped: img0: another worker took it over" in (tmp_path / "a.log").read_text()
    assert files_of(out / "img0") == taken and (out / "img0" / "metrics.json").read_text() == record
    rows = assert_each_done_once(out, 2)
    assert rows[0]["generation"] == 1 and json.loads(record)["worker"] == rows[0]["worker"]


def test_worker_stopped_between_check_and_rename(model, nine, warm, cache_dir, tmp_path):
    """A worker that stops itself after its publish check, before its renames (the fault hook),
    past a short --claim-timeout: the worker that takes the image over publishes after it, so the
    image's files and record are the newer claim's."""
    out = tmp_path / "out"
    cmd = command(model, nine, out, *SHORT, images="img0.png")
    a = subprocess.Popen(cmd, stdout=open(tmp_path / "a.log", "w"), stderr=subprocess.STDOUT,
                         env=testing.script_env(cache_dir, **{writer.STOP_BEFORE_RENAME: "img0"}))
    wait_until(lambda: stopped(a), [a], "the hook stopped it")
    b = start(cmd, cache_dir, tmp_path / "b.log")
    try:
        newer = lambda: list(out.glob(".nti-run/stage/img0.1.*/attention.png")) or b.poll() is not None
        wait_until(newer, [a], "the second worker made its files")
        time.sleep(1.0)
    finally:
        a.send_signal(signal.SIGCONT)
    testing.finish_workers([a, b], [tmp_path / "a.log", tmp_path / "b.log"])
    (row,) = assert_each_done_once(out, 1)
    record = json.loads((out / "img0" / "metrics.json").read_text())
    assert row["generation"] == record["generation"] == 1 and record["worker"].split("-")[-2] == str(b.pid)
