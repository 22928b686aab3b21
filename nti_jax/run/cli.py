"""The command line: invert and edit one image, a folder, a glob or a manifest, on every device.

    python scripts/invert.py                 # the bundled samples, the bundled toy model -> outputs/
    nti-invert --model M --image 'photos/*.jpg' --prompt "a cat" --edit "a dog" --out runs/cats
    nti-invert --model M --manifest items.jsonl --batch-size 4 --out runs/big

This module parses the arguments into one `RunConfig` and sets the run up (devices, hosts, cache,
model); `manifest` reads what to do, `driver` does it and `ledger` keeps the books (see their
docstrings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Callable, Optional

from nti_jax.core import parallel
from nti_jax.run import hosts
from nti_jax.pie import bench as pie_bench
from nti_jax.core.controllers import GUIDANCE
from nti_jax.run.driver import Driver
from nti_jax.errors import DeviceMemoryError, NtiError, UsageError, one_line
from nti_jax.models.unet import REMAT_MODES
from nti_jax.run.ledger import Ledger, check_folder, record_checksums
from nti_jax.run.manifest import PACKAGE_DIR, Item, assign_names, check_items, collect_items
from nti_jax.loading.pipeline import DTYPES, load_pipeline
from nti_jax.records import write_json
from nti_jax.run.config import EDIT_FLAGS, RUN_FLAGS, SETTING_FLAGS, RunConfig, flag_words
from nti_jax.run.keys import item_keys, model_fingerprint, run_key
from nti_jax.core.schedule import inference_timesteps
from nti_jax.core.settings import METHODS, InvertSettings

PROG = "nti-invert"
DEFAULT_MODEL = os.path.join(PACKAGE_DIR, "toy", "model")
DEFAULT_OUT = "outputs"
DEFAULT_SETTINGS = InvertSettings()  # the paper's
RUN_DEFAULTS = {f: getattr(RunConfig, f) for f in ("dtype", "batch_size", "claim_timeout")}  # RunConfig's own defaults
FLAGS = {**SETTING_FLAGS, **EDIT_FLAGS, **RUN_FLAGS}  # field -> flag: each flag is spelled in run/config.py only
DEFAULT_EDIT_GUIDANCE = "single-branch"  # the measured best with null-text inversion (RESULTS.md)

EPILOG = """\
manifest (--manifest FILE.jsonl), one JSON object a line; image paths are relative to the file:
  {"image": "cat.jpg", "prompt": "a cat sitting on a wall",
   "edits": [{"prompt": "a dog sitting on a wall", "kind": "replace", "cross_replace_steps": 0.8,
              "self_replace_steps": 0.5, "blend_words": [["cat"], ["dog"]]},
             {"prompt": "a fluffy cat sitting on a wall", "equalizer": {"fluffy": 4}}]}
  optional per row: "name" (output folder), "crop" [left, right, top, bottom]; other keys are the
  row's own data (ignored), but one that looks like a misspelt key ("edit") is an error; no two
  rows may name the same output folder.
  Edit settings (nti_jax.core.controllers.controller_from_settings): kind (auto|replace|refine),
  cross_replace_steps, self_replace_steps, equalizer {word: factor}, blend_words (word lists,
  source first), blend_threshold, blend_start, max_self_size, substruct_words,
  substruct_threshold, mapping (original|aligned), guidance (plain|single-branch|proximal|
  single-branch+proximal), prox_norm, prox_quantile, recon_lr, recon_t, prox_dilate.

outputs: OUT/<name>/{inversion.safetensors, input.png, reconstruction.png, edit-<k>-<words>.png,
  attention.png (each token's cross-attention, averaged over the 16x16-level layers and the
  steps, over the image; --attention: attention-edit-<k>-<words>.png too), metrics.json},
  OUT/index.html (the report), OUT/results.jsonl (one row per image: status done|skipped|failed|pending).
  Each image's metrics.json lists the size and SHA-256 of its files. Reruns skip finished images
  whose files have their recorded sizes (--verify: and hashes) and redo the others (an intact
  inversion is reused); --check OUT verifies a folder without running anything (exit 1 if any
  image is damaged). Exit status: 0 all done, 1 some image failed, 2 bad arguments,
  130 interrupted (Ctrl-C / SIGTERM; finished images are kept).

