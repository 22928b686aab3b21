"""An HTML index of a command-line run: OUT/index.html.

One self-contained page (inline CSS and JS, no fonts, no network; images by relative path, lazily
loaded) that opens from file:// with no server. It reads only what the run left in OUT:
results.jsonl (or the per-process results.<p>.jsonl when a multi-host merge did not happen),
run.json, each image's metrics.json and the image files that exist.

    python -m nti_jax.report OUT        # (re)write OUT/index.html
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import shlex
import statistics
import sys
import time
from typing import Optional

from nti_jax.errors import NtiError
from nti_jax.io import atomic_path
from nti_jax.report.page import CSS, JS, Page, duration, esc, kv_rows
from nti_jax.records import read_json, read_jsonl
from nti_jax.report.rows import STATUSES, number, table_html

REPORT_NAME = "index.html"
SETTING_KEYS = (  # run.json "args" shown at the top, in this order
    ("method", "method"),
    ("steps", "DDIM steps"),
    ("guidance", "guidance"),
    ("inner_steps", "inner steps"),
    ("early_stop_eps", "early stop eps"),
    ("dtype", "dtype"),
    ("batch_size", "batch size / device"),
    ("model", "model"),
)


class ReportError(NtiError):
    """An output folder that holds no run to report on."""


# ----------------------------------------------------------------------------------------------
# reading OUT


def _read_results(out: str) -> tuple[list[dict], int, list[str]]:
    """(rows in manifest order, unreadable lines, the files read): results.jsonl, else the
    per-process results.<p>.jsonl files of a multi-host run that was not merged."""
    merged = os.path.join(out, "results.jsonl")
    files = [merged] if os.path.isfile(merged) else sorted(glob.glob(os.path.join(out, "results.*.jsonl")))
    if not files:
        raise ReportError(f"{out} holds no results.jsonl: not an nti-invert output folder")
    rows, bad = [], 0
    try:
        for path in files:
            r, b = read_jsonl(path)
            rows += r
            bad += b
    except OSError as e:
        raise ReportError(f"cannot read {e.filename}: {e.strerror}") from None
    rows.sort(key=lambda r: r["index"] if isinstance(r.get("index"), int) else 1 << 62)
    return rows, bad, files


def _run_facts(run: dict, rows: list[dict], results_files: list[str]) -> list[tuple[str, str]]:
    """(label, text) facts about the run: start, wall and image times, devices, command, files."""
    facts = []
    started = run.get("started")
    start_ts = None
    if isinstance(started, str):
        facts.append(("started", started))
        try:
            start_ts = datetime.datetime.strptime(started, "%Y-%m-%dT%H:%M:%S%z").timestamp()
        except ValueError:
            pass
    if start_ts is not None:
        wall = max(os.path.getmtime(p) for p in results_files) - start_ts
        if wall >= 0:
            facts.append(("wall time", f"{duration(wall)} (start to the last results write)"))
    ran = [number(r.get("seconds")) for r in rows if r.get("status") in ("done", "failed")]
    ran = [s for s in ran if s is not None]
    if ran:
        facts.append(
            ("image time", f"{duration(sum(ran))} over the {len(ran)} image(s) this run inverted; "
             f"mean {duration(sum(ran) / len(ran))}, median {duration(statistics.median(ran))}, "
             f"max {duration(max(ran))}")
        )
    devices = run.get("devices")
    if isinstance(devices, list):
        kinds: dict[str, int] = {}
        for d in devices:
            m = re.match(r"[A-Za-z]+", str(d))
            k = m.group(0) if m else str(d)
            kinds[k] = kinds.get(k, 0) + 1
        text = ", ".join(f"{n} × {k}" for k, n in kinds.items())
        facts.append(("devices", f"{text} per process ({len(devices)})"))
    if run.get("processes") is not None:
        facts.append(("processes", str(run["processes"])))
    if run.get("jax"):
        facts.append(("JAX", str(run["jax"])))
    if isinstance(run.get("argv"), list):
        facts.append(("command", shlex.join(["nti-invert", *map(str, run["argv"])])))
    facts.append(("results", ", ".join(os.path.basename(p) for p in results_files)))
    return facts


def _top_html(out: str, rows: list[dict], run: dict, bad_lines: int, results_files: list[str]) -> list[str]:
    """The page's head, title, status counts and warnings about what could not be read."""
    counts = {s: sum(r.get("status") == s for r in rows) for s in STATUSES}
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>nti-invert: {esc(os.path.basename(out))}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>nti-invert run: {esc(out)}</h1>",
    ]
    summary = ", ".join(f'<span class="{s}">{counts[s]} {s}</span>' for s in STATUSES)
    parts.append(f'<p id="summary">{len(rows)} image(s): {summary}</p>')
    if not run:
        parts.append('<p class="error">run.json is missing or unreadable: no run settings to show.</p>')
    if bad_lines:
        files = esc(", ".join(map(os.path.basename, results_files)))
        parts.append(f'<p class="error">{bad_lines} unreadable line(s) in {files} were left out.</p>')
    return parts


