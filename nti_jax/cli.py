"""The command line: invert and edit one image, a folder, a glob or a manifest, on every device.

    python scripts/invert.py                 # the bundled samples, the bundled toy model -> outputs/
    nti-invert --model M --image 'photos/*.jpg' --prompt "a cat" --edit "a dog" --out runs/cats
    nti-invert --model M --manifest items.jsonl --batch-size 4 --out runs/big

Per image, under OUT/<name>/: inversion.safetensors, input.png, reconstruction.png, one PNG per
edit and metrics.json (written last: it marks the image finished). One row per image in
OUT/results.jsonl. Reruns skip finished images; an image that failed is retried; an image whose
inversion was saved but whose edits failed is only edited again.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np

from . import inversion, parallel
from .errors import NtiError, OptimisationError, PromptError
from .io import atomic_path, load_image, psnr, save_png
from .p2p import SETTINGS_KEYS
from .pipeline import DTYPES, load_pipeline

PROG = "nti-invert"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.join(PACKAGE_DIR, "toy", "model")
DEFAULT_MANIFEST = os.path.join(PACKAGE_DIR, "toy", "samples", "samples.jsonl")
DEFAULT_OUT = "outputs"
DEFAULTS = {  # the inversion settings of the paper; batch size 1 fits any accelerator
    "method": "null-text",
    "steps": 50,
    "guidance": 7.5,
    "inner_steps": 10,
    "early_stop_eps": 1e-5,
    "dtype": "float32",
    "batch_size": 1,
}
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
EDIT_KEYS = ("prompt",) + SETTINGS_KEYS
ROW_KEYS = ("image", "prompt", "edits", "name", "crop")

EPILOG = """\
manifest (--manifest FILE.jsonl), one JSON object a line; image paths are relative to the file:
  {"image": "cat.jpg", "prompt": "a cat sitting on a wall",
   "edits": [{"prompt": "a dog sitting on a wall", "kind": "replace", "cross_replace_steps": 0.8,
              "self_replace_steps": 0.5, "blend_words": [["cat"], ["dog"]]},
             {"prompt": "a fluffy cat sitting on a wall", "equalizer": {"fluffy": 4}}]}
  optional per row: "name" (output folder), "crop" [left, right, top, bottom].
  Edit settings (nti_jax.p2p.controller_from_settings): kind (auto|replace|refine),
  cross_replace_steps, self_replace_steps, equalizer {word: factor}, blend_words (word lists,
  source first), blend_threshold, blend_start, max_self_size.

outputs: OUT/<name>/{inversion.safetensors, input.png, reconstruction.png, edit-<k>-<words>.png,
  metrics.json}, OUT/results.jsonl (one row per image: status done|skipped|failed|pending).
  Reruns skip finished images. Exit status: 0 all done, 1 some image failed, 2 bad arguments,
  130 interrupted (Ctrl-C / SIGTERM; finished images are kept).

devices and hosts: images are split over every local device (--batch-size rows per device).
  Several hosts: run the same command on each with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID set (or --distributed on TPU pods / SLURM, where JAX finds them itself); each
  process takes every num_processes-th image and process 0 merges OUT/results.jsonl. OUT must be
  a folder all hosts share.

compilation cache: compiled programs are kept in ~/.cache/nti-jax/jax-cache (--cache-dir,
  $NTI_JAX_CACHE_DIR; "none" disables), so a second run does not compile again.
  --step-progress shows a bar per batch over the diffusion steps; JAX does not cache programs
  with host callbacks, so with it the inversion program is compiled on every run.
