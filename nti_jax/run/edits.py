"""An image's work in a run and its edits: the controllers from its manifest edits, and every
edit of a call's images through `ShardedInverter.edit`, with the heat maps they give."""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from nti_jax.core import controllers, heatmaps, p2p
from nti_jax.core.inversion import Inversion
from nti_jax.core.parallel import EditJob, ShardedInverter
from nti_jax.errors import one_line
from nti_jax.loading.pipeline import Pipeline
from nti_jax.run.manifest import Item
from nti_jax.run.writer import edit_file


@dataclasses.dataclass
class Work:
    """What this run makes of one request: its pixels and controllers once prepared, its
    warnings and heat maps, and why its finished files are redone (`repaired`)."""

    item: Item
    repaired: Optional[str] = None
    pixels: Optional[np.ndarray] = None
    controllers: list = dataclasses.field(default_factory=list)
    warnings: list = dataclasses.field(default_factory=list)
    heatmaps: dict = dataclasses.field(default_factory=dict)  # PNG file name -> uint8 image

    @property
    def prompt(self):
        return self.item.prompt


def controller(it: Item, edit: dict) -> controllers.Controller:
    """The controller of one manifest edit of `it` (its settings, the prompt aside)."""
    settings = {k: v for k, v in edit.items() if k != "prompt"}
    return controllers.controller_from_settings(it.prompt, [edit["prompt"]], settings)


def edit_images(pipe: Pipeline, inverter: ShardedInverter, attention: bool, on: Inversion, jobs: list[Work],
            invs: list[Inversion]) -> list[tuple[Optional[list], Optional[str]]]:
    """(edited images (1 + n, H, W, 3) per edit, or None; error or None) per image: row k of
    `on` (where the images' inversions live) is `invs[k]` (its host copy). Every edit of the
    images runs through `ShardedInverter.edit` (edits of one shape in one program); their
    cross-attention maps become the image's heat maps (`Work.heatmaps`: attention.png, and one
    per edit with `attention`)."""
    out: list = [[None, None] for _ in jobs]
    requests, owner = [], []
    for k, (job, inv) in enumerate(zip(jobs, invs)):
        bad = np.asarray(inv.nonfinite[0])
        if bad.any():
            first = int(np.argmax(bad))
            out[k][1] = f"non-finite loss or latents at {int(bad.sum())} of {bad.size} steps (first: step {first})"
            continue
        try:
            specs = [p2p.edit_spec(pipe, inv, [e["prompt"]], controller=c) for e, c in zip(job.item.edits, job.controllers)]
            specs = specs or [p2p.edit_spec(pipe, inv, [], edit=False)]  # the source's maps only
        except Exception as e:  # noqa: BLE001 - recorded per image
            out[k][1] = one_line(e)
            continue
        requests += [EditJob(k, s) for s in specs]
        owner += [k] * len(specs)
    results = inverter.edit(pipe, on, requests) if requests else []
    done: dict = {}
    for k, r in zip(owner, results):
        done.setdefault(k, []).append(r)
    for k, rs in done.items():
        failed = [r for r in rs if isinstance(r, BaseException)]
        if failed:
            out[k][1] = one_line(failed[0])
            continue
        job, inv = jobs[k], invs[k]
        edits = [r.images for r in rs] if job.item.edits else []
        first = rs[0].maps[:1]
        job.heatmaps = {"attention.png": heatmaps.attention_sheet(pipe, inv.prompts[:1], job.pixels[None], first)}
        if attention:
            for q, (e, r) in enumerate(zip(job.item.edits, rs)):
                job.heatmaps["attention-" + edit_file(q, e)] = heatmaps.attention_sheet(pipe, [inv.prompts[0], e["prompt"]], r.images, r.maps)
        out[k][0] = edits
    return [tuple(o) for o in out]
