"""The HTML report of a CLI run (nti_jax.report), checked as HTML and in a real headless Chromium.

One real CLI run on the shipped toy model (2 bundled samples with their colour-swap edits and one
unreadable image; 4 steps, negative-prompt inversion) makes the output folder; heat maps for one
image and its edit, a stale folder and a pending row (what an interrupted run leaves) are added.
The browser is driven over Chromium's --remote-debugging-pipe with a small DevTools-protocol
client (no extra package).
"""

from __future__ import annotations

import base64
import fcntl
import html.parser
import json
import os
import re
import select
import shutil
import subprocess
import time
import urllib.parse

import jax
import numpy as np
import pytest
from PIL import Image

import nti_jax
from nti_jax.run import cli, hosts
from nti_jax import testing
from nti_jax.report import html as report

SAMPLES = os.path.join(os.path.dirname(nti_jax.__file__), "toy", "samples")
SCRIPT_PROMPT = 'a <script>throw new Error("injected by a prompt")</script> & "quoted" thing'
CHROMIUM = os.environ.get("NTI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-pipe",
]


# ----------------------------------------------------------------------------------------------
# the output folder


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> str:
    """A real CLI run (2 done, 1 failed) plus attention heat maps and a pending row."""
    keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    before = {k: getattr(jax.config, k) for k in keys}
    src = tmp_path_factory.mktemp("report-inputs")
    rows = [json.loads(line) for line in open(os.path.join(SAMPLES, "samples.jsonl"))]
    rows = [r for r in rows if r["image"] in ("red-triangle.png", "blue-square.png")]
    for r in rows:
        shutil.copy(os.path.join(SAMPLES, r["image"]), src / r["image"])
    (src / "broken.png").write_bytes(b"not an image")
    rows.append({"image": "broken.png", "prompt": SCRIPT_PROMPT})
    (src / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    folder = str(tmp_path_factory.mktemp("report") / "out")
    try:
        # negative-prompt: the same files as null-text at half the compile time (25 s of CPU against 48 s)
        rc = cli.main(["--manifest", str(src / "m.jsonl"), "--out", folder, "--steps", "4", "--method", "negative-prompt", "--cache-dir", "none"])
    finally:  # the CLI closed this process's cache: reopen the run's (a config update alone leaves it closed)
        on = before["jax_enable_compilation_cache"]
        hosts.enable_compilation_cache(before["jax_compilation_cache_dir"] if on else None,
                                       before["jax_persistent_cache_min_compile_time_secs"])
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", before["jax_persistent_cache_min_entry_size_bytes"])
    assert rc == 1  # one image failed
    # Heat maps as the CLI will write them (attention.png, attention-<edit file>), for one image.
    grid = np.zeros((64, 192, 3), np.uint8)  # 3 tokens side by side
    grid[:, 64:128, 0] = 255
    Image.fromarray(grid).save(os.path.join(folder, "red-triangle", "attention.png"))
    edit = [f for f in os.listdir(os.path.join(folder, "red-triangle")) if f.startswith("edit-")][0]
    Image.fromarray(grid).save(os.path.join(folder, "red-triangle", "attention-" + edit))
    # A folder an earlier run left for the image that now fails: not this run's, not shown.
    os.makedirs(os.path.join(folder, "broken"))
    shutil.copy(os.path.join(folder, "red-triangle", "reconstruction.png"), os.path.join(folder, "broken"))
    with open(os.path.join(folder, "broken", "metrics.json"), "w") as f:
        json.dump({"status": "done", "psnr": 30.0}, f)
    with open(os.path.join(folder, "results.jsonl"), "a") as f:
        f.write(json.dumps({"index": 3, "name": "later", "image": str(src / "later.png"), "prompt": "a later image", "status": "pending"}) + "\n")
    return folder


@pytest.fixture(scope="module")
def results(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]


@pytest.fixture(scope="module")
def page(out) -> str:
    path = report.write_report(out)
    assert path == os.path.join(out, "index.html")
    return path


# ----------------------------------------------------------------------------------------------
# the HTML


class Parsed(html.parser.HTMLParser):
    """Tags with attributes, and per table row (data-index) its images and the text by class."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.rows: dict[str, dict] = {}
        self.text_by_class: dict[str, list[str]] = {}
        self._row = None
        self._open: list[tuple[str, str]] = []  # (tag, class) of the open elements
        self._texts: list[list] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "tr" and "data-index" in a:
            self._row = self.rows[a["data-index"]] = {"attrs": a, "imgs": [], "text": {}}
        if tag == "img" and self._row is not None:
            self._row["imgs"].append(a["src"])
        if tag not in ("img", "meta", "link", "br"):
            self._open.append((tag, a.get("class", "")))
            self._texts.append([])

    def handle_endtag(self, tag):
        if tag in ("img", "meta", "link", "br") or not self._open:
            return
        t, cls = self._open.pop()
        text = "".join(self._texts.pop())
        if self._texts:
            self._texts[-1].append(text)
        if cls:
            self.text_by_class.setdefault(cls, []).append(text)
            if self._row is not None:
                self._row["text"].setdefault(cls, []).append(text)
        if t == "tr":
            self._row = None

    def handle_data(self, data):
        if self._texts:
            self._texts[-1].append(data)


def test_the_cli_run_leaves_the_run_compilation_cache_open(out):
    """The fixture's `--cache-dir none` run closes JAX's persistent cache for this process; the
    files this worker runs next must still find the suite's cache (issue 27: before, they
    compiled without it)."""
    import jax.numpy as jnp

    with testing.compile_log() as log:
        jax.jit(lambda x: x * 3.0 + 0.25)(jnp.ones(5))  # a program no test compiles
    assert log.compiles >= 1 and log.cache_lookups == log.compiles  # each compile looked in the cache


@pytest.mark.slow
def test_report_html(out, results, page):
    text = open(page, encoding="utf-8").read()
    doc = Parsed(text)
    assert [r["status"] for r in results] == ["done", "done", "failed", "pending"]
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]  # atomic write left nothing

    # Self-contained: one inline script, inline CSS only, every link and image relative and on disk.
    scripts = [a for t, a in doc.tags if t == "script"]
    assert len(scripts) == 1 and "src" not in scripts[0]  # the prompt's <script> is text, not a tag
    assert not [a for t, a in doc.tags if t == "link" and a.get("rel") != "icon"]
    imgs = [a for t, a in doc.tags if t == "img"]
    assert imgs and all(a.get("loading") == "lazy" for a in imgs)
    for url in [a["src"] for a in imgs] + [a["href"] for t, a in doc.tags if t == "a" and not a["href"].startswith("#")]:
        parts = urllib.parse.urlsplit(url)
        assert not parts.scheme and not parts.netloc and not url.startswith("/"), url
        assert os.path.isfile(os.path.join(out, urllib.parse.unquote(url))), url

    # The summary line counts results.jsonl's statuses.
    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed", "pending")}
    summary = re.sub("<[^>]+>", "", text.split('<p id="summary">', 1)[1].split("</p>", 1)[0])
    assert summary == f"{len(results)} image(s): " + ", ".join(f"{n} {s}" for s, n in counts.items())

    # Run facts from run.json.
    run = json.load(open(os.path.join(out, "run.json")))
    n = len(run["devices"])
    assert re.search(rf"<th>devices</th><td>{n} × \w+ per process \({n}\)</td>", text)
    assert "<th>processes</th><td>1</td>" in text and f"<td>{run['jax']}</td>" in text

    assert sorted(doc.rows) == sorted(str(r["index"]) for r in results)
    for r in results:
        row = doc.rows[str(r["index"])]
        a = row["attrs"]
        assert a["data-status"] == r["status"] and a["data-name"] == r["name"]
        assert row["text"]["prompt"][0] == r["prompt"]  # the text survives escaping exactly
        folder = os.path.join(out, r["name"])
        if r["status"] == "done":
            assert float(a["data-psnr"]) == r["psnr"] and float(a["data-vae"]) == r["vae_psnr"]
            assert float(a["data-seconds"]) == r["seconds"]
            assert f"PSNR {r['psnr']:.2f} dB · VAE bound {r['vae_psnr']:.2f} dB" in row["text"]["cap"]
            # every PNG of the image's folder is shown, nothing else
            pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
            assert sorted(urllib.parse.unquote(s).split("/", 1)[1] for s in row["imgs"]) == pngs
            assert all(s.split("/", 1)[0] == r["name"] for s in row["imgs"])
            for f in r["edits"]:
                assert f in pngs
            metrics = json.load(open(os.path.join(folder, "metrics.json")))
            assert [e["prompt"] for e in metrics["edits"]] == row["text"]["prompt"][1:]
        else:
            assert a["data-psnr"] == "" and not row["imgs"]
        if r["status"] == "failed":
            assert row["text"]["error"] == [r["error"]]
            assert row["text"]["why"] == ["failed: " + r["error"]]
        if r["status"] == "pending":
            assert row["text"]["why pending"][0].startswith("pending: not reached")
    shown = [f for f in os.listdir(os.path.join(out, "red-triangle")) if f.startswith("attention")]
    assert len(shown) == 2 and all(any(s.endswith("/" + f) for s in doc.rows["0"]["imgs"]) for f in shown)
    # failed and pending listed at the top with their reasons, linking to their rows
    problems = doc.text_by_class["problems"][0]
    assert results[2]["error"] in problems and "not reached" in problems
    assert ("a", {"href": "#row-2"}) in doc.tags and ("a", {"href": "#row-3"}) in doc.tags
    assert "&lt;script&gt;throw new Error(&quot;injected by a prompt&quot;)&lt;/script&gt; &amp; &quot;quoted&quot;" in text


def test_report_bad_input(tmp_path, capsys):
    with pytest.raises(report.ReportError, match="holds no results.jsonl"):
        report.write_report(str(tmp_path))
    assert report.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nti-report: error: output folder") and "nowhere" in err
    # a torn last line (a crash mid-write) and no run.json: a report all the same, saying so
    (tmp_path / "results.jsonl").write_text(json.dumps({"index": 0, "name": "a", "prompt": "p", "status": "pending"}) + "\n{\"ind")
    text = open(report.write_report(str(tmp_path))).read()
    assert "1 unreadable line(s) in results.jsonl" in text and "run.json is missing" in text
    assert 'data-index="0"' in text


# ----------------------------------------------------------------------------------------------
# the browser


class Chromium:
    """Headless Chromium driven with the DevTools protocol over --remote-debugging-pipe: JSON
    messages ending in NUL, commands on the child's fd 3, replies and events on its fd 4."""

    def __init__(self, profile: str, timeout: float = 60.0):
        if not os.access(CHROMIUM, os.X_OK):
            pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set NTI_CHROMIUM)")
        # Our pipe ends become the child's fds 3 and 4 by bash redirections (no preexec_fn, so no
        # fork of this multithreaded process); copies at fds >= 10 cannot collide with 3 and 4.
        r, w = os.pipe()
        cmd_r, self.cmd_w = fcntl.fcntl(r, fcntl.F_DUPFD_CLOEXEC, 10), w
        os.close(r)
        r, w = os.pipe()
        self.ev_r, ev_w = r, fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(w)
        wire = f'exec "$0" "$@" 3<&{cmd_r} 4>&{ev_w} {cmd_r}<&- {ev_w}>&-'
        self.log = profile + ".log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["bash", "-c", wire, CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(cmd_r, ev_w),
            )
        os.close(cmd_r)
        os.close(ev_w)
        self.timeout = timeout
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []
        self.session = None

    def close(self) -> None:
        try:
            self.call("Browser.close", session=False, timeout=5)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.ev_r)

    def _log_tail(self) -> str:
        with open(self.log, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-5:])

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self.buf:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.ev_r], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer in time; its output: {self._log_tail()}")
            chunk = os.read(self.ev_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited (status {self.proc.wait(10)}); its output: {self._log_tail()}")
            self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, session: bool = True, timeout: float = None, **params) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + (timeout or self.timeout)
        while True:
            m = self._read(deadline)
            if m.get("id") == self.next_id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method: str) -> dict:
        for k, m in enumerate(self.events):
            if m.get("method") == method:
                return self.events.pop(k)
        deadline = time.time() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get("method") == method:
                return m
            self.events.append(m)

    def open(self, url: str, width: int = 1400, height: int = 900) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self.events.clear()
        self.call("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluation failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path: str) -> None:
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.call(
            "Page.captureScreenshot", format="png", captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))


