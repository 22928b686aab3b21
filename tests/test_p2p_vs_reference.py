"""Prompt-to-Prompt against a PyTorch port of the authors' code (benchmarks/p2p_reference.py, issue 12).

Each case runs `nti_jax.core.api.edit_latents` and the oracle from the same inversion (x_T, phi, pivots,
embeddings) and compares the final latents and the stored cross-attention maps at 1e-4 relative.
Inversions are built directly (random pivots, a perturbed "" embedding as phi): the edit does
not care how they were found, and a real `invert` would cost a compile per model. The cases
cover each controller (nested Reweight too), LocalBlend with and without substruct_words, each
inversion method and each edit-time guidance on tiny SD 1.x (epsilon) and SD 2.x (v-prediction)
models and the shipped toy model, plus PIE-Bench's own set-up on a 64 x 64 latent, three prompts
and per-word windows (issue 22). Those newer cases run negative controls: the same edit with one
setting a step off must miss the oracle by more than the tolerance. The compiled programs they
need are kept few (each new static setting compiles once; windows and thresholds are arrays).
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nti_jax
from benchmarks import p2p_reference as ref
from benchmarks import torch_reference as tr
from nti_jax.core import api, controllers, p2p, seq_aligner
from nti_jax.pie import bench as pie_bench
from nti_jax import testing
from nti_jax.errors import PromptError
from nti_jax.core.inversion import Inversion
from nti_jax.core.sampling import model_schedule
from nti_jax.core.settings import InvertSettings

pytestmark = pytest.mark.slow  # every test here compiles or runs a model (minutes in all)

SRC = "a red circle on a blue background"
SWAP = "a green circle on a blue background"
ADD = "a big red circle on a blue background"
TOL = 1e-4


rel = testing.rel_err


class Case:
    """One model: the JAX pipeline, the torch UNet and synthetic inversions of SRC."""

    def __init__(self, folder: str, steps: int, seed: int = 0):
        from diffusers import UNet2DConditionModel

        self.pipe = nti_jax.load_pipeline(folder)
        self.unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        self.T = steps
        self.stores = {}  # the oracle's AttentionStore of SRC alone, per inversion method (`threshold`)
        self.latent = self.pipe.unet.config.sample_size
        self.res = ref.blend_resolution(self.unet, self.latent)
        self.sched = tr.DDIMSchedule(self.pipe.scheduler_config, steps)
        rng = np.random.default_rng(seed)
        c = self.pipe.unet.config
        shape = (1, steps + 1, self.latent, self.latent, c.in_channels)
        self.pivots = jnp.asarray(rng.standard_normal(shape), jnp.float32)
        self.empty = self.pipe.encode_prompt([""])  # (1, L, D)
        self.cond = self.pipe.encode_prompt([SRC])
        noise = 0.05 * rng.standard_normal((1, steps) + self.empty.shape[1:])
        self.phi = {"null-text": jnp.asarray(np.asarray(self.empty)[:, None] + noise, jnp.float32),
                    "negative-prompt": jnp.broadcast_to(self.cond[:, None], (1, steps) + self.cond.shape[1:]),
                    "direct": jnp.broadcast_to(self.empty[:, None], (1, steps) + self.empty.shape[1:])}

    def inversion(self, method: str) -> Inversion:
        T = self.T
        return Inversion(
            x_T=self.pivots[:, -1], pivots=self.pivots, null_embeddings=self.phi[method], cond_embeddings=self.cond,
            timesteps=model_schedule(self.pipe, T).timesteps, inner_iterations=jnp.zeros((1, T), jnp.int32),
            final_losses=jnp.zeros((1, T), jnp.float32), nonfinite=jnp.zeros((1, T), bool),
            settings=InvertSettings(method=method, num_steps=T), prompts=(SRC,),
            prediction_type=self.pipe.scheduler_config.get("prediction_type", "epsilon"),
        )

    def oracle(self, method: str, prompts, controller, **kw):
        """The oracle's final latents (R, h, w, C) and its aggregate_attention per row (R, s, s, L)."""
        nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2)
        cond = torch.from_numpy(np.array(self.pipe.encode_prompt(list(prompts))))
        phis = [torch.from_numpy(np.array(self.phi[method][0, i]))[None] for i in range(self.T)]
        pivots = [nchw(self.pivots[0, k][None]) for k in range(self.T + 1)]
        z = ref.edit(self.unet, self.sched, controller, nchw(self.pivots[:, -1]), cond, phis, method=method,
                     pivots=pivots, empty=torch.from_numpy(np.array(self.empty)), **kw)
        maps = np.stack([ref.aggregate_attention(controller, prompts, self.res, ("up", "down"), True, r).numpy()
                         for r in range(len(prompts))])
        return z.permute(0, 2, 3, 1).numpy(), maps

    def controller(self, prompts, replace=True, eq=None, blend=None, sub=None, th=(0.3, 0.3), cross=0.8, self_=0.4, max_self_queries=None):
        return ref.make_controller(list(prompts), replace, cross, self_, blend, eq, tokenizer=self.pipe.tokenizer,
                                   num_steps=self.T, res=self.res, latent_size=(self.latent, self.latent),
                                   max_self_queries=max_self_queries or (self.latent // 2) ** 2, substruct_words=sub, th=th)

    def threshold(self, word: str, q: float = 0.5, method: str = "null-text") -> float:
        """A LocalBlend threshold that cuts the source row's pooled, normalised map of `word` near
        its q-quantile, at the widest gap between values (so float noise cannot flip a pixel)."""
        if method not in self.stores:
            self.stores[method] = ref.AttentionStore()
            self.oracle(method, [SRC], self.stores[method])
        m = ref.aggregate_attention(self.stores[method], [SRC], self.res, ("up", "down"), True, 0)
        m = m[..., ref.get_word_inds(SRC, word, self.pipe.tokenizer)].sum(-1)[None, None]
        m = torch.nn.functional.max_pool2d(m, 3, 1, 1).flatten()
        v = np.sort((m / m.max()).numpy())
        lo, hi = int(len(v) * (q - 0.2)), int(len(v) * (q + 0.2))
        k = lo + int(np.argmax(np.diff(v[lo:hi])))
        return float((v[k] + v[k + 1]) / 2)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return Case(testing.make_tiny_sd(str(tmp_path_factory.mktemp("sd1")), "sd1", seed=5), steps=6)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return Case(testing.make_tiny_sd(str(tmp_path_factory.mktemp("sd2")), "sd2", seed=6), steps=6, seed=1)


@pytest.fixture(scope="module")
def sd64(tmp_path_factory):
    """SD's geometry at 512 px: a 64 x 64 latent, attention down at 64, 32 and 16 and up at 16 and
    32 (LocalBlend at 16, self-attention at 64 not replaced); one head and no up-block attention at
    64, so the 64 x 64 self-attention costs seconds."""
    folder = testing.make_tiny_sd(str(tmp_path_factory.mktemp("sd64")), "sd1", seed=7, sample_size=64,
                                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                  block_out_channels=(8, 16, 16, 16), layers_per_block=1, attention_head_dim=1)
    return Case(folder, steps=4, seed=3)


@pytest.fixture(scope="module")
def toy():
    return Case("nti_jax/toy/model", steps=10, seed=2)


def check(case: Case, method: str, prompts, ours, theirs, controls=(), **kw) -> dict:
    """Run both; assert latents and maps agree; return the oracle controller's blend for more checks.
    `controls`: negative controls, each `ours` with one setting off by a step or a threshold moved;
    each must miss the oracle by more than TOL, so the test could see an error that small."""
    z, maps = api.edit_latents(case.pipe, case.inversion(method), list(prompts[1:]), controller=ours)
    z_ref, maps_ref = case.oracle(method, prompts, theirs, **kw)
    assert np.asarray(z).shape == z_ref.shape and np.asarray(maps).shape == maps_ref.shape
    assert rel(z, z_ref) <= TOL, rel(z, z_ref)
    assert rel(maps, maps_ref) <= TOL, rel(maps, maps_ref)
    for r in range(1, len(prompts)):
        assert rel(z[r], z[0]) > 1e-3  # every target row was edited
    for bad in controls:
        z_bad, maps_bad = api.edit_latents(case.pipe, case.inversion(method), list(prompts[1:]), controller=bad)
        assert max(rel(z_bad, z_ref), rel(maps_bad, maps_ref)) > TOL, f"the negative control {bad} passed"
    return {"z": np.asarray(z), "maps": np.asarray(maps), "blend": theirs.local_blend}


def partial_mask(blend) -> float:
    m = float(blend.last_mask[1].mean())
    assert 0.0 < m < 1.0, "the blend mask must be partial for the test to mean anything"
    return m


def test_mappers_equalizer_and_windows_equal_the_originals(sd1):
    tok, L = sd1.pipe.tokenizer, 77
    pairs = [(SRC, SWAP), ("a cat sitting on a mat", "a hippopotamus sitting on a mat"),
             ("a hippopotamus on a cat", "a dog on a rhinoceros"), ("a cat on a cat", "a hippopotamus on a dog")]
    for s, t in pairs:
        np.testing.assert_array_equal(seq_aligner.replacement_mapper(s, [t], tok, L), ref.get_replacement_mapper([s, t], tok).numpy())
    for s, t in [(SRC, ADD), ("a cat", "a photo of a black cat on the sofa"), (ADD, SRC)]:
        mapper, alphas = seq_aligner.refinement_mapper(s, [t], tok, L)
        m_ref, a_ref = ref.get_refinement_mapper([s, t], tok)
        np.testing.assert_array_equal(alphas, a_ref.numpy())
        np.testing.assert_array_equal(mapper[alphas == 1], m_ref.numpy()[a_ref.numpy() == 1])  # new tokens: unused
    eq = seq_aligner.equalizer(ADD, {"big": 3.0, "circle": 0.5}, tok, L)
    np.testing.assert_array_equal(eq[None], ref.get_equalizer(ADD, ("big", "circle"), (3.0, 0.5), tok).numpy())
    cross = {"default_": 0.8, "green": (0.2, 0.6)}
    ours = p2p._cross_alpha(cross, [SWAP], tok, 10, L)
    theirs = ref.get_time_words_attention_alpha([SRC, SWAP], 10, dict(cross), tok)[:10, :, 0, 0]
    np.testing.assert_array_equal(ours, theirs.numpy())


def test_replace_with_local_blend_null_text_and_negative_prompt(sd1):
    th = sd1.threshold("circle")
    for method in ("null-text", "negative-prompt"):
        ours = nti_jax.Replace(blend=nti_jax.LocalBlend([["circle"], ["circle"]], threshold=th))
        out = check(sd1, method, [SRC, SWAP], ours, sd1.controller([SRC, SWAP], blend=[["circle"], ["circle"]], th=(th, th)))
        partial_mask(out["blend"])


def test_reweight_on_replace_with_substruct_words(sd1):
    th, sub_th = sd1.threshold("circle"), sd1.threshold("background", 0.75)
    words, sub = [["circle"], ["circle"]], [["background"], ["background"]]
    base = nti_jax.Replace(cross_replace_steps=0.5)
    ours = nti_jax.Reweight(cross_replace_steps=0.5, equalizer={"green": 3.0}, base=base,
                            blend=nti_jax.LocalBlend(words, threshold=th, substruct_words=sub, substruct_threshold=sub_th))
    theirs = sd1.controller([SRC, SWAP], eq={"words": ("green",), "values": (3.0,)}, blend=words, sub=sub, th=(th, sub_th), cross=0.5)
    out = check(sd1, "null-text", [SRC, SWAP], ours, theirs)
    partial_mask(out["blend"])
    lb = out["blend"]  # the subtracted mask did remove pixels from the final mask
    maps = torch.cat([m.reshape(2, -1, 1, sd1.res, sd1.res, 77) for m in lb._blend_maps(theirs.attention_store)], dim=1)
    assert (lb.get_mask(maps, lb.alpha_layers, True).float() - lb.last_mask).sum() > 0


def test_reweight_alone_scales_position_by_position_across_word_counts(sd1):
    # issue 3: no word-swap mapper, so prompts of different word counts are fine (as the original)
    ours = nti_jax.Reweight(equalizer={"big": 4.0})
    theirs = ref.AttentionReweight([SRC, ADD], sd1.T, 0.8, 0.4, ref.get_equalizer(ADD, ("big",), (4.0,), sd1.pipe.tokenizer),
                                   tokenizer=sd1.pipe.tokenizer, max_self_queries=(sd1.latent // 2) ** 2)
    check(sd1, "negative-prompt", [SRC, ADD], ours, theirs)
    with pytest.raises(PromptError, match="same number of words"):
        api.edit_latents(sd1.pipe, sd1.inversion("null-text"), [ADD], controller=nti_jax.Replace())


def test_direct_inversion_pins_the_source_before_the_blend(sd1):
    th = sd1.threshold("circle", 0.7, "direct")
    ours = nti_jax.Replace(blend=nti_jax.LocalBlend([["circle"], ["circle"]], threshold=th))
    out = check(sd1, "direct", [SRC, SWAP], ours, sd1.controller([SRC, SWAP], blend=[["circle"], ["circle"]], th=(th, th)))
    partial_mask(out["blend"])
    np.testing.assert_allclose(out["z"][0], np.asarray(sd1.pivots[0, 0]), atol=1e-5)  # source row = z*_0


def test_proximal_and_single_branch_null_text(sd1):
    th = sd1.threshold("circle")
    prox = nti_jax.Proximal()  # PIE-Bench: l0, quantile 0.75, recon_lr 1, recon_t 400 (dilate 1)
    ours = nti_jax.Replace(blend=nti_jax.LocalBlend([["circle"], ["circle"]], threshold=th), single_branch=True, proximal=prox)
    theirs = sd1.controller([SRC, SWAP], blend=[["circle"], ["circle"]], th=(th, th))
    out = check(sd1, "null-text", [SRC, SWAP], ours, theirs, single_branch=True,
                prox={"prox": "l0", "quantile": 0.75, "recon_lr": 1.0, "recon_t": 400, "dilate_mask": 1})
    partial_mask(out["blend"])
    # ProxEdit pulls the source row toward the pivots, off the optimisation's latents: the row
    # samples itself whatever latents the inversion holds (random ones here).
    held = sd1.inversion("null-text").replace(latents=jnp.asarray(np.random.default_rng(9).standard_normal(sd1.pivots.shape), jnp.float32))
    z, _ = api.edit_latents(sd1.pipe, held, [SWAP], controller=ours)
    assert rel(z, out["z"]) <= TOL, rel(z, out["z"])


def test_sd2_v_prediction_refine_with_blend(sd2):  # Refine on SD 1.x: the same code, one compile less
    th = sd2.threshold("circle")
    ours = nti_jax.Refine(blend=nti_jax.LocalBlend([["circle"], ["circle"]], threshold=th))
    out = check(sd2, "null-text", [SRC, ADD], ours, sd2.controller([SRC, ADD], replace=False, blend=[["circle"], ["circle"]], th=(th, th)))
    partial_mask(out["blend"])


def test_sd2_direct_with_l1_proximal_guidance_and_a_fixed_threshold(sd2):
    for q, moved in ((0.6, 0.65), (-0.02, -0.025)):  # q <= 0: ProxEdit's fixed threshold -q
        prox = nti_jax.Proximal(norm="l1", quantile=q, recon_lr=0.5, recon_t=700, dilate=0)
        bad = nti_jax.Replace(proximal=nti_jax.Proximal(norm="l1", quantile=moved, recon_lr=0.5, recon_t=700, dilate=0))
        check(sd2, "direct", [SRC, SWAP], nti_jax.Replace(proximal=prox), sd2.controller([SRC, SWAP]), [bad],
              prox={"prox": "l1", "quantile": q, "recon_lr": 0.5, "recon_t": 700, "dilate_mask": 0})


def test_toy_model_colour_swap_with_blend(toy):
    src, tgt = "a red circle on a blue background", "a green circle on a blue background"
    assert (src, tgt) == (SRC, SWAP)
    th = toy.threshold("red")
    ours = nti_jax.Replace(blend=nti_jax.LocalBlend([["red"], ["green"]], threshold=th))
    out = check(toy, "null-text", [SRC, SWAP], ours, toy.controller([SRC, SWAP], blend=[["red"], ["green"]], th=(th, th)))
    partial_mask(out["blend"])


def test_pie_bench_setup_at_a_64_latent_with_negative_controls(sd64):
    # run_editing_p2p.py: Refine, Reweight x2 on the target blended word, LocalBlend on the blended
    # words, cross 0.4, self 0.6; self-attention replaced at 32 x 32 and below (the original's 32 ** 2)
    src, tgt = "a red circle on a blue background", "a [big green square] on a blue background"
    settings = dict(pie_bench.edit_settings(src, tgt, "circle square"), blend_threshold=sd64.threshold("circle"))
    tgt = pie_bench.strip_brackets(tgt)
    ours = controllers.controller_from_settings(src, [tgt], settings)
    assert isinstance(ours, nti_jax.Reweight) and isinstance(ours.base, nti_jax.Refine)
    th = settings["blend_threshold"]
    theirs = sd64.controller([src, tgt], replace=False, eq={"words": ("square",), "values": (2,)}, blend=(("circle",), ("square",)),
                             th=(th, th), cross=0.4, self_=0.6, max_self_queries=32**2)
    bad = lambda **kw: controllers.controller_from_settings(src, [tgt], dict(settings, **kw))
    # the self window a step longer, the threshold moved, self-attention replaced at 64 x 64 too
    controls = [bad(self_replace_steps=0.8), bad(blend_threshold=sd64.threshold("circle", 0.75)), bad(max_self_size=64)]
    out = check(sd64, "null-text", [src, tgt], ours, theirs, controls)
    partial_mask(out["blend"])


def test_three_prompts_with_per_word_windows_and_negative_controls(sd1):
    third = "a yellow circle on a blue background"
    prompts, th = [SRC, SWAP, third], sd1.threshold("circle")
    cross = {"default_": 0.8, "green": (0.2, 0.6), "yellow": (0.4, 1.0)}  # windows in steps (7 bounds for 6 steps): 5, 1-4, 2-7
    blend = nti_jax.LocalBlend([["circle"]] * 3, threshold=th)
    ours = nti_jax.Replace(cross_replace_steps=cross, blend=blend)
    theirs = sd1.controller(prompts, blend=[["circle"]] * 3, th=(th, th), cross=dict(cross))
    controls = [nti_jax.Replace(cross_replace_steps=dict(cross, green=(0.35, 0.6)), blend=blend),  # green's window a step later
                nti_jax.Replace(cross_replace_steps=dict(cross, default_=0.95), blend=blend)]  # the default window a step longer
    out = check(sd1, "null-text", prompts, ours, theirs, controls)
    assert 0.0 < float(out["blend"].last_mask[2].mean()) < 1.0


def test_nested_reweight_composes_as_the_original(sd1):
    inner = nti_jax.Reweight(equalizer={"circle": 0.5}, base=nti_jax.Replace())
    ours = nti_jax.Reweight(equalizer={"green": 3.0}, base=inner)
    tok, common = sd1.pipe.tokenizer, {"tokenizer": sd1.pipe.tokenizer, "max_self_queries": (sd1.latent // 2) ** 2}
    theirs = ref.AttentionReplace([SRC, SWAP], sd1.T, 0.8, 0.4, **common)
    for word, value in (("circle", 0.5), ("green", 3.0)):
        theirs = ref.AttentionReweight([SRC, SWAP], sd1.T, 0.8, 0.4, ref.get_equalizer(SWAP, (word,), (value,), tok), controller=theirs, **common)
    check(sd1, "negative-prompt", [SRC, SWAP], ours, theirs, [nti_jax.Reweight(equalizer={"green": 3.0}, base=nti_jax.Replace())])
