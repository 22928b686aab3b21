"""A multi-host run whose host dies (issue 29): the others do not wait days for it; they name it in
one line after --claim-timeout without its heartbeat, exit non-zero, and keep their finished
images (two jax.distributed processes on CPU, the second killed with -9 mid-run)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

from nti_jax import records, testing
from nti_jax.toy import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "invert.py")
FAST = ["--steps", "5", "--inner-steps", "3", "--early-stop-eps", "1.0", "--batch-size", "1", "--no-edits", "--claim-timeout", "4"]

pytestmark = pytest.mark.usefixtures("cache_dir", "no_distributed_env")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_host_that_dies_is_named_and_the_others_exit_1(model, cache_dir, tmp_path):
    for k in range(4):
        Image.fromarray(shapes.render(2_000_000_700 + k, 64).image).save(tmp_path / f"img{k}.png")
    out = tmp_path / "out"
    port = free_port()
    cmd = [sys.executable, SCRIPT, "--model", model, "--image", str(tmp_path / "img*.png"), "--prompt", "a shape", "--out", str(out)] + FAST
    logs = [tmp_path / f"p{p}.log" for p in range(2)]
    procs = []
    for p, log in enumerate(logs):
        env = testing.script_env(cache_dir, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p))
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
    try:
        t0 = time.time()
        while not (out / ".nti-run" / "claims" / "img1.0").exists():  # process 1's first image
            assert procs[1].poll() is None and time.time() - t0 < 600, logs[1].read_text()
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        rc = procs[0].wait(timeout=600)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    text = logs[0].read_text()
    assert rc == 1 and "Traceback" not in text, text
    (line,) = [x for x in text.splitlines() if "did not arrive" in x]
    assert f"process 1 (" in line and f"pid {procs[1].pid}) did not arrive: no heartbeat for 4 s" in line, line
    rows = {r["name"]: r["status"] for r in records.read_jsonl(str(out / "results.jsonl"))[0]}
    assert rows == {"img0": "done", "img1": "pending", "img2": "done", "img3": "pending"}
    for name in ("img0", "img2"):
        assert json.loads((out / name / "metrics.json").read_text())["status"] == "done"
