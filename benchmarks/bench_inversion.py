"""Null-text inversion speed: nti-jax's compiled program against the PyTorch reference.

    python benchmarks/bench_inversion.py --batches 1,2 --batch-repeats 1     # CPU: toy, sd-tiny
    python benchmarks/bench_inversion.py --device gpu --models toy,sd-small,sd-medium,sd15  # GPU
    python benchmarks/bench_inversion.py --quick --json /tmp/bench.json      # CI smoke run

What is timed: the inversion itself, from latents z0 and text embeddings (C, and the null
embedding phi) to the optimised null embeddings: the DDIM pivot (w = 1) and the per-timestep
null-text optimisation (Adam on phi, 10 inner iterations, w = 7.5, 50 steps unless told). The
VAE encoder and the text encoder are NOT in the timing; both sides get the same z0 / C / phi.
  * torch: `benchmarks/torch_reference.py` (`ddim_pivots` + `null_text_optimization`), the
    notebook's algorithm: eager diffusers UNet, a fresh torch Adam per step, `.item()` early stop,
    one image at a time. The UNet weights are frozen (`requires_grad_(False)`), the stronger
    baseline; `--torch-weight-grads` keeps the notebook's weight gradients (~1.3-1.5x slower
    backward passes on CPU).
  * nti-jax: `nti_jax.core.parallel.sharded_program` (mesh of one device), the jitted pivot + optimisation program of
    `nti_jax.invert`, early stop in a `lax.while_loop`.
Both load the same diffusers folder (`nti_jax.load_pipeline` / `UNet2DConditionModel`).

Models: `toy` = the shipped trained toy model (a held-out shapes-world image, encoded by the
pipeline); `sd-tiny`, `sd-small`, `sd-medium`, `sd15` = random-weight SD-layout UNets of growing
size (`sd15` is the real SD 1.5 UNet config, 64x64 latents: meant for a GPU) with standard-normal
latents and embeddings. Cases: `fixed` = always the full inner iterations (early stop off:
epsilon -1 on both sides, the threshold `eps + i * 2e-5` is never reached), `early` = the
paper's early stop, epsilon 1e-5 (the Adam steps each side took are reported).

Method: for every model, two long-lived worker processes, one per implementation, spawned
fresh (neither imports the other's framework; the parent imports neither), load the model; then
per case each runs once (the first call: compilation for nti-jax, lazy init for torch, reported as
"compile/warm-up s"), then `--repeats` runs alternate jax, torch, jax, torch... and the median
seconds per image are reported with the ratio nti-jax / torch. Workers never run at the same
time. Then nti-jax alone: batch scaling (fresh inputs of B images, fixed iterations), and the
FLOP count of XLA's cost analysis of one UNet forward (B = 1, 2) and one forward+backward with
respect to the context (an inner step), times the calls the algorithm makes (see `unet_calls`).

Memory: on CPU, the resident set of each worker process. "run" is the peak while the timed
repeats ran (after the warm-up, freed heap goes back to the OS with glibc's malloc_trim and Linux
`/proc/self/clear_refs` resets the high-water mark VmHWM: weights, libraries, the interpreter and
what the compiler left allocated are included, its transient peak is not); "all" is the peak over
the worker's life (`getrusage` ru_maxrss; includes loading and XLA compilation). On GPU:
torch's `max_memory_allocated` (reset after the warm-up) and jax's `peak_bytes_in_use`
(cannot be reset: over the worker's life). The jax worker gets XLA_PYTHON_CLIENT_MEM_FRACTION
0.45 on GPU unless set, so the torch worker has room on the same device.

Threads: torch uses `--threads` intra-op threads (default: all cores); XLA's CPU backend uses its
own pool over all cores. Run on an otherwise idle machine: with another busy process, all-core
OpenMP threads in torch stall (a UNet forward went from 16 ms to 3 s here), so give torch no more
threads than there are idle cores. On GPU, torch float32 matmuls may use TF32 (XLA's default
precision).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any, Optional, Sequence

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

TOY_MODEL = os.path.join(ROOT, "nti_jax", "toy", "model")
TOY_SEED = 1_000_000_000  # held out: training draws scenes from far smaller seeds
GUIDANCE = 7.5
CASES = {"fixed": -1.0, "early": 1e-5}  # early_stop_epsilon per case
MIB = 2.0**20


def _sd_unet(block_out_channels: Sequence[int], cross_attention_dim: int, sample_size: int = 16) -> dict:
    """An SD 1.x-layout UNet config: cross-attention at every level but the lowest, 2 layers, 8 heads."""
    n = len(block_out_channels)
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        attention_head_dim=8,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=32,
    )


def random_unet_configs() -> dict:
    """The random-weight models: name -> diffusers UNet2DConditionModel kwargs."""
    from nti_jax import testing

    return {
        "sd-tiny": dict(testing.UNET_SD1),
        "sd-small": _sd_unet((64, 128, 256), 256),
        "sd-medium": _sd_unet((128, 256, 512), 512),
        "sd15": _sd_unet((320, 640, 1280, 1280), 768, sample_size=64),
    }


MODELS = ("toy", "sd-tiny", "sd-small", "sd-medium", "sd15")


# --------------------------------------------------------------------------------------------
# pure helpers: counts, summaries, tables
# --------------------------------------------------------------------------------------------


def unet_calls(num_steps: int, inner_steps_total: int) -> dict:
    """UNet calls per image made by the algorithm (both implementations make the same ones).

    Pivot: one conditional forward per step. Optimisation, per step i: one conditional forward
    (eps_c), one forward+backward w.r.t. phi per Adam step, and one final CFG forward on the batch
    of two [phi_i; C] for the next latent. `inner_steps_total` = Adam steps summed over steps.
    """
    return {"fwd_b1": 2 * num_steps, "fwdbwd_b1": int(inner_steps_total), "fwd_b2": num_steps}


def flops_per_image(costs: dict, calls: dict) -> float:
    """Total FLOPs for one image: sum over call kinds of (FLOPs of one call) x (number of calls)."""
    return float(sum(costs[k] * n for k, n in calls.items()))


def summarize(seconds: Sequence[float], batch: int = 1) -> dict:
    """Median / min / max seconds per image of timed runs of `batch` images each."""
    s = np.asarray(seconds, np.float64) / batch
    return {"median_s_per_image": float(np.median(s)), "min_s_per_image": float(s.min()), "max_s_per_image": float(s.max())}


def agreement(jax_out: dict, torch_out: dict, null: np.ndarray) -> dict:
    """How far apart the two implementations' results are (same inputs, same settings).

    phi is also given relative to how far the reference moved it from the initial null embedding:
    Adam's first updates are ~lr * sign(g), so elements with a near-zero gradient can move
    differently on float rounding alone: the max is sensitive to one such element, the L2 ratio
    (||phi_jax - phi_torch|| / ||phi_torch - null||, over all steps) is not.
    """
    phi_j, phi_t = np.asarray(jax_out["phi"], np.float64), np.asarray(torch_out["phi"], np.float64)
    move = phi_t - np.asarray(null, np.float64)
    moved = float(np.abs(move).max())
    diff = float(np.abs(phi_j - phi_t).max())
    l2_move = float(np.linalg.norm(move))
    lj, lt = np.asarray(jax_out["final_losses"], np.float64), np.asarray(torch_out["final_losses"], np.float64)
    xj, xt = np.asarray(jax_out["x_T"], np.float64), np.asarray(torch_out["x_T"], np.float64)
    return {
        "phi_max_abs_diff": diff,
        "phi_moved": moved,
        "phi_diff_over_moved": diff / moved if moved > 0 else float("nan"),
        "phi_l2_diff_over_l2_move": float(np.linalg.norm(phi_j - phi_t)) / l2_move if l2_move > 0 else float("nan"),
        "final_loss_max_rel_diff": float(np.max(np.abs(lj - lt) / np.maximum(np.abs(lt), 1e-30))),
        "x_T_max_rel_diff": float(np.abs(xj - xt).max() / np.abs(xt).max()),
    }


def _fmt(x: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def _pair(a: Optional[float], b: Optional[float], spec: str = ".2f") -> str:
    return f"{_fmt(a, spec)} / {_fmt(b, spec)}"


def header(meta: dict) -> str:
    """Two lines naming the machine and the command, printed above every table."""
    m = meta["machine"]
    acc = m.get("gpu") or "no GPU"
    return (
        f"Machine: {m['cpu']}, {m['cores']} cores, {acc}; jax {m['jax']} ({m['jax_backend']}), torch {m['torch']}, "
        f"diffusers {m['diffusers']}; torch threads {meta['settings']['threads']}\n"
        f"Command: `{meta['command']}`"
    )


def _table(meta: dict, intro: str, columns: list, rows: list) -> str:
    """A markdown table under the machine/command header and a one-paragraph intro."""
    lines = [header(meta), "", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def comparison_table(meta: dict, models: dict) -> str:
    s = meta["settings"]
    mem = "peak GPU MiB" if s["device"] == "gpu" else "peak RSS MiB run (all)"
    rows = []
    for name, res in models.items():
        if "error" in res:
            rows.append([name, f"error: {res['error'].splitlines()[-1][:80]}", "", "", "", "", ""])
            continue
        for case, c in res["cases"].items():
            j, t = c["jax"], c["torch"]
            mj, mt = j["memory"], t["memory"]
            m = _pair(mj["run_peak_mib"], mt["run_peak_mib"], ".0f")
            if s["device"] != "gpu":
                m += f" ({_pair(mj['peak_mib'], mt['peak_mib'], '.0f')})"
            rows.append([name, case, _pair(j["first_s"], t["first_s"], ".1f"),
                         _pair(j["median_s_per_image"], t["median_s_per_image"], ".2f"),
                         f"{c['ratio_jax_over_torch']:.2f}", m, f"{j['adam_steps']} / {t['adam_steps']}"])
    intro = (f"Null-text inversion of one image, {s['num_steps']} steps x {s['num_inner_steps']} inner iterations, w = "
             f"{GUIDANCE}, {s['dtype']}, device {s['device']}; timed from latents + text embeddings (VAE and text "
             f"encoder excluded); median of {s['repeats']} alternating runs. Cells: nti-jax / torch.")
    return _table(meta, intro, ["model", "case", "compile/warm-up s", "s/image", "nti-jax / torch", mem, "Adam steps"], rows)


def agreement_table(meta: dict, models: dict) -> str:
    intro = ("Agreement, fixed case (same inputs): max |phi_jax - phi_torch| over all steps, the same relative to "
             "how far torch moved phi (max, and L2 over all elements), the final losses' max relative difference "
             "and x_T's.")
    keys = ("phi_max_abs_diff", "phi_diff_over_moved", "phi_l2_diff_over_l2_move", "final_loss_max_rel_diff", "x_T_max_rel_diff")
    rows = [[name] + [f"{res['agreement'][k]:.2e}" for k in keys] for name, res in models.items() if res.get("agreement")]
    columns = ["model", "max abs diff phi", "/ max phi move", "L2 diff / L2 move", "final loss rel diff", "x_T rel diff"]
    return _table(meta, intro, columns, rows)


def batch_table(meta: dict, models: dict) -> str:
    s = meta["settings"]
    mem = "peak GPU MiB" if s["device"] == "gpu" else "peak RSS MiB run"
    intro = (f"nti-jax batch scaling: B images per program call, {s['num_steps']} steps x {s['num_inner_steps']} "
             f"iterations (early stop off), {s['dtype']}; median of {s['batch_repeats']} runs after a compiling call.")
    rows = [[name, str(r["batch"]), f"{r['first_s']:.1f}", f"{r['median_s']:.2f}", f"{r['images_per_s']:.3f}",
             f"{r['speedup']:.2f}", _fmt(r["memory"]["run_peak_mib"], ".0f")]
            for name, res in models.items() for r in res.get("batch_scaling", [])]
    columns = ["model", "batch", "compile/warm-up s", "s/batch", "images/s", f"speed-up over batch {s['batches'][0]}", mem]
    return _table(meta, intro, columns, rows)


def flops_table(meta: dict, models: dict) -> str:
    s = meta["settings"]
    intro = (f"FLOPs (XLA cost analysis of the nti-jax UNet), fixed case: per image {s['num_steps']} x 2 forwards (B = 1: "
             f"pivot and eps_c), {s['num_steps']} x {s['num_inner_steps']} forward+backward w.r.t. phi (B = 1) and "
             f"{s['num_steps']} CFG forwards (B = 2). Achieved = GFLOP per image / median s per image.")
    rows = []
    for name, res in models.items():
        f = res.get("flops")
        if f:
            c = f["per_call"]
            rows.append([name, f"{c['fwd_b1'] / 1e9:.3f}", f"{c['fwd_b2'] / 1e9:.3f}", f"{c['fwdbwd_b1'] / 1e9:.3f}",
                         f"{f['gflop_per_image']:.1f}", _fmt(f.get("gflops_jax"), ".1f"), _fmt(f.get("gflops_torch"), ".1f")])
    columns = ["model", "GFLOP fwd B=1", "GFLOP fwd B=2", "GFLOP fwd+bwd B=1", "GFLOP/image", "nti-jax GFLOP/s", "torch GFLOP/s"]
    return _table(meta, intro, columns, rows)


# --------------------------------------------------------------------------------------------
# memory, in each worker
# --------------------------------------------------------------------------------------------


def _rusage_peak_mib() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MIB if sys.platform == "darwin" else r / 1024.0


def _vm_hwm_mib() -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_vm_hwm() -> bool:
    """Give freed heap back to the OS (glibc), then reset VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _RssMeter:
    """Peak RSS of this process: over its life, and since the last `reset` (Linux only)."""

    def __init__(self) -> None:
        self.life = 0.0
        self.resettable = False

    def _update(self) -> None:
        self.life = max(self.life, _rusage_peak_mib(), _vm_hwm_mib() or 0.0)

    def reset(self) -> None:
        self._update()
        self.resettable = _reset_vm_hwm()

    def read(self) -> dict:
        self._update()
        run = _vm_hwm_mib() if self.resettable else None
        return {"kind": "rss", "peak_mib": self.life, "run_peak_mib": run}


