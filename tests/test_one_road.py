"""One road: the library and the command line run the same compiled programs. After the library
has inverted, reconstructed and edited an image, the same run through the command line, in the
same process and on the same shapes, compiles nothing and looks nothing up in the persistent
compilation cache: every program it runs is an executable the library's calls left in memory."""

import json
import os

import numpy as np
from PIL import Image

import nti_jax
from nti_jax import testing
from nti_jax.core import controllers
from nti_jax.run import cli

SRC = "a red circle on a blue background"
TGT = "a green circle on a blue background"


def test_the_command_line_reuses_the_library_programs(model, tmp_path):
    pipe = nti_jax.load_pipeline(model)
    path = str(tmp_path / "in.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (pipe.image_size,) * 2 + (3,), dtype=np.uint8)).save(path)
    inv = nti_jax.invert(pipe, path, SRC, num_steps=4, num_inner_steps=2)
    nti_jax.reconstruct(pipe, inv)
    # The command line's edit: its default edit guidance on a one-edit controller.
    ctrl = controllers.controller_from_settings(SRC, [TGT], {"guidance": cli.DEFAULT_EDIT_GUIDANCE})
    edited = nti_jax.edit(pipe, inv, [TGT], controller=ctrl)

    out = str(tmp_path / "out")
    argv = ["--model", model, "--image", path, "--prompt", SRC, "--edit", TGT, "--steps", "4", "--inner-steps", "2", "--out", out]
    with testing.compile_log() as log:
        assert cli.main(argv) == 0
    assert (log.compiles, log.cache_lookups) == (0, 0)

    # ... and made the same image (a check that the two runs were the same run).
    (row,) = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert row["status"] == "done"
    folder = os.path.join(out, row["name"])
    ours = np.asarray(Image.open(os.path.join(folder, sorted(f for f in os.listdir(folder) if f.startswith("edit"))[0])))
    np.testing.assert_allclose(ours[..., :3] / 255.0, edited[-1], atol=1.5 / 255)