"""


class UsageError(Exception):
    """A bad argument or input file: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _prog() -> str:
    arg0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return arg0 if arg0 in ("invert.py", PROG) else PROG


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=_prog(),
        description="Null-text inversion of real images and Prompt-to-Prompt edits, in batches, on every\n"
        "local device (and several hosts). With no arguments: the bundled sample images, inverted\n"
        "with the bundled toy model and edited, into ./outputs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("inputs")
    g.add_argument("--model", metavar="PATH|ID", help="diffusers Stable Diffusion folder or Hugging Face hub id (default: the bundled toy model)")
    g.add_argument("--image", action="append", metavar="PATH", help="an image file, a folder of images or a glob (repeatable); needs --prompt or a caption in <image>.txt")
    g.add_argument("--prompt", metavar="TEXT", help="caption of the image(s) given with --image")
    g.add_argument("--manifest", metavar="FILE.jsonl", help="one {image, prompt, edits} object a line (default with neither --image nor --manifest: the bundled samples)")
    g.add_argument("--edit", action="append", metavar="PROMPT", help="a target prompt to edit every image to (repeatable; added to a manifest's edits)")
    g.add_argument("--no-edits", action="store_true", help="invert and reconstruct only, ignore all edits")
    g.add_argument("--out", metavar="DIR", help="output folder (default: %(default)s)")
    g = p.add_argument_group("inversion")
    g.add_argument("--method", choices=inversion.METHODS, help="default: %(default)s (the paper)")
    g.add_argument("--steps", type=_positive_int, metavar="N", help="DDIM steps (default %(default)s)")
    g.add_argument("--guidance", type=_finite_float, metavar="W", help="classifier-free guidance scale (default %(default)s)")
    g.add_argument("--inner-steps", type=_nonnegative_int, metavar="N", help="null-text Adam steps per timestep at most (default %(default)s)")
    g.add_argument("--early-stop-eps", type=_finite_float, metavar="EPS", help="stop a timestep when loss < EPS + i*2e-5 (default %(default)s; negative: never)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="UNet/text compute dtype (default %(default)s)")
    g = p.add_argument_group("devices, hosts and runs")
    g.add_argument("--batch-size", type=_positive_int, metavar="N", help="images per device per batch (default %(default)s; more uses an accelerator better)")
    g.add_argument("--num-devices", type=_positive_int, metavar="N", help="use only the first N local devices (default: all)")
    g.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (automatic when JAX_COORDINATOR_ADDRESS is set)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="jax.distributed coordinator address (default $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=_positive_int, metavar="N", help="number of processes (default $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=_nonnegative_int, metavar="I", help="this process's index (default $JAX_PROCESS_ID)")
    g.add_argument("--cache-dir", metavar="DIR", help="persistent compilation cache (default ~/.cache/nti-jax/jax-cache or $NTI_JAX_CACHE_DIR; 'none' disables)")
    g.add_argument("--force", action="store_true", help="redo images that a previous run finished")
    g.add_argument("--step-progress", action="store_true", help="a progress bar over the diffusion steps of each batch (the inversion program is then not cached)")
    p.set_defaults(out=DEFAULT_OUT, **DEFAULTS)
    return p


# ----------------------------------------------------------------------------------------------
# what to do


@dataclasses.dataclass
class Item:
    index: int
    image: str
    prompt: object
    edits: list
    name: str = ""
    crop: Optional[tuple] = None
    # filled while running
    key: str = ""
    inversion_key: str = ""
    pixels: Optional[np.ndarray] = None
    controllers: list = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return self.name or os.path.basename(self.image)


def _check_edits(edits, where: str) -> list:
    if not isinstance(edits, list):
        raise UsageError(f"{where}: \"edits\" must be a list of {{prompt, settings}} objects")
    out = []
    for k, e in enumerate(edits):
        if isinstance(e, str):
            e = {"prompt": e}
        if not isinstance(e, dict) or not isinstance(e.get("prompt"), str):
            raise UsageError(f"{where}: edit {k + 1} must be an object with a \"prompt\" string")
        unknown = sorted(set(e) - set(EDIT_KEYS))
        if unknown:
            raise UsageError(f"{where}: edit {k + 1} has unknown setting(s) {', '.join(unknown)} (known: {', '.join(EDIT_KEYS[1:])})")
        out.append(dict(e))
    return out


def read_manifest(path: str) -> list[Item]:
    if not os.path.isfile(path):
        raise UsageError(f"manifest {path} not found")
    base = os.path.dirname(os.path.abspath(path))
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read manifest {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object")
        image = row.get("image")
        if not isinstance(image, str) or not image.strip():
            raise UsageError(f"{where}: missing \"image\" (a path)")
        if not isinstance(row.get("prompt"), str):
            raise UsageError(f"{where}: missing \"prompt\" (the image's caption)")
        crop = row.get("crop")
        if crop is not None and (
            not isinstance(crop, list) or len(crop) != 4 or not all(isinstance(c, int) and c >= 0 for c in crop)
        ):
            raise UsageError(f"{where}: \"crop\" must be [left, right, top, bottom] pixel counts")
        name = row.get("name")
        if name is not None and not isinstance(name, str):
            raise UsageError(f"{where}: \"name\" must be a string")
        image = os.path.expanduser(image)
        items.append(
            Item(
                index=len(items),
                image=image if os.path.isabs(image) else os.path.join(base, image),
                prompt=row["prompt"],
                edits=_check_edits(row.get("edits", []), where),
                name=name or "",
                crop=tuple(crop) if crop else None,
            )
        )
    if not items:
        raise UsageError(f"manifest {path} lists no images")
    return items


def expand_images(patterns: list[str]) -> list[str]:
    files = []
    for pat in patterns:
        p = os.path.expanduser(pat)
        if os.path.isdir(p):
            found = sorted(
                os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(p, f))
            )
            if not found:
                raise UsageError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {pat}")
        elif os.path.isfile(p):
            found = [p]
        elif glob.has_magic(p):
            found = sorted(f for f in glob.glob(p, recursive=True) if os.path.isfile(f))
            if not found:
                raise UsageError(f"no file matches {pat}")
        else:
            raise UsageError(f"image {pat} not found")
        files.extend(found)
    return files


def _sidecar_caption(image: str) -> Optional[str]:
    txt = os.path.splitext(image)[0] + ".txt"
    if os.path.isfile(txt):
        with open(txt, encoding="utf-8") as f:
            return f.read().strip()
    return None


def collect_items(args) -> list[Item]:
    extra = [{"prompt": e, "kind": "auto"} for e in (args.edit or [])]
    if args.image and args.manifest:
        raise UsageError("give --image or --manifest, not both")
    if args.image:
        files = expand_images(args.image)
        items = []
        for k, f in enumerate(files):
            prompt = args.prompt if args.prompt is not None else _sidecar_caption(f)
            if prompt is None:
                raise UsageError(f"--prompt is required with --image (or a caption in {os.path.splitext(f)[0]}.txt)")
            items.append(Item(index=k, image=f, prompt=prompt, edits=list(extra)))
    else:
        if args.prompt is not None:
            raise UsageError("--prompt goes with --image; a manifest carries its own prompts")
        items = read_manifest(args.manifest or DEFAULT_MANIFEST)
        for it in items:
            it.edits = it.edits + list(extra)
    if args.no_edits:
        for it in items:
            it.edits = []
    assign_names(items)
    return items


def assign_names(items: list[Item]) -> None:
    """Output folder names: the row's name or the image's file stem, made unique in manifest order."""
    seen = set()
    for it in items:
        base = it.name or os.path.splitext(os.path.basename(it.image))[0]
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "image"
        name, k = base, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        it.name = name


def _slug(text: str, n: int = 48) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:n].rstrip("-") or "edit"


