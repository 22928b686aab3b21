"""Damaged model files give one ModelError line naming the file, never another exception.

The oracle for the safetensors reader is the safetensors library's own (Rust) validator: on
every mutated file both must reject, or both accept with identical tensors.
"""

import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

import nti_jax
from nti_jax.loading import convert
from nti_jax import testing
from nti_jax.errors import ModelError

TOY = os.path.join(os.path.dirname(nti_jax.__file__), "toy", "model")
VAE = os.path.join("vae", "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return testing.make_tiny_sd(str(tmp_path_factory.mktemp("tiny")), "sd1", seed=3)


@pytest.fixture(scope="module")
def vae_bytes(tiny) -> bytes:
    with open(os.path.join(tiny, VAE), "rb") as f:
        return f.read()


def header_of(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def pack(header, data: bytes) -> bytes:
    h = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(h)) + h + data


def model_error(fn, path: str) -> str:
    """fn() must raise ModelError (any other exception fails the test) with one line naming path."""
    with pytest.raises(ModelError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and path in msg, msg
    return msg


def library_reads(path: str):
    """The safetensors library's verdict: its tensors, or None if it rejects the file."""
    try:
        with safe_open(path, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError:
        return None


def test_truncation_at_every_header_boundary_and_300_data_offsets(vae_bytes, tmp_path):
    """An interrupted download, cut anywhere: the message says the file is truncated."""
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    (n,) = struct.unpack("<Q", vae_bytes[:8])
    rng = np.random.default_rng(0)
    data_cuts = rng.choice(np.arange(8 + n + 1, len(vae_bytes)), 300, replace=False)
    cuts = sorted({*range(0, 8 + n + 1, 8), *map(int, data_cuts)}, reverse=True)
    with open(path, "wb") as f:
        f.write(vae_bytes)
    for k in cuts:
        os.truncate(path, k)
        msg = model_error(lambda: convert.read_safetensors(path), path)
        want = "empty" if k == 0 else "shorter than the 8-byte" if k < 8 else "truncated"
        assert want in msg, (k, msg)
        assert library_reads(path) is None, k
    assert len(cuts) > 2000


def test_random_header_byte_flips_agree_with_the_library(vae_bytes, tmp_path):
    path = str(tmp_path / "m.safetensors")
    (n,) = struct.unpack("<Q", vae_bytes[:8])
    with open(path, "wb") as f:
        f.write(vae_bytes)
    rng = np.random.default_rng(1)
    positions = [*range(8), *map(int, rng.integers(8, 8 + n, 400))]
    rejected = 0
    with open(path, "r+b") as f:
        for pos in positions:
            f.seek(pos)
            f.write(bytes([vae_bytes[pos] ^ int(rng.integers(1, 256))]))
            f.flush()
            try:
                ours = convert.read_safetensors(path)[0]
            except ModelError as e:
                assert "\n" not in str(e) and path in str(e)
                ours = None
            theirs = library_reads(path)
            assert (ours is None) == (theirs is None), (pos, theirs is None)
            if ours is not None:
                assert sorted(ours) == sorted(theirs)
                for k in ours:
                    np.testing.assert_array_equal(ours[k], theirs[k])
            rejected += ours is None
            f.seek(pos)
            f.write(vae_bytes[pos : pos + 1])
    assert rejected > len(positions) // 2  # most flips break it; some (a letter in a name) do not


def _edit(raw: bytes, change) -> bytes:
    header, data = header_of(raw)
    spans = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    return change(header, data, [k for _, k in spans])


def _set(key, field, value):
    def change(h, d, names):
        h[names[key]][field] = value(h[names[key]][field]) if callable(value) else value
        return pack(h, d)

    return change


STRUCTURED = {
    "overlap": (_set(1, "data_offsets", lambda o: [o[0] - 4, o[1] - 4]), "overlap"),
    "offsets past the end": (_set(-1, "data_offsets", lambda o: [o[0] + 8, o[1] + 8]), "truncated"),
    "reversed offsets": (_set(2, "data_offsets", lambda o: [o[1], o[0]]), "not 0 <= begin <= end"),
    "negative offset": (_set(0, "data_offsets", lambda o: [-4, o[1]]), "not 0 <= begin <= end"),
    "three offsets": (_set(0, "data_offsets", lambda o: [*o, 0]), "not two integers"),
    "unknown dtype": (_set(3, "dtype", "F31"), "unknown dtype 'F31'"),
    "dtype not a string": (_set(3, "dtype", 32), "unknown dtype 32"),
    "size != shape x dtype": (_set(4, "shape", lambda s: [s[0] + 1, *s[1:]]), "needs"),
    "negative shape": (_set(4, "shape", lambda s: [-s[0], *s[1:]]), "not a list of non-negative integers"),
    "float shape": (_set(4, "shape", lambda s: [float(x) for x in s]), "not a list of non-negative integers"),
    "shape not a list": (_set(4, "shape", 7), "not a list of non-negative integers"),
    "missing data_offsets": (lambda h, d, names: pack({**h, names[0]: {"dtype": "F32", "shape": [1]}}, d), "lacks"),
    "bytes no tensor owns": (lambda h, d, names: pack(h, d + bytes(8)), "belong to no tensor"),
    "metadata not str->str": (lambda h, d, names: pack({**h, "__metadata__": {"format": 1}}, d), "__metadata__"),
    "header a JSON list": (lambda h, d, names: pack([1, 2], d), "not an object"),
    "duplicate name": (
        lambda h, d, names: pack(json.dumps(h).replace(f'"{names[1]}"', f'"{names[0]}"').encode(), d),
        "twice",
    ),
    "header not UTF-8": (lambda h, d, names: pack(json.dumps(h).encode().replace(b"conv", b"c\xffnv", 1), d), "not UTF-8"),
    "header length > file": (lambda h, d, names: struct.pack("<Q", len(d) + 10**5) + pack(h, d)[8:], "truncated"),
    "header length > 100 MB": (lambda h, d, names: struct.pack("<Q", 2**40) + pack(h, d)[8:], "100 MB"),
    "header length short by one": (
        lambda h, d, names: (lambda b: struct.pack("<Q", struct.unpack("<Q", b[:8])[0] - 1) + b[8:])(pack(h, d)),
        "not valid JSON",
    ),
    "zero bytes": (lambda h, d, names: b"", "empty"),
    "a text file": (lambda h, d, names: b"these are not the weights you are looking for\n" * 20, "100 MB"),
    "a Git LFS pointer": (
        lambda h, d, names: b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 985156\n",
        "git lfs pull",
    ),
}


@pytest.mark.parametrize("case", list(STRUCTURED))
def test_each_kind_of_damage_is_named(case, vae_bytes, tmp_path):
    change, phrase = STRUCTURED[case]
    path = str(tmp_path / "diffusion_pytorch_model.safetensors")
    with open(path, "wb") as f:
        f.write(_edit(vae_bytes, change))
    msg = model_error(lambda: convert.read_safetensors(path, advice="download it again"), path)
    assert phrase in msg and msg.endswith("; download it again"), msg
    assert library_reads(path) is None


def test_valid_files_read_as_the_library_reads_them(tiny, tmp_path):
    """No valid file is refused: dtypes incl. bf16, scalars, empty tensors, metadata, padding."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(2)
    arrays = {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "f16": rng.standard_normal((4,)).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.arange(7, dtype=np.uint8),
        "bool": np.array([True, False]),
        "scalar": np.array(2.5, np.float64),
        "empty": np.zeros((0, 4), np.float32),
    }
    path = str(tmp_path / "mixed.safetensors")
    save_file(arrays, path, metadata={"format": "pt", "note": "x"})
    out, meta = convert.read_safetensors(path)
    assert meta == {"format": "pt", "note": "x"} and sorted(out) == sorted(arrays)
    for k, v in arrays.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape
        np.testing.assert_array_equal(out[k], v)
    bf = np.array([1.5, -2.0, 3.25], ml_dtypes.bfloat16)  # written by hand: the library's numpy writer has no bf16
    with open(path, "wb") as f:
        f.write(pack({"b": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}, bf.tobytes()))
    assert convert.read_safetensors(path)[0]["b"].tolist() == [1.5, -2.0, 3.25]
    for rel in (VAE, os.path.join("text_encoder", "model.safetensors")):
        real = os.path.join(tiny, rel)
        ours, theirs = convert.read_safetensors(real)[0], library_reads(real)
        assert sorted(ours) == sorted(theirs)
        assert all(np.array_equal(ours[k], theirs[k]) for k in ours)


def _copy(tiny: str, tmp_path) -> str:
    folder = str(tmp_path / "model")
    shutil.copytree(tiny, folder)
    return folder


def _truncate_half(path):
    os.truncate(path, os.path.getsize(path) // 2)


def _write(text: str):
    def damage(path):
        with open(path, "w") as f:
            f.write(text)

    return damage


def _json_edit(change):
    def damage(path):
        with open(path) as f:
            cfg = json.load(f)
        change(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f)

    return damage


FOLDER_DAMAGE = {
    "vae weights cut in half": (VAE, _truncate_half, ["truncated", "download it again"]),
    "unet weights empty": (os.path.join("unet", "diffusion_pytorch_model.safetensors"), _write(""), ["empty"]),
    "text weights an LFS pointer": (
        os.path.join("text_encoder", "model.safetensors"),
        _write("version https://git-lfs.github.com/spec/v1\n"),
        ["git lfs pull"],
    ),
    "unet config cut": (os.path.join("unet", "config.json"), _truncate_half, ["not valid JSON"]),
    "unet config without block_out_channels": (
        os.path.join("unet", "config.json"),
        _json_edit(lambda c: c.pop("block_out_channels")),
        ["lacks 'block_out_channels'"],
    ),
    "unet config with an SDXL block": (
        os.path.join("unet", "config.json"),
        _json_edit(lambda c: c.update(down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlockFlat"])),
        ["'down_block_types'"],
    ),
    "vae config a list": (os.path.join("vae", "config.json"), _write("[1, 2]"), ["not an object"]),
    "vae groups that do not divide": (
        os.path.join("vae", "config.json"),
        _json_edit(lambda c: c.update(norm_num_groups=5)),
        ["norm_num_groups 5"],
    ),
    "text config hidden_act": (
        os.path.join("text_encoder", "config.json"),
        _json_edit(lambda c: c.update(hidden_act="relu")),
        ["'hidden_act'"],
    ),
    "scheduler beta_schedule": (
        os.path.join("scheduler", "scheduler_config.json"),
        _json_edit(lambda c: c.update(beta_schedule="squaredcos_cap_v2")),
        ["'beta_schedule'"],
    ),
    "tokenizer vocab cut": (os.path.join("tokenizer", "vocab.json"), _truncate_half, ["tokenizer"]),
}


@pytest.mark.parametrize("case", list(FOLDER_DAMAGE))
def test_load_pipeline_names_the_damaged_file(case, tiny, tmp_path):
    rel, damage, phrases = FOLDER_DAMAGE[case]
    folder = _copy(tiny, tmp_path)
    damage(os.path.join(folder, rel))
    named = os.path.dirname(os.path.join(folder, rel)) if rel.startswith("tokenizer") else os.path.join(folder, rel)
    msg = model_error(lambda: nti_jax.load_pipeline(folder), named)
    assert all(p in msg for p in phrases), msg


def test_a_file_or_a_component_folder_as_the_model(tiny, tmp_path):
    weights = os.path.join(tiny, VAE)
    assert "is a file, not a diffusers folder" in model_error(lambda: nti_jax.load_pipeline(weights), weights)
    component = os.path.join(tiny, "unet")
    assert "pass the folder above it" in model_error(lambda: nti_jax.load_pipeline(component), component)


def test_hugging_face_cache_entry_names_its_blob(vae_bytes, tmp_path):
    blob = tmp_path / "hub" / "models--a--b" / "blobs" / "0123abcd"
    snap = tmp_path / "hub" / "models--a--b" / "snapshots" / ("0" * 40) / "vae"
    blob.parent.mkdir(parents=True)
    snap.mkdir(parents=True)
    blob.write_bytes(vae_bytes[: len(vae_bytes) // 3])
    os.symlink(blob, snap / "diffusion_pytorch_model.safetensors")
    msg = model_error(lambda: convert.load_state(str(snap), "diffusion_pytorch_model"), str(snap))
    assert f"in the Hugging Face cache: {blob}" in msg and "download it again" in msg


def test_sharded_weights_and_a_damaged_index(tiny, tmp_path):
    from safetensors.numpy import save_file

    state = convert.read_safetensors(os.path.join(tiny, VAE))[0]
    names = sorted(state)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2 :]}
    for shard, keys in shards.items():
        save_file({k: np.ascontiguousarray(state[k]) for k in keys}, str(tmp_path / shard))
    index = tmp_path / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    loaded = convert.load_state(str(tmp_path), "diffusion_pytorch_model")
    assert sorted(loaded) == names and all(np.array_equal(loaded[k], state[k]) for k in names)
    for text, phrase in [("{\"weight_map\": {\"x\":", "not a readable JSON"), ("[]", "no weight_map"),
                         (json.dumps({"weight_map": {"x": "../a.safetensors"}}), "not a file name")]:
        index.write_text(text)
        assert phrase in model_error(lambda: convert.load_state(str(tmp_path), "diffusion_pytorch_model"), str(index))


def test_damaged_pickle_with_allow_pickle(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.bin"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    msg = model_error(lambda: convert.load_state(str(tmp_path), "diffusion_pytorch_model", allow_pickle=True), str(path))
    assert "cannot read" in msg


def test_cli_exits_2_with_one_line(tiny, tmp_path, capsys):
    from PIL import Image

    from nti_jax.run.cli import main

    folder = _copy(tiny, tmp_path)
    _truncate_half(os.path.join(folder, VAE))
    img = str(tmp_path / "img.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(img)
    argv = ["--model", folder, "--image", img, "--prompt", "a cat", "--steps", "2", "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert os.path.join(folder, VAE) in err and "truncated" in err


QUIET = """
import logging, sys
sys.modules["torch"] = None  # as on a machine without torch: transformers' find_spec sees none
{body}
"""


def _run_without_torch(body: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSFORMERS_")}
    env["JAX_PLATFORMS"] = "cpu"  # no accelerator probe messages: this test is about transformers
    run = subprocess.run([sys.executable, "-c", QUIET.format(body=body)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, run.stderr


def test_quiet_start_without_torch():
    """Loading a model prints nothing on stderr, although importing transformers alone would;
    the filter that drops transformers' notice is gone afterwards."""
    assert "PyTorch was not found" in _run_without_torch("import transformers")[1]  # the condition is reproduced
    body = f"import nti_jax\np = nti_jax.load_pipeline({TOY!r})\np.tokenize(['a red circle'])\n"
    out, err = _run_without_torch(body + "print(logging.getLogger('transformers').filters, 'transformers' in sys.modules)")
    bad = [line for line in err.splitlines() if "pytorch was not found" in line.lower() or "warn" in line.lower()]
    assert not bad and not err.strip(), err
    assert out.split() == ["[]", "True"], out