several workers: start the same command any number of times on one OUT (a job array, VMs that
  may be preempted): each image is claimed by one worker (OUT/.nti-run/claims); the claim of a
  worker that died is taken over at once in its kernel and pid namespace, else once its heartbeat
  has not changed for --claim-timeout seconds (by the taker's clock). A worker with other settings
  is refused. Every worker merges results.jsonl and the report from all workers' rows when it
  ends; the last one computes the PIE-Bench metrics and prunes OUT/.nti-run.

devices and hosts: images are split over every local device (--batch-size rows per device).
  Several hosts: run the same command on each with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID set (or --distributed on TPU pods / SLURM, where JAX finds them itself); each
  process takes every num_processes-th image; OUT/results.jsonl is merged from every process's rows. OUT must be
  a folder all hosts share.

PIE-Bench (--pie-bench DATA_DIR [--pie-types 0,6]): brackets stripped, Refine with cross 0.4 /
  self 0.6, and with a blended word Reweight x2 on the target word + LocalBlend on the pair (as
  cure-lab/PnPInversion run_editing_p2p.py); one output folder per --method. Metrics needing no
  weights (PSNR, MSE, SSIM on the unedited part) are computed; LPIPS, DINO and CLIP where their
  weights are on disk; PnPInversion's own evaluation/evaluate.py runs on OUT/pnp.

compilation cache: compiled programs are kept in ~/.cache/nti-jax/jax-cache (--cache-dir,
  $NTI_JAX_CACHE_DIR; "none" disables), so a second run does not compile again.
  --step-progress shows a bar per batch over the diffusion steps; JAX does not cache programs
  with host callbacks, so with it the inversion program is compiled on every run.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise UsageError(message)


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= `low`, else one line naming `what` was expected."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def _gib(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (v > 0 and v < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of GiB, got {text!r}")
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
    g.add_argument(FLAGS["model"], metavar="PATH|ID", help="diffusers Stable Diffusion folder or Hugging Face hub id (default: the bundled toy model)")
    g.add_argument("--image", action="append", metavar="PATH", help="an image file, a folder of images or a glob (repeatable); needs --prompt or a caption in <image>.txt")
    g.add_argument("--prompt", metavar="TEXT", help="caption of the image(s) given with --image")
    g.add_argument("--manifest", metavar="FILE.jsonl", help="one {image, prompt, edits} object a line (default with neither --image nor --manifest: the bundled samples)")
    g.add_argument("--edit", action="append", metavar="PROMPT", help="a target prompt to edit every image to (repeatable; added to a manifest's edits)")
    g.add_argument("--no-edits", action="store_true", help="invert and reconstruct only, ignore all edits")
    g.add_argument("--pie-bench", metavar="DATA_DIR", help="a PIE-Bench folder (mapping_file.json, annotation_images/): every entry set up as PnPInversion's run_editing_p2p.py; also writes OUT/pnp/ (their output layout) and OUT/pie_bench_metrics.{json,md}")
    g.add_argument("--pie-types", metavar="0,6", help="PIE-Bench editing types to run (default: all, 0-9)")
    g.add_argument("--out", metavar="DIR", help="output folder (default: %(default)s)")
    g = p.add_argument_group("edits (defaults for every edit; a manifest edit's own settings win)")
    g.add_argument(FLAGS["guidance"], choices=GUIDANCE, help="edit-time guidance (default: single-branch, which keeps null-text edits from overshooting, see benchmarks/RESULTS.md; plain under --pie-bench, as its authors ran it)")
    g.add_argument(FLAGS["attention"], action="store_true", help="also a heat-map PNG per edit (source and target tokens' cross-attention; attention.png per image is always written)")
    g.add_argument(FLAGS["mapping"], choices=("original", "aligned"), help="Replace's token mapper (default original, the authors'; aligned fixes swaps that change the token count)")
    g.add_argument(FLAGS["prox_quantile"], type=_finite_float, metavar="Q", help="proximal guidance: quantile of |eps_c - eps_u| kept (default 0.75); Q <= 0: a fixed threshold of -Q, as ProxEdit")
    g.add_argument(FLAGS["recon_t"], type=_nonnegative_int, metavar="T", help="proximal guidance: pull toward the inversion below this timestep (default 400)")
    g.add_argument(FLAGS["recon_lr"], type=_finite_float, metavar="LR", help="proximal guidance: weight of that pull (default 1)")
    g = p.add_argument_group("inversion")
    g.add_argument(FLAGS["method"], choices=METHODS, help="default: %(default)s (the paper)")
    g.add_argument(FLAGS["num_steps"], type=_positive_int, metavar="N", help="DDIM steps (default %(default)s)")
    g.add_argument(FLAGS["guidance_scale"], type=_finite_float, metavar="W", help="classifier-free guidance scale (default %(default)s)")
    g.add_argument(FLAGS["num_inner_steps"], type=_nonnegative_int, metavar="N", help="null-text Adam steps per timestep at most (default %(default)s)")
    g.add_argument(FLAGS["early_stop_epsilon"], type=_finite_float, metavar="EPS", help="stop a timestep when loss < EPS + i*2e-5 (default %(default)s; negative: never)")
    g.add_argument(FLAGS["remat"], choices=("auto",) + REMAT_MODES, default="auto", help="what the null-text gradient recomputes instead of keeping (same results); auto: the fastest whose compiled program fits a device's free memory (or --max-device-memory)")
    g.add_argument(FLAGS["max_device_memory"], type=_gib, metavar="GiB", help="the memory an inversion may use per device; batches that do not fit run in smaller calls (default: the device's free memory)")
    g.add_argument(FLAGS["dtype"], choices=sorted(DTYPES), help="UNet/text compute dtype (default %(default)s)")
    g = p.add_argument_group("devices, hosts and runs")
    g.add_argument(FLAGS["batch_size"], type=_positive_int, metavar="N", help="images per device per batch (default %(default)s; more uses an accelerator better)")
    g.add_argument("--num-devices", type=_positive_int, metavar="N", help="use only the first N local devices (default: all)")
    g.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (automatic when JAX_COORDINATOR_ADDRESS is set)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="jax.distributed coordinator address (default $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=_positive_int, metavar="N", help="number of processes (default $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=_nonnegative_int, metavar="I", help="this process's index (default $JAX_PROCESS_ID)")
    g.add_argument("--cache-dir", metavar="DIR", help="persistent compilation cache (default ~/.cache/nti-jax/jax-cache or $NTI_JAX_CACHE_DIR; 'none' disables)")
    g.add_argument(FLAGS["force"], action="store_true", help="redo images that a previous run finished")
    g.add_argument(FLAGS["verify"], action="store_true", help="check finished images' files against their recorded SHA-256 (always: their sizes) before skipping them")
    g.add_argument("--check", metavar="OUT", help="verify the finished images of output folder OUT (sizes and SHA-256) and run nothing: one line per damaged image, exit status 1 if any; with --verify, records the checksums of images written before checksums were (a migration)")
    g.add_argument(FLAGS["claim_timeout"], type=_finite_float, metavar="S", help="seconds without a heartbeat after which another worker takes over a claimed image (default %(default)s; at once when the worker's pid is gone in this kernel and pid namespace); also how long a multi-host run waits for a process whose heartbeat stopped")
    g.add_argument("--plan", metavar="TARGET", help="run nothing: compile the inversion for a TPU target (v5e, v6e, v4, or a topology such as v5e:2x4) from this host and print the remat, images per call, memory and estimated seconds per image it would use, from the model, --dtype, --batch-size and the inversion flags (needs requirements-tpu.txt)")
    g.add_argument(FLAGS["step_progress"], action="store_true", help="a progress bar over the diffusion steps of each batch (the inversion program is then not cached)")
    defaults = DEFAULT_SETTINGS.to_dict()
    p.set_defaults(out=DEFAULT_OUT, **RUN_DEFAULTS, **{_dest(flag): defaults[field] for field, flag in SETTING_FLAGS.items()})
    return p


