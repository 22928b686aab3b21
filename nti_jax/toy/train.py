"""Train the toy shapes-world Stable Diffusion with the project's own Flax modules.

Stage 1 trains the VAE (L1 + MSE + small KL); stage 2 trains the UNet and the CLIP text encoder
jointly on SD's noise schedule (epsilon prediction, 10% captions dropped to ""). Data are rendered
on the fly from seeds, so nothing is stored but checkpoints (msgpack, in --workdir) and the
exported diffusers folder. Seeded and resumable: rerun the same command to continue. `--init`
continues stage 2 from an exported folder; with `--decoder-steps` it instead fine-tunes that
folder's VAE decoder (MSE, encoder frozen, so the latents and the UNet stay valid).

    python -m nti_jax.toy.train --workdir ~/.cache/nti-jax/toy-train --export nti_jax/toy/model
    python -m nti_jax.toy.train --init nti_jax/toy/model --decoder-steps 600 --export nti_jax/toy/model
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from nti_jax.loading import conditioning as cnd
from nti_jax.loading import pipeline as pl
from nti_jax.models import AutoencoderKL
from nti_jax.core.schedule import train_alphas_cumprod
from nti_jax.toy import config as toy
from nti_jax.toy.shapes import render_batch

TOKENIZER_DIR = os.path.join(os.path.dirname(__file__), "model", "tokenizer")
EVAL_SEED0 = 1_000_000_000  # held-out images use seeds from here; training seeds stay below
DECODER_SEED0 = 500_000_000  # decoder fine-tuning draws from here (training images too)


def _modules():
    return pl.build_modules(toy.UNET, toy.VAE, toy.TEXT_ENCODER)


def _ema(ema, params, decay):
    return jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, ema, params)


def _wd_mask(params):
    """No weight decay on embeddings, norms and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", "") == "kernel", params
    )


def _lr_schedule(peak: float, warmup: int, steps: int, end_fraction: float):
    """Linear warm-up then cosine decay to `end_fraction * peak`; short runs shorten the warm-up.
    The host evaluates it and passes each step its rate, so one compiled step serves runs of any
    length (a resumed or extended run compiles nothing new)."""
    warmup = min(warmup, steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1), peak * end_fraction)


def _unit(count):
    """The optimisers' learning rate inside a step: 1, scaled by the host's rate after the update
    (a schedule, so the optimiser state keeps optax's step count)."""
    return 1.0


def _jit_step(loss_fn, opt):
    """A jitted optimiser step (params, opt_state, learning rate, uint8 images, *extra) -> (params,
    opt_state, loss) for `loss_fn(params, images in [-1, 1], *extra)`; `opt`'s rate is `_unit`."""

    @jax.jit
    def step(p, opt_state, lr, images, *extra):
        x = images.astype(jnp.float32) / 127.5 - 1.0
        loss, g = jax.value_and_grad(loss_fn)(p, x, *extra)
        updates, opt_state = opt.update(g, opt_state, p)
        return optax.apply_updates(p, _scaled(updates, lr)), opt_state, loss

    return step


def _scaled(updates, lr):
    return jax.tree_util.tree_map(lambda u: u * lr, updates)


def make_vae_step(vae: AutoencoderKL, opt):
    def loss_fn(p, x, key):
        mean, logvar = vae.apply({"params": p}, x, method=AutoencoderKL.encode)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        rec = vae.apply({"params": p}, z, method=AutoencoderKL.decode)
        kl = 0.5 * jnp.mean(mean**2 + jnp.exp(logvar) - 1.0 - logvar)
        return jnp.mean(jnp.abs(rec - x)) + jnp.mean((rec - x) ** 2) + 1e-5 * kl

    return _jit_step(loss_fn, opt)


def _cutmix(a: jax.Array, key, factor: int) -> tuple[jax.Array, jax.Array]:
    """Per-image random boxes on the latent grid: (mask on latents (B, h, w, 1), same mask on
    pixels); half the images get an empty box. `factor` is the VAE's downsampling."""
    n, h, w = a.shape[0], a.shape[1], a.shape[2]
    k1, k2, k3 = jax.random.split(key, 3)
    lo = jax.random.randint(k1, (n, 2), 0, jnp.array([h, w]))
    hi = jax.random.randint(k2, (n, 2), lo + 1, jnp.array([h, w]) + 1)
    on = jax.random.bernoulli(k3, 0.5, (n, 1, 1))
    rows, cols = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
    box = (rows >= lo[:, 0, None, None]) & (rows < hi[:, 0, None, None])
    box = box & (cols >= lo[:, 1, None, None]) & (cols < hi[:, 1, None, None]) & on
    pix = jnp.repeat(jnp.repeat(box, factor, axis=1), factor, axis=2)
    return box[..., None], pix[..., None]


