"""PIE-Bench support: the mask codec, reading mapping_file.json into manifest rows as
PnPInversion's run_editing_p2p.py sets edits up, the metrics against torchmetrics and closed
forms, the harness's output layout, and a small toy run through the CLI."""

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from nti_jax.run import cli
from nti_jax.pie import bench as pb
from nti_jax.pie import metrics as pm
from nti_jax.toy import pie_layout, shapes

EDIT = {"kind": "refine", "cross_replace_steps": 0.4, "self_replace_steps": 0.6}
BLEND = {"blend_threshold": 0.3, "blend_start": 0.2}


def _load(path):
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- masks


def test_mask_decode_hand_worked():
    # 5x6 frame (30 pixels): run [8, 2] -> flat 8, 9 = row 1, cols 2-3; run [26, 99] is cut at the
    # end (flat 26-29 = row 4, cols 2-5); run [40, 3] starts past the end: nothing. Then the border.
    got = pb.mask_decode([8, 2, 26, 99, 40, 3], shape=(5, 6))
    want = np.array(
        [
            [1, 1, 1, 1, 1, 1],
            [1, 0, 1, 1, 0, 1],
            [1, 0, 0, 0, 0, 1],
            [1, 0, 0, 0, 0, 1],
            [1, 1, 1, 1, 1, 1],
        ],
        np.float64,
    )
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    border_only = pb.mask_decode([])  # 512x512: the one-pixel frame alone
    assert border_only.shape == (512, 512) and border_only.sum() == 4 * 512 - 4


def test_mask_encode_round_trip():
    rng = np.random.default_rng(0)
    m = rng.random((512, 512)) < 0.3
    m[100:200, 50:300] = True
    enc = pb.mask_encode(m)
    assert len(enc) % 2 == 0 and all(isinstance(v, int) for v in enc)
    want = m.astype(np.float64)
    want[0, :] = want[-1, :] = want[:, 0] = want[:, -1] = 1
    np.testing.assert_array_equal(pb.mask_decode(enc), want)
    assert pb.mask_encode(np.zeros((4, 4))) == [] and pb.mask_encode(np.ones((2, 3))) == [0, 6]
    assert pb.mask_encode(np.array([[0, 1, 1], [1, 0, 1]])) == [1, 3, 5, 1]


def test_toy_layout_masks_are_the_true_regions(tmp_path):
    folder = pie_layout.build_toy_pie_bench(str(tmp_path / "toy"), 1, seed=5, types=("1", "6", "8"))
    mapping = _load(os.path.join(folder, "mapping_file.json"))
    assert sorted(mapping) == ["100000000000", "600000000000", "800000000000"]
    for e in mapping.values():
        seed = pie_layout.SEED_BASE + 5 * 10_000 + int(e["editing_type_id"]) * 1000
        s = shapes.render(seed, 512)
        src = pb.strip_brackets(e["original_prompt"])
        assert src == s.caption
        img = np.asarray(Image.open(os.path.join(folder, "annotation_images", e["image_path"])))
        assert img.shape == (512, 512, 3) and np.sqrt(np.mean((img - s.image.astype(float)) ** 2)) < 1.5  # JPEG q95
        tgt = pb.strip_brackets(e["editing_prompt"]).split()
        if e["editing_type_id"] == "6":
            region = s.mask > 0
            assert e["blended_word"] == f"{s.shape} {s.shape}" and tgt[1] not in (s.color, s.background)
        elif e["editing_type_id"] == "1":
            region = (s.mask > 0) | (shapes.render(seed, 512, color=s.color, shape=tgt[2], background=s.background).mask > 0)
            assert e["blended_word"] == f"{s.shape} {tgt[2]}" and tgt[2] != s.shape
        else:
            region = s.mask < 1
            assert e["blended_word"] == "background background" and tgt[5] not in (s.color, s.background)
        want = region.astype(np.float64)
        want[0, :] = want[-1, :] = want[:, 0] = want[:, -1] = 1
        np.testing.assert_array_equal(pb.mask_decode(e["mask"]), want)
    with pytest.raises(ValueError, match="toy PIE-Bench has editing types"):
        pie_layout.build_toy_pie_bench(str(tmp_path / "x"), 1, types=("3",))