def edit_file(k: int, edit: dict) -> str:
    return f"edit-{k + 1}-{_slug(edit['prompt'])}.png"


def model_fingerprint(model: str) -> list:
    """The model as it is on disk: weight files' sizes and times (a hub id: the id)."""
    if not os.path.isdir(model):
        return [model]
    out = [os.path.abspath(model)]
    for f in sorted(glob.glob(os.path.join(model, "*", "*"))):
        if f.endswith((".safetensors", ".bin", ".json")):
            st = os.stat(f)
            out.append([os.path.relpath(f, model), st.st_size, st.st_mtime_ns])
    return out


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().replace("\n", " ") or type(e).__name__
    return msg if isinstance(e, NtiError) else f"{type(e).__name__}: {msg}"


# ----------------------------------------------------------------------------------------------
# running


class StepProgress:
    """The `progress` callback of the inversion program (one instance per run, so the compiled
    program is reused by every batch). Each device reports every step: the bar shows the furthest."""

    def __init__(self):
        self.bar = None
        self.lock = threading.Lock()

    def __call__(self, i):
        with self.lock:
            if self.bar is not None:
                n = int(np.asarray(i)) + 1
                if n > self.bar.n:
                    self.bar.update(n - self.bar.n)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class Runner:
    def __init__(self, args, pipe, items: list[Item], devices, model_fp, process_index: int, process_count: int):
        self.args = args
        self.pipe = pipe
        self.items = items
        self.out = os.path.abspath(args.out)
        self.pid, self.nproc = process_index, process_count
        self.mesh = parallel.local_mesh(devices)
        self.inverter = parallel.ShardedInverter(self.mesh)
        self.replicas = None
        self.settings = inversion.check_settings(pipe, args.method, args.steps, args.guidance, args.inner_steps, args.early_stop_eps)
        self.model_fp = model_fp
        self.rows: dict[int, dict] = {}
        self.log = None
        self.bar = None
        self.step_progress = StepProgress() if args.step_progress and args.method == "null-text" else None
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.per_device = 1
        self.total = 0

    # -- bookkeeping ---------------------------------------------------------------------------

    def keys(self, it: Item) -> None:
        try:
            st = os.stat(it.image)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        a = self.args
        inv = {
            "image": os.path.abspath(it.image),
            "stamp": stamp,
            "crop": it.crop,
            "prompt": it.prompt,
            "method": a.method,
            "steps": a.steps,
            "guidance": a.guidance,
            "inner_steps": a.inner_steps,
            "early_stop_eps": a.early_stop_eps,
            "dtype": a.dtype,
            "model": self.model_fp,
        }
        it.inversion_key = _hash(inv)
        it.key = _hash([it.inversion_key, it.edits])

    def folder(self, it: Item) -> str:
        return os.path.join(self.out, it.name)

    def previous(self, it: Item) -> Optional[dict]:
        path = os.path.join(self.folder(it), "metrics.json")
        try:
            with open(path) as f:
                m = json.load(f)
        except (OSError, ValueError):
            return None
        return m if isinstance(m, dict) else None

    def state(self, it: Item) -> tuple[str, Optional[dict]]:
        """"done" (skip), "reuse" (inversion saved, edits to do) or "new"."""
        if self.args.force:
            return "new", None
        m = self.previous(it)
        if m is None:
            return "new", None
        d = self.folder(it)
        inv_ok = m.get("inversion_key") == it.inversion_key and os.path.isfile(os.path.join(d, "inversion.safetensors"))
        files = ["reconstruction.png"] + [edit_file(k, e) for k, e in enumerate(it.edits)]
        if m.get("status") == "done" and m.get("key") == it.key and inv_ok and all(os.path.isfile(os.path.join(d, f)) for f in files):
            return "done", m
        if inv_ok and m.get("psnr") is not None:
            return "reuse", m
        return "new", None

    def record(self, it: Item, status: str, error: Optional[str] = None, metrics: Optional[dict] = None) -> None:
        row = {"index": it.index, "name": it.name, "image": it.image, "prompt": it.prompt, "status": status}
        if error:
            row["error"] = error
        if metrics:
            for k in ("psnr", "vae_psnr", "latent_mse", "inner_iterations", "seconds"):
                if k in metrics:
                    row[k] = metrics[k]
            row["dir"] = self.folder(it)
            row["edits"] = [e.get("file") for e in metrics.get("edits", [])]
        if self.nproc > 1:
            row["process"] = self.pid
        self.rows[it.index] = row
        self.counts[status] = self.counts.get(status, 0) + 1
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        if self.bar is not None:
            if status == "failed":
                self.bar.write(f"failed: {it.label}: {error}", file=sys.stderr)
            self.bar.set_postfix(done=self.counts["done"], skipped=self.counts["skipped"], failed=self.counts["failed"], refresh=False)
            self.bar.update(1)

    def write_metrics(self, it: Item, metrics: dict) -> None:
        with atomic_path(os.path.join(self.folder(it), "metrics.json")) as tmp:
            with open(tmp, "w") as f:
                json.dump(metrics, f, indent=2)

    # -- preparing one image -------------------------------------------------------------------

    def prepare(self, it: Item) -> None:
        """Load the image and check the prompts on the host (a failure here costs no device time)."""
        p = it.prompt
        if not isinstance(p, str) or not p.strip():
            raise PromptError(f"the source prompt must be a non-empty caption of the image, got {p!r}")
        self.pipe.tokenize([p])  # too long: PromptError
        it.pixels = load_image(it.image, self.pipe.image_size, it.crop)
        it.controllers = [self.controller(it, e) for e in it.edits]

    def controller(self, it: Item, edit: dict):
        from . import p2p

        settings = {k: v for k, v in edit.items() if k != "prompt"}
        return p2p.controller_from_settings(it.prompt, [edit["prompt"]], settings)

    def run_edits(self, pipe, inv_one, it: Item) -> list:
        """Dispatch the item's edits (one `nti_jax.edit` call per edit); arrays may still be in flight."""
        import nti_jax

        return [nti_jax.edit(pipe, inv_one, [e["prompt"]], controller=c) for e, c in zip(it.edits, it.controllers)]

    def save_edits(self, it: Item, results: list) -> list[dict]:
        out = []
        for k, (e, images) in enumerate(zip(it.edits, results)):
            images = np.asarray(images)
            if images.shape[0] != 2 or not np.all(np.isfinite(images)):
                raise OptimisationError(f"edit {k + 1} ({e['prompt']!r}) gave no finite image")
            fn = edit_file(k, e)
            save_png(images[1], os.path.join(self.folder(it), fn))
            out.append(dict(e, file=fn))
        return out

    # -- a batch -------------------------------------------------------------------------------

    def run_batch(self, batch: list[Item]) -> None:
        import jax

        b = self.per_device
        cap = b * self.inverter.num_devices
        rows = parallel.pad_rows(len(batch), cap)
        prompts = [batch[r].prompt for r in rows]
        t0 = time.time()
        step_bar = None
        try:
            if self.step_progress is not None:
                from tqdm import tqdm

                step_bar = tqdm(total=self.args.steps, desc="  steps", unit="step", leave=False, dynamic_ncols=True, disable=None)
                self.step_progress.bar = step_bar
            if self.replicas is None:
                self.replicas = parallel.device_replicas(self.pipe, self.mesh, self.inverter.unet_params(self.pipe))
            inputs = self.inverter.prepare(self.replicas, [batch[r].pixels for r in rows], prompts, self.args.steps)
            outputs = self.inverter(self.pipe, inputs, self.settings, self.step_progress)
            inv = inversion.assemble(self.pipe, inputs, self.settings, prompts, outputs)
            shards = parallel.split_rows(inv, self.mesh, b)
            recon = [inversion.reconstruct(rep, s) for rep, s in zip(self.replicas, shards)]
            vae = [rep.decode_latents(s.pivots[:, 0]) for rep, s in zip(self.replicas, shards)]
            jax.block_until_ready((recon, vae))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # the whole batch failed (e.g. out of memory): record, go on
            for it in batch:
                self.record(it, "failed", f"batch failed: {_one_line(e)}")
            return
        finally:
            if step_bar is not None:
                self.step_progress.bar = None
                step_bar.close()
        t_inv = time.time() - t0
        where = [divmod(k, b) for k in range(len(batch))]
        pending = self.edit_batch(batch, shards, where)
        for (it, inv_one, edits, error, edit_seconds), (d, j) in zip(pending, where):
            t1 = time.time() - edit_seconds
            recon_img = np.asarray(recon[d][0][j])
            z = np.asarray(recon[d][1][j])
            z0 = np.asarray(inv_one.pivots[0, 0])
            vae_img = np.asarray(vae[d][j])
            metrics = self.base_metrics(it, inv_one, t_inv / len(batch))
            finite = metrics["nonfinite_steps"] == 0 and np.isfinite(z).all() and np.isfinite(recon_img).all()
            metrics.update(
                psnr=psnr(recon_img, it.pixels) if finite else None,
                vae_psnr=psnr(vae_img, it.pixels) if np.isfinite(vae_img).all() else None,
                latent_mse=float(np.mean((z.astype(np.float64) - z0) ** 2)) if finite else None,
            )
            if not finite and error is None:
                error = "the reconstruction is not finite"
            self.finish(it, inv_one, recon_img if finite else None, edits, error, metrics, t1)
        if self.bar is not None and self.bar.disable:  # no terminal: one line per batch for the logs
            c = self.counts
            print(
                f"[{sum(c.values())}/{self.total}] batch of {len(batch)} in {t_inv:.1f} s; "
                f"done {c['done']}, skipped {c['skipped']}, failed {c['failed']}",
                file=sys.stderr,
                flush=True,
            )

    def edit_batch(self, batch: list[Item], shards, where) -> list[tuple]:
        """(item, its inversion, its edited images or None, error or None, seconds) per item. Each
        device edits its own images; with several devices they work at once (one thread each)."""

        def one(it, d, j):
            inv_one = shards[d][j]
            bad = np.asarray(inv_one.nonfinite[0])
            if bad.any():
                first = int(np.argmax(bad))
                return it, inv_one, None, f"non-finite loss or latents at {int(bad.sum())} of {bad.size} steps (first: step {first})", 0.0
            t = time.time()
            try:
                edits = [np.asarray(x) for x in self.run_edits(self.replicas[d], inv_one, it)]
                return it, inv_one, edits, None, time.time() - t
            except Exception as e:  # noqa: BLE001 - recorded per image
                return it, inv_one, None, _one_line(e), time.time() - t

        jobs = list(zip(batch, where))
        if self.inverter.num_devices == 1 or not any(it.edits for it in batch):
            return [one(it, d, j) for it, (d, j) in jobs]
        from concurrent.futures import ThreadPoolExecutor

        def device_jobs(d):
            return [(k, one(it, dd, j)) for k, (it, (dd, j)) in enumerate(jobs) if dd == d]

        with ThreadPoolExecutor(max_workers=self.inverter.num_devices, thread_name_prefix="nti-edit") as pool:
            futures = [pool.submit(device_jobs, d) for d in range(self.inverter.num_devices)]
            done = dict(kv for f in futures for kv in f.result())
        return [done[k] for k in range(len(jobs))]

    def base_metrics(self, it: Item, inv_one, inv_seconds: float) -> dict:
        iters = np.asarray(inv_one.inner_iterations[0])
        a = self.args
        return {
            "name": it.name,
            "image": it.image,
            "prompt": it.prompt,
            "status": "running",
            "method": a.method,
            "num_steps": a.steps,
            "guidance_scale": a.guidance,
            "num_inner_steps": a.inner_steps,
            "early_stop_epsilon": a.early_stop_eps,
            "dtype": a.dtype,
            "model": os.path.abspath(a.model) if os.path.isdir(a.model) else a.model,
            "inner_iterations": int(iters.sum()),
            "inner_iterations_per_step": iters.tolist(),
            "final_losses": np.asarray(inv_one.final_losses[0]).tolist(),
            "nonfinite_steps": int(np.asarray(inv_one.nonfinite[0]).sum()),
            "inversion_seconds": round(inv_seconds, 4),
            "key": it.key,
            "inversion_key": None,
        }

    def finish(self, it: Item, inv_one, recon_img, edits, error, metrics: dict, t1: float) -> None:
        """Write the image's files, metrics.json last (atomic), and its results row."""
        folder = self.folder(it)
        try:
            os.makedirs(folder, exist_ok=True)
            metrics["edits"] = []
            save_png(it.pixels, os.path.join(folder, "input.png"))
            if recon_img is not None:  # a finite inversion: kept, even if its edits failed
                inv_one.save(os.path.join(folder, "inversion.safetensors"))
                metrics["inversion_key"] = it.inversion_key
                save_png(recon_img, os.path.join(folder, "reconstruction.png"))
                if error is None and edits:
                    metrics["edits"] = self.save_edits(it, edits)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            error = error or _one_line(e)
        metrics["edit_seconds"] = round(time.time() - t1, 4)
        metrics["seconds"] = round(metrics["inversion_seconds"] + metrics["edit_seconds"], 4)
        metrics["status"] = "failed" if error else "done"
        if error:
            metrics["error"] = error
        try:
            self.write_metrics(it, metrics)
        except OSError as e:
            error, metrics["status"] = error or _one_line(e), "failed"
        self.record(it, metrics["status"], error, metrics)

    def redo_edits(self, it: Item, prev: dict) -> None:
        """The inversion is on disk from an earlier run; only the edits are (re)made."""
        t1 = time.time()
        metrics = dict(prev, key=it.key, status="running", edits=[])
        metrics.pop("error", None)
        error = None
        try:
            inv_one = inversion.Inversion.load(os.path.join(self.folder(it), "inversion.safetensors"))
            it.controllers = [self.controller(it, e) for e in it.edits]
            metrics["edits"] = self.save_edits(it, self.run_edits(self.pipe, inv_one, it))
        except KeyboardInterrupt:
            raise
        except Exception as e:
            error = _one_line(e)
        metrics["edit_seconds"] = round(time.time() - t1, 4)
        metrics["seconds"] = round(prev.get("inversion_seconds", 0.0) + metrics["edit_seconds"], 4)
        metrics["status"] = "failed" if error else "done"
        if error:
            metrics["error"] = error
        self.write_metrics(it, metrics)
        self.record(it, metrics["status"], error, metrics)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> int:
        from tqdm import tqdm

        share = [self.items[i] for i in parallel.host_share(len(self.items), self.pid, self.nproc)]
        self.total = len(share)
        os.makedirs(self.out, exist_ok=True)
        results_path = parallel.results_file(self.out, self.pid, self.nproc)
        self.log = open(results_path, "w")
        new, reuse = [], []
        for it in share:
            self.keys(it)
            st, prev = self.state(it)
            if st == "done":
                self.record(it, "skipped", metrics=prev)
            elif st == "reuse":
                reuse.append((it, prev))
            else:
                new.append(it)
        self.per_device = parallel.per_device_batch(self.args.batch_size, len(new), self.inverter.num_devices)
        cap = self.per_device * self.inverter.num_devices
        desc = "images" if self.nproc == 1 else f"images [process {self.pid}/{self.nproc}]"
        self.bar = tqdm(total=len(share), initial=self.counts["skipped"], desc=desc, unit="img", dynamic_ncols=True, disable=None)
        self.bar.set_postfix(done=0, skipped=self.counts["skipped"], failed=0, refresh=False)
        t0 = time.time()
        interrupted = False
        old_term = None
        if threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            for it, prev in reuse:
                self.redo_edits(it, prev)
            batch: list[Item] = []
            for it in new:
                try:
                    self.prepare(it)
                except KeyboardInterrupt:
                    raise
                except Exception as e:
                    self.record(it, "failed", _one_line(e))
                    continue
                batch.append(it)
                if len(batch) == cap:
                    self.run_batch(batch)
                    batch = []
            if batch:
                self.run_batch(batch)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if old_term is not None:
                signal.signal(signal.SIGTERM, old_term)
            elapsed = time.time() - t0
            self.bar.close()
            self.log.close()
            rows = [self.rows.get(it.index) or {"index": it.index, "name": it.name, "image": it.image, "prompt": it.prompt, "status": "pending"} for it in share]
            if self.nproc > 1:
                for r in rows:
                    r["process"] = self.pid
            parallel.write_jsonl(results_path, rows)
        return self.summary(rows, elapsed, interrupted)

    def summary(self, rows: list[dict], elapsed: float, interrupted: bool) -> int:
        results = os.path.join(self.out, "results.jsonl")
        merge_error = None
        if self.nproc > 1 and not interrupted:
            try:
                parallel.barrier("nti-invert-results")
                if self.pid == 0:
                    parts = [parallel.results_file(self.out, p, self.nproc) for p in range(self.nproc)]
                    rows = parallel.merge_jsonl(results, parts)
            except Exception as e:  # another process died: this one's rows stay in its own file
                merge_error = _one_line(e)
        count = lambda s: sum(r.get("status") == s for r in rows)
        done, skipped, failed, pending = count("done"), count("skipped"), count("failed"), count("pending")
        rate = self.counts["done"] / elapsed if elapsed > 0 else 0.0
        scope = "" if self.nproc == 1 else (" (all processes)" if self.pid == 0 else f" (process {self.pid})")
        line = f"{done} done, {skipped} skipped, {failed} failed"
        if pending:
            line += f", {pending} not reached"
        line += f"{scope}; {elapsed:.1f} s, {rate:.3g} images/s"
        if self.nproc > 1:
            line += f" on process {self.pid}"
        print(("interrupted: " if interrupted else "") + line)
        if merge_error:
            print(f"could not merge the processes' results ({merge_error}); see {self.out}/results.<process>.jsonl", file=sys.stderr)
        elif self.nproc == 1 or self.pid == 0:
            print(f"outputs in {self.out} (per image: <name>/; index: {results})")
        else:
            print(f"outputs in {self.out}; process 0 merges {results}")
        if interrupted:
            return 130
        return 1 if failed or merge_error else 0