def make_decoder_step(vae: AutoencoderKL, opt, factor: int):
    """MSE fine-tuning of post_quant_conv + decoder on the frozen encoder's posterior means: the
    latents (and so the UNet trained on them) stay valid while the reconstruction bound rises.
    Half the latents are cut-and-pasted from another image of the batch (pixels pasted alike):
    in a world of flat backgrounds the decoder otherwise reads colours from the whole latent
    (GroupNorm statistics, mid-block attention), so an edit inside a LocalBlend mask repaints
    pixels far outside it. `factor` is the VAE's downsampling."""

    def loss_fn(dec, x, enc, key):
        mean, _ = vae.apply({"params": enc}, x, method=AutoencoderKL.encode)
        box, pix = _cutmix(mean, key, factor)
        z = jnp.where(box, jnp.roll(mean, 1, axis=0), mean)
        x = jnp.where(pix, jnp.roll(x, 1, axis=0), x)
        rec = vae.apply({"params": {**enc, **dec}}, jax.lax.stop_gradient(z), method=AutoencoderKL.decode)
        return jnp.mean((rec - x) ** 2)

    return _jit_step(loss_fn, opt)


def make_unet_step(unet, vae, text, opt, scaling: float, ema_decay: float, offset_noise: float = 0.0, text_2=None):
    """One AdamW step of the UNet and text encoder(s) on the epsilon loss. `offset_noise` adds a
    per-image, per-channel constant to the noise (Guttenberg 2023): without it a 16x16 model reads
    the background colour from the mean of x_t instead of the caption, and samples from pure noise
    get random backgrounds.

    With `text_2` (SDXL) the step takes token ids `(ids, ids_2, dropped)`: the conditioning is the
    pipeline's own (`pipeline._encode_prompt_xl`, `sampling.Denoiser` with the toy's constant time
    ids), and the rows where `dropped` (B,) holds get zero conditioning, tokens and pooled, as
    force_zeros_for_empty_prompt makes the unconditional one."""
    ac = jnp.asarray(train_alphas_cumprod(toy.SCHEDULER))
    size = float(toy.IMAGE_SIZE)
    time_ids = jnp.asarray([size, size, 0.0, 0.0, size, size], jnp.float32)  # as Pipeline.time_ids

    def predict(p, zt, t, ids):
        if text_2 is None:
            return unet.apply({"params": p["unet"]}, zt, t, text.apply({"params": p["text_encoder"]}, ids))
        from nti_jax.core.sampling import Denoiser

        ids, ids_2, dropped = ids
        cond = pl._encode_prompt_xl(text, text_2, p["text_encoder"], p["text_encoder_2"], ids, ids_2)
        cond = cnd.where_rows(dropped, jax.tree_util.tree_map(jnp.zeros_like, cond), cond)
        return Denoiser(p["unet"], unet, "epsilon", time_ids)(zt, t, cond)

    def loss_fn(p, vae_p, images, ids, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        x = images.astype(jnp.float32) / 127.5 - 1.0
        mean, logvar = vae.apply({"params": vae_p}, x, method=AutoencoderKL.encode)
        z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(k1, mean.shape)) * scaling
        t = jax.random.randint(k2, (z.shape[0],), 0, ac.shape[0])
        noise = jax.random.normal(k3, z.shape)
        noise = noise + offset_noise * jax.random.normal(k4, (z.shape[0], 1, 1, z.shape[-1]))
        a = ac[t][:, None, None, None]
        zt = jnp.sqrt(a) * z + jnp.sqrt(1 - a) * noise
        pred = predict(p, zt, t, ids)
        return jnp.mean((pred - noise) ** 2)

    @jax.jit
    def step(p, ema, opt_state, lr, vae_p, images, ids, key):
        loss, g = jax.value_and_grad(loss_fn)(p, vae_p, images, ids, key)
        updates, opt_state = opt.update(g, opt_state, p)
        p = optax.apply_updates(p, _scaled(updates, lr))
        return p, _ema(ema, p, ema_decay), opt_state, loss

    return step


