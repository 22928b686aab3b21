"""The report page's assets and HTML helpers (used by `nti_jax.report`): inline CSS and JS,
escaping, number formats and relative links to OUT's files."""

from __future__ import annotations

import html
import math
import os
import struct
import urllib.parse
from typing import Optional

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px;margin:0 0 8px}
table.kv{border-collapse:collapse;margin:8px 0}
table.kv th{text-align:left;font-weight:600;padding:2px 12px 2px 0;vertical-align:top;color:#555}
table.kv td{padding:2px 0;word-break:break-all}
#summary{font-size:16px;margin:10px 0}
.facts{display:flex;flex-wrap:wrap;gap:0 40px}
#run{max-width:720px}
.st{display:inline-block;padding:1px 6px;border-radius:4px;font-size:12px;background:#ddd}
.st.done{background:#cfe9cf}.st.skipped{background:#dde6f3}.st.failed{background:#f6c9c9}.st.pending{background:#f3e5bf}
.problems li{margin:2px 0}
table#rows{border-collapse:collapse;background:#fff;margin-top:12px}
#rows th,#rows td{border:1px solid #ddd;padding:4px 6px;vertical-align:top}
#rows th{background:#eee;position:sticky;top:0;z-index:1;white-space:nowrap}
#rows th[data-key]{cursor:pointer;user-select:none}
#rows th[data-key]::after{content:" ↕";color:#aaa}
#rows th[aria-sort=ascending]::after{content:" ▲";color:#333}
#rows th[aria-sort=descending]::after{content:" ▼";color:#333}
td.num{text-align:right;white-space:nowrap}
td.info{min-width:200px;max-width:280px}
.name{font-weight:600;overflow-wrap:anywhere}
.prompt{white-space:pre-wrap;word-break:break-word}
.small{font-size:12px;color:#666;word-break:break-word}
.error,.why{color:#a00;white-space:pre-wrap;overflow-wrap:anywhere}
.why{max-width:260px}
.why.pending{color:#8a6d00}
.none{color:#999;font-size:12px}
.cap{font-size:12px;white-space:nowrap}
img{display:block;width:128px;height:auto;background:#eee}
img.px{image-rendering:pixelated}
img.att{width:auto;max-width:384px;height:auto;margin-top:4px}
.edits{display:flex;flex-wrap:wrap;gap:8px}
figure{margin:0;max-width:200px}
figcaption{font-size:12px}
details.maps summary{font-size:12px;color:#555;cursor:pointer;white-space:nowrap}
"""

# Sorting by a header's data-key (the rows' data-* values): click once ascending, again
# descending; rows without a value stay last; ties keep manifest order.
JS = """
(function () {
  var table = document.getElementById("rows"), body = table.tBodies[0], current = null, dir = 1;
  table.querySelectorAll("th[data-key]").forEach(function (th) {
    th.addEventListener("click", function () {
      var key = th.dataset.key, numeric = th.dataset.type === "num";
      dir = current === key ? -dir : 1;
      current = key;
      table.querySelectorAll("th[data-key]").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.dataset[key], y = b.dataset[key];
        if (x === "" || y === "") return (x === "") - (y === "") || a.dataset.index - b.dataset.index;
        var c = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
        return dir * c || a.dataset.index - b.dataset.index;
      });
      var frag = document.createDocumentFragment();
      rows.forEach(function (r) { frag.appendChild(r); });
      body.appendChild(frag);
    });
  });
})();
"""


def esc(x: object) -> str:
    """`str(x)` escaped for HTML text and quoted attributes."""
    return html.escape(str(x), quote=True)


def duration(seconds: Optional[float]) -> str:
    """A duration for people: "12.3 s", "4 min 05 s", "2 h 07 min"; "–" for None."""
    if seconds is None:
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m < 60 else f"{m // 60} h {m % 60:02d} min"


def db(x: Optional[float]) -> str:
    """A PSNR in dB with two decimals; "∞" for infinity, "–" for None."""
    if x is None:
        return "–"
    return "∞" if math.isinf(x) else f"{x:.2f}"


def data_num(x: Optional[float]) -> str:
    """A number for a data- attribute that JavaScript's Number() reads back exactly."""
    if x is None:
        return ""
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


def kv_rows(pairs: list[tuple[str, object]]) -> str:
    """Table rows <tr><th>key</th><td>value</td></tr> for (key, value) pairs."""
    return "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in pairs)


def png_size(path: str) -> Optional[tuple[int, int]]:
    """(width, height) from a PNG header, None for anything else."""
    try:
        with open(path, "rb") as f:
            head = f.read(24)
    except OSError:
        return None
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", head[16:24])


class Page:
    """Relative links to the files of OUT that exist."""

    def __init__(self, out: str):
        self.out = out

    def src(self, path: str) -> str:
        """The URL of `path` relative to OUT."""
        rel = os.path.relpath(path, self.out).replace(os.sep, "/")
        return urllib.parse.quote(rel)

    def img(self, path: str, alt: str, cls: str = "") -> str:
        """A lazily loaded image linking to its file; small images are drawn pixelated."""
        size = png_size(path)
        dims = f' width="{size[0]}" height="{size[1]}"' if size else ""
        if size and size[0] < 128:
            cls = (cls + " px").strip()
        cls_attr = f' class="{cls}"' if cls else ""
        src = self.src(path)
        return (
            f'<a href="{src}" target="_blank"><img src="{src}" alt="{esc(alt)}"{dims}{cls_attr}'
            ' loading="lazy" decoding="async"></a>'
        )

    def maps(self, path: Optional[str], alt: str) -> str:
        """An attention heat map behind a toggle ("" without one), so edits stay in view."""
        return f'<details class="maps"><summary>attention</summary>{self.img(path, alt, "att")}</details>' if path else ""

    def file(self, folder: Optional[str], name: str) -> Optional[str]:
        """The path of the plain file `name` in `folder`, if both exist."""
        if folder is None or not isinstance(name, str) or not name or "/" in name or os.sep in name:
            return None
        path = os.path.join(folder, name)
        return path if os.path.isfile(path) else None
