"""A Stable-Diffusion-v1.5-shaped model with random weights, built in code (nothing is downloaded).

Same architecture as runwayml/stable-diffusion-v1-5: diffusers ``UNet2DConditionModel`` with SD 1.5's
UNet config (859.5 M parameters, 4x64x64 latents, 512 px), a ``CLIPTextModel`` with CLIP ViT-L/14's text
config (77 tokens, width 768) and the CLIP BPE tokenizer, SD's ``AutoencoderKL`` (optional) and DDIM
schedule. Its outputs are meaningless; it exists to measure speed on the real shapes (``tasks/studies/speed.py``).
"""
from __future__ import annotations

import torch

from bench.core.model import DiffusionModel, assemble, resolve_device_dtype

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True, freq_shift=0,
    mid_block_scale_factor=1)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                 projection_dim=768)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
SD15_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False,
                  "clip_sample": False, "prediction_type": "epsilon"}
SD15_UNET_PARAMS = 859_520_964     # parameter count of SD v1.5's UNet (tests check the config gives it)


def sd15_unet(device: str | torch.device = "cpu"):
    from diffusers import UNet2DConditionModel

    with torch.device(device):
        return UNet2DConditionModel(**SD15_UNET)


def sd15_random(*, device: str = "cpu", dtype: str = "float32", seed: int = 0, vae: bool = True) -> DiffusionModel:
    """The random SD-1.5-shaped model on ``device`` / ``dtype`` (weights initialised from ``seed``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.core.tokenizer import clip_tokenizer

    dev, _ = resolve_device_dtype(device, dtype)
    torch.manual_seed(seed)
    unet = sd15_unet(dev)
    with torch.device(dev):
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
        autoencoder = None
        if vae:
            from diffusers import AutoencoderKL
            autoencoder = AutoencoderKL(**SD15_VAE)
    return assemble(unet, text_encoder, clip_tokenizer(), SD15_SCHEDULER, autoencoder, device=device,
                    dtype=dtype, max_length=77, name="sd15-random", path="")