def _write_run_info(args, out: str, devices, process_count: int) -> None:
    import jax

    info = {
        "argv": sys.argv[1:],
        "args": vars(args),
        "jax": jax.__version__,
        "devices": [str(d) for d in devices],
        "processes": process_count,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_path(os.path.join(out, "run.json")) as tmp:
        with open(tmp, "w") as f:
            json.dump(info, f, indent=2, default=str)


def main(argv: Optional[list[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some image failed, 2 bad arguments,
    130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        return _run(args)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _run(args) -> int:
    import jax

    env = parallel.distributed_env()
    wanted = args.distributed or args.coordinator or args.num_processes or args.process_id is not None or env["coordinator_address"]
    if wanted:
        kw = {
            "coordinator_address": args.coordinator or env["coordinator_address"],
            "num_processes": args.num_processes or env["num_processes"],
            "process_id": args.process_id if args.process_id is not None else env["process_id"],
        }
        try:
            parallel.initialize_distributed(**kw)
        except Exception as e:
            raise UsageError(f"cannot start jax.distributed ({_one_line(e)}); set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID or --coordinator/--num-processes/--process-id") from None
    parallel.enable_compilation_cache(parallel.cache_dir_from_env(args.cache_dir))
    pid, nproc = parallel.process_info()
    items = collect_items(args)
    devices = jax.local_devices()
    if args.num_devices:
        if args.num_devices > len(devices):
            raise UsageError(f"--num-devices {args.num_devices}, but this process has {len(devices)} device(s)")
        devices = devices[: args.num_devices]
    model = args.model or DEFAULT_MODEL
    args.model = model
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {args.out}: {e.strerror or e}") from None
    try:
        pipe = load_pipeline(model, dtype=args.dtype)
    except NtiError as e:
        hint = " (the bundled toy model; pass --model)" if model == DEFAULT_MODEL else ""
        raise UsageError(f"cannot load the model{hint}: {e}") from None
    try:
        runner = Runner(args, pipe, items, devices, model_fingerprint(model), pid, nproc)
    except (NtiError, ValueError) as e:
        raise UsageError(_one_line(e)) from None
    if pid == 0:
        _write_run_info(args, os.path.abspath(args.out), devices, nproc)
    return runner.run()


if __name__ == "__main__":
    sys.exit(main())