class Captions:
    """Token ids of captions, cached (the world has 216 of them, plus "")."""

    def __init__(self, tokenizer=None):
        self.tok = tokenizer or pl.load_tokenizer(TOKENIZER_DIR)
        self.cache: dict[str, list[int]] = {}

    def __call__(self, captions) -> np.ndarray:
        for c in captions:
            if c not in self.cache:
                self.cache[c] = self.tok(c, padding="max_length", max_length=77)["input_ids"]
        return np.asarray([self.cache[c] for c in captions], np.int32)


def _save(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        arrays = jax.tree_util.tree_map(lambda x: x if isinstance(x, (str, int, float)) else np.asarray(x), state)
        f.write(serialization.msgpack_serialize(arrays))
    os.replace(tmp, path)


def _load(path: str):
    with open(path, "rb") as f:
        return serialization.msgpack_restore(f.read())


def latent_scaling(vae, vae_p, n: int = 512) -> float:
    """1 / std of the posterior means over training images (SD's recipe for scaling_factor)."""
    imgs, _, _ = render_batch(range(EVAL_SEED0 + 10_000, EVAL_SEED0 + 10_000 + n), toy.IMAGE_SIZE)
    enc = jax.jit(lambda p, x: vae.apply({"params": p}, x / 127.5 - 1.0, method=AutoencoderKL.encode)[0])
    mean = np.concatenate([np.asarray(enc(vae_p, jnp.asarray(imgs[i : i + 64], jnp.float32))) for i in range(0, n, 64)])
    return float(1.0 / mean.std())


def export(folder: str, params: dict, scaling: float) -> None:
    """Write the diffusers folder: each component to a temp folder, then renamed into place. With a
    "text_encoder_2" in `params`, the SDXL-shaped toy in sdxl-base's layout."""
    import shutil

    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    xl = "text_encoder_2" in params
    configs = {"unet": toy.UNET_XL if xl else toy.UNET, "vae": dict(toy.VAE, scaling_factor=scaling),
               "text_encoder": toy.TEXT_ENCODER}
    if xl:
        configs["text_encoder_2"] = toy.TEXT_ENCODER_XL_2
    pl.save_pipeline(tmp, configs, params, toy.SCHEDULER_XL if xl else toy.SCHEDULER, TOKENIZER_DIR)
    os.makedirs(folder, exist_ok=True)
    parts = ("unet", "vae", "text_encoder", "tokenizer", "scheduler") + (("text_encoder_2", "tokenizer_2") if xl else ())
    for k in parts + ("model_index.json",):
        dst = os.path.join(folder, k)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, k), dst)
    shutil.rmtree(tmp)


def _warm_start(folder: str) -> dict:
    """A stage-2 state from an exported folder: its VAE stays fixed, UNet and text encoder go on training."""
    pipe = pl.load_pipeline(folder)
    params = {"unet": pipe.params["unet"], "text_encoder": pipe.params["text_encoder"]}
    return {"stage": "unet", "step": 0, "vae": pipe.params["vae"], "scaling": pipe.scaling_factor, "params": params,
            "ema": params, "opt": None}


