"""The command line (nti_jax.run.cli / scripts/invert.py) on a tiny random model.

In-process runs share one compiled program (5 steps, 2 images per device); the 4-device and the
two-process runs are subprocesses, since XLA flags and jax.distributed must be set before JAX
starts. Everything uses a compilation cache in a temporary folder, never ~/.cache.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import nti_jax
from nti_jax.run import cli, console, driver, manifest
from nti_jax import records, testing
from nti_jax.toy import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "invert.py")
# Early stop at 1.0 bites on some steps of this tiny model only: inner iterations vary (1 or 3).
FAST = ["--steps", "5", "--inner-steps", "3", "--early-stop-eps", "1.0", "--batch-size", "2"]


# Module-wide: a compilation cache in a temporary folder, no jax.distributed variables (conftest.py).
pytestmark = pytest.mark.usefixtures("cache_dir", "no_distributed_env")


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """Six held-out shapes images and their manifest."""
    folder = tmp_path_factory.mktemp("six")
    with open(folder / "manifest.jsonl", "w") as f:
        for k in range(6):
            s = shapes.render(2_000_000_100 + k, 64)
            Image.fromarray(s.image).save(folder / f"img{k}.png")
            f.write(json.dumps({"image": f"img{k}.png", "prompt": s.caption}) + "\n")
    return folder


@pytest.fixture(scope="module")
def single(model, six, tmp_path_factory):
    """The six images on one device, in this process: the reference of the parallel runs."""
    out = tmp_path_factory.mktemp("single")
    assert cli.main(["--model", model, "--manifest", str(six / "manifest.jsonl"), "--out", str(out), "--no-edits"] + FAST) == 0
    return out


@pytest.fixture(scope="module")
def null(model):
    """The "" embedding: where phi starts."""
    return np.array(nti_jax.load_pipeline(model).encode_prompt([""]))[0]


def rows(out):
    return records.read_jsonl(os.path.join(out, "results.jsonl"))[0]


def assert_same_inversions(a, b, names, null):
    """As tests/test_inversion.py (batch vs one by one): inner iterations equal, pivots to 1e-5,
    phi to 1% of how far it moved from the "" embedding."""
    for name in names:
        x = nti_jax.Inversion.load(os.path.join(a, name, "inversion.safetensors"))
        y = nti_jax.Inversion.load(os.path.join(b, name, "inversion.safetensors"))
        assert x.prompts == y.prompts and x.settings == y.settings
        np.testing.assert_array_equal(np.array(x.inner_iterations), np.array(y.inner_iterations))
        px, py = np.array(x.pivots, np.float64), np.array(y.pivots, np.float64)
        assert np.abs(px - py).max() <= 1e-5 * np.abs(px).max(), name
        phi_x, phi_y = np.array(x.null_embeddings[0]), np.array(y.null_embeddings[0])
        moved = np.abs(phi_x - null).max()
        assert moved > 0.01 and np.abs(phi_x - phi_y).max() <= 1e-2 * moved, name


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "positive integer"),
        (["--bogus"], "unrecognized arguments"),
        (["--guidance", "nan"], "finite"),
        (["--method", "magic"], "invalid choice"),
        (["--image", "{tmp}/missing.png", "--prompt", "a cat"], "not found"),
        (["--image", "{tmp}/*.jpg", "--prompt", "a cat"], "no file matches"),
        (["--image", "{tmp}/a.png"], "--prompt is required"),
        (["--image", "{tmp}/a.png", "--manifest", "{tmp}/m.jsonl", "--prompt", "x"], "not both"),
        (["--manifest", "{tmp}/nothing.jsonl"], "not found"),
        (["--manifest", "{tmp}/broken.jsonl"], "broken.jsonl:2: not valid JSON"),
        (["--manifest", "{tmp}/typo.jsonl"], "unknown setting(s) cross_replace"),
        (["--manifest", "{tmp}/m.jsonl", "--prompt", "a cat"], "--prompt goes with --image"),
        (["--model", "{tmp}/no-such-model", "--manifest", "{tmp}/m.jsonl"], "cannot load the model"),
        (["--manifest", "{tmp}/m.jsonl", "--num-devices", "64"], "--num-devices 64"),
        (["--manifest", "{tmp}/m.jsonl", "--max-device-memory", "0"], "positive number of GiB"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, message, tmp_path, capsys):
    Image.fromarray(shapes.render(2_000_000_200, 64).image).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "a cat"}) + "\n")
    (tmp_path / "broken.jsonl").write_text(json.dumps({"image": "a.png", "prompt": "a cat"}) + "\n{oops\n")
    bad_edit = {"image": "a.png", "prompt": "a cat", "edits": [{"prompt": "a dog", "cross_replace": 0.5}]}
    (tmp_path / "typo.jsonl").write_text(json.dumps(bad_edit) + "\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = cli.main(argv + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "error:" in err and message in err, err
    assert "Traceback" not in err


def test_script_bad_model_is_one_line_no_traceback(tmp_path, cache_dir):
    p = subprocess.run(
        [sys.executable, SCRIPT, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300, env=testing.script_env(cache_dir),
    )
    assert p.returncode == 2
    assert p.stderr.count("\n") == 1 and "cannot load the model" in p.stderr and "Traceback" not in p.stderr
    q = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=300)
    assert q.returncode == 0 and "--manifest" in q.stdout and "--batch-size" in q.stdout


@pytest.mark.slow
def test_no_argument_run(model, tmp_path, monkeypatch, capsys):
    """`python scripts/invert.py` alone: the bundled samples, inverted and edited into ./outputs
    (here the default model is the tiny one and the defaults are the fast settings)."""
    monkeypatch.setattr(cli, "DEFAULT_MODEL", model)
    monkeypatch.setattr(cli, "DEFAULT_SETTINGS", nti_jax.InvertSettings(num_steps=5, num_inner_steps=3, early_stop_epsilon=1.0))
    monkeypatch.setattr(cli, "RUN_DEFAULTS", dict(cli.RUN_DEFAULTS, batch_size=2))
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 0
    out = tmp_path / "outputs"
    assert str(out) in capsys.readouterr().out
    samples = records.read_jsonl(manifest.DEFAULT_MANIFEST)[0]
    got = rows(out)
    assert [r["status"] for r in got] == ["done"] * len(samples) and len(samples) >= 2
    for row, sample in zip(got, samples):
        folder = out / row["name"]
        inv = nti_jax.Inversion.load(str(folder / "inversion.safetensors"))
        assert inv.num_images == 1 and inv.prompts == (sample["prompt"],) and inv.null_embeddings.shape[1] == 5
        m = json.loads((folder / "metrics.json").read_text())
        assert m["status"] == "done" and m["inner_iterations"] == int(np.array(inv.inner_iterations).sum())
        assert all(np.isfinite(m[k]) for k in ("psnr", "vae_psnr", "latent_mse", "seconds"))
        assert len(m["edits"]) == len(sample["edits"]) == 1
        edited = np.asarray(Image.open(folder / m["edits"][0]["file"]))
        assert edited.shape == (64, 64, 3)
        assert np.asarray(Image.open(folder / "reconstruction.png")).shape == (64, 64, 3)
    # A rerun finds everything finished.
    assert cli.main([]) == 0
    assert [r["status"] for r in rows(out)] == ["skipped"] * len(samples)


def test_batch_line_says_images_per_hour_and_time_left():
    """The batch line's images per hour are those of the last `window` batches (so a first batch
    that compiled drops out) and the time left is the images not yet seen at that rate; run.json's
    figure is the whole run's."""
    now = [100.0]
    speed = console.Throughput(clock=lambda: now[0], window=2)
    counts = {"done": 0, "skipped": 0, "failed": 4}
    now[0] = 160.0
    assert console.batch_line(counts, 30, 4, 60.0, speed.batch(0)).endswith("failed 4; 0 images/h, ? left")
    now[0] = 100.0
    speed.start()  # a run: batches end at 900, 1080 and 1260 s
    for t, done in ((1000.0, 4), (1180.0, 8)):
        now[0] = t
        speed.batch(done)
    now[0] = 1360.0
    counts.update(done=10, skipped=1, failed=1)
    line = console.batch_line(counts, 30, 4, 180.0, speed.batch(10))  # 6 images in the window's 360 s
    assert line == "[12/30] batch of 4 in 180.0 s; done 10, skipped 1, failed 1; 60 images/h, 0:18:00 left"
    assert speed.stop() == 1260.0 and speed.record(10) == {"images_done": 10, "run_seconds": 1260.0, "images_per_hour": 28.6}