# --------------------------------------------------------------------------------------------
# the two implementations, each living in its own worker process
# --------------------------------------------------------------------------------------------


class TorchImpl:
    """The PyTorch reference on one image at a time."""

    def __init__(self, device: str, threads: int, dtype: str, weight_grads: bool) -> None:
        import torch

        from benchmarks import torch_reference as tr

        self.torch, self.tr = torch, tr
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if device == "gpu" else "cpu")
        self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.weight_grads = weight_grads
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.rss = _RssMeter()
        self.life_gpu = 0.0

    def info(self) -> dict:
        import diffusers

        t = self.torch
        gpu = t.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return {"torch": t.__version__, "diffusers": diffusers.__version__, "gpu": gpu, "torch_threads": t.get_num_threads()}

    def load(self, folder: str) -> dict:
        from diffusers import UNet2DConditionModel

        t0 = time.perf_counter()
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=self.dtype, low_cpu_mem_usage=False)
        self.unet = self.unet.to(self.device).eval().requires_grad_(self.weight_grads)
        with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
            self.sched_config = json.load(f)
        return {"load_s": time.perf_counter() - t0, "unet_params": sum(p.numel() for p in self.unet.parameters())}

    def set_inputs(self, z0: np.ndarray, cond: np.ndarray, null: np.ndarray) -> None:
        """One image: z0 (1, h, w, C) channels-last as nti-jax has it, cond / null (1, L, D)."""
        t = self.torch
        self.z0 = t.from_numpy(np.ascontiguousarray(z0[:1].transpose(0, 3, 1, 2))).to(self.device)
        self.cond = t.from_numpy(np.ascontiguousarray(cond[:1])).to(self.device)
        self.null = t.from_numpy(np.ascontiguousarray(null[:1])).to(self.device)

    def run(self, num_steps: int, num_inner_steps: int, early_stop_epsilon: float, keep: bool = False) -> dict:
        sched = self.tr.DDIMSchedule(self.sched_config, num_steps)
        self.tr._sync(self.device)
        t0 = time.perf_counter()
        pivots = self.tr.ddim_pivots(self.unet, sched, self.z0, self.cond)
        res = self.tr.null_text_optimization(
            self.unet, sched, pivots, self.cond, self.null, guidance_scale=GUIDANCE,
            num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon,
        )
        self.tr._sync(self.device)
        out = {"seconds": time.perf_counter() - t0, "adam_steps": int(sum(res["inner_iterations"])), "batch": 1}
        if keep:
            out["phi"] = np.stack([p[0].float().cpu().numpy() for p in res["null_embeddings"]])
            out["final_losses"] = np.asarray(res["final_losses"], np.float64)
            out["x_T"] = pivots[-1].float().cpu().numpy().transpose(0, 2, 3, 1)
        return out

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            self.life_gpu = max(self.life_gpu, self.torch.cuda.max_memory_allocated(self.device) / MIB)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss.reset()

    def memory(self) -> dict:
        if self.device.type == "cuda":
            run = self.torch.cuda.max_memory_allocated(self.device) / MIB
            self.life_gpu = max(self.life_gpu, run)
            return {"kind": "gpu", "peak_mib": self.life_gpu, "run_peak_mib": run}
        return self.rss.read()


