"""PyTorch port of the authors' Prompt-to-Prompt code: the oracle for `nti_jax.p2p` (issue 12).

Ported as written, from
* google/prompt-to-prompt @ 9c472e44aa1b607da59fea94820f7be9480ec545: ``seq_aligner.py``
  (ScoreParams .. get_replacement_mapper), ``ptp_utils.py`` (get_word_inds,
  update_alpha_time_word, get_time_words_attention_alpha, diffusion_step, register_attention_control
  in its diffusers-``Attention`` form), ``null_text_w_ptp.ipynb`` (LocalBlend with
  substruct_words, AttentionControl, AttentionStore, AttentionControlEdit, AttentionReplace,
  AttentionRefine, AttentionReweight, get_equalizer, make_controller, aggregate_attention,
  text2image_ldm_stable with per-step unconditional embeddings);
* cure-lab/PnPInversion @ 07f97f448150e2ca220bebd54c8f687c5c50c67a: ``models/p2p/inversion.py``
  (DirectInversion.offset_calculate), ``models/p2p/p2p_guidance_forward.py``
  (direct_inversion_p2p_guidance_diffusion_step, p2p_guidance_forward_single_branch),
  ``models/p2p/proximal_guidance_forward.py`` and ``models/p2p/attention_control.py`` (the same
  controllers as a module);
* phymhan/prompt-to-prompt (ProxEdit) @ 9955a1fedf7b4d4a5967dc433d3e753ebc305e2a: ``ptp_utils.py``
  diffusion_step with ``prox`` / ``quantile`` / ``recon_lr`` / ``recon_t`` / ``inversion_guidance`` /
  ``dilate_mask`` (the same code as PnPInversion's proximal_guidance_diffusion_step).

What had to change to run the authors' code here (nothing else was touched):
* Globals become arguments: the tokenizer, the number of steps, the latent size.
* The UNet is hooked through diffusers' attention processors (`P2PAttnProcessor`), whose body is
  ptp_utils' ``ca_forward`` line for line; ``place_in_unet`` comes from the module name as
  ``register_attention_control`` derives it.
* LocalBlend's maps: the original takes ``attention_store["down_cross"][2:4] +
  attention_store["up_cross"][:3]`` reshaped to 16 x 16, which for SD 1.x/2.x at 512 px are all the
  stored 16 x 16 down/up cross-attention layers; here every stored down/up cross layer at
  ``res`` x ``res`` (``res`` = the UNet's smallest down cross-attention size, 16 on SD) is taken,
  so tiny test models work. ``get_mask`` interpolates to the latent size (the notebook reads a
  global ``x_t`` there; PnPInversion fixes it to ``LATENT_SIZE``).
* Self-attention replacement applies to layers with at most ``max_self_queries`` queries
  (the NTI notebook: ``32 ** 2`` for a 64 x 64 latent; a parameter for other latent sizes).
* DDIM: ``benchmarks.torch_reference.DDIMSchedule.prev_step`` (equal to diffusers'
  ``DDIMScheduler.step`` at eta 0, v-prediction included) instead of a scheduler object.
* Direct inversion with proximal guidance has no upstream code: here the source row is pinned to
  the pivot after the step (PnP's offset computed from that step's own source row), before the
  proximal pull and the blend. Plain direct edits use PnP's precomputed offsets as written.
Latents are NCHW float32 torch tensors.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as nnf

from benchmarks.torch_reference import DDIMSchedule, unet_eps

MAX_NUM_WORDS = 77
LOW_RESOURCE = False

# --------------------------------------------------------------------------------------------
# seq_aligner.py (google/prompt-to-prompt)
# --------------------------------------------------------------------------------------------


class ScoreParams:
    def __init__(self, gap, match, mismatch):
        self.gap = gap
        self.match = match
        self.mismatch = mismatch

    def mis_match_char(self, x, y):
        if x != y:
            return self.mismatch
        else:
            return self.match


def get_matrix(size_x, size_y, gap):
    matrix = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    matrix[0, 1:] = (np.arange(size_y) + 1) * gap
    matrix[1:, 0] = (np.arange(size_x) + 1) * gap
    return matrix


def get_traceback_matrix(size_x, size_y):
    matrix = np.zeros((size_x + 1, size_y + 1), dtype=np.int32)
    matrix[0, 1:] = 1
    matrix[1:, 0] = 2
    matrix[0, 0] = 4
    return matrix


def global_align(x, y, score):
    matrix = get_matrix(len(x), len(y), score.gap)
    trace_back = get_traceback_matrix(len(x), len(y))
    for i in range(1, len(x) + 1):
        for j in range(1, len(y) + 1):
            left = matrix[i, j - 1] + score.gap
            up = matrix[i - 1, j] + score.gap
            diag = matrix[i - 1, j - 1] + score.mis_match_char(x[i - 1], y[j - 1])
            matrix[i, j] = max(left, up, diag)
            if matrix[i, j] == left:
                trace_back[i, j] = 1
            elif matrix[i, j] == up:
                trace_back[i, j] = 2
            else:
                trace_back[i, j] = 3
    return matrix, trace_back


def get_aligned_sequences(x, y, trace_back):
    x_seq = []
    y_seq = []
    i = len(x)
    j = len(y)
    mapper_y_to_x = []
    while i > 0 or j > 0:
        if trace_back[i, j] == 3:
            x_seq.append(x[i - 1])
            y_seq.append(y[j - 1])
            i = i - 1
            j = j - 1
            mapper_y_to_x.append((j, i))
        elif trace_back[i][j] == 1:
            x_seq.append("-")
            y_seq.append(y[j - 1])
            j = j - 1
            mapper_y_to_x.append((j, -1))
        elif trace_back[i][j] == 2:
            x_seq.append(x[i - 1])
            y_seq.append("-")
            i = i - 1
        elif trace_back[i][j] == 4:
            break
    mapper_y_to_x.reverse()
    return x_seq, y_seq, torch.tensor(mapper_y_to_x, dtype=torch.int64)


def get_mapper(x: str, y: str, tokenizer, max_len=77):
    x_seq = tokenizer.encode(x)
    y_seq = tokenizer.encode(y)
    score = ScoreParams(0, 1, -1)
    matrix, trace_back = global_align(x_seq, y_seq, score)  # noqa: RUF059 (as written upstream)
    mapper_base = get_aligned_sequences(x_seq, y_seq, trace_back)[-1]
    alphas = torch.ones(max_len)
    alphas[: mapper_base.shape[0]] = mapper_base[:, 1].ne(-1).float()
    mapper = torch.zeros(max_len, dtype=torch.int64)
    mapper[: mapper_base.shape[0]] = mapper_base[:, 1]
    mapper[mapper_base.shape[0] :] = len(y_seq) + torch.arange(max_len - len(y_seq))
    return mapper, alphas


def get_refinement_mapper(prompts, tokenizer, max_len=77):
    x_seq = prompts[0]
    mappers, alphas = [], []
    for i in range(1, len(prompts)):
        mapper, alpha = get_mapper(x_seq, prompts[i], tokenizer, max_len)
        mappers.append(mapper)
        alphas.append(alpha)
    return torch.stack(mappers), torch.stack(alphas)


def get_word_inds(text: str, word_place: int, tokenizer):
    split_text = text.split(" ")
    if type(word_place) is str:
        word_place = [i for i, word in enumerate(split_text) if word_place == word]
    elif type(word_place) is int:
        word_place = [word_place]
    out = []
    if len(word_place) > 0:
        words_encode = [tokenizer.decode([item]).strip("#") for item in tokenizer.encode(text)][1:-1]
        cur_len, ptr = 0, 0

        for i in range(len(words_encode)):
            cur_len += len(words_encode[i])
            if ptr in word_place:
                out.append(i + 1)
            if cur_len >= len(split_text[ptr]):
                ptr += 1
                cur_len = 0
    return np.array(out)


def get_replacement_mapper_(x: str, y: str, tokenizer, max_len=77):
    words_x = x.split(" ")
    words_y = y.split(" ")
    if len(words_x) != len(words_y):
        raise ValueError(
            f"attention replacement edit can only be applied on prompts with the same length"
            f" but prompt A has {len(words_x)} words and prompt B has {len(words_y)} words."
        )
    inds_replace = [i for i in range(len(words_y)) if words_y[i] != words_x[i]]
    inds_source = [get_word_inds(x, i, tokenizer) for i in inds_replace]
    inds_target = [get_word_inds(y, i, tokenizer) for i in inds_replace]
    mapper = np.zeros((max_len, max_len))
    i = j = 0
    cur_inds = 0
    while i < max_len and j < max_len:
        if cur_inds < len(inds_source) and inds_source[cur_inds][0] == i:
            inds_source_, inds_target_ = inds_source[cur_inds], inds_target[cur_inds]
            if len(inds_source_) == len(inds_target_):
                mapper[inds_source_, inds_target_] = 1
            else:
                ratio = 1 / len(inds_target_)
                for i_t in inds_target_:
                    mapper[inds_source_, i_t] = ratio
            cur_inds += 1
            i += len(inds_source_)
            j += len(inds_target_)
        elif cur_inds < len(inds_source):
            mapper[i, j] = 1
            i += 1
            j += 1
        else:
            mapper[j, j] = 1
            i += 1
            j += 1

    return torch.from_numpy(mapper).float()


def get_replacement_mapper(prompts, tokenizer, max_len=77):
    x_seq = prompts[0]
    mappers = []
    for i in range(1, len(prompts)):
        mapper = get_replacement_mapper_(x_seq, prompts[i], tokenizer, max_len)
        mappers.append(mapper)
    return torch.stack(mappers)


# --------------------------------------------------------------------------------------------
# ptp_utils.py (google/prompt-to-prompt): time-word alphas
# --------------------------------------------------------------------------------------------


def update_alpha_time_word(alpha, bounds: float | tuple[float, float], prompt_ind: int, word_inds: torch.Tensor | None = None):
    if type(bounds) is float:
        bounds = 0, bounds
    start, end = int(bounds[0] * alpha.shape[0]), int(bounds[1] * alpha.shape[0])
    if word_inds is None:
        word_inds = torch.arange(alpha.shape[2])
    alpha[:start, prompt_ind, word_inds] = 0
    alpha[start:end, prompt_ind, word_inds] = 1
    alpha[end:, prompt_ind, word_inds] = 0
    return alpha


def get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps: float | dict[str, tuple[float, float]], tokenizer, max_num_words=77):
    if type(cross_replace_steps) is not dict:
        cross_replace_steps = {"default_": cross_replace_steps}
    if "default_" not in cross_replace_steps:
        cross_replace_steps["default_"] = (0.0, 1.0)
    alpha_time_words = torch.zeros(num_steps + 1, len(prompts) - 1, max_num_words)
    for i in range(len(prompts) - 1):
        alpha_time_words = update_alpha_time_word(alpha_time_words, cross_replace_steps["default_"], i)
    for key, item in cross_replace_steps.items():
        if key != "default_":
            inds = [get_word_inds(prompts[i], key, tokenizer) for i in range(1, len(prompts))]
            for i, ind in enumerate(inds):
                if len(ind) > 0:
                    alpha_time_words = update_alpha_time_word(alpha_time_words, item, i, ind)
    alpha_time_words = alpha_time_words.reshape(num_steps + 1, len(prompts) - 1, 1, 1, max_num_words)
    return alpha_time_words


# --------------------------------------------------------------------------------------------
# null_text_w_ptp.ipynb (google/prompt-to-prompt): controllers
# --------------------------------------------------------------------------------------------


class LocalBlend:
    def get_mask(self, maps, alpha, use_pool):
        k = 1
        maps = (maps * alpha).sum(-1).mean(1)
        if use_pool:
            maps = nnf.max_pool2d(maps, (k * 2 + 1, k * 2 + 1), (1, 1), padding=(k, k))
        mask = nnf.interpolate(maps, size=self.latent_size)
        mask = mask / mask.max(2, keepdims=True)[0].max(3, keepdims=True)[0]
        mask = mask.gt(self.th[1 - int(use_pool)])
        mask = mask[:1] + mask
        return mask

    def _blend_maps(self, attention_store):
        # the original: attention_store["down_cross"][2:4] + attention_store["up_cross"][:3]
        r = self.res
        return [m for key in ("down_cross", "up_cross") for m in attention_store[key] if m.shape[1] == r * r]

    def __call__(self, x_t, attention_store):
        self.counter += 1
        if self.counter > self.start_blend:
            maps = self._blend_maps(attention_store)
            maps = [item.reshape(self.alpha_layers.shape[0], -1, 1, self.res, self.res, MAX_NUM_WORDS) for item in maps]
            maps = torch.cat(maps, dim=1)
            mask = self.get_mask(maps, self.alpha_layers, True)
            if self.substruct_layers is not None:
                maps_sub = ~self.get_mask(maps, self.substruct_layers, False)
                mask = mask * maps_sub
            mask = mask.float()
            self.last_mask = mask
            x_t = x_t[:1] + mask * (x_t - x_t[:1])
        return x_t

    def __init__(self, prompts: list[str], words, substruct_words=None, start_blend=0.2, th=(0.3, 0.3), *,
                 tokenizer, num_ddim_steps: int, res: int, latent_size: tuple[int, int]):
        alpha_layers = torch.zeros(len(prompts), 1, 1, 1, 1, MAX_NUM_WORDS)
        for i, (prompt, words_) in enumerate(zip(prompts, words)):
            if type(words_) is str:
                words_ = [words_]
            for word in words_:
                ind = get_word_inds(prompt, word, tokenizer)
                alpha_layers[i, :, :, :, :, ind] = 1

        if substruct_words is not None:
            substruct_layers = torch.zeros(len(prompts), 1, 1, 1, 1, MAX_NUM_WORDS)
            for i, (prompt, words_) in enumerate(zip(prompts, substruct_words)):
                if type(words_) is str:
                    words_ = [words_]
                for word in words_:
                    ind = get_word_inds(prompt, word, tokenizer)
                    substruct_layers[i, :, :, :, :, ind] = 1
            self.substruct_layers = substruct_layers
        else:
            self.substruct_layers = None
        self.alpha_layers = alpha_layers
        self.start_blend = int(start_blend * num_ddim_steps)
        self.counter = 0
        self.th = th
        self.res = res
        self.latent_size = tuple(latent_size)
        self.last_mask = None


class EmptyControl:
    def step_callback(self, x_t):
        return x_t

    def between_steps(self):
        return

    def __call__(self, attn, is_cross: bool, place_in_unet: str):
        return attn


class AttentionControl(abc.ABC):
    def step_callback(self, x_t):
        return x_t

    def between_steps(self):
        return

    @property
    def num_uncond_att_layers(self):
        return self.num_att_layers if LOW_RESOURCE else 0

    @abc.abstractmethod
    def forward(self, attn, is_cross: bool, place_in_unet: str):
        raise NotImplementedError

    def __call__(self, attn, is_cross: bool, place_in_unet: str):
        if self.cur_att_layer >= self.num_uncond_att_layers:
            if LOW_RESOURCE:
                attn = self.forward(attn, is_cross, place_in_unet)
            else:
                h = attn.shape[0]
                attn[h // 2 :] = self.forward(attn[h // 2 :], is_cross, place_in_unet)
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers + self.num_uncond_att_layers:
            self.cur_att_layer = 0
            self.cur_step += 1
            self.between_steps()
        return attn

    def reset(self):
        self.cur_step = 0
        self.cur_att_layer = 0

    def __init__(self):
        self.cur_step = 0
        self.num_att_layers = -1
        self.cur_att_layer = 0


class AttentionStore(AttentionControl):
    @staticmethod
    def get_empty_store():
        return {"down_cross": [], "mid_cross": [], "up_cross": [], "down_self": [], "mid_self": [], "up_self": []}

    def forward(self, attn, is_cross: bool, place_in_unet: str):
        key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
        if attn.shape[1] <= 32**2:  # avoid memory overhead
            self.step_store[key].append(attn)
        return attn

    def between_steps(self):
        if len(self.attention_store) == 0:
            self.attention_store = self.step_store
        else:
            for key in self.attention_store:
                for i in range(len(self.attention_store[key])):
                    self.attention_store[key][i] += self.step_store[key][i]
        self.step_store = self.get_empty_store()

    def get_average_attention(self):
        average_attention = {key: [item / self.cur_step for item in self.attention_store[key]] for key in self.attention_store}
        return average_attention

    def reset(self):
        super().reset()
        self.step_store = self.get_empty_store()
        self.attention_store = {}

    def __init__(self):
        super().__init__()
        self.step_store = self.get_empty_store()
        self.attention_store = {}


class AttentionControlEdit(AttentionStore, abc.ABC):
    def step_callback(self, x_t):
        if self.local_blend is not None:
            x_t = self.local_blend(x_t, self.attention_store)
        return x_t

    def replace_self_attention(self, attn_base, att_replace):
        if att_replace.shape[2] <= self.max_self_queries:  # the NTI notebook: 32 ** 2
            attn_base = attn_base.unsqueeze(0).expand(att_replace.shape[0], *attn_base.shape)
            return attn_base
        else:
            return att_replace

    @abc.abstractmethod
    def replace_cross_attention(self, attn_base, att_replace):
        raise NotImplementedError

    def forward(self, attn, is_cross: bool, place_in_unet: str):
        super().forward(attn, is_cross, place_in_unet)
        if is_cross or (self.num_self_replace[0] <= self.cur_step < self.num_self_replace[1]):
            h = attn.shape[0] // (self.batch_size)
            attn = attn.reshape(self.batch_size, h, *attn.shape[1:])
            attn_base, attn_repalce = attn[0], attn[1:]
            if is_cross:
                alpha_words = self.cross_replace_alpha[self.cur_step]
                attn_repalce_new = self.replace_cross_attention(attn_base, attn_repalce) * alpha_words + (1 - alpha_words) * attn_repalce
                attn[1:] = attn_repalce_new
            else:
                attn[1:] = self.replace_self_attention(attn_base, attn_repalce)
            attn = attn.reshape(self.batch_size * h, *attn.shape[2:])
        return attn

    def __init__(self, prompts, num_steps: int, cross_replace_steps, self_replace_steps, local_blend: LocalBlend | None, *,
                 tokenizer, max_self_queries: int = 32**2):
        super().__init__()
        self.batch_size = len(prompts)
        self.cross_replace_alpha = get_time_words_attention_alpha(prompts, num_steps, cross_replace_steps, tokenizer)
        if type(self_replace_steps) is float:
            self_replace_steps = 0, self_replace_steps
        self.num_self_replace = int(num_steps * self_replace_steps[0]), int(num_steps * self_replace_steps[1])
        self.local_blend = local_blend
        self.max_self_queries = max_self_queries


class AttentionReplace(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        return torch.einsum("hpw,bwn->bhpn", attn_base, self.mapper)

    def __init__(self, prompts, num_steps: int, cross_replace_steps, self_replace_steps, local_blend=None, *, tokenizer, max_self_queries=32**2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend,
                                               tokenizer=tokenizer, max_self_queries=max_self_queries)
        self.mapper = get_replacement_mapper(prompts, tokenizer)


class AttentionRefine(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        attn_base_replace = attn_base[:, :, self.mapper].permute(2, 0, 1, 3)
        attn_replace = attn_base_replace * self.alphas + att_replace * (1 - self.alphas)
        return attn_replace

    def __init__(self, prompts, num_steps: int, cross_replace_steps, self_replace_steps, local_blend=None, *, tokenizer, max_self_queries=32**2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend,
                                              tokenizer=tokenizer, max_self_queries=max_self_queries)
        self.mapper, alphas = get_refinement_mapper(prompts, tokenizer)
        self.alphas = alphas.reshape(alphas.shape[0], 1, 1, alphas.shape[1])


class AttentionReweight(AttentionControlEdit):
    def replace_cross_attention(self, attn_base, att_replace):
        if self.prev_controller is not None:
            attn_base = self.prev_controller.replace_cross_attention(attn_base, att_replace)
        attn_replace = attn_base[None, :, :, :] * self.equalizer[:, None, None, :]
        return attn_replace

    def __init__(self, prompts, num_steps: int, cross_replace_steps, self_replace_steps, equalizer, local_blend=None,
                 controller: AttentionControlEdit | None = None, *, tokenizer, max_self_queries=32**2):
        super().__init__(prompts, num_steps, cross_replace_steps, self_replace_steps, local_blend,
                                                tokenizer=tokenizer, max_self_queries=max_self_queries)
        self.equalizer = equalizer
        self.prev_controller = controller


def get_equalizer(text: str, word_select: int | tuple[int, ...], values: list[float] | tuple[float, ...], tokenizer):
    if type(word_select) is int or type(word_select) is str:
        word_select = (word_select,)
    equalizer = torch.ones(1, 77)

    for word, val in zip(word_select, values):
        inds = get_word_inds(text, word, tokenizer)
        equalizer[:, inds] = val
    return equalizer


def make_controller(prompts: list[str], is_replace_controller: bool, cross_replace_steps, self_replace_steps: float,
                    blend_words=None, equilizer_params=None, *, tokenizer, num_steps: int, res: int,
                    latent_size: tuple[int, int], max_self_queries: int = 32**2, substruct_words=None,
                    start_blend: float = 0.2, th=(0.3, 0.3)) -> AttentionControlEdit:
    """The notebook's make_controller; ``substruct_words``/``start_blend``/``th`` go to LocalBlend."""
    common = {"tokenizer": tokenizer, "max_self_queries": max_self_queries}
    if blend_words is None:
        lb = None
    else:
        lb = LocalBlend(prompts, blend_words, substruct_words, start_blend, th, tokenizer=tokenizer,
                        num_ddim_steps=num_steps, res=res, latent_size=latent_size)
    if is_replace_controller:
        controller = AttentionReplace(prompts, num_steps, cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps, local_blend=lb, **common)
    else:
        controller = AttentionRefine(prompts, num_steps, cross_replace_steps=cross_replace_steps, self_replace_steps=self_replace_steps, local_blend=lb, **common)
    if equilizer_params is not None:
        eq = get_equalizer(prompts[1], equilizer_params["words"], equilizer_params["values"], tokenizer)
        controller = AttentionReweight(prompts, num_steps, cross_replace_steps=cross_replace_steps,
                                       self_replace_steps=self_replace_steps, equalizer=eq, local_blend=lb, controller=controller, **common)
    return controller


