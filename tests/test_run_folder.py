"""The run folder's books without a model (issue 29): workers told apart by boot id and pid
namespace, staleness by the observer's monotonic clock, rows merged by claim generation, results
published only by the claim's holder, dead hosts named, old folders checked and migrated, and a
completed run pruned."""

import dataclasses
import json
import os
import time

import pytest

from nti_jax import records
from nti_jax.run import claims, cli, driver, hosts, ledger, manifest, writer


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def items(n: int) -> list:
    return [manifest.Item(index=k, image=f"img{k}.png", prompt="p", edits=(), name=f"img{k}") for k in range(n)]


def holder(**kw) -> dict:
    return dict({"host": claims.HOST, "pid": os.getpid(), "nonce": "other", "started": 0.0}, **kw)


def test_same_host_is_the_same_kernel_and_pid_namespace():
    """Two containers sharing a hostname, both pid 1: each other's claims are not dead at once
    (another pid namespace); in our own kernel and namespace, a pid that is ours (an earlier run)
    or gone is dead, a running one alive."""
    me = claims.Worker("box", 1, "me", 0.0, "boot-a", "ns-1")
    twin = holder(host="box", pid=1, boot="boot-a", pidns="ns-2")
    assert claims.alive(twin, False, me)
    assert not claims.alive(twin, True, me)
    assert not claims.alive(dict(twin, pidns="ns-1"), False, me)
    here = claims.Worker.me()
    assert here.boot and here.pidns == str(os.stat("/proc/self/ns/pid").st_ino)
    assert claims.alive(holder(pid=os.getppid(), boot=here.boot, pidns=here.pidns), False, here)
    gone = 2**22 + 12345
    assert not claims.alive(holder(pid=gone, boot=here.boot, pidns=here.pidns), False, here)
    assert claims.alive(holder(host=here.host, pid=gone, boot="another-boot", pidns=here.pidns), False, here)


def test_stale_by_the_observers_clock_not_the_files(tmp_path):
    """A claim from another machine is taken once its heartbeat has not changed for the timeout
    by this worker's monotonic clock: an mtime years old or in the future says nothing, a touch
    restarts the wait; two takers of one dead claim: one wins."""
    clock = Clock()
    me = claims.Worker.me()
    c = claims.Claims(str(tmp_path), me, timeout_s=60, watch=claims.Watch(clock))
    records.write_json(str(tmp_path / "a.0"), holder(host="elsewhere", pid=1, boot="b", pidns="n"))
    os.utime(tmp_path / "a.0", (1.0, 1.0))  # 1970 by its writer's clock
    assert not c.acquire("a")
    clock.now += 59
    assert not c.acquire("a")
    os.utime(tmp_path / "a.0", (4e9, 4e9))  # touched, by a clock far ahead
    clock.now += 30
    assert not c.acquire("a")  # it beat 30 s ago
    clock.now += 31
    assert not c.acquire("a")
    clock.now += 30
    rival = claims.Claims(str(tmp_path), claims.Worker(me.host, os.getppid(), "rival", time.time(), me.boot, me.pidns), 60,
                          claims.Watch(clock))
    assert not rival.acquire("a")  # first sight for the rival
    assert c.acquire("a") and not rival.acquire("a")
    assert [h["nonce"] for h in c.history("a")] == ["other", me.nonce] and c.mine("a") and c.generation("a") == 1
    records.write_json(str(tmp_path / "b.0"), holder(host="elsewhere", finished=1.0))
    assert c.acquire("b") and c.generations("b") == [0, 1]


