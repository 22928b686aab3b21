"""The table of images on the report page (`nti_jax.report`): one row per results row, with what
the image's folder in OUT holds (metrics.json, input, reconstruction, attention maps, edits)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

from nti_jax.records import read_json
from nti_jax.report.page import Page, data_num, db, duration, esc

STATUSES = ("done", "skipped", "failed", "pending")
HEAD_CELLS = (  # (data-key, data-type, label) of the table's columns; the process column only when multi-host
    ("index", "num", "#"),
    ("name", "", "image"),
    ("status", "", "status"),
    ("process", "num", "process"),
    ("psnr", "num", "PSNR dB"),
    ("vae", "num", "VAE bound dB"),
    ("seconds", "num", "seconds"),
    ("", "", "input"),
    ("", "", "reconstruction"),
    ("", "", "edits"),
    ("", "", "attention"),
)


def _inside(out: str, path: str) -> bool:
    """Whether `path` lies strictly inside `out` (links resolved)."""
    real_out, real = os.path.realpath(out), os.path.realpath(path)
    return real != real_out and os.path.commonpath([real_out, real]) == real_out


def _folder(out: str, row: dict) -> Optional[str]:
    """The image's folder OUT/<name> (or the row's "dir" if that lies inside OUT), if it exists."""
    for cand in (row.get("name"), row.get("dir")):
        if not isinstance(cand, str) or not cand:
            continue
        path = os.path.join(out, cand) if not os.path.isabs(cand) else cand
        if _inside(out, path) and os.path.isdir(path):
            return path
    return None


def number(x: object) -> Optional[float]:
    """`x` as a float if it is a real number (not a bool, not NaN), else None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return float(x)


def _settings_text(edit: dict) -> str:
    """An edit's settings other than its prompt and file, as "key=value · ..."."""
    parts = []
    for k, v in edit.items():
        if k in ("prompt", "file"):
            continue
        parts.append(f"{k}={v if isinstance(v, (str, int, float)) else json.dumps(v, ensure_ascii=False)}")
    return " · ".join(parts)


def _edits(row: dict, metrics: dict) -> list[dict]:
    """Edit settings dicts (each with "file") from metrics.json, else the file names of the row."""
    m = metrics.get("edits")
    if isinstance(m, list) and all(isinstance(e, dict) and isinstance(e.get("file"), str) for e in m) and m:
        return m
    files = row.get("edits")
    if isinstance(files, list):
        return [{"file": f} for f in files if isinstance(f, str)]
    return []


@dataclasses.dataclass(frozen=True)
class _Row:
    """One results row with what its image folder adds (folder and metrics only if they agree)."""

    row: dict
    status: str
    folder: Optional[str]
    metrics: dict
    index: object  # int, or "" when the row has none
    name: str
    prompt: object
    psnr: Optional[float]
    vae: Optional[float]
    secs: Optional[float]
    error: object


def _row_facts(page: Page, row: dict) -> _Row:
    """The row's values, each from results.jsonl else from the folder's metrics.json."""
    status = row.get("status") if row.get("status") in STATUSES else "unknown"
    folder = _folder(page.out, row)
    metrics = (read_json(os.path.join(folder, "metrics.json")) if folder else None) or {}
    # The folder's files belong to this row only if its metrics.json agrees (a pending row, or an
    # image that failed before writing anything, may have a folder left by an earlier run).
    state = metrics.get("status")
    if not ((status in ("done", "skipped") and state in (None, "done")) or (status == "failed" and state == "failed")):
        folder, metrics = None, {}
    return _Row(
        row=row,
        status=status,
        folder=folder,
        metrics=metrics,
        index=row.get("index") if isinstance(row.get("index"), int) else "",
        name=str(row.get("name") or os.path.basename(str(row.get("image", ""))) or "?"),
        prompt=row.get("prompt", metrics.get("prompt", "")),
        psnr=number(row.get("psnr", metrics.get("psnr"))),
        vae=number(row.get("vae_psnr", metrics.get("vae_psnr"))),
        secs=number(row.get("seconds", metrics.get("seconds"))),
        error=row.get("error") or metrics.get("error"),
    )


def _info_html(r: _Row, show_error: bool) -> str:
    """Name, prompt, source file, method facts and (if `show_error`) the error."""
    row, metrics = r.row, r.metrics
    info = [f'<div class="name">{esc(r.name)}</div>', f'<div class="prompt">{esc(r.prompt)}</div>']
    if row.get("image"):
        info.append(f'<div class="small" title="{esc(row["image"])}">{esc(os.path.basename(str(row["image"])))}</div>')
    facts = []
    if metrics.get("method"):
        facts.append(str(metrics["method"]))
    if metrics.get("num_steps") is not None:
        facts.append(f"{metrics['num_steps']} steps")
    if row.get("inner_iterations", metrics.get("inner_iterations")) is not None:
        facts.append(f"{row.get('inner_iterations', metrics.get('inner_iterations'))} inner its")
    lm = number(row.get("latent_mse", metrics.get("latent_mse")))
    if lm is not None:
        facts.append(f"latent MSE {lm:.3g}")
    if facts:
        info.append(f'<div class="small">{esc(" · ".join(facts))}</div>')
    if show_error:  # e.g. the inversion is kept but an edit failed
        info.append(f'<div class="error">{esc(r.error)}</div>')
    return "".join(info)