def aggregate_attention(attention_store: AttentionStore, prompts, res: int, from_where: Sequence[str], is_cross: bool, select: int):
    """The notebook's aggregate_attention (behind show_cross_attention): (res, res, 77)."""
    out = []
    attention_maps = attention_store.get_average_attention()
    num_pixels = res**2
    for location in from_where:
        for item in attention_maps[f"{location}_{'cross' if is_cross else 'self'}"]:
            if item.shape[1] == num_pixels:
                cross_maps = item.reshape(len(prompts), -1, res, res, item.shape[-1])[select]
                out.append(cross_maps)
    out = torch.cat(out, dim=0)
    out = out.sum(0) / out.shape[0]
    return out.cpu()


# --------------------------------------------------------------------------------------------
# ptp_utils.register_attention_control, as a diffusers attention processor
# --------------------------------------------------------------------------------------------


class P2PAttnProcessor:
    """ptp_utils' ``ca_forward`` (diffusers ``Attention`` version): explicit probabilities, then the controller."""

    def __init__(self, controller, place_in_unet: str):
        self.controller = controller
        self.place_in_unet = place_in_unet

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)
        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        attention_probs = self.controller(attention_probs, is_cross, self.place_in_unet)
        hidden_states = torch.bmm(attention_probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states


class DummyController:
    def __call__(self, *args):
        return args[0]

    def __init__(self):
        self.num_att_layers = 0


def register_attention_control(unet, controller) -> None:
    """Every attention layer of a diffusers UNet calls ``controller(probs, is_cross, place_in_unet)``."""
    if controller is None:
        controller = DummyController()
    procs = {}
    for name in unet.attn_processors:
        place = "down" if name.startswith("down") else "up" if name.startswith("up") else "mid"
        procs[name] = P2PAttnProcessor(controller, place)
    controller.num_att_layers = len(procs)
    unet.set_attn_processor(procs)  # (empties the dict)


def blend_resolution(unet, latent: int) -> int:
    """The smallest down-block cross-attention size (16 for SD at 512 px: LocalBlend's and show_cross_attention's res)."""
    kinds = unet.config.down_block_types
    return min(latent // 2**i for i, k in enumerate(kinds) if k.startswith("CrossAttn"))


# --------------------------------------------------------------------------------------------
# editing loops: the notebook's text2image_ldm_stable, PnP's direct inversion, ProxEdit
# --------------------------------------------------------------------------------------------


def diffusion_step(unet, schedule: DDIMSchedule, controller, latents, context, t, guidance_scale):
    """ptp_utils.diffusion_step (low_resource=False)."""
    latents_input = torch.cat([latents] * 2)
    noise_pred = unet_eps(unet, latents_input, t, context)
    noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
    latents = schedule.prev_step(noise_pred, t, latents)
    latents = controller.step_callback(latents)
    return latents


def direct_inversion_p2p_guidance_diffusion_step(unet, schedule, controller, latents, context, t, guidance_scale, noise_loss, add_offset=True):
    """PnPInversion's direct-inversion step: the source row gets its offset, THEN the controller's callback."""
    latents_input = torch.cat([latents] * 2)
    noise_pred = unet_eps(unet, latents_input, t, context)
    noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
    noise_pred = noise_pred_uncond + guidance_scale * (noise_prediction_text - noise_pred_uncond)
    latents = schedule.prev_step(noise_pred, t, latents)
    if add_offset:
        latents = torch.concat((latents[:1] + noise_loss[:1], latents[1:]))
    latents = controller.step_callback(latents)
    return latents


def dilate(image, kernel_size, stride=1, padding=0):
    assert image.max() <= 1 and image.min() >= 0
    return nnf.max_pool2d(image, kernel_size, stride, padding)


def proximal_guidance_diffusion_step(unet, schedule, controller, latents, context, t, guidance_scale, prox="l0", quantile=0.7,
                                     recon_lr=0.1, recon_t=400, inversion_guidance=False, x_stars=None, i=0, dilate_mask=0, pin_source=False):
    """ProxEdit's diffusion_step (phymhan/prompt-to-prompt; PnPInversion proximal_guidance_diffusion_step) with
    ``edit_stage=True`` and no ``image_enc`` (reconstruction guidance off, as PIE-Bench runs it).
    ``pin_source``: direct inversion (no upstream code): the source row is set to the pivot after the step."""
    latents_input = torch.cat([latents] * 2)
    noise_pred = unet_eps(unet, latents_input, t, context)
    noise_pred_uncond, noise_prediction_text = noise_pred.chunk(2)
    mask_edit = None
    if prox == "l1":
        score_delta = noise_prediction_text - noise_pred_uncond
        if quantile > 0:
            threshold = score_delta.abs().quantile(quantile)
        else:
            threshold = -quantile
        score_delta -= score_delta.clamp(-threshold, threshold)
        score_delta = torch.where(score_delta > 0, score_delta - threshold, score_delta)
        score_delta = torch.where(score_delta < 0, score_delta + threshold, score_delta)
        if (recon_t > 0 and t < recon_t) or (recon_t < 0 and t > -recon_t):
            mask_edit = (score_delta.abs() > threshold).float()
            if dilate_mask > 0:
                radius = int(dilate_mask)
                mask_edit = dilate(mask_edit.float(), kernel_size=2 * radius + 1, padding=radius)
    elif prox == "l0":
        score_delta = noise_prediction_text - noise_pred_uncond
        if quantile > 0:
            threshold = score_delta.abs().quantile(quantile)
        else:
            threshold = -quantile
        score_delta -= score_delta.clamp(-threshold, threshold)
        if (recon_t > 0 and t < recon_t) or (recon_t < 0 and t > -recon_t):
            mask_edit = (score_delta.abs() > threshold).float()
            if dilate_mask > 0:
                radius = int(dilate_mask)
                mask_edit = dilate(mask_edit.float(), kernel_size=2 * radius + 1, padding=radius)
    else:
        raise NotImplementedError
    noise_pred = noise_pred_uncond + guidance_scale * score_delta
    latents = schedule.prev_step(noise_pred, t, latents)
    if pin_source:
        latents = torch.concat((x_stars[len(x_stars) - i - 2], latents[1:]))
    if mask_edit is not None and inversion_guidance and (recon_t > 0 and t < recon_t) or (recon_t < 0 and t > -recon_t):
        recon_mask = 1 - mask_edit
        latents = latents - recon_lr * (latents - x_stars[len(x_stars) - i - 2].expand_as(latents)) * recon_mask
    latents = controller.step_callback(latents)
    return latents


@torch.no_grad()
def offset_calculate(unet, schedule: DDIMSchedule, latents: Sequence[torch.Tensor], context, guidance_scale) -> list[torch.Tensor]:
    """PnPInversion's DirectInversion.offset_calculate: per step, pivot z*_{t-1} minus the CFG step from z*_t.
    ``latents``: pivots z*_0 .. z*_T; ``context``: [uncond rows; cond rows]."""
    noise_loss_list = []
    latent_cur = torch.concat([latents[-1]] * (context.shape[0] // 2))
    for i in range(schedule.num_steps):
        latent_prev = torch.concat([latents[len(latents) - i - 2]] * latent_cur.shape[0])
        t = int(schedule.timesteps[i])
        noise_pred = unet_eps(unet, torch.concat([latent_cur] * 2), t, context)
        noise_pred_uncond, noise_pred_cond = noise_pred.chunk(2)
        noise_pred_w_guidance = noise_pred_uncond + guidance_scale * (noise_pred_cond - noise_pred_uncond)
        latents_prev_rec = schedule.prev_step(noise_pred_w_guidance, t, latent_cur)
        loss = latent_prev - latents_prev_rec
        noise_loss_list.append(loss.detach())
        latent_cur = latents_prev_rec + loss
    return noise_loss_list


@torch.no_grad()
def edit(unet, schedule: DDIMSchedule, controller, x_T, cond, uncond_embeddings, *, guidance_scale: float = 7.5,
         method: str = "null-text", pivots: Sequence[torch.Tensor] | None = None, empty=None,
         single_branch: bool = False, prox: dict | None = None) -> torch.Tensor:
    """One edit of prompts [source, *targets] from ``x_T`` (1, C, h, w); returns the final latents (R, C, h, w).

    ``cond`` (R, 77, D): the prompts' embeddings. ``uncond_embeddings``: per-step unconditional
    embeddings (T of (1, 77, D)), as the NTI notebook's ``text2image_ldm_stable``.
    ``method="direct"``: PnPInversion's ``direct_inversion_p2p_guidance_forward`` ("" embedding
    ``empty`` in every row, the source row offset to ``pivots`` (z*_0 .. z*_T) each step).
    ``single_branch``: PnP's ``p2p_guidance_forward_single_branch`` (phi_i in the source row, ``empty``
    in the target rows). ``prox``: ProxEdit settings ``{prox, quantile, recon_lr, recon_t, dilate_mask}``
    (inversion guidance on, toward ``pivots``).
    """
    R = cond.shape[0]
    latents = x_T.expand(R, *x_T.shape[1:])
    noise_loss_list = None
    if method == "direct" and prox is None:  # DirectInversion.invert: offsets with no controller
        register_attention_control(unet, None)
        noise_loss_list = offset_calculate(unet, schedule, pivots, torch.cat([empty.expand(*cond.shape), cond]), guidance_scale)
    register_attention_control(unet, controller)
    for i in range(schedule.num_steps):
        t = int(schedule.timesteps[i])
        if method == "direct":
            uncond = empty.expand(*cond.shape)
        elif single_branch:
            uncond = torch.cat([uncond_embeddings[i], empty.expand(R - 1, *empty.shape[1:])])
        else:
            uncond = uncond_embeddings[i].expand(*cond.shape)
        context = torch.cat([uncond, cond])
        if prox is not None:
            latents = proximal_guidance_diffusion_step(
                unet, schedule, controller, latents, context, t, guidance_scale, prox=prox.get("prox", "l0"),
                quantile=prox.get("quantile", 0.75), recon_lr=prox.get("recon_lr", 1.0), recon_t=prox.get("recon_t", 400),
                inversion_guidance=True, x_stars=pivots, i=i, dilate_mask=prox.get("dilate_mask", 1),
                pin_source=method == "direct")
        elif method == "direct":
            latents = direct_inversion_p2p_guidance_diffusion_step(unet, schedule, controller, latents, context, t, guidance_scale, noise_loss_list[i])
        else:
            latents = diffusion_step(unet, schedule, controller, latents, context, t, guidance_scale)
    return latents
