"""PyTorch reference for Null-text Inversion (the oracle and the speed baseline).

Null-text Inversion as the paper states it (Mokady et al., "Null-text Inversion for Editing
Real Images using Guided Diffusion Models", CVPR 2023, Algorithm 1) and as the authors'
notebook ``null_text_w_ptp.ipynb`` (google/prompt-to-prompt, class ``NullInversion``:
``next_step``, ``prev_step``, ``ddim_loop``, ``null_optimization``) runs it, in that notebook's
style: a diffusers ``UNet2DConditionModel``,
``torch.optim.Adam``, a ``.item()``-based early stop and the per-step latent update done with a
batch of two ([phi_t, C] concatenated) exactly as the notebook's ``get_noise_pred`` does.

It works on latents and text embeddings handed in directly, so the tests need no VAE or text
encoder; :func:`invert_image` adds the notebook's image/text front end for benchmarks.

Conventions
-----------
* Latents are NCHW ``torch.Tensor`` (diffusers layout); numpy arrays are accepted as inputs.
* Everything returned is a float32 torch tensor on the UNet's device.
* **Precision.** The UNet may run in float16/bfloat16 (benchmarks), but the optimised null
  embedding, the Adam state, the CFG combination, the loss and all DDIM math stay float32: inputs
  are cast to the UNet's dtype at the UNet boundary and its output is cast back to float32
  (:func:`unet_eps`). With a float32 UNet every cast is a no-op. Gradients flow through the casts.
* **Determinism.** No function here draws random numbers. On CPU results are bitwise
  reproducible; on GPU call ``torch.use_deterministic_algorithms(True)`` yourself if you need that.
* The UNet is called with a 0-d int64 timestep tensor, as the notebook does with
  ``scheduler.timesteps[i]``.

Semantics decided where the notebook and the paper leave room (see also the function docs)
-----------------------------------------------------------------------------------------
* Stride ``s = num_train_timesteps // num_steps`` (integer division, as the notebook and
  diffusers); ``alpha(t) = alphas_cumprod[t]`` for ``t >= 0`` else ``final_alpha_cumprod``.
* ``next_step`` (inversion) uses ``a_t = alpha(min(t - s, 999))``, ``a_next = alpha(t)``: identical
  to the notebook's ``next_step`` and to diffusers' ``DDIMInverseScheduler.step``.
* v-prediction: ``v`` is converted to ``(x0, eps)`` with the alpha the *formula* uses for the
  current sample: ``alpha(t)`` in ``prev_step`` (== diffusers ``DDIMScheduler``) and
  ``alpha(min(t - s, 999))`` in ``next_step`` (== diffusers ``DDIMInverseScheduler``), although the
  UNet was conditioned on ``t`` in both. The notebook itself has no v-prediction.
* ``clip_sample`` / thresholding are never applied (the notebook's own prev/next steps do not
  clip; SD configs have ``clip_sample=False``).
* Early stop: the Adam step is taken, THEN the pre-step loss is tested against
  ``epsilon + i * 2e-5``; so Adam steps taken == iterations executed ==
  ``inner_iterations[i]`` (j + 1 at the break, else ``num_inner_steps``).
* ``num_inner_steps == 0`` (which crashes the notebook with a NameError) is allowed here: phi is
  not touched, ``inner_iterations[i] == 0`` and ``final_losses[i]`` is NaN.
* A fresh Adam (default betas/eps, no weight decay) is built for every timestep; phi is
  warm-started from the previous timestep's result.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf

__all__ = [
    "DDIMSchedule",
    "SD_DDIM_CONFIG",
    "unet_eps",
    "ddim_pivots",
    "null_text_inner_step",
    "null_text_optimization",
    "cfg_sample",
    "negative_prompt_inversion",
    "load_512",
    "encode_image",
    "encode_prompt",
    "invert_image",
    "load_sd_components",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _module_device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _as_f32(x: Any, device: torch.device | None = None) -> torch.Tensor:
    """numpy / torch -> float32 torch tensor (on ``device`` if given)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    x = x.to(dtype=torch.float32)
    if device is not None:
        x = x.to(device)
    return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _emb3(x: torch.Tensor) -> torch.Tensor:
    """(77, D) -> (1, 77, D); (1, 77, D) unchanged."""
    return x[None] if x.dim() == 2 else x


def unet_eps(unet: torch.nn.Module, z: torch.Tensor, t: int, emb: torch.Tensor) -> torch.Tensor:
    """One UNet call; casts at the boundary: inputs -> UNet dtype, output -> float32.

    ``z`` (B, C, H, W) float32, ``emb`` (B, 77, D) float32 (may require grad). Returns the raw
    model output (eps or v, depending on the model) as float32.
    """
    device, dtype = _module_device_dtype(unet)
    tt = torch.tensor(int(t), dtype=torch.long, device=device)
    out = unet(z.to(device=device, dtype=dtype), tt, encoder_hidden_states=emb.to(device=device, dtype=dtype))
    out = out["sample"] if not isinstance(out, torch.Tensor) else out
    return out.to(torch.float32)


# --------------------------------------------------------------------------------------------
# DDIM schedule
# --------------------------------------------------------------------------------------------


