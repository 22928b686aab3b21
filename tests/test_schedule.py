"""The DDIM schedule PIE-Bench's harness really samples, pinned (issue 22).

PnPInversion's `models/p2p_editor.py` (cure-lab/PnPInversion @ 07f97f4), like the authors'
`null_text_w_ptp.ipynb` (google/prompt-to-prompt), builds its DDIM scheduler without
`steps_offset` (default 0) and hands it to `StableDiffusionPipeline`, whose `__init__` rewrites an
offset other than 1 to 1 (a deprecation fix). So the harness samples 981, 961, ..., 1, as
nti-jax does; this test builds that scheduler the same way and compares.
"""

import numpy as np
import pytest
from diffusers import DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer

from nti_jax.run import cli
from nti_jax import load_pipeline, testing
from nti_jax.pie import bench as pie_bench
from nti_jax.core.sampling import model_schedule
from nti_jax.core.schedule import ddim_schedule

RTOL = 1e-5
# CompVis/stable-diffusion-v1-4's scheduler/scheduler_config.json, the model PIE-Bench runs.
SD14_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                  "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "trained_betas": None, "clip_sample": False}


@pytest.fixture(scope="module")
def harness_schedule():
    """(timesteps, alpha_t, alpha_prev) of the harness's scheduler after StableDiffusionPipeline, 50 steps."""
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False)
    assert sched.config.steps_offset == 0  # as the harness and the notebook build it
    text = testing.TEXT_TINY
    pipe = StableDiffusionPipeline(vae=testing.tiny_vae(), text_encoder=testing.tiny_text_encoder(text),
                                   tokenizer=CLIPTokenizer.from_pretrained(testing.TOKENIZER_DIR),
                                   unet=testing.tiny_unet(dict(testing.UNET_MINI, cross_attention_dim=text["hidden_size"])),
                                   scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    s = pipe.scheduler
    assert s.config.steps_offset == 1  # the pipeline's rewrite
    s.set_timesteps(50)
    ts = s.timesteps.numpy()
    prev = ts - s.config.num_train_timesteps // 50
    ac = s.alphas_cumprod.numpy()
    a_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], s.final_alpha_cumprod.numpy())
    return ts, ac[ts], a_prev


def test_the_harness_samples_981_to_1(harness_schedule):
    ts, _, _ = harness_schedule
    np.testing.assert_array_equal(ts, np.arange(981, 0, -20))


def test_the_library_and_the_pie_bench_path_pin_the_harness_schedule(harness_schedule, tmp_path):
    steps = cli.settings_from_args(cli.build_parser().parse_args(["--pie-bench", "PIE-Bench_v1"])).num_steps
    assert steps == pie_bench.RUN_SETTINGS["steps"] == 50  # what --pie-bench runs, the harness's 50
    pipe = load_pipeline(testing.make_tiny_sd(str(tmp_path / "sd"), "sd1"))
    ts, a_t, a_prev = harness_schedule
    for got in (model_schedule(pipe, steps), ddim_schedule(SD14_SCHEDULER, steps)):  # the library; --pie-bench on SD 1.4
        np.testing.assert_array_equal(np.asarray(got.timesteps), ts)
        # numpy's float32 cumprod vs torch's: 1.2e-6 relative at most
        np.testing.assert_allclose(np.asarray(got.alpha_t), a_t, rtol=RTOL)
        np.testing.assert_allclose(np.asarray(got.alpha_prev), a_prev, rtol=RTOL)
    offset0 = ddim_schedule(dict(SD14_SCHEDULER, steps_offset=0), steps)  # the config as a reader of their code sees it
    assert offset0.timesteps[0] == 980
    assert not np.allclose(offset0.alpha_t, a_t, rtol=RTOL) and not np.allclose(offset0.alpha_prev, a_prev, rtol=RTOL)