# Loads every image (they are lazy: make them eager), waits until each has loaded or failed.
LOAD_ALL = """
(async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(i => { i.loading = "eager"; });
  const t0 = Date.now();
  while (imgs.some(i => !i.complete) && Date.now() - t0 < 20000)
    await new Promise(r => setTimeout(r, 50));
  return imgs.map(i => ({src: i.getAttribute("src"), width: i.naturalWidth, complete: i.complete}));
})()
"""


LOADED = "new Promise(r => setTimeout(r, 300)).then(() => Array.from(document.images).filter(i => i.naturalWidth > 0).length)"


# Where the first row's first edit image lies in the viewport, as loaded (no scrolling).
FIRST_EDIT = """
(() => {
  const img = document.querySelector("#rows tbody tr figure img");
  const r = img.getBoundingClientRect();
  return {alt: img.alt, left: r.left, top: r.top, right: r.right, bottom: r.bottom, width: innerWidth, height: innerHeight};
})()
"""


def check_in_browser(index_html: str, profile: str, screenshot: str = None, sort_keys=(), viewport=(1400, 900)) -> dict:
    """Open the page from file:// in a `viewport` (width, height); return its images' load state,
    the errors and exceptions it raised, every URL it requested, how many images had loaded 0.3 s
    after the load event (lazy loading), the first edit image's box, and the row order
    (data-index) after clicking each sort key (twice)."""
    b = Chromium(profile)
    try:
        b.open("file://" + os.path.abspath(index_html), *viewport)
        loaded_at_first = b.evaluate(LOADED)
        first_edit = b.evaluate(FIRST_EDIT)
        images = b.evaluate(LOAD_ALL)
        orders = {}
        for key in sort_keys:
            b.evaluate(f'document.querySelector(\'#rows th[data-key="{key}"]\').click()')
            first = b.evaluate("Array.from(document.querySelectorAll('#rows tbody tr')).map(r => r.dataset.index)")
            b.evaluate(f'document.querySelector(\'#rows th[data-key="{key}"]\').click()')
            second = b.evaluate("Array.from(document.querySelectorAll('#rows tbody tr')).map(r => r.dataset.index)")
            orders[key] = (first, second)
        if screenshot:
            b.evaluate("document.querySelector('#rows th[data-key=\"index\"]').click()")  # manifest order
            b.screenshot(screenshot)
        b.call("Runtime.evaluate", expression="0")  # drain the events so far
        events = b.events
    finally:
        b.close()
    errors = []
    for m in events:
        p = m.get("params", {})
        if m.get("method") == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            errors.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
        elif m.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
        elif m.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
            errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
        elif m.get("method") == "Network.loadingFailed":
            errors.append(f"network: {p.get('errorText')}")
    requests = [m["params"]["request"]["url"] for m in events if m.get("method") == "Network.requestWillBeSent"]
    broken = [i["src"] for i in images if not (i["complete"] and i["width"] > 0)]
    return {"images": images, "broken": broken, "errors": errors, "requests": requests, "orders": orders,
            "loaded_at_first": loaded_at_first, "first_edit": first_edit}


