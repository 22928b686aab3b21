"""load_pipeline on diffusers-format folders: outputs vs torch, no recompiles, loading errors."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nti_jax
from nti_jax.loading import pipeline as pl
from nti_jax import testing
from nti_jax.errors import ModelError, PromptTruncatedWarning


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return testing.make_tiny_sd(str(tmp_path_factory.mktemp("sd1")), "sd1", seed=7)


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return nti_jax.load_pipeline(sd1_folder)


def rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_pipeline_operations_match_torch(sd1_folder, pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(os.path.join(sd1_folder, "tokenizer"))
    text = CLIPTextModel.from_pretrained(os.path.join(sd1_folder, "text_encoder")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(sd1_folder, "vae")).eval()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(sd1_folder, "unet")).eval()
    prompts = ["a red circle on a blue background", ""]
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        want_emb = text(ids).last_hidden_state.numpy()
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        want_lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        want_img = ((vae.decode(want_lat / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
        want_eps = unet(want_lat, 501, torch.from_numpy(want_emb)).sample
    emb = pipe.encode_prompt(prompts)
    assert emb.shape == (2, 77, 32) and rel_err(emb, want_emb) <= 1e-4
    lat = pipe.encode_image(images)
    assert lat.shape == (2, 16, 16, 4)
    assert rel_err(lat, want_lat.permute(0, 2, 3, 1).numpy()) <= 1e-4
    img = pipe.decode_latents(want_lat.permute(0, 2, 3, 1).numpy())
    assert img.shape == (2, 64, 64, 3) and rel_err(img, want_img.permute(0, 2, 3, 1).numpy()) <= 1e-4
    eps = testing.unet_output(pipe, want_lat.permute(0, 2, 3, 1).numpy(), 501, want_emb)
    assert rel_err(eps, want_eps.permute(0, 2, 3, 1).numpy()) <= 1e-4
    assert pipe.image_size == 64 and pipe.scheduler_config["prediction_type"] == "epsilon"


def test_second_call_does_not_recompile(pipe):
    rng = np.random.default_rng(1)
    calls = [
        (pl._encode_image, lambda: pipe.encode_image(rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8))),
        (pl.decode_with, lambda: pipe.decode_latents(rng.standard_normal((1, 16, 16, 4)))),
        (pl._encode_prompt, lambda: pipe.encode_prompt(["a blue square"])),
    ]
    for fn, call in calls:
        call()
        before = fn._cache_size()
        call()
        assert fn._cache_size() == before


@pytest.mark.slow
def test_bfloat16_pipeline_close_to_float32(sd1_folder, pipe):
    bf = nti_jax.load_pipeline(sd1_folder, dtype="bfloat16")
    assert bf.dtype == "bfloat16"
    # weight matrices stored in the compute dtype (issue 13); vectors and the VAE stay float32
    assert bf.params["unet"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    assert bf.params["unet"]["conv_in"]["bias"].dtype == np.float32
    assert bf.params["vae"]["decoder"]["conv_in"]["kernel"].dtype == np.float32
    rng = np.random.default_rng(2)
    x, ctx = rng.standard_normal((1, 16, 16, 4)), rng.standard_normal((1, 77, 32))
    assert rel_err(testing.unet_output(bf, x, 300, ctx), testing.unet_output(pipe, x, 300, ctx)) <= 3e-2
    assert rel_err(bf.encode_prompt(["a cat"]), pipe.encode_prompt(["a cat"])) <= 3e-2


def test_fp16_variant_files_load(sd1_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    folder = str(tmp_path / "m")
    shutil.copytree(sd1_folder, folder)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).half()
    shutil.rmtree(os.path.join(folder, "unet"))
    unet.save_pretrained(os.path.join(folder, "unet"), variant="fp16")
    assert os.listdir(os.path.join(folder, "unet")) and any("fp16" in f for f in os.listdir(os.path.join(folder, "unet")))
    p16 = nti_jax.load_pipeline(folder)
    ref = unet.float()
    rng = np.random.default_rng(3)
    x, ctx = rng.standard_normal((1, 16, 16, 4)).astype(np.float32), rng.standard_normal((1, 77, 32)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 3, 1, 2), 7, torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
    assert rel_err(testing.unet_output(p16, x, 7, ctx), want) <= 1e-4


def test_long_prompt_is_truncated_as_diffusers_does(sd1_folder, pipe):
    """diffusers' own encode_prompt is the oracle: same embedding, same removed text."""
    import logging

    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    sd = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(sd1_folder, "vae")),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(sd1_folder, "text_encoder")).eval(),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(sd1_folder, "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(sd1_folder, "unet")),
        scheduler=DDIMScheduler.from_pretrained(sd1_folder, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    long = ", ".join(f"a {c} {s} on a {b} background" for c, s, b in zip(["red", "green", "blue"] * 4, ["circle", "square", "triangle"] * 4, ["white", "black", "gray"] * 4))
    full = sd.tokenizer(long, verbose=False).input_ids
    assert len(full) > 77 + 10

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    sd_logger = logging.getLogger(StableDiffusionPipeline.__module__)
    sd_logger.addHandler(handler)
    try:
        with torch.no_grad():
            want, _ = sd.encode_prompt(long, "cpu", 1, False)
    finally:
        sd_logger.removeHandler(handler)
    (record,) = [r for r in records if "truncated" in r.getMessage()]

    with pytest.warns(PromptTruncatedWarning) as caught:
        ids = pipe.tokenize([long, "a short one"])
    assert len(caught) == 1
    assert ids.shape == (2, 77) and ids[0].tolist() == full[:76] + [49407]  # bos, first 75 tokens, eos
    removed = pipe.truncation(long)
    assert record.getMessage().endswith(str([removed]))
    assert f"({len(full) - 77} tokens cut): {removed!r}" in str(caught[0].message)
    assert pipe.truncation("a short one") is None
    with pytest.warns(PromptTruncatedWarning):
        emb = pipe.encode_prompt([long])
    assert rel_err(emb, want.numpy()) <= 1e-4


def test_missing_file_is_a_model_error(sd1_folder, tmp_path):
    folder = str(tmp_path / "m")
    shutil.copytree(sd1_folder, folder)
    os.remove(os.path.join(folder, "vae", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelError, match="no diffusion_pytorch_model.safetensors"):
        nti_jax.load_pipeline(folder)
    with pytest.raises(ModelError, match="does not exist"):
        nti_jax.load_pipeline(str(tmp_path / "nowhere"))


def test_wrong_shapes_list_the_keys(sd1_folder, tmp_path):
    folder = str(tmp_path / "m")
    shutil.copytree(sd1_folder, folder)
    cfg_path = os.path.join(folder, "unet", "config.json")
    cfg = json.load(open(cfg_path))
    cfg["cross_attention_dim"] = 40  # the weights say 32
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ModelError, match=r"wrong shapes: .*attn2\.to_k\.weight"):
        nti_jax.load_pipeline(folder)


def test_missing_and_unexpected_keys_are_listed(sd1_folder, tmp_path):
    from safetensors.numpy import save_file

    from nti_jax.loading.convert import read_safetensors

    folder = str(tmp_path / "m")
    shutil.copytree(sd1_folder, folder)
    path = os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors")
    state = dict(read_safetensors(path)[0])
    state.pop("conv_out.bias")
    state["extra.weight"] = np.zeros(3, np.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    with pytest.raises(ModelError, match=r"unet weights .*missing keys: conv_out\.bias; unexpected keys: extra\.weight"):
        nti_jax.load_pipeline(folder)


def test_pickle_only_folder_refused_unless_opted_in(sd1_folder, tmp_path):
    folder = str(tmp_path / "m")
    shutil.copytree(sd1_folder, folder)
    vae_dir = os.path.join(folder, "vae")
    from nti_jax.loading.convert import read_safetensors

    state = read_safetensors(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))[0]
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, os.path.join(vae_dir, "diffusion_pytorch_model.bin"))
    os.remove(os.path.join(vae_dir, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ModelError, match="only pickled weights .*allow_pickle=True"):
        nti_jax.load_pipeline(folder)
    opted = nti_jax.load_pipeline(folder, allow_pickle=True)
    imgs = np.random.default_rng(4).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    ref = nti_jax.load_pipeline(sd1_folder)
    np.testing.assert_array_equal(opted.encode_image(imgs), ref.encode_image(imgs))


def test_uncached_hub_id_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError, match="not in the Hugging Face cache.*hf download"):
        nti_jax.load_pipeline("nobody/no-such-model")


def test_hub_id_resolves_from_the_cache(sd1_folder, monkeypatch, tmp_path):
    """A cached snapshot (laid out as huggingface_hub does) loads by its hub id, offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someone--tiny-sd"
    commit = "0" * 40
    shutil.copytree(sd1_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        p = nti_jax.load_pipeline("someone/tiny-sd")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)
    assert p.image_size == 64