class JaxImpl:
    """nti-jax's compiled inversion program; also makes the inputs, counts FLOPs, scales the batch."""

    def __init__(self, device: str, dtype: str) -> None:
        if device == "gpu":
            os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
        import jax
        import jax.numpy as jnp

        import nti_jax
        from nti_jax.core import null_text, parallel

        self.jax, self.jnp, self.nti, self.inv, self.parallel = jax, jnp, nti_jax, null_text, parallel
        self.dtype = dtype
        self.dev = jax.devices()[0]
        self.rss = _RssMeter()

    def info(self) -> dict:
        import flax
        import jaxlib

        return {
            "jax": self.jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "jax_backend": self.jax.default_backend(), "jax_device": self.dev.device_kind,
            "jax_device_count": self.jax.device_count(),
        }

    def load(self, folder: str) -> dict:
        t0 = time.perf_counter()
        self.pipe = self.nti.load_pipeline(folder, dtype=self.dtype)
        n = sum(int(np.prod(x.shape)) for x in self.jax.tree_util.tree_leaves(self.pipe.params["unet"]))
        return {"load_s": time.perf_counter() - t0, "unet_params": n}

    def make_inputs(self, toy: bool, batch: int, seed: int = 0) -> dict:
        """z0 (B, h, w, C), cond (B, L, D), null (B, L, D) as numpy float32.

        Toy: held-out shapes-world images and their captions through the pipeline's VAE and text
        encoder (null = the "" embedding). Random models: standard normal draws.
        """
        pipe = self.pipe
        if toy:
            from nti_jax.toy import shapes

            samples = [shapes.render(TOY_SEED + k, pipe.image_size) for k in range(batch)]
            ins = self.inv.prepare_inputs(pipe, [s.image for s in samples], [s.caption for s in samples], self.nti.InvertSettings(num_steps=1))
            return {k: np.asarray(getattr(ins, k), np.float32) for k in ("z0", "cond", "null")}
        cfg = pipe.unet.config
        rng = np.random.default_rng(seed)
        s, d, n = cfg.sample_size, cfg.cross_attention_dim, pipe.max_tokens
        null = rng.standard_normal((1, n, d), np.float32)
        return {
            "z0": rng.standard_normal((batch, s, s, cfg.in_channels), np.float32),
            "cond": rng.standard_normal((batch, n, d), np.float32),
            "null": np.repeat(null, batch, axis=0),
        }

    def set_inputs(self, z0: np.ndarray, cond: np.ndarray, null: np.ndarray) -> None:
        jnp = self.jnp
        self.z0, self.cond, self.null = (self.jax.device_put(jnp.asarray(a), self.dev) for a in (z0, cond, null))

    def run(self, num_steps: int, num_inner_steps: int, early_stop_epsilon: float, keep: bool = False) -> dict:
        inv, jax = self.inv, self.jax
        from nti_jax.core.sampling import Denoiser, model_schedule

        jnp = self.jnp
        inputs = inv.InvertInputs(self.z0, self.cond, self.null, model_schedule(self.pipe, num_steps), jnp.float32(GUIDANCE),
                                  jnp.int32(num_inner_steps), jnp.float32(early_stop_epsilon))
        model = jax.block_until_ready(Denoiser.of(self.pipe))
        inputs = jax.block_until_ready(inputs)
        t0 = time.perf_counter()
        program = self.parallel.sharded_program(self.parallel.local_mesh([self.dev]), "null-text", None)
        out = jax.block_until_ready(program(model, inputs))
        seconds = time.perf_counter() - t0
        pivots, phi, iters, losses = out.pivots, out.phi, out.inner_iterations, out.final_losses
        b = self.z0.shape[0]
        res = {"seconds": seconds, "adam_steps": int(np.asarray(iters).sum()) // b, "batch": b}
        if keep:
            res["phi"] = np.asarray(phi[0], np.float32)
            res["final_losses"] = np.asarray(losses[0], np.float64)
            res["x_T"] = np.asarray(pivots[:1, -1], np.float32)
        return res

    def flops(self) -> dict:
        """XLA's FLOP count of one UNet forward (B = 1, 2) and one forward+backward w.r.t. the context."""
        from nti_jax.core.sampling import Denoiser

        jax, jnp, pipe = self.jax, self.jnp, self.pipe
        cfg = pipe.unet.config
        params = pipe.params["unet"]
        fwd = lambda p, x, t, c: Denoiser(p, pipe.unet)(x, t, c)

        def fwdbwd(p, x, t, c):
            return jax.value_and_grad(lambda c: jnp.mean(fwd(p, x, t, c) ** 2))(c)

        def count(fn, b: int) -> dict:
            x = jnp.zeros((b, cfg.sample_size, cfg.sample_size, cfg.in_channels), jnp.float32)
            c = jnp.zeros((b, pipe.max_tokens, cfg.cross_attention_dim), jnp.float32)
            lowered = jax.jit(fn).lower(params, x, jnp.int32(500), c)
            return {"compiled": _flops(lowered.compile().cost_analysis()), "lowered": _flops(lowered.cost_analysis())}

        raw = {"fwd_b1": count(fwd, 1), "fwd_b2": count(fwd, 2), "fwdbwd_b1": count(fwdbwd, 1)}
        # Backends may turn convolutions / GEMMs into library calls the compiled analysis does not
        # count; fall back to the (pre-optimisation) lowered count where the compiled one lost work.
        per_call = {k: v["compiled"] if v["compiled"] >= 0.5 * v["lowered"] else v["lowered"] for k, v in raw.items()}
        return {"per_call": per_call, "raw": raw}

    def batch_point(self, toy: bool, batch: int, num_steps: int, num_inner_steps: int, repeats: int) -> dict:
        self.set_inputs(**self.make_inputs(toy, batch, seed=batch))
        first = self.run(num_steps, num_inner_steps, -1.0)["seconds"]
        self.reset_peak()
        seconds = [self.run(num_steps, num_inner_steps, -1.0)["seconds"] for _ in range(repeats)]
        return {"batch": batch, "first_s": first, "seconds": seconds, "memory": self.memory()}

    def reset_peak(self) -> None:
        if self.jax.default_backend() == "cpu":
            self.rss.reset()

    def memory(self) -> dict:
        if self.jax.default_backend() == "cpu":
            return self.rss.read()
        stats = self.dev.memory_stats() or {}
        peak = stats.get("peak_bytes_in_use", 0) / MIB
        return {"kind": "gpu", "peak_mib": peak, "run_peak_mib": peak}


def _flops(cost: Any) -> float:
    """The 'flops' entry of a cost analysis (a dict, or a list of dicts in older jax)."""
    if isinstance(cost, (list, tuple)):
        return float(sum(c.get("flops", 0.0) for c in cost))
    return float((cost or {}).get("flops", 0.0))


def worker_main(conn, impl: str, options: dict) -> None:
    """Serve (method name, kwargs) requests on `conn` until "quit"; reply ("ok", value) or ("error", tb)."""
    try:
        obj = TorchImpl(**options) if impl == "torch" else JaxImpl(**options)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        cmd, kwargs = conn.recv()
        if cmd == "quit":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(obj, cmd)(**kwargs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, ctx, impl: str, options: dict) -> None:
        self.impl = impl
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, impl, options), name=f"bench-{impl}", daemon=True)
        self.proc.start()
        child.close()

    def send(self, cmd: str, **kwargs) -> None:
        self.conn.send((cmd, kwargs))

    def recv(self) -> Any:
        try:
            status, value = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            raise RuntimeError(f"the {self.impl} worker died (exit code {self.proc.exitcode}; out of memory?)") from None
        if status == "error":
            raise RuntimeError(f"{self.impl} worker:\n{value}")
        return value

    def call(self, cmd: str, **kwargs) -> Any:
        self.send(cmd, **kwargs)
        return self.recv()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.call("quit")
            except (RuntimeError, OSError):
                pass
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)