def test_merge_orders_rows_by_generation_not_time(tmp_path):
    """results.jsonl: per image, the row of the highest claim generation of this epoch, whatever
    its wall-clock time (a skewed host's old "failed" never beats a newer "done"); a "skipped" row
    over the row that finished its generation; other epochs and run keys ignored; a torn line
    skipped; images with no row pending."""
    rows = tmp_path / ".nti-run" / "rows"
    rows.mkdir(parents=True)
    row = lambda k, status, gen, t, epoch=0: json.dumps({"name": f"img{k}", "status": status, "generation": gen, "time": t, "epoch": epoch}) + "\n"
    (rows / "K.0.w1.jsonl").write_text(row(0, "failed", 0, 9e9) + row(2, "done", 0, 5) + row(3, "done", 0, 5) + '{"name": "img4", "sta')
    (rows / "K.0.w2.jsonl").write_text(row(0, "done", 1, 1) + row(3, "skipped", 0, 1))
    (rows / "K.1.w3.jsonl").write_text(row(2, "failed", 7, 9e9, epoch=1))
    (rows / "OTHER.0.w3.jsonl").write_text(row(1, "done", 9, 9))
    log = ledger.Ledger(str(tmp_path), "K")
    with log.merged(items(5)) as got:
        pass
    assert [(r["index"], r["status"]) for r in got] == [(0, "done"), (1, "pending"), (2, "done"), (3, "skipped"), (4, "pending")]
    assert records.read_jsonl(str(tmp_path / "results.jsonl")) == (got, 0)
    assert not log.completes and (rows / "K.1.w3.jsonl").exists()


def test_publish_is_fenced_by_the_claim(tmp_path):
    """Files are staged per claim generation; `publish` moves them only while the claim is held:
    a worker that lost its claim leaves the image folder as the newer holder finished it."""
    folder, stage = tmp_path / "img0", tmp_path / ".nti-run" / "stage" / "img0.0.x"
    w_new = writer.ImageWriter(str(folder), stage=str(tmp_path / "s1"), lock=str(tmp_path / "lock"), stamp={"generation": 1})
    w_new.write("a.bin", lambda p: open(p, "wb").write(b"new"))
    assert w_new.publish({"status": "done"}, lambda: True)
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in folder.iterdir()}
    w_old = writer.ImageWriter(str(folder), stage=str(stage), lock=str(tmp_path / "lock"), stamp={"generation": 0})
    w_old.write("a.bin", lambda p: open(p, "wb").write(b"old!"))
    assert not (folder / "a.bin").read_bytes() == b"old!"  # staged, not in the image folder
    assert not w_old.publish({"status": "done"}, lambda: False)
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in folder.iterdir()} == before
    assert json.loads((folder / "metrics.json").read_text())["generation"] == 1 and not stage.exists()
    assert (folder / "a.bin").read_bytes() == b"new"


