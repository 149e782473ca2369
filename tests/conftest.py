"""Shared fixtures: the test-size organism (trained for a few dozen steps on first use, cached per
session) and a tiny randomly initialised Stable-Diffusion-shaped folder with a VAE."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))


@pytest.fixture(scope="session")
def small_organism():
    from tasks.organism import load_organism, small_config

    return load_organism(small_config())


@pytest.fixture(scope="session")
def small_world():
    from tasks.memworld import build_memworld
    from tasks.organism import small_config

    return build_memworld(small_config().world)


def make_tiny_sd(folder: Path, *, vae: bool = True, prediction_type: str = "epsilon",
                 sample_size: int = 8) -> Path:
    """A random SD-v1-shaped diffusers folder (CLIP text encoder, UNet, optional VAE, DDIM config)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.core.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    folder = Path(folder)
    tok = clip_tokenizer()
    tok.save_pretrained(folder / "tokenizer")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77))
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet = UNet2DConditionModel(sample_size=sample_size, in_channels=4 if vae else 3,
                                out_channels=4 if vae else 3, layers_per_block=1,
                                block_out_channels=(32, 32), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    if vae:
        v = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                          norm_num_groups=8, sample_size=sample_size * 2)
        v.save_pretrained(folder / "vae", safe_serialization=True)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                  clip_sample=False, set_alpha_to_one=False,
                  prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return folder


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("tiny_sd"))