def _both(jx: Worker, th: Worker, cmd: str, **kwargs) -> tuple:
    """The same request to both workers, run concurrently (loading only, never timing)."""
    jx.send(cmd, **kwargs)
    th.send(cmd, **kwargs)
    return jx.recv(), th.recv()


# --------------------------------------------------------------------------------------------
# driving one model
# --------------------------------------------------------------------------------------------


def build_model(name: str, folder: str) -> None:
    """Write the random-weight SD folder `name` (torch diffusers init, seed 0) unless it exists."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return
    from nti_jax import testing

    unet_cfg = random_unet_configs()[name]
    text_cfg = dict(testing.TEXT_TINY, hidden_size=unet_cfg["cross_attention_dim"])
    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    testing.save_sd_folder(tmp, testing.tiny_unet(unet_cfg, 0), testing.tiny_vae(seed=0), testing.tiny_text_encoder(text_cfg, 0))
    os.replace(tmp, folder)


def model_folder(ctx, name: str, model_dir: str) -> str:
    if name == "toy":
        return TOY_MODEL
    folder = os.path.join(model_dir, name)
    p = ctx.Process(target=build_model, args=(name, folder), name="bench-build")
    p.start()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"building the {name} model folder failed (exit code {p.exitcode})")
    return folder


def bench_model(ctx, name: str, folder: str, args: argparse.Namespace, machine: dict) -> dict:
    """All figures for one model, with a fresh pair of workers (so peak RSS is this model's)."""
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{name} {time.perf_counter() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)
    jx = Worker(ctx, "jax", {"device": args.device, "dtype": args.dtype})
    th = Worker(ctx, "torch", {"device": args.device, "threads": args.threads, "dtype": args.dtype, "weight_grads": args.torch_weight_grads})
    res: dict = {}
    try:
        jx.recv(), th.recv()  # both started
        if not machine.get("jax"):
            machine.update(jx.call("info"))
            machine.update(th.call("info"))
            if args.device == "gpu" and machine["jax_backend"] == "cpu":
                log("warning: torch runs on the GPU but jax found none (install jax[cuda12])")
        lj, lt = _both(jx, th, "load", folder=folder)
        res["model"] = {"folder": os.path.relpath(folder, ROOT) if name == "toy" else name, "unet_params": lj["unet_params"],
                        "jax_load_s": lj["load_s"], "torch_load_s": lt["load_s"]}
        if lj["unet_params"] != lt["unet_params"]:
            raise RuntimeError(f"parameter counts differ: jax {lj['unet_params']}, torch {lt['unet_params']}")
        inputs = jx.call("make_inputs", toy=name == "toy", batch=1)
        _both(jx, th, "set_inputs", **inputs)
        T, K = args.num_steps, args.num_inner_steps
        res["cases"] = {}
        for case in args.cases:
            eps = CASES[case]
            log(f"{case}: warm-up")
            first = {w.impl: w.call("run", num_steps=T, num_inner_steps=K, early_stop_epsilon=eps)["seconds"] for w in (jx, th)}
            _both(jx, th, "reset_peak")
            runs: dict = {"jax": [], "torch": []}
            for r in range(args.repeats):
                keep = r == args.repeats - 1
                for w in (jx, th):
                    runs[w.impl].append(w.call("run", num_steps=T, num_inner_steps=K, early_stop_epsilon=eps, keep=keep))
                log(f"{case}: repeat {r + 1}/{args.repeats}: jax {runs['jax'][-1]['seconds']:.2f} s, torch {runs['torch'][-1]['seconds']:.2f} s")
            mem = dict(zip(("jax", "torch"), _both(jx, th, "memory")))
            c: dict = {"early_stop_epsilon": eps}
            for impl in ("jax", "torch"):
                c[impl] = {
                    "first_s": first[impl],
                    "seconds": [x["seconds"] for x in runs[impl]],
                    **summarize([x["seconds"] for x in runs[impl]]),
                    "adam_steps": runs[impl][-1]["adam_steps"],
                    "adam_steps_per_run": [x["adam_steps"] for x in runs[impl]],
                    "memory": mem[impl],
                }
            c["ratio_jax_over_torch"] = c["jax"]["median_s_per_image"] / c["torch"]["median_s_per_image"]
            res["cases"][case] = c
            if case == "fixed":
                res["agreement"] = agreement(runs["jax"][-1], runs["torch"][-1], inputs["null"][0])
        th.close()
        log("FLOP count")
        f = jx.call("flops")
        calls = unet_calls(T, T * K)
        f["calls_fixed"] = calls
        f["gflop_per_image"] = flops_per_image(f["per_call"], calls) / 1e9
        if "fixed" in res["cases"]:
            fc = res["cases"]["fixed"]
            for impl in ("jax", "torch"):
                f[f"gflops_{impl}"] = f["gflop_per_image"] / fc[impl]["median_s_per_image"]
        if "early" in res["cases"]:
            ec = res["cases"]["early"]
            f["gflop_per_image_early"] = {
                impl: flops_per_image(f["per_call"], unet_calls(T, ec[impl]["adam_steps"])) / 1e9 for impl in ("jax", "torch")
            }
        res["flops"] = f
        res["batch_scaling"] = []
        for b in args.batches:
            log(f"batch {b}")
            p = jx.call("batch_point", toy=name == "toy", batch=b, num_steps=T, num_inner_steps=K, repeats=args.batch_repeats)
            p["median_s"] = float(np.median(p["seconds"]))
            p["images_per_s"] = b / p["median_s"]
            res["batch_scaling"].append(p)
        base = res["batch_scaling"][0]["images_per_s"] if res["batch_scaling"] else None
        for p in res["batch_scaling"]:
            p["speedup"] = p["images_per_s"] / base
    except RuntimeError as e:
        log(f"FAILED: {e}")
        res["error"] = str(e)
    finally:
        jx.close()
        th.close()
    return res


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="toy,sd-tiny", help=f"comma-separated, of {','.join(MODELS)}")
    ap.add_argument("--cases", default="fixed,early", help="comma-separated, of fixed,early")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per implementation and case (default 3)")
    ap.add_argument("--batches", default="1,2,4,8", help="nti-jax batch sizes (empty: skip)")
    ap.add_argument("--batch-repeats", type=int, default=None, help="timed runs per batch size (default: --repeats)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="torch's device; jax uses its default backend")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    ap.add_argument("--num-steps", type=int, default=50)
    ap.add_argument("--num-inner-steps", type=int, default=10)
    ap.add_argument("--torch-weight-grads", action="store_true", help="torch UNet weights require grad, as in the notebook")
    ap.add_argument("--model-dir", default=None, help="keep (and reuse) the random model folders here")
    ap.add_argument("--json", default=None, help="write all figures and the machine info here")
    ap.add_argument("--quick", action="store_true", help="smoke run: sd-tiny, 4 steps x 2 iterations, 1 repeat, batches 1,2")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.num_steps, args.num_inner_steps, args.repeats, args.batches = "sd-tiny", 4, 2, 1, "1,2"
    args.models = [m for m in args.models.split(",") if m]
    args.cases = [c for c in args.cases.split(",") if c]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.batch_repeats = args.repeats if args.batch_repeats is None else args.batch_repeats
    for what, got, allowed in (("model", args.models, MODELS), ("case", args.cases, tuple(CASES))):
        bad = [x for x in got if x not in allowed]
        if bad:
            ap.error(f"unknown {what} {bad[0]!r}; choose from {', '.join(allowed)}")
    if min(args.repeats, args.batch_repeats) < 1 or args.num_steps < 1 or args.num_inner_steps < 1 or any(b < 1 for b in args.batches):
        ap.error("--repeats, --batch-repeats, --num-steps, --num-inner-steps and --batches must be positive")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, os.getcwd())] + list(sys.argv[1:] if argv is None else argv))
    ctx = mp.get_context("spawn")
    model_dir = args.model_dir or tempfile.mkdtemp(prefix="nti-bench-")
    os.makedirs(model_dir, exist_ok=True)
    machine = machine_info()
    settings = {
        k: getattr(args, k)
        for k in ("models", "cases", "repeats", "batches", "batch_repeats", "dtype", "device", "threads", "num_steps", "num_inner_steps", "torch_weight_grads")
    }
    settings["guidance_scale"] = GUIDANCE
    meta = {"machine": machine, "command": command, "settings": settings}
    models: dict = {}
    t0 = time.perf_counter()
    try:
        for name in args.models:
            try:
                folder = model_folder(ctx, name, model_dir)
            except RuntimeError as e:
                models[name] = {"error": str(e)}
                continue
            models[name] = bench_model(ctx, name, folder, args, machine)
    finally:
        if args.model_dir is None:
            shutil.rmtree(model_dir, ignore_errors=True)
    meta["total_s"] = time.perf_counter() - t0
    machine.setdefault("gpu", None)
    for k in ("jax", "jax_backend", "torch", "diffusers"):
        machine.setdefault(k, "?")
    print(comparison_table(meta, models))
    if any("agreement" in r for r in models.values()):
        print("\n" + agreement_table(meta, models))
    if any(r.get("batch_scaling") for r in models.values()):
        print("\n" + batch_table(meta, models))
    if any("flops" in r for r in models.values()):
        print("\n" + flops_table(meta, models))
    print(f"\n(total {meta['total_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "models": models}, f, indent=1, default=_json_default)
    return 1 if any("error" in r for r in models.values()) else 0


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


if __name__ == "__main__":
    sys.exit(main())
