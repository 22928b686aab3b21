"""Several workers on one output folder (nti_jax.run.claims, nti_jax.run.ledger), through scripts/invert.py.

Three workers split nine images, each done exactly once; a worker killed with -9 mid-image leaves
its claim to another; a worker with other settings is refused while one runs. The subprocesses
share one compilation cache, warmed first in this process (a tiny model, 5 steps, no edits).
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from nti_jax.run import claims, cli, ledger, manifest
from nti_jax import records, testing
from nti_jax.toy import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "invert.py")
FAST = ["--steps", "5", "--inner-steps", "3", "--early-stop-eps", "1.0", "--batch-size", "1", "--no-edits"]

pytestmark = pytest.mark.usefixtures("cache_dir", "no_distributed_env")


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    """Nine shapes images (64 px, the model's size)."""
    folder = tmp_path_factory.mktemp("nine")
    for k in range(9):
        Image.fromarray(shapes.render(2_000_000_500 + k, 64).image).save(folder / f"img{k}.png")
    return folder


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


def history(out, name) -> list[dict]:
    return claims.Claims(str(out / ".nti-run" / "claims"), claims.Worker.me(), 600).history(name)


def assert_each_done_once(out, n=9) -> list[dict]:
    """results.jsonl: one "done" row per image; every image's files intact; one finished claim."""
    rows = records.read_jsonl(str(out / "results.jsonl"))[0]
    assert [r["index"] for r in rows] == list(range(n)) and [r["status"] for r in rows] == ["done"] * n, rows
    lines, checked = ledger.check_folder(str(out))
    assert lines == [] and checked == n
    for r in rows:
        finished = [c for c in history(out, r["name"]) if c.get("finished")]
        assert len(finished) == 1, (r["name"], history(out, r["name"]))
        record = json.loads((out / r["name"] / "metrics.json").read_text())
        assert record["worker"] == r["worker"] == "{host}-{pid}-{nonce}".format(**finished[0])
    return rows


def test_three_workers_share_nine_images(model, nine, warm, cache_dir, tmp_path):
    out = tmp_path / "out"
    procs = [start(command(model, nine, out), cache_dir, tmp_path / f"w{k}.log") for k in range(3)]
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [(tmp_path / f"w{k}.log").read_text() for k in range(3)]
    assert codes == [0, 0, 0], logs
    assert not any("Traceback" in text for text in logs)
    rows = assert_each_done_once(out)
    assert len({r["worker"] for r in rows}) >= 2  # the images were split
    done = [r for p in (out / ".nti-run" / "rows").glob("*.jsonl") for r in records.read_jsonl(str(p))[0]]
    assert sorted(r["name"] for r in done) == [f"img{k}" for k in range(9)]  # no row lost or doubled
    assert all(r["status"] == "done" for r in done)


def test_worker_killed_mid_image_is_taken_over(model, nine, warm, cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    dead = start(command(model, nine, out, images="img[0-2].png"), cache_dir, tmp_path / "dead.log")
    wait_for(".nti-run/claims/img0.0", dead, out)
    dead.send_signal(signal.SIGKILL)
    assert dead.wait(timeout=60) == -signal.SIGKILL
    assert not (out / "img0" / "metrics.json").exists()  # killed mid-image
    assert cli.main(command(model, nine, out, images="img[0-2].png")[2:]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert_each_done_once(out, 3)
    first, second = history(out, "img0")
    assert first["pid"] == dead.pid and not first.get("finished") and second["pid"] == os.getpid() and second["finished"]


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


def test_claims_of_another_host_expire(tmp_path):
    """A claim from another host is taken over only once it has not been touched for the timeout;
    one from a finished run is taken at once; two takers of one dead claim: one wins."""
    me = claims.Worker.me()
    c = claims.Claims(str(tmp_path), me, timeout_s=60)
    other = {"host": "elsewhere", "pid": 1, "nonce": "x", "started": 0.0}
    records.write_json(str(tmp_path / "a.0"), other)
    assert not c.acquire("a")
    old = time.time() - 120
    os.utime(tmp_path / "a.0", (old, old))
    rival = claims.Claims(str(tmp_path), claims.Worker(me.host, os.getppid(), "rival", time.time()), timeout_s=60)
    assert c.acquire("a") and not rival.acquire("a")
    assert [h["nonce"] for h in c.history("a")] == ["x", me.nonce] and c.mine("a")
    records.write_json(str(tmp_path / "b.0"), dict(other, finished=old))
    assert c.acquire("b") and c.generations("b") == [0, 1]


def test_merge_takes_each_images_latest_row(tmp_path):
    """results.jsonl from every worker's rows: the latest row per image, a torn line skipped,
    rows of another run key ignored, images with no row pending, in manifest order."""
    items = [manifest.Item(index=k, image=f"img{k}.png", prompt="p", edits=[], name=f"img{k}") for k in range(4)]
    rows = tmp_path / ".nti-run" / "rows"
    rows.mkdir(parents=True)
    row = lambda k, status, t: json.dumps({"name": f"img{k}", "status": status, "time": t}) + "\n"
    (rows / "K.w1.jsonl").write_text(row(0, "failed", 1) + row(2, "done", 5) + '{"name": "img3", "sta')
    (rows / "K.w2.jsonl").write_text(row(0, "done", 2))
    (rows / "OTHER.w3.jsonl").write_text(row(1, "done", 9))
    with ledger.Ledger(str(tmp_path), "K").merged(items) as got:
        pass
    assert [(r["index"], r["status"]) for r in got] == [(0, "done"), (1, "pending"), (2, "done"), (3, "pending")]
    assert records.read_jsonl(str(tmp_path / "results.jsonl")) == (got, 0)