def _dest(flag: str) -> str:
    return flag[2:].replace("-", "_")


def settings_from_args(args) -> InvertSettings:
    """The validated inversion settings of the command line (a bad value: UsageError)."""
    try:
        return InvertSettings(**{field: getattr(args, _dest(flag)) for field, flag in SETTING_FLAGS.items()})
    except ValueError as e:
        raise UsageError(flag_words(str(e))) from None


def config_from_args(args, edit_guidance: str) -> RunConfig:
    """The run's one validated configuration, each field from its flag (`edit_guidance`: the
    edit-guidance default of this kind of run); a bad value: UsageError."""
    edits = {key: getattr(args, _dest(flag)) for key, flag in EDIT_FLAGS.items() if getattr(args, _dest(flag)) is not None}
    try:
        return RunConfig(settings=settings_from_args(args), edit_defaults=tuple({"guidance": edit_guidance, **edits}.items()),
                         **{field: getattr(args, _dest(flag)) for field, flag in RUN_FLAGS.items()})
    except ValueError as e:
        raise UsageError(flag_words(str(e))) from None


def _write_run_info(argv: list[str], args, out: str, devices, process_count: int) -> dict:
    import jax

    info = {
        "argv": list(argv),
        "args": vars(args),
        "jax": jax.__version__,
        "versions": hosts.versions(devices),
        "devices": [str(d) for d in devices],
        "processes": process_count,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(os.path.join(out, "run.json"), info)
    return info


def _pie_rows(args) -> list[dict]:
    """The PIE-Bench entries to run (none without --pie-bench); a bad folder or entry: UsageError."""
    if not args.pie_bench:
        if args.pie_types:
            raise UsageError("--pie-types goes with --pie-bench")
        return []
    if args.image or args.manifest or args.edit or args.prompt is not None:
        raise UsageError("--pie-bench takes its images, prompts and edits from the benchmark: no --image, --manifest, --prompt or --edit")
    try:
        return pie_bench.read_benchmark(args.pie_bench, pie_bench.parse_types(args.pie_types))
    except ValueError as e:
        raise UsageError(str(e)) from None


def _pie_items(rows: list[dict]) -> list[Item]:
    return assign_names([Item(index=k, image=r["image"], prompt=r["prompt"], edits=tuple(r["edits"]), name=r["name"]) for k, r in enumerate(rows)])


def _finish_run(rows: list[dict], info: Optional[dict], out: str, pie_dir: Optional[str] = None, pie_rows: Optional[list] = None,
                speed: Optional[dict] = None) -> None:
    """A worker after the merge: run.json's finish time and this process's images per hour
    (`speed`: `Throughput.record`; process 0, which wrote run.json), the PIE-Bench layout and
    metrics (`pie_dir`: given to the worker that completes the run, once no image is pending),
    and OUT/index.html."""
    from nti_jax.report.html import write_report

    if info is not None:
        write_json(os.path.join(out, "run.json"), dict(info, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(speed or {})))
    if pie_dir and not any(r.get("status") == "pending" for r in rows):
        from nti_jax.pie.metrics import evaluate

        try:
            layout = pie_bench.write_pnp_layout(out, pie_dir, pie_rows)
            evaluate(pie_dir, out, pie_rows)
            print(f"PIE-Bench: {layout['written']} outputs in {out}/pnp; metrics in {out}/pie_bench_metrics.md")
        except (ValueError, OSError) as e:
            print(f"could not evaluate the PIE-Bench run: {one_line(e)}", file=sys.stderr)
    try:
        print(f"report: {write_report(out)}")
    except (NtiError, OSError) as e:  # the report never changes the run's outcome
        print(f"could not write the report: {one_line(e)}", file=sys.stderr)


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
        if args.check is not None:
            return _check(args)
        args.model = args.model or DEFAULT_MODEL
        cfg = config_from_args(args, "plain" if args.pie_bench else DEFAULT_EDIT_GUIDANCE)
        if args.plan is not None:
            return _plan(args, cfg)
        return _run(args, cfg, sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _check(args) -> int:
    """--check OUT: one line per damaged image on stdout, a count on stderr; exit 1 if any."""
    if args.image or args.manifest or args.pie_bench or args.edit:
        raise UsageError("--check OUT verifies a folder and runs nothing: give it no images, manifest or edits")
    if not os.path.isdir(args.check):
        raise UsageError(f"--check: output folder {args.check} not found")
    try:
        lines, checked, unrecorded = check_folder(args.check)
        if unrecorded and args.verify:
            record_checksums(args.check, unrecorded)
    except OSError as e:
        raise UsageError(f"--check: {one_line(e)}") from None
    for line in lines:
        print(line)
    if unrecorded:
        said = "recorded now (--verify)" if args.verify else f"--check {args.check} --verify records them as they are now"
        print(f"{len(unrecorded)} finished image(s) written before checksums were recorded: {said}", file=sys.stderr)
    print(f"{checked} finished image(s) checked in {args.check}: {len(lines)} damaged", file=sys.stderr)
    return 1 if lines else 0


def _plan(args, cfg: RunConfig) -> int:
    """--plan TARGET: the plan's lines on stdout (and its JSON on the last line); exit 1, with one
    line, if the target's compiler refuses even the leanest program."""
    from nti_jax.run import fit

    try:
        pipe = load_pipeline(cfg.model, dtype=cfg.dtype)
    except NtiError as e:
        raise UsageError(f"cannot load the model: {e}") from None
    try:
        plan = fit.plan_target(pipe, cfg, args.plan)
    except DeviceMemoryError as e:  # nothing fits the target, not even one image with full remat
        print(f"nti-invert --plan {args.plan}: {e}", file=sys.stderr)
        return 1
    print("\n".join(fit.describe(plan)))
    print(json.dumps(plan))
    return 0


def _run(args, cfg: RunConfig, argv: list[str]) -> int:
    import jax

    env = hosts.distributed_env()
    wanted = args.distributed or args.coordinator or args.num_processes or args.process_id is not None or env["coordinator_address"]
    if wanted:
        kw = {
            "coordinator_address": args.coordinator or env["coordinator_address"],
            "num_processes": args.num_processes or env["num_processes"],
            "process_id": args.process_id if args.process_id is not None else env["process_id"],
        }
        try:
            hosts.initialize_distributed(**kw)
        except Exception as e:
            raise UsageError(f"cannot start jax.distributed ({one_line(e)}); set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID or --coordinator/--num-processes/--process-id") from None
    hosts.enable_compilation_cache(hosts.cache_dir_from_env(args.cache_dir))
    pid, nproc = hosts.process_info()
    pie_rows = _pie_rows(args)
    items = _pie_items(pie_rows) if pie_rows else collect_items(args.image, args.prompt, args.manifest, args.edit or [], args.no_edits)
    # the edit defaults are recorded in metrics.json and key the outputs
    items = [dataclasses.replace(it, edits=tuple(cfg.edit(e) for e in it.edits)) for it in items]
    check_items(items)
    devices = jax.local_devices()
    if args.num_devices:
        if args.num_devices > len(devices):
            raise UsageError(f"--num-devices {args.num_devices}, but this process has {len(devices)} device(s)")
        devices = devices[: args.num_devices]
    model = cfg.model
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {args.out}: {e.strerror or e}") from None
    model_fp = model_fingerprint(model)
    items = [dataclasses.replace(it, **dict(zip(("inversion_key", "key"), item_keys(it, cfg.settings, cfg.dtype, model_fp)))) for it in items]
    log = Ledger(args.out, run_key(items, cfg), pid, nproc, force=cfg.force, verify=cfg.verify, timeout_s=cfg.claim_timeout)
    log.register(cfg.outputs())
    try:
        pipe = load_pipeline(model, dtype=args.dtype)
    except NtiError as e:
        hint = " (the bundled toy model; pass --model)" if model == DEFAULT_MODEL else ""
        raise UsageError(f"cannot load the model{hint}: {e}") from None
    try:
        inference_timesteps(pipe.scheduler_config, cfg.settings.num_steps)
    except ValueError as e:
        raise UsageError(f"--steps: {e}") from None
    barrier = hosts.FileBarrier(log.out, hosts.FileBarrier.new_token(), pid, nproc, cfg.claim_timeout)
    driver = Driver(cfg, pipe, items, parallel.ShardedInverter(parallel.local_mesh(devices)), log)
    info = _write_run_info(argv, args, log.out, devices, nproc) if pid == 0 else None
    code = driver.run(barrier, on_done=lambda rows: _finish_run(rows, info, log.out, args.pie_bench if log.completes else None, pie_rows,
                                                                speed=driver.speed.record(log.counts["done"])))
    if barrier.lost:  # a process died: JAX's shutdown at exit would wait for it, then abort
        hosts.exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
