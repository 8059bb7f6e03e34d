"""Random-weight Stable Diffusion pipelines for the benchmarks, built from configs (no model hub).

- :data:`SD15_UNET`, :data:`SD15_VAE`, :data:`SD15_TEXT`: runwayml/stable-diffusion-v1-5's
  ``UNet2DConditionModel`` (859.5 M parameters, 4 x 64 x 64 latents at 512 px, h = 1280 x 8 x 8),
  its ``AutoencoderKL`` (83.7 M) and CLIP ViT-L/14's text encoder layers and widths (with the test
  tokenizer's vocabulary), written out; the GPU suite runs these.
- :data:`BENCH_UNET` (with the tests' tiny VAE and text encoder sizes): a small SD that is still
  large enough on the CPU for the denoiser to dominate a sampling call (4 x 32 x 32 latents,
  blocks 32 / 64, h = 64 x 16 x 16).

The tokenizer is the tests' whole-word CLIPTokenizer (``tests/tiny_pipelines.py``) with the text
encoder's context length; the prompts use its words.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tests.tiny_pipelines import WORDS, vocabulary_size, write_tokenizer

#: runwayml/stable-diffusion-v1-5 unet/config.json (the keys that differ from diffusers' defaults).
SD15_UNET: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)
#: runwayml/stable-diffusion-v1-5 vae/config.json.
SD15_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=512,
    act_fn="silu",
)
#: openai/clip-vit-large-patch14's text model (SD 1.5's text encoder), ids of the test tokenizer.
SD15_TEXT: dict[str, Any] = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)

#: A small SD U-Net for CPU benchmarks: 4 x 32 x 32 latents, h = 64 x 16 x 16 at the mid block.
BENCH_UNET: dict[str, Any] = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=8,
    cross_attention_dim=32,
)
#: The tests' tiny VAE (16 / 32 channels, 2x down-sampling: 64 px images from 32 x 32 latents).
TINY_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    sample_size=64,
)
#: The tests' tiny CLIP text encoder (hidden 32, 2 layers).
TINY_TEXT: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    max_position_embeddings=16,
    projection_dim=32,
    hidden_act="gelu",
)

#: Prompts and negative prompts in the test tokenizer's words, each within its 16-token context
#: (the tokenizer's vocabulary and merges are the tests' own: ``tests/tiny_pipelines.py``).
PROMPTS = ["a red cat", "grey hair", "smiling face", "a dog"]
NEGATIVE = ["blurry", "ugly"]
assert all(w in WORDS for p in PROMPTS + NEGATIVE for w in p.split()), "prompts use unknown words"


def stable_diffusion(
    unet: Mapping[str, Any] = BENCH_UNET,
    vae: Mapping[str, Any] = TINY_VAE,
    text: Mapping[str, Any] = TINY_TEXT,
    *,
    seed: int = 0,
) -> Any:
    """A StableDiffusionPipeline of random-weight components with these configs and a DDIM scheduler
    with SD's training schedule (scaled linear betas 0.00085 .. 0.012, ``set_alpha_to_one=False``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    text_config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=2, vocab_size=vocabulary_size(), **dict(text)
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp))
    tokenizer.model_max_length = int(text["max_position_embeddings"])
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**dict(vae)).eval(),
        text_encoder=CLIPTextModel(text_config).eval(),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**dict(unet)).eval(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, as hspace's sampler makes them."""
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]