def _logger(workdir: str):
    """say(msg): a timestamped line to stdout and to workdir/log.txt."""
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, "log.txt"), "a")

    def say(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        log.write(line + "\n")
        log.flush()

    return say


def train(args) -> None:
    say = _logger(args.workdir)
    unet, vae, text = _modules()
    ckpt = os.path.join(args.workdir, "state.msgpack")
    init = functools.cache(lambda: pl.init_params(unet, vae, text, jax.random.PRNGKey(args.seed)))  # a resumed stage 2 needs none

    # ---- stage 1: VAE
    vae_sched = _lr_schedule(args.vae_lr, 100, args.vae_steps, 0.05)
    vae_opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(_unit))
    state = _load(ckpt) if os.path.exists(ckpt) else None
    if state is None and args.init:
        state = _warm_start(args.init)
        say(f"warm start from {args.init} (scaling_factor {state['scaling']:.4f})")
    if state is None or state["stage"] == "vae":
        vae_p = init()["vae"] if state is None else state["vae"]
        vae_os = vae_opt.init(vae_p)
        vae_os = vae_os if state is None else serialization.from_state_dict(vae_os, state["opt"])
        step0 = 0 if state is None else int(state["step"])
        vstep = make_vae_step(vae, vae_opt)
        t0, losses = time.time(), []
        for s in range(step0, args.vae_steps):
            seeds = range(s * args.vae_batch, (s + 1) * args.vae_batch)
            imgs, _, _ = render_batch(seeds, toy.IMAGE_SIZE)
            vae_p, vae_os, loss = vstep(vae_p, vae_os, vae_sched(s), imgs, jax.random.PRNGKey(s))
            losses.append(loss)
            if (s + 1) % 50 == 0:
                say(f"vae step {s + 1} loss {np.mean(jax.device_get(losses)):.4f} {50 / (time.time() - t0):.2f} steps/s")
                t0, losses = time.time(), []
            if (s + 1) % 250 == 0 or s + 1 == args.vae_steps:
                _save(ckpt, {"stage": "vae", "step": s + 1, "vae": vae_p, "opt": serialization.to_state_dict(vae_os)})
        scaling = latent_scaling(vae, vae_p)
        say(f"vae done; scaling_factor {scaling:.4f}")
        params = {"unet": init()["unet"], "text_encoder": init()["text_encoder"]}
        state = {"stage": "unet", "step": 0, "vae": vae_p, "scaling": scaling, "params": params, "ema": params, "opt": None}
        _save(ckpt, state)

    # ---- stage 2: UNet + text encoder
    captions = Captions()
    _unet_stage(args, state, ckpt, say, dict(unet=unet, vae=vae, text=text), "unet", "unet",
                lambda caps, dropped: captions(caps))


def _unet_stage(args, state: dict, ckpt: str, say, modules: dict, stage: str, label: str, ids_of) -> None:
    """Stage 2's loop, shared by the SD and SDXL toys: batches of rendered scenes with captions
    dropped to "" at --dropout, AdamW on a warm-up + cosine schedule, EMA, checkpoints every
    --ckpt-every steps (`stage` names them), exports every --export-every steps (the EMA, or the
    raw weights with --export-raw); a finished run only exports. `ids_of(captions, dropped)`: the
    step's text input."""
    vae_p, scaling = state["vae"], float(state["scaling"])
    params, ema = state["params"], state["ema"]
    sched = _lr_schedule(args.lr, 200, args.unet_steps, 0.1)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(_unit, weight_decay=1e-2, mask=_wd_mask))
    opt_state = opt.init(params)
    if state["opt"] is not None:
        opt_state = serialization.from_state_dict(opt_state, state["opt"])
    ustep = make_unet_step(opt=opt, scaling=scaling, ema_decay=args.ema, offset_noise=args.offset_noise, **modules)
    which = "raw" if args.export_raw else "EMA"

    def export_now(when: str) -> None:
        export(args.export, {"vae": vae_p, **(params if args.export_raw else ema)}, scaling)
        say(f"exported {which} weights {when} to {args.export}")

    t0, losses = time.time(), []
    step0 = int(state["step"])
    rng = np.random.default_rng(args.seed + step0)
    for s in range(step0, args.unet_steps):
        seeds = range(s * args.batch, (s + 1) * args.batch)
        imgs, _, caps = render_batch(seeds, toy.IMAGE_SIZE)
        dropped = rng.random(len(caps)) < args.dropout
        caps = ["" if d else c for c, d in zip(caps, dropped)]
        params, ema, opt_state, loss = ustep(params, ema, opt_state, sched(s), vae_p, imgs, ids_of(caps, dropped), jax.random.PRNGKey(10**7 + s))
        losses.append(loss)
        if (s + 1) % args.log_every == 0:
            say(f"{label} step {s + 1} loss {np.mean(jax.device_get(losses)):.4f} {args.log_every / (time.time() - t0):.2f} steps/s")
            t0, losses = time.time(), []
        last = s + 1 == args.unet_steps
        if (s + 1) % args.ckpt_every == 0 or last:
            _save(ckpt, {"stage": stage, "step": s + 1, "vae": vae_p, "scaling": scaling, "params": params,
                         "ema": ema, "opt": serialization.to_state_dict(opt_state)})
        if args.export and ((s + 1) % args.export_every == 0 or last):
            export_now(f"at step {s + 1}")
    if args.export and step0 >= args.unet_steps:  # a finished run: export its checkpoint again
        export_now(f"of the finished run (step {step0})")


# ---- the SDXL-shaped toy (issue 20)