class DDIMSchedule:
    """DDIM (eta = 0) in float32, built from a diffusers scheduler config dict.

    Attributes: ``timesteps`` (int64 tensor, descending, e.g. 981, 961, ..., 1 for SD and 50
    steps), ``alphas_cumprod`` (float32, length ``num_train_timesteps``), ``final_alpha_cumprod``
    (0-d float32: 1.0 if ``set_alpha_to_one`` else ``alphas_cumprod[0]``), ``stride``,
    ``num_steps``, ``prediction_type``.
    The betas/alphas are computed exactly as diffusers' ``DDIMScheduler`` does (bitwise).
    """

    def __init__(self, config: dict, num_steps: int = 50):
        cfg = dict(config)
        self.config = cfg
        self.num_train_timesteps = int(cfg.get("num_train_timesteps", 1000))
        beta_start = float(cfg.get("beta_start", 0.0001))
        beta_end = float(cfg.get("beta_end", 0.02))
        beta_schedule = cfg.get("beta_schedule", "linear")
        n = self.num_train_timesteps
        if cfg.get("trained_betas") is not None:
            betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not supported")
        if cfg.get("rescale_betas_zero_snr", False):
            raise NotImplementedError("rescale_betas_zero_snr is not supported")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        set_alpha_to_one = bool(cfg.get("set_alpha_to_one", True))
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]

        self.prediction_type = cfg.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise NotImplementedError(f"prediction_type {self.prediction_type!r} is not supported")

        self.num_steps = int(num_steps)
        if not 0 < self.num_steps <= n:
            raise ValueError(f"num_steps must be in 1..{n}, got {num_steps}")
        self.stride = n // self.num_steps
        steps_offset = int(cfg.get("steps_offset", 0))
        spacing = cfg.get("timestep_spacing", "leading")
        if spacing == "leading":
            ts = (np.arange(0, self.num_steps) * self.stride).round()[::-1].copy().astype(np.int64)
            ts += steps_offset
        elif spacing == "trailing":
            ts = np.round(np.arange(n, 0, -n / self.num_steps)).astype(np.int64) - 1
        elif spacing == "linspace":
            ts = np.linspace(0, n - 1, self.num_steps).round()[::-1].copy().astype(np.int64)
        else:
            raise NotImplementedError(f"timestep_spacing {spacing!r} is not supported")
        self.timesteps = torch.from_numpy(ts)
        self._dev_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    # alpha(t) on the sample's device, float32 0-d tensor
    def alpha(self, t: int, device: torch.device | str = "cpu") -> torch.Tensor:
        device = torch.device(device)
        if device not in self._dev_cache:
            self._dev_cache[device] = (self.alphas_cumprod.to(device), self.final_alpha_cumprod.to(device))
        ac, fin = self._dev_cache[device]
        t = int(t)
        return ac[t] if t >= 0 else fin

    def _to_x0_eps(self, model_output, sample, a_t):
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - b_t**0.5 * eps) / a_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        return x0, eps

    def prev_step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """Denoise t -> t - s (eta = 0); equals diffusers ``DDIMScheduler.step(eta=0)``."""
        t = int(t)
        a_t = self.alpha(t, sample.device)
        a_prev = self.alpha(t - self.stride, sample.device)
        x0, eps = self._to_x0_eps(model_output, sample, a_t)
        return a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps

    def next_step(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        """Invert t - s -> t (the notebook's ``next_step``; == diffusers ``DDIMInverseScheduler``).

        ``model_output`` is the UNet's output on the CURRENT (less noisy) ``sample`` at timestep
        ``t``. a_t = alpha(min(t - s, 999)), a_next = alpha(t).
        """
        t = int(t)
        cur = min(t - self.stride, self.num_train_timesteps - 1)
        a_t = self.alpha(cur, sample.device)
        a_next = self.alpha(t, sample.device)
        x0, eps = self._to_x0_eps(model_output, sample, a_t)
        return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps


# --------------------------------------------------------------------------------------------
# 1. pivots: DDIM inversion at w = 1
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def ddim_pivots(unet, schedule: DDIMSchedule, z0, cond_emb) -> list[torch.Tensor]:
    """DDIM inversion with the conditional prediction only (w = 1), as the notebook's ``ddim_loop``.

    Returns T + 1 latents ``[z*_0 (= z0), z*_1, ..., z*_T]``; ``x_T = result[-1]``.
    """
    device, _ = _module_device_dtype(unet)
    z = _as_f32(z0, device).clone()
    cond = _emb3(_as_f32(cond_emb, device))
    out = [z]
    for t in schedule.timesteps.flip(0).tolist():  # ascending: 1, 21, ..., 981
        eps = unet_eps(unet, z, t, cond)
        z = schedule.next_step(eps, t, z)
        out.append(z)
    return out


# --------------------------------------------------------------------------------------------
# 2. null-text optimisation
# --------------------------------------------------------------------------------------------


def _cfg_batch2(unet, schedule, z, t, uncond, cond, guidance_scale):
    """The notebook's ``get_noise_pred(is_forward=False)``: batch of 2 [uncond, cond], CFG, prev_step."""
    context = torch.cat([uncond, cond])
    out = unet_eps(unet, torch.cat([z] * 2), t, context)
    e_u, e_c = out.chunk(2)
    eps = e_u + guidance_scale * (e_c - e_u)
    return schedule.prev_step(eps, t, z)


def _default_lr(i: int) -> float:
    return 1e-2 * (1.0 - i / 100.0)


def null_text_inner_step(
    unet,
    schedule: DDIMSchedule,
    i: int,
    z_bar,
    pivot_target,
    cond_emb,
    uncond_emb,
    *,
    guidance_scale: float = 7.5,
    lr: float | None = None,
) -> tuple[torch.Tensor, float]:
    """ONE Adam step on the null embedding from a fresh Adam at timestep index ``i``.

    ``lr`` defaults to ``1e-2 * (1 - i / 100)``. Returns (updated phi (1, 77, D) float32 detached,
    pre-step loss as a Python float).
    """
    device, _ = _module_device_dtype(unet)
    t = int(schedule.timesteps[i])
    z_bar = _as_f32(z_bar, device)
    target = _as_f32(pivot_target, device)
    cond = _emb3(_as_f32(cond_emb, device))
    phi = _emb3(_as_f32(uncond_emb, device)).clone().detach()
    phi.requires_grad = True
    optimizer = torch.optim.Adam([phi], lr=_default_lr(i) if lr is None else lr)
    with torch.no_grad():
        eps_c = unet_eps(unet, z_bar, t, cond)
    eps_u = unet_eps(unet, z_bar, t, phi)
    eps = eps_u + guidance_scale * (eps_c - eps_u)
    loss = nnf.mse_loss(schedule.prev_step(eps, t, z_bar), target)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return phi.detach(), loss.item()


def null_text_optimization(
    unet,
    schedule: DDIMSchedule,
    pivots: Sequence,
    cond_emb,
    uncond_emb,
    *,
    guidance_scale: float = 7.5,
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    lr: float = 1e-2,
) -> dict:
    """The notebook's ``null_optimization``.

    ``pivots`` is the list returned by :func:`ddim_pivots` (T + 1 latents, z*_0 first).
    ``lr`` is the base learning rate; step i uses ``lr * (1 - i / 100)``.

    Returns a dict with
      * ``null_embeddings``: list of T float32 tensors (1, 77, D), phi for timesteps[0..T-1];
      * ``inner_iterations``: list[int], Adam steps taken at each timestep;
      * ``final_losses``: list[float], the last computed (pre-step) loss at each timestep
        (NaN when ``num_inner_steps == 0``);
      * ``loss_history``: list of lists, every computed loss at each timestep;
      * ``latents``: list of T float32 tensors, z_bar after each timestep's update (the last one
        is the reconstruction z_0 of the optimisation trajectory).
    """
    device, _ = _module_device_dtype(unet)
    cond = _emb3(_as_f32(cond_emb, device))
    out = _null_loop(
        schedule, [_as_f32(p, device) for p in pivots], [_emb3(_as_f32(uncond_emb, device))], [True],
        lambda z, t: unet_eps(unet, z, t, cond),
        lambda z, t, u: unet_eps(unet, z, t, u[0]),
        lambda z, t, u: _cfg_batch2(unet, schedule, z, t, u[0], cond, guidance_scale),
        guidance_scale=guidance_scale, num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon, lr=lr,
    )
    out["null_embeddings"] = [u[0] for u in out.pop("nulls")]
    return out


def _null_loop(schedule: DDIMSchedule, pivots: list, uncond: list, trainable: list, eps_cond: Callable, eps_uncond: Callable,
               advance: Callable, *, guidance_scale: float, num_inner_steps: int, early_stop_epsilon: float, lr: float) -> dict:
    """The notebook's ``null_optimization`` loop over a list of unconditional tensors (SD: the
    token embedding; SDXL: tokens and pooled), those marked `trainable` in one Adam per timestep:
    a fresh Adam with lr ``lr * (1 - i / 100)``, the conditional prediction once per timestep (no
    grad), one unconditional call per inner step, the Adam step, then the early stop test
    ``loss < epsilon + i * 2e-5``; warm start from the previous timestep, and `advance` (the
    notebook's batch of two [uncond, cond]) moves the latent. Returns ``nulls`` (T lists of the
    (1, ...) tensors) and the other keys of :func:`null_text_optimization`."""
    T = schedule.num_steps
    if len(pivots) != T + 1:
        raise ValueError(f"expected {T + 1} pivots, got {len(pivots)}")
    latent_cur = pivots[-1]
    nulls, inner_iterations, final_losses, loss_history, latents = [], [], [], [], []
    for i in range(T):
        uncond = [u.clone().detach() for u in uncond]
        for u, train in zip(uncond, trainable):
            u.requires_grad = train
        optimizer = torch.optim.Adam([u for u, train in zip(uncond, trainable) if train], lr=lr * (1.0 - i / 100.0))
        latent_prev = pivots[len(pivots) - i - 2]
        t = int(schedule.timesteps[i])
        with torch.no_grad():
            noise_pred_cond = eps_cond(latent_cur, t)
        losses: list[float] = []
        n_iter = 0
        for j in range(num_inner_steps):
            noise_pred_uncond = eps_uncond(latent_cur, t, uncond)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
            latents_prev_rec = schedule.prev_step(noise_pred, t, latent_cur)
            loss = nnf.mse_loss(latents_prev_rec, latent_prev)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_item = loss.item()
            losses.append(loss_item)
            n_iter = j + 1
            if loss_item < early_stop_epsilon + i * 2e-5:
                break
        phi_t = [u[:1].detach() for u in uncond]
        nulls.append(phi_t)
        inner_iterations.append(n_iter)
        final_losses.append(losses[-1] if losses else math.nan)
        loss_history.append(losses)
        with torch.no_grad():
            latent_cur = advance(latent_cur, t, phi_t)
        latents.append(latent_cur)
        uncond = phi_t
    return {
        "nulls": nulls,
        "inner_iterations": inner_iterations,
        "final_losses": final_losses,
        "loss_history": loss_history,
        "latents": latents,
    }


# --------------------------------------------------------------------------------------------
# 3. reconstruction / sampling
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def cfg_sample(unet, schedule: DDIMSchedule, x_T, cond_emb, uncond_embs, *, guidance_scale: float = 7.5) -> torch.Tensor:
    """Plain CFG DDIM sampling from ``x_T`` (the notebook's ``text2image_ldm_stable`` with
    ``uncond_embeddings`` given): each step a batch of 2 [phi_i, C], eps_u + w (eps_c - eps_u),
    ``prev_step``. ``uncond_embs`` is a list of T per-step embeddings or one tensor used at every
    step (or a stacked (T, 1, 77, D) tensor). Returns z_0 (float32)."""
    device, _ = _module_device_dtype(unet)
    T = schedule.num_steps
    cond = _emb3(_as_f32(cond_emb, device))
    if isinstance(uncond_embs, (list, tuple)):
        if len(uncond_embs) != T:
            raise ValueError(f"expected {T} null embeddings, got {len(uncond_embs)}")
        phis = [_emb3(_as_f32(u, device)) for u in uncond_embs]
    else:
        u = _as_f32(uncond_embs, device)
        if u.dim() == 4:  # stacked (T, 1, 77, D)
            phis = [u[k] for k in range(T)]
        else:  # one (77, D) / (1, 77, D) embedding for every step
            phis = [_emb3(u)] * T
    z = _as_f32(x_T, device)
    for i, t in enumerate(schedule.timesteps.tolist()):
        z = _cfg_batch2(unet, schedule, z, t, phis[i].expand(*cond.shape), cond, guidance_scale)
    return z


def negative_prompt_inversion(
    unet, schedule: DDIMSchedule, z0, cond_emb, *, guidance_scale: float = 7.5, reconstruct: bool = True
) -> dict:
    """Negative-prompt inversion (Miyake et al. 2023): phi_t = C for every t, no optimisation.

    Returns ``x_T``, ``pivots``, ``null_embeddings`` (T copies of C) and, if ``reconstruct``,
    ``reconstruction`` = :func:`cfg_sample` with those embeddings (which is DDIM sampling at w = 1,
    whatever ``guidance_scale`` is, since eps_u == eps_c)."""
    device, _ = _module_device_dtype(unet)
    cond = _emb3(_as_f32(cond_emb, device))
    pivots = ddim_pivots(unet, schedule, z0, cond)
    out = {"x_T": pivots[-1], "pivots": pivots, "null_embeddings": [cond.clone() for _ in range(schedule.num_steps)]}
    if reconstruct:
        out["reconstruction"] = cfg_sample(unet, schedule, pivots[-1], cond, out["null_embeddings"], guidance_scale=guidance_scale)
    return out


# --------------------------------------------------------------------------------------------
# 4. notebook front end (benchmarks): image / text encoders
# --------------------------------------------------------------------------------------------


def load_512(image_path, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0, size: int = 512) -> np.ndarray:
    """The notebook's ``load_512``: crop offsets, centre square crop, PIL default (bicubic) resize.

    Reproduces the notebook's quirk ``top = min(top, h - left - 1)`` verbatim."""
    from PIL import Image

    if isinstance(image_path, str):
        image = np.array(Image.open(image_path).convert("RGB"))[:, :, :3]
    else:
        image = np.asarray(image_path)
    h, w, _ = image.shape
    left = min(left, w - 1)
    right = min(right, w - left - 1)
    top = min(top, h - left - 1)
    bottom = min(bottom, h - top - 1)
    image = image[top : h - bottom, left : w - right]
    h, w, _ = image.shape
    if h < w:
        offset = (w - h) // 2
        image = image[:, offset : offset + h]
    elif w < h:
        offset = (h - w) // 2
        image = image[offset : offset + w]
    return np.array(Image.fromarray(np.ascontiguousarray(image)).resize((size, size)))


@torch.no_grad()
def encode_image(vae, image_uint8_HWC) -> torch.Tensor:
    """The notebook's ``image2latent``: x = img / 127.5 - 1, VAE posterior MEAN * scaling_factor.

    The VAE runs in its own dtype; the result is float32 (1, C, H/f, W/f)."""
    device, dtype = _module_device_dtype(vae)
    image = torch.from_numpy(np.asarray(image_uint8_HWC)).float() / 127.5 - 1
    image = image.permute(2, 0, 1).unsqueeze(0).to(device=device, dtype=dtype)
    latents = vae.encode(image)["latent_dist"].mean
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    return latents.to(torch.float32) * scaling


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The notebook's ``init_prompt``: (uncond "" embedding, cond embedding), both (1, 77, D) float32,
    padding='max_length' to ``tokenizer.model_max_length`` with truncation."""
    device, _ = _module_device_dtype(text_encoder)
    max_len = int(tokenizer.model_max_length)
    text_input = tokenizer([prompt], padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    cond = text_encoder(text_input["input_ids"].to(device))[0]
    uncond_input = tokenizer([""], padding="max_length", max_length=text_input["input_ids"].shape[-1], return_tensors="pt")
    uncond = text_encoder(uncond_input["input_ids"].to(device))[0]
    return uncond.to(torch.float32), cond.to(torch.float32)


def invert_image(
    unet,
    vae,
    text_encoder,
    tokenizer,
    image_uint8_HWC,
    prompt: str,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    scheduler_config: dict | None = None,
) -> dict:
    """Full notebook-style null-text inversion of one (already square, e.g. :func:`load_512`) image.

    ``scheduler_config`` defaults to the SD 1.x DDIM config of the notebook (``SD_DDIM_CONFIG``,
    981 ... 1 after diffusers' pipeline sets its offset to 1); pass the model's own
    ``scheduler_config.json`` dict for SD 2.x etc.

    Returns ``x_T``, ``null_embeddings`` (list of T), ``pivots``, ``z0``, ``cond_emb``,
    ``uncond_emb``, ``inner_iterations``, ``final_losses`` and ``timings`` (seconds: ``encode``,
    ``pivots``, ``null_text``, ``total``; CUDA-synchronised).
    """
    device, _ = _module_device_dtype(unet)
    schedule = DDIMSchedule(scheduler_config or SD_DDIM_CONFIG, num_steps)
    _sync(device)
    t0 = time.perf_counter()
    uncond, cond = encode_prompt(text_encoder, tokenizer, prompt)
    z0 = encode_image(vae, image_uint8_HWC)
    _sync(device)
    t1 = time.perf_counter()
    pivots = ddim_pivots(unet, schedule, z0, cond)
    _sync(device)
    t2 = time.perf_counter()
    res = null_text_optimization(
        unet,
        schedule,
        pivots,
        cond,
        uncond,
        guidance_scale=guidance_scale,
        num_inner_steps=num_inner_steps,
        early_stop_epsilon=early_stop_epsilon,
    )
    _sync(device)
    t3 = time.perf_counter()
    return {
        "x_T": pivots[-1],
        "null_embeddings": res["null_embeddings"],
        "pivots": pivots,
        "z0": z0,
        "cond_emb": cond,
        "uncond_emb": uncond,
        "inner_iterations": res["inner_iterations"],
        "final_losses": res["final_losses"],
        "reconstruction_latent": res["latents"][-1],
        "timings": {"encode": t1 - t0, "pivots": t2 - t1, "null_text": t3 - t2, "total": t3 - t0},
    }


#: The notebook's scheduler (SD 1.x): DDIMScheduler(beta_start=0.00085, beta_end=0.012,
#: beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False), steps_offset 1.
SD_DDIM_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def load_sd_components(path: str, *, device: str = "cuda", dtype: torch.dtype = torch.float32) -> dict:
    """Load unet / vae / text_encoder / tokenizer / scheduler_config from a diffusers-format folder
    (benchmarks). Only the UNet gets ``dtype``; VAE and text encoder stay float32."""
    import json
    import os

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype).to(device).eval()
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae").to(device).eval()
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder").to(device).eval()
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    # the notebook's settings, whatever the folder's scheduler class was
    sched.update({"clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1})
    for k in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps"):
        sched.setdefault(k, SD_DDIM_CONFIG[k])
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler_config": sched}


# --------------------------------------------------------------------------------------------
# 5. SDXL (issue 20): two text encoders, pooled embedding and time ids as added conditioning
# --------------------------------------------------------------------------------------------
#
# Written from diffusers' StableDiffusionXLPipeline (``encode_prompt``, ``_get_add_time_ids``,
# the denoising loop's ``unet(..., added_cond_kwargs={"text_embeds": ..., "time_ids": ...})``)
# and the same notebook logic as above (``ddim_loop``, ``null_optimization``). What is optimised
# per step is the unconditional TOKEN embedding (1, 77, D1 + D2); optionally also the
# unconditional pooled embedding (``optimize_pooled``). The time ids are the same for both CFG
# branches (the pipeline's default: no negative_original_size / negative_target_size).

__all__ += [
    "load_sdxl_components",
    "encode_prompt_sdxl",
    "sdxl_time_ids",
    "sdxl_ddim_config",
    "unet_eps_sdxl",
    "ddim_pivots_sdxl",
    "null_text_optimization_sdxl",
    "cfg_sample_sdxl",
    "invert_image_sdxl",
]

# DDIMScheduler.__init__'s arguments and defaults (diffusers 0.42): the keys
# DDIMScheduler.from_config takes from another scheduler's config, and what it uses when absent.
_DDIM_INIT_DEFAULTS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "clip_sample_range": 1.0,
    "sample_max_value": 1.0,
    "timestep_spacing": "leading",
    "rescale_betas_zero_snr": False,
}


def sdxl_ddim_config(scheduler_config: dict) -> dict:
    """The config ``DDIMScheduler.from_config(pipe.scheduler.config)`` ends with for an SDXL folder.

    What was found (diffusers 0.42.1): sdxl-base ships an ``EulerDiscreteScheduler`` whose
    ``scheduler_config.json`` also holds DDIM/PNDM keys Euler does not take (``clip_sample: false``,
    ``set_alpha_to_one: false``, ``skip_prk_steps``, ``sample_max_value``). diffusers keeps such keys
    in the loaded scheduler's config, so ``from_config`` hands them on to DDIM: the result is
    scaled_linear 0.00085 .. 0.012, steps_offset 1, "leading" spacing, epsilon,
    ``set_alpha_to_one=False`` (final alpha = alphas_cumprod[0]) and ``clip_sample=False``; for 50
    steps the timesteps are 981, 961, ..., 1, as for SD 1.x. A key the file lacks takes DDIM's
    default (``_DDIM_INIT_DEFAULTS``; NB ``set_alpha_to_one=True``, ``clip_sample=True``,
    ``steps_offset=0``), as ``from_config`` gives it (diffusers drops a key the source scheduler
    only defaulted). Clipping/thresholding are not implemented here, so a config that would turn
    them on is refused rather than silently run differently."""
    cfg = {k: scheduler_config.get(k, v) for k, v in _DDIM_INIT_DEFAULTS.items()}
    if cfg["clip_sample"] or cfg["thresholding"]:
        raise NotImplementedError(
            f"DDIM with clip_sample={cfg['clip_sample']} / thresholding={cfg['thresholding']} is not implemented"
        )
    return cfg


def load_sdxl_components(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32, variant: str | None = None) -> dict:
    """Load an SDXL diffusers folder: ``unet`` (in ``dtype``), ``vae`` (float32: SDXL's VAE has
    ``force_upcast``), ``text_encoder`` / ``text_encoder_2`` (float32, asked for explicitly:
    transformers 5 otherwise takes the config's dtype), ``tokenizer`` / ``tokenizer_2``,
    ``scheduler_config`` (the folder's json, verbatim), ``ddim_config`` (:func:`sdxl_ddim_config`)
    and ``force_zeros_for_empty_prompt`` (model_index.json; the pipeline's default True if absent).
    ``variant``: e.g. "fp16" to read ``*.fp16.safetensors`` (weights cast on load)."""
    import json
    import os

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = {"variant": variant} if variant else {}
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw).to(device).eval()
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=torch.float32, **kw).to(device).eval()
    te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=torch.float32, **kw).to(device).eval()
    te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=torch.float32, **kw).to(device).eval()
    tok1 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    with open(os.path.join(path, "scheduler", "scheduler_config.json")) as f:
        sched = json.load(f)
    with open(os.path.join(path, "model_index.json")) as f:
        index = json.load(f)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": te1,
        "text_encoder_2": te2,
        "tokenizer": tok1,
        "tokenizer_2": tok2,
        "scheduler_config": sched,
        "ddim_config": sdxl_ddim_config(sched),
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
    }


@torch.no_grad()
def _encode_sdxl(components: dict, text: str, max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One text through both encoders as diffusers' ``encode_prompt`` (clip_skip None): per
    encoder, ids padded to max_length with truncation, ``hidden_states[-2]``; concatenated on the
    last axis; pooled = text_encoder_2's projected output (``text_embeds``)."""
    tokens, pooled = [], None
    for tok, enc in ((components["tokenizer"], components["text_encoder"]), (components["tokenizer_2"], components["text_encoder_2"])):
        device, _ = _module_device_dtype(enc)
        ids = tok([text], padding="max_length", max_length=max_length or tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = enc(ids.to(device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = out[0]
        tokens.append(out.hidden_states[-2])
    if pooled is None:
        raise ValueError("text_encoder_2 must be a CLIPTextModelWithProjection (pooled text_embeds)")
    return torch.cat(tokens, dim=-1).to(torch.float32), pooled.to(torch.float32)


@torch.no_grad()
def encode_prompt_sdxl(components: dict, prompt: str, negative_prompt: str | None = None):
    """(cond_tokens (1, 77, D1 + D2), cond_pooled (1, P), uncond_tokens, uncond_pooled), float32.

    The unconditional pair as diffusers makes it for CFG: zeros when ``negative_prompt`` is None
    and the folder's ``force_zeros_for_empty_prompt`` is set; otherwise ``negative_prompt`` (or "")
    encoded the same way (padded to the conditional length)."""
    cond, cond_pooled = _encode_sdxl(components, prompt)
    if negative_prompt is None and components.get("force_zeros_for_empty_prompt", True):
        return cond, cond_pooled, torch.zeros_like(cond), torch.zeros_like(cond_pooled)
    uncond, uncond_pooled = _encode_sdxl(components, negative_prompt or "", max_length=cond.shape[1])
    return cond, cond_pooled, uncond, uncond_pooled


def sdxl_time_ids(height: int, width: int) -> torch.Tensor:
    """``_get_add_time_ids`` with the pipeline's defaults: original size (h, w), crop top-left
    (0, 0), target size (h, w) -> float32 (1, 6)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def unet_eps_sdxl(unet, z: torch.Tensor, t: int, tokens: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """One SDXL UNet call (``added_cond_kwargs`` text_embeds / time_ids), cast at the boundary as
    :func:`unet_eps`: inputs -> UNet dtype, output -> float32. Batch B of z, tokens, pooled; the
    time ids (1, 6) are repeated to B."""
    device, dtype = _module_device_dtype(unet)
    tt = torch.tensor(int(t), dtype=torch.long, device=device)
    B = z.shape[0]
    ids = time_ids.to(device=device, dtype=dtype)
    ids = ids.expand(B, -1) if ids.shape[0] == 1 else ids
    out = unet(
        z.to(device=device, dtype=dtype),
        tt,
        encoder_hidden_states=tokens.to(device=device, dtype=dtype),
        added_cond_kwargs={"text_embeds": pooled.to(device=device, dtype=dtype), "time_ids": ids},
    )
    out = out["sample"] if not isinstance(out, torch.Tensor) else out
    return out.to(torch.float32)


@torch.no_grad()
def ddim_pivots_sdxl(unet, schedule: DDIMSchedule, z0, cond_tokens, cond_pooled, time_ids) -> list[torch.Tensor]:
    """:func:`ddim_pivots` for SDXL: DDIM inversion at w = 1 with the conditional tokens + pooled."""
    device, _ = _module_device_dtype(unet)
    z = _as_f32(z0, device).clone()
    cond, pooled = _emb3(_as_f32(cond_tokens, device)), _as_f32(cond_pooled, device)
    out = [z]
    for t in schedule.timesteps.flip(0).tolist():
        eps = unet_eps_sdxl(unet, z, t, cond, pooled, time_ids)
        z = schedule.next_step(eps, t, z)
        out.append(z)
    return out


def _cfg_batch2_sdxl(unet, schedule, z, t, uncond, uncond_pooled, cond, cond_pooled, time_ids, guidance_scale):
    """:func:`_cfg_batch2` for SDXL: batch of 2 [uncond, cond] (tokens and pooled), CFG, prev_step."""
    out = unet_eps_sdxl(
        unet, torch.cat([z] * 2), t, torch.cat([uncond, cond]), torch.cat([uncond_pooled, cond_pooled]), time_ids
    )
    e_u, e_c = out.chunk(2)
    eps = e_u + guidance_scale * (e_c - e_u)
    return schedule.prev_step(eps, t, z)


def null_text_optimization_sdxl(
    unet,
    schedule: DDIMSchedule,
    pivots: Sequence,
    cond_tokens,
    cond_pooled,
    uncond_tokens,
    uncond_pooled,
    time_ids,
    *,
    guidance_scale: float = 7.5,
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    lr: float = 1e-2,
    optimize_pooled: bool = False,
) -> dict:
    """:func:`null_text_optimization` for SDXL, step for step the same: a fresh Adam per timestep
    with lr ``lr * (1 - i / 100)``, the conditional prediction once per timestep (no grad), one
    unconditional UNet call per inner step, the Adam step and then the early stop test
    ``loss < epsilon + i * 2e-5``, warm start from the previous timestep, and the latent update
    as a batch of two [uncond, cond].

    ``optimize_pooled``: the unconditional pooled embedding joins the token embedding in the same
    Adam (same lr); otherwise it stays fixed at ``uncond_pooled``.

    Returns ``null_embeddings`` (T x (1, 77, D)), ``null_pooled`` (T x (1, P); copies of the
    fixed one when not optimised), ``inner_iterations``, ``final_losses``, ``loss_history`` and
    ``latents`` (z_bar after each timestep; the last is the reconstruction)."""
    device, _ = _module_device_dtype(unet)
    cond, c_pooled = _emb3(_as_f32(cond_tokens, device)), _as_f32(cond_pooled, device)
    out = _null_loop(
        schedule, [_as_f32(p, device) for p in pivots], [_emb3(_as_f32(uncond_tokens, device)), _as_f32(uncond_pooled, device)],
        [True, optimize_pooled],
        lambda z, t: unet_eps_sdxl(unet, z, t, cond, c_pooled, time_ids),
        lambda z, t, u: unet_eps_sdxl(unet, z, t, u[0], u[1], time_ids),
        lambda z, t, u: _cfg_batch2_sdxl(unet, schedule, z, t, u[0], u[1], cond, c_pooled, time_ids, guidance_scale),
        guidance_scale=guidance_scale, num_inner_steps=num_inner_steps, early_stop_epsilon=early_stop_epsilon, lr=lr,
    )
    nulls = out.pop("nulls")
    out["null_embeddings"], out["null_pooled"] = [u[0] for u in nulls], [u[1] for u in nulls]
    return out


@torch.no_grad()
def cfg_sample_sdxl(
    unet, schedule: DDIMSchedule, x_T, cond_tokens, cond_pooled, uncond_tokens, uncond_pooled, time_ids, *, guidance_scale: float = 7.5
) -> torch.Tensor:
    """:func:`cfg_sample` for SDXL: CFG DDIM sampling from ``x_T``, a batch of 2 per step.
    ``uncond_tokens`` / ``uncond_pooled``: lists of T per-step tensors or one tensor for all steps."""
    device, _ = _module_device_dtype(unet)
    T = schedule.num_steps

    def per_step(x, emb3):
        if isinstance(x, (list, tuple)):
            if len(x) != T:
                raise ValueError(f"expected {T} per-step embeddings, got {len(x)}")
            return [(_emb3 if emb3 else (lambda a: a))(_as_f32(u, device)) for u in x]
        u = _as_f32(x, device)
        return [_emb3(u) if emb3 else u] * T

    cond, c_pooled = _emb3(_as_f32(cond_tokens, device)), _as_f32(cond_pooled, device)
    phis, pooleds = per_step(uncond_tokens, True), per_step(uncond_pooled, False)
    z = _as_f32(x_T, device)
    for i, t in enumerate(schedule.timesteps.tolist()):
        z = _cfg_batch2_sdxl(unet, schedule, z, t, phis[i], pooleds[i], cond, c_pooled, time_ids, guidance_scale)
    return z


def invert_image_sdxl(
    components: dict,
    image_uint8_HWC,
    prompt: str,
    *,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    num_inner_steps: int = 10,
    early_stop_epsilon: float = 1e-5,
    optimize_pooled: bool = False,
    reconstruct: bool = True,
    negative_prompt: str | None = None,
) -> dict:
    """Null-text inversion of one image with SDXL (``components``: :func:`load_sdxl_components`).

    z0 = VAE posterior mean x scaling_factor (0.13025 for SDXL; VAE in float32); time ids
    :func:`sdxl_time_ids` of the image's size for both CFG branches; DDIM from
    ``components["ddim_config"]`` (:func:`sdxl_ddim_config`, i.e. what
    ``DDIMScheduler.from_config(pipe.scheduler.config)`` gives); pivots at w = 1 with the
    conditional tokens + pooled; then :func:`null_text_optimization_sdxl` from the unconditional
    pair of :func:`encode_prompt_sdxl` (zeros for sdxl-base, whose force_zeros_for_empty_prompt
    is true, unless ``negative_prompt`` is given).

    Returns ``x_T``, ``pivots``, ``null_embeddings``, ``null_pooled``, ``inner_iterations``,
    ``final_losses``, ``loss_history``, ``latents`` (the optimisation trajectory), ``z0``,
    ``cond_tokens``, ``cond_pooled``, ``uncond_tokens``, ``uncond_pooled``, ``time_ids``,
    ``timings`` and, when ``reconstruct``, ``reconstruction_latent``: :func:`cfg_sample_sdxl`
    replayed from x_T with the stored null embeddings (equal to ``latents[-1]``)."""
    unet, vae = components["unet"], components["vae"]
    device, _ = _module_device_dtype(unet)
    schedule = DDIMSchedule(components.get("ddim_config") or sdxl_ddim_config(components["scheduler_config"]), num_steps)
    h, w = np.asarray(image_uint8_HWC).shape[:2]
    time_ids = sdxl_time_ids(h, w).to(device)
    _sync(device)
    t0 = time.perf_counter()
    cond, cond_pooled, uncond, uncond_pooled = encode_prompt_sdxl(components, prompt, negative_prompt)
    z0 = encode_image(vae, image_uint8_HWC).to(device)
    _sync(device)
    t1 = time.perf_counter()
    pivots = ddim_pivots_sdxl(unet, schedule, z0, cond, cond_pooled, time_ids)
    _sync(device)
    t2 = time.perf_counter()
    res = null_text_optimization_sdxl(
        unet,
        schedule,
        pivots,
        cond,
        cond_pooled,
        uncond,
        uncond_pooled,
        time_ids,
        guidance_scale=guidance_scale,
        num_inner_steps=num_inner_steps,
        early_stop_epsilon=early_stop_epsilon,
        optimize_pooled=optimize_pooled,
    )
    _sync(device)
    t3 = time.perf_counter()
    out = {
        "x_T": pivots[-1],
        "pivots": pivots,
        "null_embeddings": res["null_embeddings"],
        "null_pooled": res["null_pooled"],
        "inner_iterations": res["inner_iterations"],
        "final_losses": res["final_losses"],
        "loss_history": res["loss_history"],
        "latents": res["latents"],
        "z0": z0,
        "cond_tokens": cond,
        "cond_pooled": cond_pooled,
        "uncond_tokens": uncond,
        "uncond_pooled": uncond_pooled,
        "time_ids": time_ids,
        "timings": {"encode": t1 - t0, "pivots": t2 - t1, "null_text": t3 - t2, "total": t3 - t0},
    }
    if reconstruct:
        out["reconstruction_latent"] = cfg_sample_sdxl(
            unet, schedule, pivots[-1], cond, cond_pooled, res["null_embeddings"], res["null_pooled"], time_ids, guidance_scale=guidance_scale
        )
    return out