def _expected_order(results: list[dict], key: str, field: str) -> tuple[list[str], list[str]]:
    has = [r for r in results if isinstance(r.get(field), (int, float))]
    rest = [str(r["index"]) for r in results if r not in has]
    asc = sorted(has, key=lambda r: (r[field], r["index"]))
    desc = sorted(has, key=lambda r: (-r[field], r["index"]))
    return [str(r["index"]) for r in asc] + rest, [str(r["index"]) for r in desc] + rest


@pytest.mark.slow
def test_report_in_browser(out, results, page, tmp_path):
    shot = os.path.join(out, "report.png")
    t0 = time.time()
    got = check_in_browser(page, str(tmp_path / "profile"), shot, sort_keys=("psnr", "seconds", "name"), viewport=(1280, 800))
    seconds = time.time() - t0
    box = got["first_edit"]  # the edit is what the report is opened for: in view on a laptop screen
    assert box["alt"].startswith("edit 1 ") and (box["width"], box["height"]) == (1280, 800), box
    assert 0 <= box["left"] < box["right"] <= 1280 and 0 <= box["top"] < box["bottom"] <= 800, box
    assert len(got["images"]) == 9, got["images"]  # 2 x (input, reconstruction, 1 edit, attention.png) + 1 edit heat map
    assert got["broken"] == [] and got["errors"] == [], got
    assert got["requests"] and all(u.startswith(("file://", "data:")) for u in got["requests"]), got["requests"]
    assert got["orders"]["psnr"] == _expected_order(results, "psnr", "psnr")
    assert got["orders"]["seconds"] == _expected_order(results, "seconds", "seconds")
    by_name = sorted(results, key=lambda r: r["name"])
    assert got["orders"]["name"] == ([str(r["index"]) for r in by_name], [str(r["index"]) for r in reversed(by_name)])
    with Image.open(shot) as im:
        assert im.width >= 1000 and im.height >= 400
    print(f"browser check {seconds:.1f} s; screenshot {shot}")