def _modules_xl():
    """The SDXL-shaped toy's networks: UNET_XL, the toy VAE, and SDXL's two text encoders."""
    unet, vae, _ = pl.build_modules(toy.UNET_XL, toy.VAE, toy.TEXT_ENCODER)
    text, text_2 = pl.build_text_encoders_xl(toy.TEXT_ENCODER, toy.TEXT_ENCODER_XL_2)
    return unet, vae, text, text_2


def transplant_unet(old: dict, new: dict) -> tuple[dict, dict]:
    """The SD toy's UNet params `old` carried into the SDXL-shaped UNet's fresh params `new` (same
    block layout): every param of the same path and shape copied; proj_in/proj_out 1x1 conv kernels
    reshaped into linear kernels; cross-attention to_k/to_v kernels (64 input rows) copied into the
    first rows, zeros in the rows of text_encoder_2's features (so the new features start with no
    effect); add_embedding.linear_2 zeros (so the pooled embedding and time ids start with no
    effect); anything else stays fresh. Returns (params, {how: count})."""
    from flax import traverse_util

    flat_old, flat_new = traverse_util.flatten_dict(old), traverse_util.flatten_dict(new)
    out, counts = {}, {}
    for key, fresh in flat_new.items():
        prev = flat_old.get(key)
        names = [str(k) for k in key]
        if any("add_embedding.linear_2" in n for n in names):
            how, val = "zeroed add_embedding.linear_2", jnp.zeros_like(fresh)
        elif prev is not None and prev.shape == fresh.shape:
            how, val = "copied", prev
        elif prev is not None and names[-2] in ("proj_in", "proj_out") and prev.size == fresh.size:
            how, val = "conv 1x1 -> linear", prev.reshape(fresh.shape)
        elif (prev is not None and names[-2] in ("to_k", "to_v") and prev.ndim == 2
              and prev.shape[1] == fresh.shape[1] and prev.shape[0] < fresh.shape[0]):
            how, val = "to_k/to_v rows padded with zeros", jnp.zeros_like(fresh).at[: prev.shape[0]].set(prev)
        else:
            how, val = "fresh", fresh
        counts[how] = counts.get(how, 0) + 1
        out[key] = jnp.asarray(val, fresh.dtype)
    unused = [k for k in flat_old if k not in flat_new]
    if unused:
        counts["SD params without a place"] = len(unused)
    return traverse_util.unflatten_dict(out), counts


