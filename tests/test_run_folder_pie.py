"""`--pie-bench` with several workers on one folder (issue 29): the images are split, and the
PIE-Bench layout and metrics are written once, by the worker that completes the run."""

import json
import os
import subprocess
import sys

import pytest

from nti_jax import records, testing
from nti_jax.toy import pie_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "invert.py")

pytestmark = pytest.mark.usefixtures("cache_dir", "no_distributed_env")


@pytest.mark.slow
def test_pie_bench_with_two_workers(cache_dir, tmp_path):
    data = pie_layout.build_toy_pie_bench(str(tmp_path / "data"), 1, seed=1, types=("1", "6", "8"))
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--pie-bench", data, "--pie-types", "1,6,8", "--out", str(out), "--steps", "5", "--inner-steps", "2"]
    logs = [tmp_path / f"w{k}.log" for k in range(2)]
    procs = []
    for log in logs:
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=testing.script_env(cache_dir)))
    texts = testing.finish_workers(procs, logs, timeout=1500)
    rows = records.read_jsonl(str(out / "results.jsonl"))[0]
    assert [r["status"] for r in rows] == ["done"] * 3
    said = [k for k, t in enumerate(texts) if "PIE-Bench: 3 outputs in" in t]
    assert len(said) == 1, texts  # computed once
    complete = json.loads((out / ".nti-run" / "complete.json").read_text())
    assert complete["by"].split("-")[-2] == str(procs[said[0]].pid)
    metrics = json.loads((out / "pie_bench_metrics.json").read_text())
    assert metrics["table"]["all"]["images"] == 3