def _timing_html(r: _Row) -> str:
    """Total seconds, then the inversion and edit parts when metrics.json has them."""
    t = [esc(duration(r.secs))]
    inv_s, edit_s = number(r.metrics.get("inversion_seconds")), number(r.metrics.get("edit_seconds"))
    if inv_s is not None:
        t.append(f'<div class="small">inversion {esc(duration(inv_s))}</div>')
    if edit_s is not None:
        t.append(f'<div class="small">edits {esc(duration(edit_s))}</div>')
    if r.status == "skipped":
        t.append('<div class="small">(earlier run)</div>')
    return "".join(t)


def _recon_html(page: Page, r: _Row, rec: Optional[str]) -> str:
    """The reconstruction with its PSNRs, else why there is none."""
    if rec:
        return (
            page.img(rec, f"reconstruction {r.name}")
            + f'<div class="cap">PSNR {esc(db(r.psnr))} dB · VAE bound {esc(db(r.vae))} dB</div>'
        )
    if r.status == "failed":
        return f'<div class="why">failed: <span class="error">{esc(r.error or "no reason recorded")}</span></div>'
    if r.status == "pending":
        return '<div class="why pending">pending: not reached (the run stopped or another process had it)</div>'
    return '<span class="none">no reconstruction file</span>'


def _edit_figures(page: Page, r: _Row) -> str:
    """One <figure> per edit: the image (or what is missing), its attention map behind a toggle, prompt and settings."""
    figs = []
    for k, e in enumerate(_edits(r.row, r.metrics)):
        f = page.file(r.folder, e["file"])
        cap = f'<figcaption><div class="prompt">{esc(e.get("prompt", e["file"]))}</div>'
        settings = _settings_text(e)
        if settings:
            cap += f'<div class="small">{esc(settings)}</div>'
        cap += "</figcaption>"
        body = page.img(f, f"edit {k + 1} {r.name}") if f else f'<div class="none">missing: {esc(e["file"])}</div>'
        body += page.maps(page.file(r.folder, "attention-" + e["file"]), f"attention edit {k + 1} {r.name}")
        figs.append(f"<figure>{body}{cap}</figure>")
    return "".join(figs)


def _row_html(page: Page, row: dict, multi: bool) -> str:
    """The <tr> of one image, with data-* values for sorting."""
    r = _row_facts(page, row)
    inp = page.file(r.folder, "input.png")
    rec = page.file(r.folder, "reconstruction.png")
    att = page.file(r.folder, "attention.png")
    cells = [
        f'<td class="num">{esc(r.index)}</td>',
        f'<td class="info">{_info_html(r, bool(r.error and rec))}</td>',
        f'<td><span class="st {r.status}">{esc(r.status)}</span></td>',
    ]
    if multi:
        cells.append(f'<td class="num">{esc(row.get("process", ""))}</td>')
    input_cell = page.img(inp, f"input {r.name}") if inp else '<span class="none">no input saved</span>'
    cells += [
        f'<td class="num">{esc(db(r.psnr))}</td>',
        f'<td class="num">{esc(db(r.vae))}</td>',
        f'<td class="num">{_timing_html(r)}</td>',
        f"<td>{input_cell}</td>",
        f"<td>{_recon_html(page, r, rec)}</td>",
        f'<td><div class="edits">{_edit_figures(page, r)}</div></td>',
        f"<td>{page.maps(att, f'attention {r.name}')}</td>",
    ]
    data = (
        f' id="row-{esc(r.index)}" data-index="{esc(r.index)}" data-name="{esc(r.name)}" data-status="{esc(r.status)}"'
        f' data-psnr="{data_num(r.psnr)}" data-vae="{data_num(r.vae)}" data-seconds="{data_num(r.secs)}"'
    )
    if multi:
        data += f' data-process="{esc(row.get("process", ""))}"'
    return f"<tr{data}>{''.join(cells)}</tr>"


def table_html(page: Page, rows: list[dict], multi: bool) -> str:
    """The sortable table of images: a header cell per column, a row per image."""
    head = []
    for key, kind, label in HEAD_CELLS:
        if key == "process" and not multi:
            continue
        attrs = (f' data-key="{key}"' if key else "") + (f' data-type="{kind}"' if kind else "")
        head.append(f"<th{attrs}>{label}</th>")
    body = "\n".join(_row_html(page, r, multi) for r in rows)
    return f'<table id="rows"><thead><tr>{"".join(head)}</tr></thead><tbody>\n{body}\n</tbody></table>'