@pytest.mark.slow
def test_run_logs_its_speed_and_run_json_records_it(single, six, model, tmp_path, capsys):
    """Without a terminal, each batch's line has the images per hour and the time left; run.json
    the images per hour of the run (the programs are `single`'s: no compile here)."""
    out = tmp_path / "out"
    assert cli.main(["--model", model, "--manifest", str(six / "manifest.jsonl"), "--out", str(out), "--no-edits"] + FAST) == 0
    lines = [x for x in capsys.readouterr().err.splitlines() if " batch of " in x]
    assert len(lines) == 3, lines
    for k, line in enumerate(lines):
        pattern = rf"\[{2 * k + 2}/6\] batch of 2 in [0-9.]+ s; done {2 * k + 2}, skipped 0, failed 0; [0-9.]+ images/h, \d+:\d\d:\d\d left"
        assert re.fullmatch(pattern, line), line
    assert lines[-1].endswith(" 0:00:00 left")
    run = json.loads((out / "run.json").read_text())
    assert run["images_done"] == 6 and 0 < run["run_seconds"] and "finished" in run
    assert abs(run["images_per_hour"] - 6 * 3600 / run["run_seconds"]) <= 0.03 * run["images_per_hour"]


@pytest.mark.slow
def test_corrupt_image_is_recorded_and_rerun_skips_finished(model, six, tmp_path, capsys):
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"image": str(six / "img0.png"), "prompt": "a blue square on a purple background"},
        {"image": "corrupt.png", "prompt": "a cat"},
        {"image": str(six / "img1.png"), "prompt": "a black circle on a blue background", "name": "second"},
    ]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in lines))
    argv = ["--model", model, "--manifest", str(manifest), "--out", str(tmp_path / "out")] + FAST
    assert cli.main(argv) == 1
    got = rows(tmp_path / "out")
    assert [r["status"] for r in got] == ["done", "failed", "done"]
    assert [r["name"] for r in got] == ["img0", "corrupt", "second"]
    assert "cannot read image" in got[1]["error"]
    assert "1 failed" in capsys.readouterr().out
    stamp = {n: os.stat(tmp_path / "out" / n / "inversion.safetensors").st_mtime_ns for n in ("img0", "second")}
    assert cli.main(argv) == 1
    got = rows(tmp_path / "out")
    assert [r["status"] for r in got] == ["skipped", "failed", "skipped"]
    assert got[0]["psnr"] is not None  # a skipped row carries the earlier metrics
    assert stamp == {n: os.stat(tmp_path / "out" / n / "inversion.safetensors").st_mtime_ns for n in stamp}
    # Other inversion settings are another job: the images are inverted again.
    assert cli.main(argv + ["--inner-steps", "2"]) == 1
    assert [r["status"] for r in rows(tmp_path / "out")] == ["done", "failed", "done"]