def _settings_html(run: dict, rows: list[dict], results_files: list[str]) -> list[str]:
    """The run's facts and main settings side by side, then all its arguments folded."""
    facts = _run_facts(run, rows, results_files)
    args = run.get("args") if isinstance(run.get("args"), dict) else {}
    settings = [(label, args[k]) for k, label in SETTING_KEYS if args.get(k) is not None]
    tables = f'<table class="kv" id="run">{kv_rows(facts)}</table><table class="kv" id="settings">{kv_rows(settings)}</table>'
    parts = [f'<div class="facts">{tables}</div>']
    if args:
        dump = esc(json.dumps(args, indent=2, default=str))
        parts.append(f"<details><summary>all arguments (run.json)</summary><pre>{dump}</pre></details>")
    return parts


def _problems_html(rows: list[dict]) -> list[str]:
    """A list of the failed and pending images linking to their rows (nothing if none)."""
    items = []
    for r in rows:
        if r.get("status") not in ("failed", "pending"):
            continue
        why = r.get("error") or ("not reached" if r.get("status") == "pending" else "no reason recorded")
        idx = r.get("index") if isinstance(r.get("index"), int) else ""
        items.append(
            f'<li><a href="#row-{esc(idx)}">{esc(r.get("name") or r.get("image") or "?")}</a> '
            f'<span class="st {esc(r.get("status"))}">{esc(r.get("status"))}</span> {esc(why)}</li>'
        )
    return [f'<h2>Failed and pending</h2><ul class="problems">{"".join(items)}</ul>'] if items else []


def render(out_dir: str) -> str:
    """The report page of OUT as a string (see `write_report`)."""
    out = os.path.abspath(out_dir)
    if not os.path.isdir(out):
        raise ReportError(f"output folder {out_dir} not found")
    rows, bad_lines, results_files = _read_results(out)
    run = read_json(os.path.join(out, "run.json")) or {}
    multi = any("process" in r for r in rows)
    parts = [
        *_top_html(out, rows, run, bad_lines, results_files),
        *_settings_html(run, rows, results_files),
        *_problems_html(rows),
        table_html(Page(out), rows, multi),
        f'<p class="small">written {esc(time.strftime("%Y-%m-%dT%H:%M:%S%z"))} by nti_jax.report</p>',
        f"<script>{JS}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(out_dir: str) -> str:
    """Write OUT/index.html (atomically) for the run in `out_dir`; returns its path. Raises
    ReportError (one line) when `out_dir` holds no results.jsonl."""
    text = render(out_dir)
    path = os.path.join(os.path.abspath(out_dir), REPORT_NAME)
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as e:
        raise ReportError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m nti_jax.report OUT`: write OUT/index.html; exit 2 with one line on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m nti_jax.report OUT   (writes OUT/index.html for an nti-invert output folder)", file=sys.stderr)
        return 0 if argv in (["-h"], ["--help"]) else 2
    try:
        print(write_report(argv[0]))
    except ReportError as e:
        print(f"nti-report: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
