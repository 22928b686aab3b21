"""Bad input and faults through the command line and the library (issue 14).

Every failure is one line: the CLI exits 2 for a bad argument, model or manifest, and records a
reason per failed image in results.jsonl (exit 1) without a traceback or a Python class name; a
run that is killed, interrupted or runs out of disk keeps every finished image as it was.
Images and prompts each go through one CLI run (a manifest of many bad rows); every run uses the
same compiled programs (a tiny random model, 5 steps, one image per batch, no successful edit),
cached in a temporary folder that the kill -9 and SIGTERM subprocesses share.
"""

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nti_jax
import nti_jax.io
from nti_jax.run import cli, ledger, manifest
from nti_jax.core import controllers, p2p
from nti_jax import records, testing
from nti_jax.testing import scene_folder
from nti_jax.toy import shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "invert.py")
QUEUE = 12  # images in the kill tests' run
FAST = ["--steps", "5", "--inner-steps", "3", "--early-stop-eps", "1.0", "--batch-size", "1"]
CLASS_NAME = re.compile(r"\b[A-Z][A-Za-z]*(Error|Exception|Warning|Interrupt)\b")
CAPTION = "a blue square on a purple background"


# Module-wide: a compilation cache in a temporary folder, no jax.distributed variables (conftest.py).
pytestmark = pytest.mark.usefixtures("cache_dir", "no_distributed_env")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Four held-out shapes images (64 px, the model's size) for the run-fault tests."""
    return scene_folder(tmp_path_factory.mktemp("scenes"), 4, 2_000_000_300)


@pytest.fixture(scope="module")
def queue(tmp_path_factory):
    """Twelve held-out shapes images for the kill tests: the eleven after the first keep the run
    busy for seconds (about 0.45 s each here), so the signal lands mid-run even when the test's
    polling is slow on a loaded machine (with four images a run once finished first)."""
    return scene_folder(tmp_path_factory.mktemp("queue"), QUEUE, 2_000_000_300)


def scene(k: int) -> np.ndarray:
    return shapes.render(2_000_000_400 + k, 64).image  # (64, 64, 3) uint8


def assert_one_line(text: str) -> None:
    """A user-facing failure: one non-empty line, no traceback, no Python class name."""
    assert text and "\n" not in text.strip(), text
    assert "Traceback" not in text and not CLASS_NAME.search(text), text


def assert_clean_stderr(err: str) -> None:
    assert "Traceback" not in err, err
    for line in err.splitlines():
        if line.startswith(("failed:", "nti-invert: error:", "invert.py: error:", "stopped:")):
            assert_one_line(line)


def rows(out) -> list[dict]:
    return records.read_jsonl(os.path.join(out, "results.jsonl"))[0]


def write_manifest(path, lines: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
    return str(path)


def finished(out, names) -> dict:
    """What a finished image is: its inversion file's mtime and every PNG's bytes."""
    state = {}
    for n in names:
        d = Path(out) / n
        state[n] = ((d / "inversion.safetensors").stat().st_mtime_ns, {f.name: f.read_bytes() for f in sorted(d.glob("*.png"))})
    return state


def done_names(out) -> list[str]:
    names = []
    for d in sorted(os.listdir(out)):
        try:
            with open(os.path.join(out, d, "metrics.json")) as f:
                if json.load(f).get("status") == "done":
                    names.append(d)
        except (OSError, ValueError):
            continue
    return names


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path, width: int, height: int, depth: int, colour: int, raw: bytes) -> None:
    """A PNG written by hand (PIL cannot write 48-bit RGB, nor a header that lies about its size)."""
    head = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    body = png_chunk(b"IHDR", head) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + body)


# ----------------------------------------------------------------------------------------------
# images: one run over a manifest of every kind


