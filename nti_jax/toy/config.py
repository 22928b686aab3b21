"""The toy shapes-world Stable Diffusion, as diffusers/transformers config dicts (data, not code).

64 px images, a factor-4 VAE (16x16x4 latents), a UNet with cross-attention at 16x16, 8x8 and the
4x4 mid block, and a small CLIP text transformer over the real CLIP BPE vocabulary.
"""

IMAGE_SIZE = 64

VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 16,
    "act_fn": "silu",
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # set from the trained encoder's latent std at export
}

UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": IMAGE_SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [32, 64, 128],
    "layers_per_block": 1,
    "attention_head_dim": 4,
    "cross_attention_dim": 64,
    "norm_num_groups": 32,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "act_fn": "silu",
}

TEXT_ENCODER = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 64,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# ---- The SDXL-shaped toy (issue 20): SDXL's conditioning on the toy's networks --------------
# The UNet keeps UNET's block layout exactly (so the SD toy warm-starts it, see train.py --sdxl)
# and takes what differs in SDXL: linear proj_in/proj_out, cross-attention over both encoders'
# penultimate states side by side (TEXT_ENCODER's 64 + TEXT_ENCODER_XL_2's 32), and the
# "text_time" added conditioning (the pooled 32 + 6 time ids x 8 sinusoids).
UNET_XL = dict(
    UNET,
    use_linear_projection=True,
    cross_attention_dim=64 + 32,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)

# text_encoder is TEXT_ENCODER (CLIP ViT-L's kind, read without its projection); text_encoder_2
# is OpenCLIP bigG's kind in miniature: gelu, a text projection giving the pooled embedding,
# pad_token_id 0 (tokenizer_2 pads with "!", id 0, as sdxl-base's).
TEXT_ENCODER_XL_2 = {
    "architectures": ["CLIPTextModelWithProjection"],
    "model_type": "clip_text_model",
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 0,
}

# sdxl-base's Euler scheduler config as the hub ships it (its betas are SD's, the toy's too);
# nti_jax.testing.SDXL_SCHEDULER is this without the class name.
SCHEDULER_XL = {
    "_class_name": "EulerDiscreteScheduler",
    "beta_end": SCHEDULER["beta_end"],
    "beta_schedule": SCHEDULER["beta_schedule"],
    "beta_start": SCHEDULER["beta_start"],
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": SCHEDULER["num_train_timesteps"],
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