@pytest.mark.slow
def test_failed_edit_keeps_the_inversion_and_a_rerun_only_edits(model, six, tmp_path):
    manifest = tmp_path / "m.jsonl"
    src = "a blue square on a purple background"
    bad = {"image": str(six / "img0.png"), "prompt": src, "edits": [{"prompt": "a red square on a purple background", "blend_words": [["dog"], ["dog"]]}]}
    other = {"image": str(six / "img1.png"), "prompt": "a black circle on a blue background"}
    manifest.write_text(json.dumps(bad) + "\n" + json.dumps(other) + "\n")
    argv = ["--model", model, "--manifest", str(manifest), "--out", str(tmp_path / "out")] + FAST
    assert cli.main(argv) == 1
    row, _ = rows(tmp_path / "out")
    assert row["status"] == "failed" and "dog" in row["error"]
    inv_file = tmp_path / "out" / "img0" / "inversion.safetensors"
    stamp = os.stat(inv_file).st_mtime_ns
    good = dict(bad, edits=[{"prompt": "a red square on a purple background", "kind": "replace", "blend_words": [["square"], ["square"]]}])
    manifest.write_text(json.dumps(good) + "\n" + json.dumps(other) + "\n")
    assert cli.main(argv) == 0
    row, row1 = rows(tmp_path / "out")
    assert row1["status"] == "skipped"
    assert row["status"] == "done" and row["edits"] == ["edit-1-a-red-square-on-a-purple-background.png"]
    assert os.stat(inv_file).st_mtime_ns == stamp  # not inverted again
    assert (tmp_path / "out" / "img0" / row["edits"][0]).is_file()