def image_cases(folder) -> dict:
    """name -> (manifest row, expected input.png or None, words of the error or None)."""
    rgb = scene(0)
    cases = {}

    def good(name, file, expected, **row):
        cases[name] = (dict(image=f"../imgs/{file}", prompt="a shape", name=name, **row), expected, None)

    def bad(name, file, words, **row):
        cases[name] = (dict(image=f"../imgs/{file}", prompt="a shape", name=name, **row), None, words)

    alpha = np.tile(np.arange(64, dtype=np.uint8)[None, :] * 4, (64, 1))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "rgba.png")
    good("rgba", "rgba.png", rgb)  # alpha dropped, as load_512's [:, :, :3]
    grey = rgb[..., 1]
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(folder / "la.png")
    good("la", "la.png", np.repeat(grey[..., None], 3, -1))
    palette = np.random.default_rng(1).integers(0, 256, (256, 3), dtype=np.uint8)
    index = (np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.tobytes())
    p.save(folder / "palette.png")
    good("palette", "palette.png", palette[index])
    v16 = (np.arange(64)[None, :] * 1024 + np.arange(64)[:, None] * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(v16).save(folder / "grey16.png")  # PIL: mode I;16, a 16-bit PNG
    good("grey16", "grey16.png", np.repeat(np.round(v16 / 257.0).astype(np.uint8)[..., None], 3, -1))
    rgb16 = np.random.default_rng(2).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    write_png(folder / "rgb16.png", 64, 64, 16, 2, b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(64)))
    good("rgb16", "rgb16.png", rgb16 / 257.0)  # to within one level (PIL keeps the high byte)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk.tif")
    good("cmyk", "cmyk.tif", rgb)  # PIL's RGB -> CMYK -> RGB is exact
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, :32] = (230, 30, 30)
    halves[:, 32:] = (30, 30, 230)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored picture is shown turned 90 degrees clockwise
    Image.fromarray(halves).save(folder / "exif.jpg", quality=95, exif=exif)
    good("exif", "exif.jpg", np.rot90(halves, -1))  # checked to JPEG accuracy below
    wide = np.concatenate([scene(k) for k in range(10)], axis=1)  # 640 x 64
    Image.fromarray(wide).save(folder / "wide.png")
    good("wide", "wide.png", wide[:, 288:352])  # the centred 64 x 64 square
    Image.fromarray(rgb).save(folder / "fine.png")
    good("blocked", "fine.png", None)  # OUT/blocked is a file: the image cannot be written
    Image.fromarray(rgb[:1, :1]).save(folder / "one.png")
    bad("one", "one.png", "too small")
    bad("cropped", "fine.png", "leaves nothing", crop=[40, 30, 0, 0])
    bad("narrow", "fine.png", "too small", crop=[0, 0, 0, 60])  # a 64 x 4 strip: a 4 x 4 square
    data = (folder / "fine.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    bad("truncated", "truncated.png", "cannot read image")
    (folder / "empty.png").write_bytes(b"")
    bad("empty", "empty.png", "cannot read image")
    (folder / "text.jpg").write_text("this is a caption, not a photo\n")
    bad("text", "text.jpg", "cannot read image")
    bad("missing", "missing.png", "not found")
    (folder / "folder.png").mkdir()
    bad("folder", "folder.png", "is a folder")
    write_png(folder / "bomb.png", 100_000, 100_000, 8, 0, b"\x00" * 16)
    bad("bomb", "bomb.png", "too large")
    return cases


@pytest.mark.slow
def test_bad_images_one_run(model, pipe, tmp_path, monkeypatch, capsys):
    """RGBA, LA, palette, 16-bit, CMYK, EXIF-rotated and very wide images are read as documented
    in nti_jax.io (each input.png against its expected pixels); 1x1, cropped-away, truncated, empty,
    text, missing, folder and decompression-bomb files fail one line each, and the library raises
    ValueError with the same words."""
    (tmp_path / "imgs").mkdir()
    cases = image_cases(tmp_path / "imgs")
    lists = tmp_path / "lists"
    lists.mkdir()
    m = write_manifest(lists / "m.jsonl", [row for row, _, _ in cases.values()])
    out = tmp_path / "out"
    out.mkdir()
    (out / "blocked").write_text("a file where the image's folder would go")
    monkeypatch.chdir(tmp_path / "imgs")  # image paths are relative to the manifest, not the cwd
    rc = cli.main(["--model", model, "--manifest", os.path.relpath(m), "--out", str(out), "--no-edits"] + FAST)
    err = capsys.readouterr().err
    assert rc == 1
    assert_clean_stderr(err)
    got = {r["name"]: r for r in rows(out)}
    assert list(got) == list(cases)
    for name, (row, expected, words) in cases.items():
        r = got[name]
        if name == "blocked":
            assert r["status"] == "failed" and "File exists" in r["error"] and str(out / "blocked") in r["error"]
            continue
        if words is not None:
            assert r["status"] == "failed" and words in r["error"], (name, r)
            assert_one_line(r["error"])
            assert err.count(f"failed: {name}: ") == 1
            path = os.path.normpath(os.path.join(lists, row["image"]))  # as the manifest resolves it
            with pytest.raises(ValueError) as e:
                nti_jax.invert(pipe, path, "a shape", crop=row.get("crop"))
            assert isinstance(e.value, nti_jax.NtiError) and str(e.value) == r["error"]
            continue
        assert r["status"] == "done", (name, r)
        seen = np.asarray(Image.open(out / name / "input.png"))
        if name == "rgb16":
            assert np.abs(seen - expected).max() <= 1
        elif name == "exif":
            assert np.abs(seen.astype(float) - expected).mean() < 6  # JPEG
            assert np.abs(seen.astype(float) - np.asarray(Image.open(tmp_path / "imgs" / "exif.jpg"))).mean() > 40
        else:
            np.testing.assert_array_equal(seen, expected, err_msg=name)


def test_library_arrays(pipe):
    """The library's arrays: uint16 scaled as 16-bit files are, other dtypes refused in one line."""
    v16 = np.random.default_rng(3).integers(0, 65536, (64, 64, 3), dtype=np.uint16)
    np.testing.assert_array_equal(nti_jax.io.load_image(v16, 64), np.round(v16 / 257.0).astype(np.uint8))
    with pytest.raises(ValueError, match="uint8") as e:
        nti_jax.invert(pipe, np.zeros((64, 64, 3), np.float32), "a shape")
    assert_one_line(str(e.value))


# ----------------------------------------------------------------------------------------------
# prompts: one run


LONG = CAPTION + " " + " ".join(["next to a small round dot"] * 16) + " and a cat"  # 108 tokens


@pytest.fixture(scope="module")
def prompt_run(model, tmp_path_factory):
    """One CLI run over a manifest of bad prompts: (exit status, stderr, rows by name, OUT)."""
    folder = tmp_path_factory.mktemp("prompts")
    Image.fromarray(scene(1)).save(folder / "a.png")
    replace = {"kind": "replace", "blend_words": [["square"], ["square"]]}
    lines = [
        {"image": "a.png", "name": "empty", "prompt": ""},
        {"image": "a.png", "name": "blank", "prompt": " \t "},
        {"image": "a.png", "name": "long", "prompt": LONG},
        {"image": "a.png", "name": "long-edit", "prompt": LONG, "edits": [{"prompt": LONG[: -len("cat")] + "dog", "kind": "replace", "blend_words": [["cat"], ["dog"]]}]},
        {"image": "a.png", "name": "accents", "prompt": "un carré bleu sur fond violet ✓ 猫"},
        {"image": "a.png", "name": "no-such-word", "prompt": CAPTION, "edits": [dict(replace, prompt="a red square on a purple background", blend_words=[["dog"], ["dog"]])]},
        {"image": "a.png", "name": "blank-edit", "prompt": CAPTION, "edits": [dict(replace, prompt="  ")]},
    ]
    m = write_manifest(folder / "m.jsonl", lines)
    out = folder / "out"
    err_file = folder / "stderr"
    with open(err_file, "w") as f, contextlib.redirect_stderr(f):
        rc = cli.main(["--model", model, "--manifest", m, "--out", str(out)] + FAST)
    return rc, err_file.read_text(), {r["name"]: r for r in rows(out)}, out


@pytest.mark.slow
def test_bad_prompts_one_run(prompt_run, pipe):
    """Empty and blank captions fail before the inversion; an over-long caption is inverted cut to
    77 tokens with the warning in results.jsonl and metrics.json; non-ASCII captions work; an edit
    naming a word its prompts lack, or a blank target, fails after the inversion, which is kept."""
    rc, err, got, out = prompt_run
    assert rc == 1
    assert_clean_stderr(err)
    status = {n: r["status"] for n, r in got.items()}
    assert status == {"empty": "failed", "blank": "failed", "long": "done", "long-edit": "failed", "accents": "done",
                      "no-such-word": "failed", "blank-edit": "failed"}
    for r in got.values():
        if "error" in r:
            assert_one_line(r["error"])
    assert "non-empty caption" in got["empty"]["error"] and "non-empty caption" in got["blank"]["error"]
    assert not (out / "empty").exists() and not (out / "blank").exists()  # refused before any device work
    for name in ("long", "long-edit"):
        (warning,) = got[name]["warnings"]
        assert "77 tokens" in warning and "a cat" in warning, warning
        assert json.loads((out / name / "metrics.json").read_text())["warnings"] == [warning]
    cond = np.asarray(nti_jax.Inversion.load(str(out / "long" / "inversion.safetensors")).cond_embeddings)
    with pytest.warns(nti_jax.PromptTruncatedWarning):
        other_tail = np.asarray(pipe.encode_prompt([LONG[: -len("cat")] + "dog"]))  # differs only past the cut
        other_head = np.asarray(pipe.encode_prompt(["a red" + LONG[len("a blue"):]]))  # differs before it
    assert np.abs(cond - other_tail).max() < 1e-5 and np.abs(cond - other_head).max() > 1e-2
    assert "'dog'" in got["no-such-word"]["error"] and "not found" in got["no-such-word"]["error"]
    assert "non-empty" in got["blank-edit"]["error"]
    for name in ("long-edit", "no-such-word", "blank-edit"):  # the inversion is kept: a rerun only edits
        assert (out / name / "inversion.safetensors").is_file() and (out / name / "reconstruction.png").is_file()
    # Non-ASCII words are found by the controller (host side, no device).
    src, tgt = "un carré bleu sur fond violet ✓", "un carré rouge sur fond violet ✓"
    ctl = controllers.Replace(blend=controllers.LocalBlend([["carré"], ["carré"]]))
    _, arrays = p2p.compile_controller(pipe, ctl, src, [tgt], 5, 16, False)
    assert np.asarray(arrays.blend_alpha).sum(axis=1).min() >= 1


@pytest.mark.slow
def test_edit_of_a_word_cut_off_names_the_word(prompt_run):
    """Issue 14: "edits whose words were cut off get a clear edit error naming the word"."""
    _, _, got, _ = prompt_run
    assert "'cat'" in got["long-edit"]["error"], got["long-edit"]["error"]


# ----------------------------------------------------------------------------------------------
# arguments, settings and manifests: exit 2 with one line, before any model is loaded


def cli_error(argv, capsys) -> str:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err, err
    message = err.split("error: ", 1)[1].strip()
    assert_one_line(message)
    return message


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--steps", "2000"], "num_steps", 2000),
        (["--guidance", "1000"], "guidance_scale", 1000.0),
        (["--guidance", "-1"], "guidance_scale", -1.0),
        (["--inner-steps", "20000"], "num_inner_steps", 20000),
    ],
)
def test_settings_out_of_range(argv, field, value, tmp_path, capsys):
    """The CLI exits 2 with the words the library's ValueError uses (its option for the field)."""
    message = cli_error(argv + ["--out", str(tmp_path / "o")], capsys)
    with pytest.raises(ValueError) as e:
        nti_jax.InvertSettings(**{field: value})
    assert message == str(e.value).replace(field, argv[0])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--steps", "0"], "positive integer"),
        (["--batch-size", "0"], "positive integer"),
        (["--early-stop-eps", "inf"], "finite"),
        (["--image", "{tmp}/a.png", "--prompt", " "], "--prompt is empty"),
        (["--image", "{tmp}/a.png", "--prompt", "a cat", "--edit", ""], "--edit is empty"),
        (["--out", "{tmp}/file/out"], "cannot create the output folder"),
        (["--out", "{tmp}/file"], "cannot create the output folder"),
    ],
)
def test_bad_arguments(argv, words, tmp_path, capsys):
    Image.fromarray(scene(2)).save(tmp_path / "a.png")
    (tmp_path / "file").write_text("not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "o")]
    assert words in cli_error(argv, capsys)


MANIFESTS = {
    "malformed": ('{"image": "a.png", "prompt": "a cat"}\n{"image": "a.png", "prompt": \n', "m.jsonl:2: not valid JSON"),
    "not-an-object": ('["a.png", "a cat"]\n', "m.jsonl:1: expected a JSON object"),
    "misspelt-key": ('{"image": "a.png", "prompt": "a cat", "edit": [{"prompt": "a dog"}]}\n', "m.jsonl:1: unknown key 'edit'; did you mean 'edits'?"),
    "misspelt-case": ('{"image": "a.png", "Prompt": "a cat"}\n', "did you mean 'prompt'?"),
    "unknown-setting": ('{"image": "a.png", "prompt": "a cat", "edits": [{"prompt": "a dog", "cross_replace": 0.5}]}\n', "unknown setting(s) cross_replace"),
    "bad-kind": ('{"image": "a.png", "prompt": "a cat", "edits": [{"prompt": "a dog", "kind": "swap"}]}\n', "m.jsonl:1: edit 1: edit kind must be auto, replace or refine; got 'swap'"),
    "bad-guidance": ('{"image": "a.png", "prompt": "a cat", "edits": [{"prompt": "a dog", "guidance": "strong"}]}\n', "m.jsonl:1: edit 1: edit guidance must be one of"),
    "bad-prox": ('{"image": "a.png", "prompt": "a cat", "edits": [{"prompt": "a dog", "guidance": "proximal", "prox_quantile": 2}]}\n', "m.jsonl:1: edit 1: proximal guidance needs"),
    "bad-crop": ('{"image": "a.png", "prompt": "a cat", "crop": [1, 2, true, 4]}\n', "m.jsonl:1: \"crop\" must be"),
    "duplicate-name": ('{"image": "a.png", "prompt": "a cat", "name": "x"}\n\n{"image": "b.png", "prompt": "a dog", "name": "x"}\n', "m.jsonl:3: \"name\" 'x' is also the output folder of"),
    "duplicate-folder": ('{"image": "a.png", "prompt": "a cat", "name": "my cat"}\n{"image": "b.png", "prompt": "a dog", "name": "my/cat"}\n', "m.jsonl:2: \"name\" 'my/cat' is also the output folder of"),
    "empty": ("", "lists no images"),
    "comments-only": ("# nothing yet\n\n", "lists no images"),
    "not-utf8": (b'{"image": "a.png", "prompt": "caf\xe9"}\n', "cannot read manifest"),
    "folder": (None, "is a folder"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_bad_manifests(case, tmp_path, capsys):
    text, words = MANIFESTS[case]
    path = tmp_path / "m.jsonl"
    if text is None:
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    message = cli_error(["--manifest", str(path), "--out", str(tmp_path / "o")], capsys)
    assert words in message, message
    if case == "bad-kind":  # the library's words, with the line in front
        with pytest.raises(ValueError) as e:
            controllers.controller_from_settings("a cat", ["a dog"], {"kind": "swap"})
        assert message.endswith(str(e.value))


@pytest.mark.parametrize(
    "setting, value",
    [("cross_replace_steps", 1.5), ("self_replace_steps", [0.6, 0.2]), ("blend_threshold", 2.0), ("blend_start", -0.5)],
)
def test_edit_setting_ranges_exit_2(setting, value, tmp_path, capsys):
    """Edit settings out of range stop the run when the manifest is read, naming the line, in the
    words of the library's ValueError."""
    edit = {"prompt": "a red square", "kind": "replace", "blend_words": [["square"], ["square"]], setting: value}
    m = write_manifest(tmp_path / "m.jsonl", [{"image": "a.png", "prompt": "a blue square", "edits": [edit]}])
    message = cli_error(["--manifest", m, "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")], capsys)
    with pytest.raises(ValueError) as e:
        controllers.controller_from_settings("a blue square", ["a red square"], {k: v for k, v in edit.items() if k != "prompt"})
    assert message == f"{m}:1: edit 1: {e.value}"


def test_command_line_edit_defaults_are_checked(tmp_path, capsys):
    Image.fromarray(scene(2)).save(tmp_path / "a.png")
    argv = ["--image", str(tmp_path / "a.png"), "--prompt", "a cat", "--edit", "a dog", "--edit-guidance", "proximal",
            "--prox-quantile", "5", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")]
    assert "proximal guidance needs" in cli_error(argv, capsys)


def test_manifest_paths_names_and_extra_keys(tmp_path, monkeypatch):
    """Paths are relative to the manifest (not the working folder); a byte-order mark and keys that
    are a row's own data (the samples' "seed", PIE-Bench's ids) are fine; file stems that clash get
    -2, -3, never a name another row gave."""
    sub = tmp_path / "lists"
    sub.mkdir()
    rows_ = [
        {"image": "../imgs/cat.png", "prompt": "a cat", "seed": 7, "pie_id": "000000000001"},
        {"image": "more/cat.png", "prompt": "a cat"},
        {"image": str(tmp_path / "abs" / "x.png"), "prompt": "x", "name": "cat-2"},
        {"image": "~/dog.png", "prompt": "a dog"},
    ]
    (sub / "m.jsonl").write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in rows_), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    items = manifest.collect_items(None, None, str(sub / "m.jsonl"))
    assert [it.image for it in items] == [
        str(tmp_path / "imgs" / "cat.png"), str(sub / "more" / "cat.png"),
        str(tmp_path / "abs" / "x.png"), os.path.expanduser("~/dog.png"),
    ]
    assert [it.name for it in items] == ["cat", "cat-3", "cat-2", "dog"]
    assert [it.where for it in items] == [f"{sub / 'm.jsonl'}:{n}" for n in (1, 2, 3, 4)]
    assert len(manifest.collect_items(None, None, None)) >= 2  # the bundled samples (with "seed") stay valid


# ----------------------------------------------------------------------------------------------
# models: one CLI case per class; the library raises the same words as ModelError


def _damage(kind: str, model: str, tmp_path) -> str:
    """A copy of `model` damaged as `kind`; returns the --model argument."""
    copy = str(tmp_path / "model")
    if kind in ("hub-id-offline",):
        return "nobody-here/no-such-model"
    shutil.copytree(model, copy)
    unet = Path(copy) / "unet" / "diffusion_pytorch_model.safetensors"
    if kind == "missing-component":
        shutil.rmtree(os.path.join(copy, "vae"))
    elif kind == "truncated-weights":
        data = unet.read_bytes()
        unet.write_bytes(data[: len(data) // 2])
    elif kind == "corrupt-weights":
        data = bytearray(unet.read_bytes())
        data[8:40] = b"\xff" * 32  # inside the JSON header
        unet.write_bytes(bytes(data))
    elif kind == "wrong-shapes":
        cfg_path = Path(copy) / "unet" / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["block_out_channels"] = [48, 48]
        cfg_path.write_text(json.dumps(cfg))
    elif kind == "pickles-only":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(str(unet)), str(unet.with_suffix(".bin")))
        unet.unlink()
    elif kind == "file-not-folder":
        return str(unet)
    return copy


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing-component", "vae"),
        ("truncated-weights", "diffusion_pytorch_model.safetensors"),
        ("corrupt-weights", "diffusion_pytorch_model.safetensors"),
        ("wrong-shapes", "shape"),
        ("pickles-only", "allow_pickle"),
        ("hub-id-offline", "nobody-here/no-such-model"),
        ("file-not-folder", "is a file, not a diffusers folder"),
    ],
)
def test_bad_models(kind, words, model, tmp_path, monkeypatch, capsys):
    if kind == "hub-id-offline":
        import huggingface_hub.constants as hf

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    arg = _damage(kind, model, tmp_path)
    Image.fromarray(scene(3)).save(tmp_path / "a.png")
    message = cli_error(["--model", arg, "--image", str(tmp_path / "a.png"), "--prompt", "a shape", "--out", str(tmp_path / "o")], capsys)
    assert message.startswith("cannot load the model: ") and words in message, message
    assert not (tmp_path / "o" / "results.jsonl").exists()
    with pytest.raises(nti_jax.ModelError) as e:
        nti_jax.load_pipeline(arg)
    assert message == f"cannot load the model: {e.value}"


# ----------------------------------------------------------------------------------------------
# runs: a folder holding another image's work, kill -9, SIGTERM, a full disk


@pytest.mark.slow
def test_folder_of_another_image_is_never_overwritten(model, scenes, tmp_path, capsys):
    out = tmp_path / "out"
    a = write_manifest(tmp_path / "a.jsonl", [{"image": str(scenes / "img0.png"), "prompt": "a shape", "name": "x"}])
    assert cli.main(["--model", model, "--manifest", a, "--out", str(out), "--no-edits"] + FAST) == 0
    before = finished(out, ["x"])
    b = write_manifest(tmp_path / "b.jsonl", [{"image": str(scenes / "img1.png"), "prompt": "a shape", "name": "x"}])
    assert cli.main(["--model", model, "--manifest", b, "--out", str(out), "--no-edits"] + FAST) == 1
    (row,) = rows(out)
    assert row["status"] == "failed" and "holds the results of another image" in row["error"] and "--force" in row["error"]
    assert_one_line(row["error"])
    assert_clean_stderr(capsys.readouterr().err)
    assert finished(out, ["x"]) == before


def test_damaged_results_are_redone_and_checked(model, scenes, tmp_path, capsys):
    """Truncated, deleted and bit-flipped result files: --check names each damaged image (exit 1);
    a rerun redoes what the size check finds (an intact inversion is reused) and says so, a rerun
    with --verify what only the SHA-256 finds; then every file is intact (--check: exit 0)."""
    out = tmp_path / "out"
    argv = ["--model", model, "--image", str(scenes / "img[0-2].png"), "--prompt", "a shape", "--out", str(out), "--no-edits"] + FAST
    assert cli.main(argv) == 0
    inv = {n: out / n / "inversion.safetensors" for n in ("img0", "img1", "img2")}
    stamp = {n: f.stat().st_mtime_ns for n, f in inv.items()}
    recon = (out / "img1" / "reconstruction.png").read_bytes()
    size = inv["img0"].stat().st_size
    inv["img0"].write_bytes(inv["img0"].read_bytes()[:1000])
    (out / "img1" / "reconstruction.png").unlink()
    flipped = bytearray((out / "img2" / "reconstruction.png").read_bytes())
    flipped[len(flipped) // 2] ^= 1
    (out / "img2" / "reconstruction.png").write_bytes(bytes(flipped))
    capsys.readouterr()
    assert cli.main(["--check", str(out)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"img0: inversion.safetensors is 1000 bytes, recorded {size}", "img1: reconstruction.png is missing",
                     "img2: reconstruction.png does not match its recorded SHA-256"]
    assert cli.main(argv) == 0  # sizes only: the bit flip passes
    std = capsys.readouterr()
    assert_clean_stderr(std.err)
    assert "2 done, 1 skipped, 0 failed (2 redone: their files were damaged)" in std.out
    assert "redoing img0: inversion.safetensors is 1000 bytes" in std.err
    got = {r["name"]: r for r in rows(out)}
    assert [got[n]["status"] for n in inv] == ["done", "done", "skipped"]
    assert got["img0"]["repaired"].startswith("inversion.safetensors is 1000 bytes") and got["img1"]["repaired"] == "reconstruction.png is missing"
    assert inv["img0"].stat().st_mtime_ns != stamp["img0"] and inv["img1"].stat().st_mtime_ns == stamp["img1"]  # reused
    assert (out / "img1" / "reconstruction.png").read_bytes() == recon
    assert cli.main(argv + ["--verify"]) == 0
    assert_clean_stderr(capsys.readouterr().err)
    got = {r["name"]: r for r in rows(out)}
    assert [got[n]["status"] for n in inv] == ["skipped", "skipped", "done"]
    assert "does not match" in got["img2"]["repaired"] and inv["img2"].stat().st_mtime_ns == stamp["img2"]
    assert cli.main(["--check", str(out)]) == 0
    assert capsys.readouterr().out == ""
    assert nti_jax.Inversion.load(str(inv["img0"])).num_images == 1


def run_until_first_image(model, scenes, out, cache_dir, tmp_path) -> subprocess.Popen:
    """scripts/invert.py on the queue's images, returned once img0's metrics.json exists."""
    cmd = [sys.executable, SCRIPT, "--model", model, "--image", str(scenes / "img*.png"), "--prompt", "a shape",
           "--out", str(out), "--no-edits"] + FAST
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=testing.script_env(cache_dir))
    t0 = time.time()
    while not (out / "img0" / "metrics.json").exists():
        if proc.poll() is not None or time.time() - t0 > 600:
            proc.kill()
            pytest.fail(f"the run ended before its first image: {(tmp_path / 'stderr').read_text()[-3000:]}")
        time.sleep(0.02)
    return proc


def rerun_keeps_finished(model, scenes, out, capsys) -> None:
    """A rerun skips every image finished before the kill, untouched, and does the rest."""
    names = done_names(out)
    assert "img0" in names and len(names) < QUEUE, names  # the kill landed mid-run
    before = finished(out, names)
    argv = ["--model", model, "--image", str(scenes / "img*.png"), "--prompt", "a shape", "--out", str(out), "--no-edits"] + FAST
    assert cli.main(argv) == 0
    assert_clean_stderr(capsys.readouterr().err)
    status = {r["name"]: r["status"] for r in rows(out)}
    assert status == {f"img{k}": "skipped" if f"img{k}" in names else "done" for k in range(QUEUE)}
    assert finished(out, names) == before


@pytest.mark.slow
def test_kill_9_then_rerun(model, queue, cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    proc = run_until_first_image(model, queue, out, cache_dir, tmp_path)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    rerun_keeps_finished(model, queue, out, capsys)


@pytest.mark.slow
def test_sigterm_then_rerun(model, queue, cache_dir, tmp_path, capsys):
    """SIGTERM stops the run as Ctrl-C does: exit 130, results.jsonl with the rest pending."""
    out = tmp_path / "out"
    proc = run_until_first_image(model, queue, out, cache_dir, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 130
    assert_clean_stderr((tmp_path / "stderr").read_text())
    assert "interrupted: " in (tmp_path / "stdout").read_text()
    status = [r["status"] for r in rows(out)]
    assert status[0] == "done" and "pending" in status and set(status) <= {"done", "pending"}, status
    rerun_keeps_finished(model, queue, out, capsys)


@contextlib.contextmanager
def small_disk(path, kind: str):
    """A 1 MiB tmpfs at `path` for kind "tmpfs" where this process may mount one (root); else a
    plain folder: yields the kind `full_disk` then uses ("fsize" when mounting is not permitted)."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(path)]
    ok = kind == "tmpfs" and subprocess.run(mount, capture_output=True, check=False).returncode == 0
    try:
        yield "tmpfs" if ok else "fsize"
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def full_disk(path, kind: str):
    """Writes over a few KB fail: the tmpfs filled to its last 16 KB (ENOSPC), or this process's
    RLIMIT_FSIZE at 40 KB with SIGXFSZ ignored (EFBIG), as the kernel does for either."""
    if kind == "tmpfs":
        st = os.statvfs(path)
        filler = os.path.join(path, "filler")
        with open(filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - 16384))
        try:
            yield "No space left on device"
        finally:
            os.remove(filler)
        return
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, limits[1]))
    try:
        yield "File too large"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, old)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tmpfs", "fsize"])
def test_disk_full(kind, model, scenes, tmp_path, capsys):
    """A disk that fills up (a full tmpfs: ENOSPC; a file-size limit: EFBIG): the image being
    written fails with the system's words naming its file, the run stops cleanly (exit 1, the rest
    pending), finished images are untouched; once there is room a rerun does the rest."""
    with small_disk(tmp_path / "disk", kind) as used:
        out = tmp_path / "disk" / "out"
        argv = ["--model", model, "--image", str(scenes / "img*.png"), "--prompt", "a shape", "--out", str(out), "--no-edits"] + FAST
        assert cli.main(argv[:3] + [str(scenes / "img0.png")] + argv[4:]) == 0
        before = finished(out, ["img0"])
        capsys.readouterr()
        with full_disk(tmp_path / "disk", used) as words:
            rc = cli.main(argv)
        err = capsys.readouterr().err
        assert rc == 1
        assert_clean_stderr(err)
        assert f"stopped: {words}" in err
        got = rows(out)
        assert [r["status"] for r in got] == ["skipped", "failed", "pending", "pending"]
        # the first file of img1 that did not fit: its folder, its claim, or a file its claim stages
        where = (out / "img1", out / ".nti-run" / "claims" / "img1", out / ".nti-run" / "stage" / "img1.")
        assert got[1]["error"].startswith(tuple(f"{words}: {w}" for w in where)), got[1]["error"]
        assert_one_line(got[1]["error"])
        assert finished(out, ["img0"]) == before
        assert not [f for d in os.listdir(out) if os.path.isdir(out / d) for f in os.listdir(out / d) if f.startswith(".tmp-")]
        assert cli.main(argv) == 0
        assert [r["status"] for r in rows(out)] == ["skipped", "done", "done", "done"]
        assert finished(out, ["img0"]) == before


@pytest.mark.parametrize("kind", ["tmpfs", "fsize"])
def test_results_file_on_a_full_disk(kind, tmp_path, capsys):
    """Rows that cannot be appended to the worker's rows file are kept and the run told to stop;
    the final rewrite and the merge that fail too are one line each on stderr, and the rows are
    still returned."""
    share = [manifest.Item(index=k, image=f"img{k}.png", prompt="a shape", edits=[], name=f"img{k}") for k in range(40)]
    with small_disk(tmp_path / "disk", kind) as used:
        log = ledger.Ledger(str(tmp_path / "disk" / "out"), "key")
        log.open()
        with full_disk(tmp_path / "disk", used) as words:
            if used == "tmpfs":  # not even the last 16 KB
                with contextlib.suppress(OSError), open(tmp_path / "disk" / "rest", "wb") as f:
                    f.write(b"\0" * 16384)
            else:
                resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            for it in share[:30]:
                log.record(it, "failed", "x" * 600)
            log.close()
            with log.merged(share) as got:
                pass
    assert log.stop is not None and log.stop.startswith(words), log.stop
    assert [r["status"] for r in got] == ["failed"] * 30 + ["pending"] * 10
    err = capsys.readouterr().err
    assert f"could not write {log.path}: {words}" in err and "Traceback" not in err
    assert f"could not write {log.out}/results.jsonl: {words}" in err