def test_a_host_that_died_is_named_not_awaited(tmp_path, capsys):
    """The end of a multi-host run: a process whose heartbeat stops is named in one line within
    the timeout, and the others exit 1 with results.jsonl merged from what was written."""
    token = "t"
    dead = hosts.FileBarrier(str(tmp_path), token, 1, 2, timeout_s=1.0)
    dead.stop()  # it wrote its heartbeat once, then died
    live = hosts.FileBarrier(str(tmp_path), token, 0, 2, timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(hosts.PeerLost, match=r"^process 1 \(.* pid \d+\) did not arrive: no heartbeat for 1 s$"):
        live.wait("results", poll_s=0.05)
    assert time.monotonic() - t0 < 10
    log = ledger.Ledger(str(tmp_path / "out"), "K", 0, 2, timeout_s=1.0)
    log.open()
    log.record(items(1)[0], "done")
    log.close()
    assert driver.summary(log, items(2), 1.0, False, live, None) == 1
    std = capsys.readouterr()
    (line,) = [x for x in std.err.splitlines() if "did not arrive" in x]
    assert "process 1" in line and "1 done, 0 skipped, 0 failed, 1 not reached (all processes)" in std.out
    live.stop()


def test_check_names_a_folder_without_checksums_and_verify_records_them(tmp_path, capsys):
    """A folder written before checksums: --check says so in one line (exit 0, not damage);
    --check --verify records them; then --check verifies them (a change found, exit 1)."""
    img = tmp_path / "img0"
    img.mkdir()
    for name in ("inversion.safetensors", "input.png", "reconstruction.png"):
        (img / name).write_bytes(name.encode())
    (img / "metrics.json").write_text(json.dumps({"status": "done", "image": "a.png", "edits": []}))
    assert cli.main(["--check", str(tmp_path)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "1 finished image(s) written before checksums were recorded" in err[0] and "--verify" in err[0]
    assert cli.main(["--check", str(tmp_path), "--verify"]) == 0
    capsys.readouterr()
    files = json.loads((img / "metrics.json").read_text())["files"]
    assert sorted(files) == ["input.png", "inversion.safetensors", "reconstruction.png"]
    assert cli.main(["--check", str(tmp_path)]) == 0 and "before checksums" not in capsys.readouterr().err
    (img / "input.png").write_bytes(b"changed!!")
    assert cli.main(["--check", str(tmp_path)]) == 1
    assert capsys.readouterr().out == "img0: input.png does not match its recorded SHA-256\n"


def test_a_completed_run_is_pruned_once(tmp_path, monkeypatch):
    """The worker that merges last with nothing pending completes the run: claims, stages and
    registrations pruned, its epoch recorded; a straggler does not complete it again; a worker
    started later begins the next epoch."""
    its = items(2)
    first = ledger.Ledger(str(tmp_path), "K", timeout_s=2)
    real = claims.Worker.me
    monkeypatch.setattr(claims.Worker, "me", classmethod(lambda cls: dataclasses.replace(real(), boot="another-machine")))
    second = ledger.Ledger(str(tmp_path), "K", timeout_s=2)  # elsewhere: known alive once seen beating
    for log in (first, second):
        log.register({})
        log.open()
    for log, it in zip((first, second), its):
        assert log.claims.acquire(it.name)
        log.claims.finish(it.name)
        log.record(it, "done")
    first.close()
    with first.merged(its):
        pass
    assert not first.completes  # the second worker still runs
    second.close()
    with second.merged(its) as rows:
        assert second.completes and [r["status"] for r in rows] == ["done", "done"]
    run = tmp_path / ".nti-run"
    assert sorted(os.listdir(run)) == ["complete.json", "merge.lock", "rows"]
    with first.merged(its) as rows:
        assert not first.completes and [r["status"] for r in rows] == ["done", "done"]
    later = ledger.Ledger(str(tmp_path), "K")
    assert (first.epoch, later.epoch) == (0, 1)


class Steps(Clock):
    """A monotonic clock that moves a second each time it is read."""

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_dead_worker_elsewhere_does_not_keep_the_run_open(tmp_path):
    """A registration left by a worker killed on another machine: the last worker watches it
    until stale (by its own clock) and completes the run."""
    log = ledger.Ledger(str(tmp_path), "K", timeout_s=4, watch=claims.Watch(Steps()))
    log.register({})
    dead = tmp_path / ".nti-run" / "workers" / "elsewhere-1-dead.json"
    records.write_json(str(dead), holder(host="elsewhere", pid=1, boot="b", pidns="n", run_key="K"))
    log.open()
    log.record(items(1)[0], "done")
    log.close()
    t0 = time.monotonic()
    with log.merged(items(1)):
        pass
    assert log.completes and not dead.exists() and time.monotonic() - t0 < 30


def test_rounds_wait_for_held_images_until_finished(tmp_path):
    """After its pass a worker plans again the images another worker holds, until their records
    are finished, even if that worker died before marking its claim finished."""
    log = ledger.Ledger(str(tmp_path), "K")
    its = items(2)
    for it in its:
        records.write_json(str(tmp_path / ".nti-run" / "claims" / f"{it.name}.0"), holder(host="elsewhere", boot="b", pidns="n"))
    rounds = log.rounds(its, poll_s=0)
    assert next(rounds) == its and next(rounds) == its
    os.makedirs(tmp_path / "img0")
    records.write_json(str(tmp_path / "img0" / "metrics.json"), {"status": "done", "image": "img0.png", "key": "", "files": {}})
    assert next(rounds) == its[1:]
    records.write_json(str(tmp_path / ".nti-run" / "claims" / "img1.0"), holder(host="elsewhere", finished=1.0))
    assert list(rounds) == []
