"""Full-size parity of our Flax SDXL networks with diffusers/transformers (issue 20), with no
weights downloaded: each component of stabilityai/stable-diffusion-xl-base-1.0 is built at its
real config with random weights in torch, saved as the hub saves it (safetensors), and read back
through nti-jax's own loader; both compute in float32 on the same random input.

    python benchmarks/parity_full.py --out /tmp/parity            # every component
    python benchmarks/parity_full.py --out /tmp/parity --components text_encoder_2

Each side runs in its own process (torch first, then JAX), so the weights are never held twice
(the UNet is 10.3 GB in float32). The UNet runs on a 64x64 latent (512 px) and the VAE on 256 px
to keep the CPU time in minutes; both are convolutional, so the weights and the code paths are
those of 1024 px. Prints one JSON line per component: max |ours - theirs| / max |theirs|.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

COMPONENTS = ("text_encoder", "text_encoder_2", "vae", "unet")
LATENT, PIXELS, PROMPT_IDS = 64, 256, 77


def _config(name: str) -> dict:
    from benchmarks import memory

    cfg = memory.CONFIGS["sdxl"]
    base = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407)
    return {"unet": cfg["unet"], "vae": cfg["vae"], "text_encoder": dict(base, **cfg["text"], pad_token_id=49407),
            "text_encoder_2": dict(base, **cfg["text_2"], pad_token_id=0)}[name]


def _inputs(name: str) -> dict:
    rng = np.random.default_rng(0)
    if name.startswith("text_encoder"):
        ids = rng.integers(0, 49406, (2, PROMPT_IDS))
        ids[:, 0], ids[:, 20], ids[:, 21:] = 49406, 49407, 0 if name == "text_encoder_2" else 49407
        return {"ids": ids.astype(np.int64)}
    if name == "vae":
        return {"x": rng.uniform(-1, 1, (1, PIXELS, PIXELS, 3)).astype(np.float32)}
    return {"x": rng.standard_normal((1, LATENT, LATENT, 4)).astype(np.float32),
            "tokens": rng.standard_normal((1, 77, 2048)).astype(np.float32),
            "pooled": rng.standard_normal((1, 1280)).astype(np.float32),
            "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32)}


def run_torch(name: str, out: str) -> None:
    import torch

    torch.manual_seed(0)
    folder = os.path.join(out, name)
    x = _inputs(name)
    t = time.time()
    with torch.no_grad():
        if name.startswith("text_encoder"):
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
            m = cls(CLIPTextConfig(**_config(name))).eval()
            o = m(torch.from_numpy(x["ids"]), output_hidden_states=True)
            res = {"penultimate": o.hidden_states[-2].numpy()}
            if name == "text_encoder_2":
                res["pooled"] = o.text_embeds.numpy()
        elif name == "vae":
            from diffusers import AutoencoderKL

            m = AutoencoderKL(**{k: v for k, v in _config(name).items() if k != "sample_size"}).eval()
            post = m.encode(torch.from_numpy(x["x"]).permute(0, 3, 1, 2)).latent_dist
            res = {"mean": post.mean.permute(0, 2, 3, 1).numpy(), "decoded": m.decode(post.mean).sample.permute(0, 2, 3, 1).numpy()}
        else:
            from diffusers import UNet2DConditionModel

            m = UNet2DConditionModel(**_config(name)).eval()
            o = m(torch.from_numpy(x["x"]).permute(0, 3, 1, 2), 500, encoder_hidden_states=torch.from_numpy(x["tokens"]),
                  added_cond_kwargs={"text_embeds": torch.from_numpy(x["pooled"]), "time_ids": torch.from_numpy(x["time_ids"])})
            res = {"eps": o.sample.permute(0, 2, 3, 1).numpy()}
    seconds = time.time() - t
    m.save_pretrained(folder, safe_serialization=True)
    np.savez(os.path.join(out, f"{name}.torch.npz"), **res)
    print(json.dumps({"component": name, "torch_s": round(seconds, 1), "params": sum(p.numel() for p in m.parameters())}))


def run_jax(name: str, out: str) -> dict:
    import jax
    import jax.numpy as jnp

    from nti_jax.loading import convert, pipeline
    from nti_jax.loading.model_config import XL_WEIGHT_FILES
    from nti_jax.models import AutoencoderKL

    folder = os.path.join(out, name)
    cfg = _config(name)
    if name.startswith("text_encoder"):
        other = "text_encoder_2" if name == "text_encoder" else "text_encoder"
        pair = pipeline.build_text_encoders_xl(*(cfg, _config(other)) if name == "text_encoder" else (_config(other), cfg))
        module = pair[0] if name == "text_encoder" else pair[1]
        shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    else:
        from benchmarks import memory

        sd = memory.CONFIGS["sdxl"]
        unet, vae, text = pipeline.build_modules(sd["unet"], sd["vae"], sd["text"])
        module = vae if name == "vae" else unet
        shapes = pipeline.param_shapes(unet, vae, text)[name]
    params = convert.from_torch_layout(convert.load_state(folder, XL_WEIGHT_FILES[name]), shapes, what=name, place=jnp.asarray)
    x, want = _inputs(name), dict(np.load(os.path.join(out, f"{name}.torch.npz")))
    t = time.time()
    if name.startswith("text_encoder"):
        pen, pooled = jax.jit(lambda p, ids: module.apply({"params": p}, ids))(params, jnp.asarray(x["ids"], jnp.int32))
        got = {"penultimate": pen, "pooled": pooled}
    elif name == "vae":
        mean = jax.jit(lambda p, x: module.apply({"params": p}, x, method=AutoencoderKL.encode)[0])(params, jnp.asarray(x["x"]))
        dec = jax.jit(lambda p, z: module.apply({"params": p}, z, method=AutoencoderKL.decode))(params, jnp.asarray(want["mean"]))
        got = {"mean": mean, "decoded": dec}
    else:
        f = jax.jit(lambda p, x, c, pooled, ids: module.apply({"params": p}, x, jnp.int32(500), c, None, (pooled, ids)))
        got = {"eps": f(params, *(jnp.asarray(x[k]) for k in ("x", "tokens", "pooled", "time_ids")))}
    got = {k: np.asarray(v) for k, v in got.items()}
    rel = {k: float(np.abs(got[k].astype(np.float64) - want[k]).max() / np.abs(want[k]).max()) for k in want}
    return {"component": name, "jax_s": round(time.time() - t, 1), "rel_err": rel}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="scratch folder for the random weights (the UNet: 10.3 GB)")
    ap.add_argument("--components", default=",".join(COMPONENTS))
    ap.add_argument("--side", choices=("torch", "jax"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--component", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    if a.side == "torch":
        run_torch(a.component, a.out)
        return 0
    if a.side == "jax":
        print(json.dumps(run_jax(a.component, a.out)))
        return 0
    for name in a.components.split(","):
        for side in ("torch", "jax"):
            res = subprocess.run([sys.executable, __file__, "--out", a.out, "--side", side, "--component", name],
                                 capture_output=True, text=True)
            if res.returncode != 0:
                print(json.dumps({"component": name, "side": side, "error": (res.stderr.strip().splitlines() or ["?"])[-1]}), flush=True)
                break
            print(res.stdout.strip().splitlines()[-1], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