@pytest.mark.slow
def test_nan_is_recorded_as_a_failure(model, six, tmp_path, monkeypatch):
    real = cli.settings_from_args
    monkeypatch.setattr(cli, "settings_from_args", lambda args: testing.unchecked(real(args), guidance_scale=float("nan")))
    out = tmp_path / "out"
    argv = ["--model", model, "--image", str(six / "img2.png"), "--image", str(six / "img3.png"), "--prompt", "a shape", "--out", str(out)]
    assert cli.main(argv + FAST) == 1
    got = rows(out)
    assert [r["status"] for r in got] == ["failed", "failed"]
    assert all("non-finite" in r["error"] for r in got)
    assert not (out / "img2" / "inversion.safetensors").exists()


@pytest.mark.slow
def test_interrupt_keeps_finished_batches(model, six, tmp_path, monkeypatch):
    """Ctrl-C loses at most the batch in flight; the rerun does only what is left."""
    real = driver.Driver.run_batch
    calls = []

    def interrupted_second_batch(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(driver.Driver, "run_batch", interrupted_second_batch)
    argv = ["--model", model, "--image", str(six / "img[0-3].png"), "--prompt", "a shape", "--out", str(tmp_path / "out")] + FAST
    assert cli.main(argv) == 130
    assert [r["status"] for r in rows(tmp_path / "out")] == ["done", "done", "pending", "pending"]
    monkeypatch.setattr(driver.Driver, "run_batch", real)
    assert cli.main(argv) == 0
    assert [r["status"] for r in rows(tmp_path / "out")] == ["skipped", "skipped", "done", "done"]


@pytest.mark.slow
def test_four_devices_equal_one_device(single, six, model, null, tmp_path, cache_dir):
    """6 images over 4 devices (2 per device: one batch of 8 rows, 2 of them padding) equal the
    single-device run (3 batches of 2)."""
    out = tmp_path / "four"
    p = subprocess.run(
        [sys.executable, SCRIPT, "--model", model, "--manifest", str(six / "manifest.jsonl"), "--out", str(out), "--no-edits"] + FAST,
        capture_output=True, text=True, timeout=900,
        env=testing.script_env(cache_dir, XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(json.loads((out / "run.json").read_text())["devices"]) == 4
    assert "[6/6] batch of 6" in p.stderr  # one batch for the six images
    a, b = rows(single), rows(out)
    assert [r["status"] for r in b] == ["done"] * 6 and [r["name"] for r in a] == [r["name"] for r in b]
    iters = [r["inner_iterations"] for r in a]
    assert len(set(iters)) > 1 and iters == [r["inner_iterations"] for r in b]
    assert_same_inversions(str(single), str(out), [r["name"] for r in a], null)
    for r in a:  # each image's heat maps come from its own row, wherever the device program put it
        x, y = (np.asarray(Image.open(os.path.join(d, r["name"], "attention.png")), np.int16) for d in (single, out))
        assert x.shape == y.shape and np.abs(x - y).max() <= 8, r["name"]


@pytest.mark.slow
def test_two_processes_equal_one_process(single, six, model, null, tmp_path, cache_dir):
    """Two processes through jax.distributed on CPU (coordinator on 127.0.0.1): each inverts
    every other image, process 0 merges results.jsonl; the same results as one process."""
    out = tmp_path / "dist"
    port = free_port()
    cmd = [sys.executable, SCRIPT, "--model", model, "--manifest", str(six / "manifest.jsonl"), "--out", str(out), "--no-edits"] + FAST
    procs = [
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=testing.script_env(cache_dir, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p)),
        )
        for p in range(2)
    ]
    try:
        outs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    assert "6 done, 0 skipped, 0 failed (all processes)" in outs[0][0]
    merged = rows(out)
    assert [r["index"] for r in merged] == list(range(6)) and [r["process"] for r in merged] == [0, 1] * 3
    parts = sorted((out / ".nti-run" / "rows").glob("*.jsonl"))  # each process's own rows
    assert len(parts) == 2 and sorted(r["process"] for p in parts for r in records.read_jsonl(str(p))[0]) == [0, 0, 0, 1, 1, 1]
    ref = rows(single)
    assert [(r["name"], r["status"], r["inner_iterations"]) for r in merged] == [(r["name"], r["status"], r["inner_iterations"]) for r in ref]
    for r, s in zip(merged, ref):
        assert abs(r["psnr"] - s["psnr"]) < 1e-2
    assert_same_inversions(str(single), str(out), [r["name"] for r in ref], null)