def _warm_start_xl(folder: str, fresh: dict, say) -> dict:
    """An SDXL stage-2 state from an exported folder: an SDXL-shaped toy goes on as it is; the SD
    toy gives its frozen VAE (so the same latents and scaling_factor), its text encoder, and its UNet
    through `transplant_unet`; text_encoder_2 starts random (`fresh`)."""
    pipe = pl.load_pipeline(folder)
    if pipe.is_sdxl:
        params = {k: pipe.params[k] for k in ("unet", "text_encoder", "text_encoder_2")}
    else:
        shapes_of = lambda t: jax.tree_util.tree_map(jnp.shape, t)
        if shapes_of(pipe.params["text_encoder"]) != shapes_of(fresh["text_encoder"]):
            raise SystemExit(f"{folder}: its text encoder is not the toy's TEXT_ENCODER")
        unet_p, counts = transplant_unet(pipe.params["unet"], fresh["unet"])
        say("UNet warm start: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        params = {"unet": unet_p, "text_encoder": pipe.params["text_encoder"], "text_encoder_2": fresh["text_encoder_2"]}
    return {"stage": "sdxl", "step": 0, "vae": pipe.params["vae"], "scaling": pipe.scaling_factor, "params": params,
            "ema": params, "opt": None}


def train_xl(args) -> None:
    """Stage 2 for the SDXL-shaped toy: UNet and both text encoders jointly (the same loss,
    schedule, EMA and offset noise as stage 2), from --init or the checkpoint in --workdir."""
    say = _logger(args.workdir)
    unet, vae, text, text_2 = _modules_xl()
    ckpt = os.path.join(args.workdir, "state.msgpack")
    if os.path.exists(ckpt):
        state = _load(ckpt)
        if state["stage"] != "sdxl":
            raise SystemExit(f"{ckpt} is not an --sdxl checkpoint (stage {state['stage']!r}); use another --workdir")
    elif args.init:
        fresh = pl.init_params(unet, vae, text, jax.random.PRNGKey(args.seed), text_2)
        state = _warm_start_xl(args.init, fresh, say)
        say(f"warm start from {args.init} (scaling_factor {state['scaling']:.4f})")
    else:
        raise SystemExit("--sdxl needs --init FOLDER (the SD toy, e.g. nti_jax/toy/model) or a checkpoint in --workdir")
    captions = Captions()
    captions_2 = Captions(pl.clip_tokenizer_class().from_pretrained(TOKENIZER_DIR, pad_token="!"))  # sdxl-base's tokenizer_2
    _unet_stage(args, state, ckpt, say, dict(unet=unet, vae=vae, text=text, text_2=text_2), "sdxl", "sdxl unet",
                lambda caps, dropped: (captions(caps), captions_2(caps), dropped))


def finetune_decoder(args) -> None:
    """Stage 3 on an exported folder (--init): fine-tune its VAE decoder, write it to --export."""
    say = _logger(args.workdir)
    pipe = pl.load_pipeline(args.init)
    vae = pipe.vae
    enc = {k: v for k, v in pipe.params["vae"].items() if k in ("encoder", "quant_conv")}
    dec = {k: v for k, v in pipe.params["vae"].items() if k not in enc}
    sched = _lr_schedule(args.decoder_lr, 50, args.decoder_steps, 0.05)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(_unit))
    opt_state = opt.init(dec)
    ckpt = os.path.join(args.workdir, "decoder.msgpack")
    step0 = 0
    if os.path.exists(ckpt):
        state = _load(ckpt)
        dec, step0 = state["dec"], int(state["step"])
        opt_state = serialization.from_state_dict(opt_state, state["opt"])
    step = make_decoder_step(vae, opt, pipe.latent_factor)
    t0, losses = time.time(), []
    for s in range(step0, args.decoder_steps):
        seeds = range(DECODER_SEED0 + s * args.vae_batch, DECODER_SEED0 + (s + 1) * args.vae_batch)
        dec, opt_state, loss = step(dec, opt_state, sched(s), render_batch(seeds, toy.IMAGE_SIZE)[0], enc, jax.random.PRNGKey(s))
        losses.append(loss)
        if (s + 1) % 50 == 0:
            mse = float(np.mean(jax.device_get(losses))) / 4.0  # images in [-1, 1]: MSE on [0, 1] is a quarter
            say(f"decoder step {s + 1} psnr {-10 * np.log10(mse):.2f} dB {50 / (time.time() - t0):.2f} steps/s")
            t0, losses = time.time(), []
        if (s + 1) % 250 == 0:
            _save(ckpt, {"step": s + 1, "dec": dec, "opt": serialization.to_state_dict(opt_state)})
    params = dict(pipe.params, vae={**enc, **dec})
    export(args.export, params, pipe.scaling_factor)
    say(f"exported the fine-tuned decoder at step {args.decoder_steps} to {args.export}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/nti-jax/toy-train"))
    ap.add_argument("--export", default=None, help="diffusers folder to write the EMA model to")
    ap.add_argument("--init", default=None, help="start stage 2 from this exported folder (fresh optimiser)")
    ap.add_argument("--decoder-steps", type=int, default=0, help="with --init: fine-tune its VAE decoder only")
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    ap.add_argument("--vae-steps", type=int, default=2000)
    ap.add_argument("--vae-lr", type=float, default=2e-3)
    ap.add_argument("--unet-steps", type=int, default=20000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--offset-noise", type=float, default=0.1)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--ckpt-every", type=int, default=500)
    ap.add_argument("--export-every", type=int, default=2000)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--export-raw", action="store_true", help="export the raw weights, not the EMA (a short run "
                    "from a warm start: after n steps an EMA of decay d still holds d**n of the starting weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sdxl", action="store_true", help="stage 2 of the SDXL-shaped toy (config.UNET_XL, two text "
                    "encoders); with --init the SD toy, whose VAE stays frozen and whose UNet and text encoder are carried over")
    args = ap.parse_args(argv)
    if args.decoder_steps and not (args.init and args.export):
        ap.error("--decoder-steps needs --init FOLDER and --export FOLDER")
    if args.sdxl and args.decoder_steps:
        ap.error("--sdxl trains the UNet and text encoders only, not --decoder-steps")
    (finetune_decoder if args.decoder_steps else train_xl if args.sdxl else train)(args)


if __name__ == "__main__":
    main()