# ---------------------------------------------------------------------------------------------- mapping -> rows


def _entry(type_id="6", original="a [red] circle on a blue background", editing="a [green] circle on a blue background",
           blended="circle circle", image="6_change_attribute_color_40/a.jpg", mask=(10, 5)):
    return {
        "image_path": image,
        "original_prompt": original,
        "editing_prompt": editing,
        "editing_instruction": "do it",
        "editing_type_id": type_id,
        "blended_word": blended,
        "mask": list(mask),
    }


def _write(folder, mapping, images=()):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "mapping_file.json"), "w") as f:
        json.dump(mapping, f)
    for rel in images:
        path = os.path.join(folder, "annotation_images", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.new("RGB", (512, 512), "gray").save(path)
    return str(folder)


def test_read_benchmark_rows(tmp_path):
    mapping = {
        "600000000001": _entry(),
        "900000000002": _entry("9", "a photo of a cat", "a [watercolor painting] of a cat", "", "9_change_style_80/b.jpg"),
        "100000000003": _entry("1", "a cat on a mat", "a dog, on a mat", "cat dog", "1_change_object_80/c.jpg"),
    }
    folder = _write(tmp_path / "d", mapping, [e["image_path"] for e in mapping.values()])
    rows = pb.read_benchmark(folder)
    assert [r["pie_id"] for r in rows] == list(mapping)
    r = rows[0]
    assert r == {
        "image": os.path.join(os.path.abspath(folder), "annotation_images", "6_change_attribute_color_40/a.jpg"),
        "prompt": "a red circle on a blue background",
        "name": "600000000001",
        "crop": None,
        "edits": [{"prompt": "a green circle on a blue background", **EDIT, "equalizer": {"circle": 2.0},
                   "blend_words": [["circle"], ["circle"]], **BLEND}],
        "pie_id": "600000000001",
        "editing_type_id": "6",
        "image_path": "6_change_attribute_color_40/a.jpg",
    }
    # no blended word: Refine alone
    assert rows[1]["prompt"] == "a photo of a cat"
    assert rows[1]["edits"] == [{"prompt": "a watercolor painting of a cat", **EDIT}]
    # a blended word missing from its prompt ("dog," is not "dog") does nothing, as in the harness
    assert rows[2]["edits"] == [{"prompt": "a dog, on a mat", **EDIT, "blend_words": [["cat"], []], **BLEND}]
    # type filter
    assert [r["pie_id"] for r in pb.read_benchmark(folder, {"9", "1"})] == ["900000000002", "100000000003"]
    with pytest.raises(ValueError, match="no PIE-Bench entries of type"):
        pb.read_benchmark(folder, {"3"})
    with pytest.raises(ValueError, match="unknown PIE-Bench editing type"):
        pb.read_benchmark(folder, {"12"})
    assert pb.parse_types("0, 6") == {"0", "6"} and pb.parse_types("") is None
    with open(pb.write_manifest(rows, str(tmp_path / "m.jsonl"))) as f:
        lines = f.read().splitlines()
    assert [json.loads(x) for x in lines] == rows


@pytest.mark.parametrize(
    "key, change, message",
    [
        ("12", {}, "id '12': ids are 12-digit strings"),
        ("600000000001", {"drop": "blended_word"}, "id 600000000001: missing field\\(s\\) blended_word"),
        ("600000000001", {"editing_type_id": "10"}, "editing_type_id '10' is not one of 0-9"),
        ("600000000001", {"editing_type_id": 6}, "editing_type_id must be a string"),
        ("600000000001", {"image_path": "../x.jpg"}, "image_path '../x.jpg' must be a path inside annotation_images/"),
        ("600000000001", {"image_path": "6/missing.jpg"}, "image .*6/missing.jpg not found"),
        ("600000000001", {"editing_prompt": "[]"}, "editing_prompt is empty"),
        ("600000000001", {"blended_word": "circle"}, "blended_word 'circle' must be"),
        ("600000000001", {"mask": [1, 2, 3]}, "mask must be a list of \\[start, length\\] integer pairs"),
        ("600000000001", {"mask": [1, -2]}, "mask has a negative value"),
        ("600000000001", {"mask": [512 * 512, 1]}, "start outside the 512x512 frame"),
    ],
)
def test_read_benchmark_bad_entry(tmp_path, key, change, message):
    e, change = _entry(), dict(change)
    drop = change.pop("drop", None)
    if drop:
        del e[drop]
    e.update(change)
    folder = _write(tmp_path / "d", {key: e}, ["6_change_attribute_color_40/a.jpg"])
    with pytest.raises(ValueError, match=message) as err:
        pb.read_benchmark(folder)
    assert "\n" not in str(err.value)


def test_read_benchmark_bad_files(tmp_path):
    with pytest.raises(ValueError, match="mapping_file.json not found"):
        pb.read_benchmark(str(tmp_path))
    (tmp_path / "mapping_file.json").write_text("{oops")
    with pytest.raises(ValueError, match="cannot read .*mapping_file.json"):
        pb.read_benchmark(str(tmp_path))
    (tmp_path / "mapping_file.json").write_text('{"600000000001": 3}')
    with pytest.raises(ValueError, match="id 600000000001: the entry must be an object"):
        pb.read_benchmark(str(tmp_path))


# ---------------------------------------------------------------------------------------------- metrics


def _evaluate_py(src, tgt, region, valid=True, dtype=np.float32):
    """evaluate.py's calculate_psnr / calculate_mse / calculate_ssim with torchmetrics (float32 as
    evaluate.py; float64 to compare without float32 rounding)."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure
    from torchmetrics.image import PeakSignalNoiseRatio
    from torchmetrics.regression import MeanSquaredError

    m = np.repeat(region[..., None], 3, axis=2).astype(dtype)
    a = np.asarray(src).astype(dtype) / 255 * m
    b = np.asarray(tgt).astype(dtype) / 255 * m
    ta, tb = torch.tensor(a).permute(2, 0, 1).unsqueeze(0), torch.tensor(b).permute(2, 0, 1).unsqueeze(0)
    psnr = PeakSignalNoiseRatio(data_range=1.0)(ta, tb).item()
    mse = MeanSquaredError()(ta[0].contiguous(), tb[0].contiguous()).item()
    full, ssim_map = structural_similarity_index_measure(tb, ta, data_range=1.0, return_full_image=True)
    ssim = ssim_map[..., 5:-5, 5:-5].mean().item() if valid else full.item()  # torchmetrics < 1.5 cropped 5 px
    return psnr, mse, ssim


def test_masked_metrics_against_torchmetrics():
    rng = np.random.default_rng(1)
    src = shapes.render(7, 512).image
    tgt = np.clip(src.astype(int) + rng.integers(-30, 31, src.shape), 0, 255).astype(np.uint8)
    region = 1 - pb.mask_decode(pb.mask_encode(shapes.render(7, 512).mask > 0))
    for border, valid in (("valid", True), ("full", False)):
        got = pm.masked_metrics(src, tgt, region, ssim_border=border)
        psnr, mse, ssim = _evaluate_py(src, tgt, region, valid, np.float64)
        assert got["psnr"] == pytest.approx(psnr, abs=1e-5)  # the PSNR metric keeps float32 state
        assert got["mse"] == pytest.approx(mse, rel=1e-6)
        assert got["ssim"] == pytest.approx(ssim, abs=1e-9)
        psnr, mse, ssim = _evaluate_py(src, tgt, region, valid)  # evaluate.py's float32 rounding: 4e-5 in SSIM here
        assert got["psnr"] == pytest.approx(psnr, abs=1e-4) and got["mse"] == pytest.approx(mse, rel=1e-5)
        assert got["ssim"] == pytest.approx(ssim, abs=1e-4)
    assert pm.masked_metrics(src, tgt, region)["ssim"] != pm.masked_metrics(src, tgt, region, "full")["ssim"]


def test_masked_metrics_closed_forms():
    region = np.zeros((512, 512))
    region[:128] = 1  # a quarter of the frame
    src = np.zeros((512, 512, 3), np.uint8)
    tgt = np.full((512, 512, 3), 51, np.uint8)  # 0.2 everywhere
    got = pm.masked_metrics(src, tgt, region)
    assert got["mse"] == pytest.approx(0.04 / 4, rel=1e-12)  # masked-out pixels are 0 in both
    assert got["psnr"] == pytest.approx(10 * math.log10(4 / 0.04), rel=1e-12)
    # constant images: variances and covariance vanish, SSIM = (2 a b + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.7
    c1 = 0.01**2
    const = lambda v: np.full((40, 40, 3), v)
    assert pm.ssim(const(a), const(b)) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-12)
    assert pm.ssim(const(a), const(a), border="full") == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="border must be"):
        pm.ssim(const(a), const(b), border="same")
    empty = pm.masked_metrics(src, tgt, np.zeros((512, 512)))
    assert all(math.isnan(v) for v in empty.values())


def test_table_excludes_nan():
    per_image = [
        {"editing_type_id": "6", "psnr": 20.0, "mse": 0.01, "ssim": 0.5},
        {"editing_type_id": "6", "psnr": math.nan, "mse": math.nan, "ssim": math.nan},
        {"editing_type_id": "1", "psnr": 30.0, "mse": 0.03, "ssim": 0.9},
    ]
    t = pm._table(per_image, ["psnr", "mse", "ssim"])
    assert list(t) == ["1", "6", "all"]
    assert t["6"] == {"images": 2, "psnr": 20.0, "psnr_nan": 1, "mse": pytest.approx(100.0), "mse_nan": 1, "ssim": 50.0, "ssim_nan": 1}
    assert t["all"]["psnr"] == 25.0 and t["all"]["mse"] == pytest.approx(200.0) and t["all"]["ssim"] == pytest.approx(70.0)
    assert t["all"]["psnr_nan"] == 1 and t["all"]["images"] == 3


# ---------------------------------------------------------------------------------------------- layout


def _fake_run(out, row, method="null-text"):
    """A finished CLI result for one row: 64-px reconstruction (red) and edit (blue)."""
    folder = os.path.join(out, row["name"])
    os.makedirs(folder)
    Image.new("RGB", (64, 64), (200, 30, 30)).save(os.path.join(folder, "reconstruction.png"))
    Image.new("RGB", (64, 64), (30, 30, 200)).save(os.path.join(folder, "edit-1-x.png"))
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"status": "done", "method": method, "edits": [dict(row["edits"][0], file="edit-1-x.png")]}, f)


def test_pnp_layout_image(tmp_path):
    data = _write(tmp_path / "d", {"600000000001": _entry(), "600000000002": _entry(image="6/b.jpg")},
                  ["6_change_attribute_color_40/a.jpg", "6/b.jpg"])
    rows = pb.read_benchmark(data)
    out = str(tmp_path / "out")
    _fake_run(out, rows[0])
    got = pb.write_pnp_layout(out, data, rows)
    assert got == {"written": 1, "missing": ["600000000002"], "method": "null-text"}
    path = os.path.join(out, "pnp", "output", "null-text-inversion+p2p_a800", "annotation_images", "6_change_attribute_color_40/a.jpg")
    im = Image.open(path)
    assert im.format == "JPEG" and im.size == (2048, 512)
    px = np.asarray(im).astype(int)
    # each panel away from its edges (JPEG q75 rings where two panels meet)
    text, gt, recon, edit = (px[16:-16, k * 512 + 16 : (k + 1) * 512 - 16] for k in range(4))
    assert np.abs(gt - 128).max() <= 3  # the gray source
    assert np.abs(recon - [200, 30, 30]).max() <= 6 and np.abs(edit - [30, 30, 200]).max() <= 6
    assert (text > 240).all(axis=-1).mean() > 0.9 and (text < 100).all(axis=-1).any()  # dark text on white
    _fake_run(out, rows[1], method="ddim")
    with pytest.raises(ValueError, match="mixes inversion methods"):
        pb.write_pnp_layout(out, data, rows)


# ---------------------------------------------------------------------------------------------- end to end


def test_pie_bench_cli_bad_arguments(tmp_path, capsys):
    data = str(tmp_path / "nope")
    assert cli.main(["--pie-bench", data, "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["--pie-types", "6", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "mapping_file.json" in err[0] and "--pie-types goes with --pie-bench" in err[1]


@pytest.mark.slow
def test_toy_pie_bench_through_the_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("NTI_JAX_CACHE_DIR", str(tmp_path / "jax-cache"))
    data = pie_layout.build_toy_pie_bench(str(tmp_path / "data"), 1, seed=1, types=("0", "1", "6", "8"))
    mapping_path = os.path.join(data, "mapping_file.json")
    mapping = _load(mapping_path)
    mapping["800000000000"]["mask"] = [0, 512 * 512]  # everything edited: no unedited part -> NaN
    with open(mapping_path, "w") as f:
        json.dump(mapping, f)
    rows = pb.read_benchmark(data, {"1", "6", "8"})
    assert [r["pie_id"] for r in rows] == ["100000000000", "600000000000", "800000000000"]
    out = str(tmp_path / "out")
    assert cli.main(["--pie-bench", data, "--pie-types", "1,6,8", "--out", out, "--steps", "5", "--inner-steps", "2"]) == 0
    assert len(os.listdir(os.path.join(out, "pnp", "output", "null-text-inversion+p2p_a800", "annotation_images"))) > 0
    assert pb.write_pnp_layout(out, data, rows) == {"written": 3, "missing": [], "method": "null-text"}
    res = pm.evaluate(data, out, rows)
    assert _load(os.path.join(out, "pie_bench_metrics.json"))["table"] == res["table"]  # the CLI wrote the same
    assert res["pnp_method"] == "1_null-text-inversion+p2p_a800" and res["missing"] == []
    assert set(res["not_run"]) <= set(pm.MODEL_METRICS)
    t = res["table"]
    assert list(t) == ["1", "6", "8", "all"]
    assert t["8"]["images"] == 1 and t["8"]["psnr"] is None and t["8"]["psnr_nan"] == 1
    assert t["all"]["images"] == 3 and t["all"]["psnr_nan"] == 1 and t["all"]["ssim_nan"] == 1
    assert t["all"]["psnr"] == pytest.approx((t["1"]["psnr"] + t["6"]["psnr"]) / 2)
    # each type's figures (one image each) are evaluate.py's own on the written layout, in the
    # table's scaling (an independent torchmetrics run)
    for k in ("1", "6"):
        entry = mapping[k + "00000000000"]
        one = next(p for p in res["per_image"] if p["pie_id"] == k + "00000000000")
        src = np.asarray(Image.open(os.path.join(data, "annotation_images", entry["image_path"])))
        layout = np.asarray(Image.open(pb.pnp_image_path(out, "null-text", entry["image_path"])))
        psnr, mse, ssim = _evaluate_py(src, layout[:, -512:], 1 - pb.mask_decode(entry["mask"]), dtype=np.float64)
        assert one["psnr"] == pytest.approx(psnr, abs=1e-5) and one["mse"] == pytest.approx(mse, rel=1e-6)
        assert one["ssim"] == pytest.approx(ssim, abs=1e-9)
        assert (t[k]["psnr"], t[k]["mse"], t[k]["ssim"]) == pytest.approx((psnr, mse * 1e4, ssim * 1e2), rel=1e-6)
    saved = _load(os.path.join(out, "pie_bench_metrics.json"))
    assert saved["table"]["all"]["images"] == 3
    with open(os.path.join(out, "pie_bench_metrics.md")) as f:
        md = f.read()
    assert "| 6 change color | 1 |" in md and "| all | 3 |" in md