@pytest.mark.slow
def test_browser_check_catches_faults(out, page, tmp_path):
    """The same check on broken copies of the report: a deleted image, a script that throws."""
    missing = tmp_path / "missing"
    shutil.copytree(out, missing)
    os.remove(missing / "blue-square" / "reconstruction.png")
    got = check_in_browser(str(missing / "index.html"), str(tmp_path / "p1"))
    assert got["broken"] == ["blue-square/reconstruction.png"]
    assert any("ERR_FILE_NOT_FOUND" in e for e in got["errors"]), got["errors"]

    throwing = tmp_path / "throwing"
    shutil.copytree(out, throwing, ignore=shutil.ignore_patterns("*.safetensors"))
    text = (throwing / "index.html").read_text()
    (throwing / "index.html").write_text(text.replace("</body>", '<script>throw new Error("boom")</script></body>'))
    got = check_in_browser(str(throwing / "index.html"), str(tmp_path / "p2"))
    assert got["broken"] == []
    assert [e for e in got["errors"] if "boom" in e], got["errors"]


@pytest.mark.slow
def test_report_many_rows(out, tmp_path):
    """400 images: the page renders in well under a second, loads its images lazily (few at
    first, all once scrolled to), and sorts 400 rows by PSNR as Python does."""
    n = 400
    big = tmp_path / "big"
    big.mkdir()
    base = os.path.join(out, "red-triangle")
    pngs = [f for f in os.listdir(base) if f.endswith(".png")]
    psnrs = np.random.default_rng(0).uniform(10, 35, n)
    rows = []
    for k in range(n):
        folder = big / f"img{k:04d}"
        folder.mkdir()
        for f in pngs:
            os.link(os.path.join(base, f), folder / f)
        shutil.copy(os.path.join(base, "metrics.json"), folder / "metrics.json")
        rows.append({"index": k, "name": f"img{k:04d}", "prompt": f"prompt {k}", "status": "done", "psnr": float(psnrs[k]),
                     "vae_psnr": 31.0, "seconds": float(k % 7), "edits": [f for f in pngs if f.startswith("edit-")]})
    (big / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    t0 = time.time()
    page = report.write_report(str(big))
    render_s = time.time() - t0
    html_text = open(page, encoding="utf-8").read()  # every image lazy, so the page opens at once
    assert html_text.count(' loading="lazy"') == html_text.count("<img ") == n * len(pngs)
    t0 = time.time()
    got = check_in_browser(page, str(tmp_path / "profile"), sort_keys=("psnr",))
    browser_s = time.time() - t0
    assert len(got["images"]) == n * len(pngs) and got["broken"] == [] and got["errors"] == []
    assert got["loaded_at_first"] < n * len(pngs) // 4, got["loaded_at_first"]
    assert got["orders"]["psnr"] == _expected_order(rows, "psnr", "psnr")
    print(f"{n} rows: report {render_s:.2f} s, browser {browser_s:.1f} s, {got['loaded_at_first']} images loaded before scrolling")


@pytest.mark.slow
def test_report_other_states(out, tmp_path):
    """What the CLI writes in rarer cases: a rerun's skipped row, an image whose inversion was
    kept but whose edit failed, and a multi-host run whose per-process results were not merged."""
    shutil.copytree(os.path.join(out, "red-triangle"), tmp_path / "a")
    shutil.copytree(os.path.join(out, "blue-square"), tmp_path / "b")
    metrics = json.load(open(tmp_path / "b" / "metrics.json"))
    edit = metrics["edits"][0]["file"]
    os.remove(tmp_path / "b" / edit)
    for f in os.listdir(tmp_path / "b"):  # heat maps are written only with the edits
        if f.startswith("attention"):
            os.remove(tmp_path / "b" / f)
    metrics.update(status="failed", error="edit 1 ('x') gave no finite image", edits=[])
    (tmp_path / "b" / "metrics.json").write_text(json.dumps(metrics))
    rows = [
        {"index": 0, "name": "a", "prompt": "p0", "status": "skipped", "psnr": 21.5, "vae_psnr": 30.0, "seconds": 3.0, "process": 0},
        {"index": 1, "name": "b", "prompt": "p1", "status": "failed", "error": metrics["error"], "psnr": 19.25, "process": 1},
    ]
    (tmp_path / "results.1.jsonl").write_text(json.dumps(rows[1]) + "\n")  # no results.jsonl
    (tmp_path / "results.0.jsonl").write_text(json.dumps(rows[0]) + "\n")
    doc = Parsed(open(report.write_report(str(tmp_path)), encoding="utf-8").read())
    a, b = doc.rows["0"], doc.rows["1"]
    assert a["attrs"]["data-status"] == "skipped" and "(earlier run)" in a["text"]["small"]
    assert a["attrs"]["data-process"] == "0" and b["attrs"]["data-process"] == "1"
    assert sorted(s.split("/")[1] for s in a["imgs"]) == sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".png"))
    assert sorted(s.split("/")[1] for s in b["imgs"]) == ["input.png", "reconstruction.png"]
    assert b["text"]["error"] == [rows[1]["error"]] and "PSNR 19.25 dB · VAE bound" in b["text"]["cap"][0]
    assert ("th", {"data-key": "process", "data-type": "num"}) in doc.tags
    assert "results.0.jsonl, results.1.jsonl" in open(tmp_path / "index.html").read()
