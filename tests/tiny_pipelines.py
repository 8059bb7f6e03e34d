"""Tiny diffusers pipelines of every kind hspace supports, built from configs in process.

No model hub is reachable in tests, so, as diffusers' own test suite does, each pipeline is made of
components with tiny random-weight configs (U-Nets, VAEs, a CLIP text encoder with a word-level
tokenizer written here, a DiT) and saved with ``save_pretrained`` as a pipeline directory that
``HSpaceModel.from_pretrained`` and the diffusers pipeline class both load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

#: The words the test tokenizer knows (each a whole-word token, CLIP style ``word</w>``).
WORDS = (
    "a photo of face person smiling glasses hat grey hair dark skin facing left right blurry ugly "
    "red blue green cat dog portrait"
).split()
TEXT_LENGTH = 16


def write_tokenizer(directory: Path) -> Any:
    """A CLIPTokenizer whose every word in :data:`WORDS` is one token: vocab.json and the BPE merges
    that assemble each word (hspace.toy.captions builds them), saved in ``directory``."""
    from transformers import CLIPTokenizer

    from hspace.toy.captions import EOS_TOKEN, build_vocabulary

    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocabulary(tuple(WORDS))
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=TEXT_LENGTH
    )
    tokenizer.pad_token = EOS_TOKEN
    return tokenizer


def vocabulary_size() -> int:
    from hspace.toy.captions import build_vocabulary

    return len(build_vocabulary(tuple(WORDS))[0])


def _text_encoder(with_projection: bool = False, hidden: int = 32) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocabulary_size(),
        max_position_embeddings=TEXT_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
    )
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def _vae(latent_channels: int = 4) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=16,
    ).eval()


def _cond_unet(**extra: Any) -> Any:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        **extra,
    ).eval()


def _scheduler(kind: str = "ddpm", **extra: Any) -> Any:
    import diffusers

    cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[kind]
    return cls(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, **extra
    )


def stable_diffusion(prediction_type: str = "epsilon") -> Any:
    """A tiny StableDiffusionPipeline: 16x16 images, 4x8x8 latents, h = 32x4x4 at the mid block."""
    import tempfile

    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    unet = _cond_unet(cross_attention_dim=32)
    vae = _vae()
    text_encoder = _text_encoder()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def stable_diffusion_xl() -> Any:
    """A tiny StableDiffusionXLPipeline: two text encoders (the second with a projection), pooled
    embeddings and time ids (``addition_embed_type="text_time"``)."""
    import tempfile

    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    time_dim = 8
    unet = _cond_unet(
        cross_attention_dim=64,  # both encoders' hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=32 + 6 * time_dim,
        transformer_layers_per_block=1,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = write_tokenizer(Path(tmp))
        tokenizer_2 = write_tokenizer(Path(tmp) / "two")
    return StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=_text_encoder(),
        text_encoder_2=_text_encoder(with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_scheduler(),
    )


def latent_diffusion() -> Any:
    """A tiny LDMPipeline: a VQModel and an unconditional UNet2DModel on 3x8x8 latents."""
    from diffusers import LDMPipeline, UNet2DModel, VQModel

    torch.manual_seed(0)
    vqvae = VQModel(
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=3,
        norm_num_groups=8,
        num_vq_embeddings=32,
        sample_size=16,
    ).eval()
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    return LDMPipeline(vqvae=vqvae, unet=unet, scheduler=_scheduler("ddim"))


def dit() -> Any:
    """A tiny DiTPipeline: a 4-block DiTTransformer2DModel on 4x8x8 latents (patch 2: 16 tokens),
    learned sigma, 1000 classes + the null class DiTPipeline uses for guidance."""
    from diffusers import DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    ).eval()
    return DiTPipeline(transformer=transformer, vae=_vae(), scheduler=_scheduler("ddim"))


def class_unet() -> Any:
    """A tiny class-conditional UNet2DModel (10 classes) in a DDPMPipeline."""
    from diffusers import DDPMPipeline, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=10,
    ).eval()
    return DDPMPipeline(unet=unet, scheduler=_scheduler())


BUILDERS = {
    "text": stable_diffusion,
    "text-xl": stable_diffusion_xl,
    "latent": latent_diffusion,
    "dit": dit,
    "class": class_unet,
}


def save(kind: str, directory: Path) -> Path:
    """Build the tiny pipeline of ``kind`` and save it as a pipeline directory."""
    BUILDERS[kind]().save_pretrained(directory)
    return directory
