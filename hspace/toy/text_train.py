"""Train the text-to-image toy: a tiny latent diffusion model of the toy faces, captioned by their factors.

Two phases in one resumable run. Steps ``[0, vae_steps)`` train the ``AutoencoderKL`` (32x32 RGB to
a 4 x 16 x 16 latent; L1 + MSE reconstruction and a small KL term); then the autoencoder is frozen,
every training face is encoded once (posterior mean and standard deviation), the latent scaling
factor is set to one over the latents' standard deviation, and the next ``steps`` steps train the
``UNet2DConditionModel`` and the ``CLIPTextModel`` together on noise (epsilon) prediction, Min-SNR
weighted, or on v-prediction weighted so that the high-noise steps keep their weight,
with a fresh random caption per face and step (:func:`hspace.toy.captions.caption_for`; 15% of
them empty, the caption dropout that classifier-free guidance needs).

Seeded and resumable: every step draws its batch, noise and captions from generators seeded by
(seed, step); a checkpoint (all weights, EMA weights, optimisers, step) is written every
``checkpoint_every`` steps with ``torch.save`` and read back with ``weights_only=True``, so a
resumed run ends with the weights of an uninterrupted one. The export is a
``StableDiffusionPipeline`` directory (EMA U-Net and text encoder, safetensors, no safety checker)
that ``diffusers.StableDiffusionPipeline.from_pretrained`` loads offline.

Run ``python -m hspace.toy.text_train --out runs/toy-text --vae-steps 600 --steps 3000``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from hspace.toy.captions import MAX_TOKENS, build_vocabulary, caption_for, load_tokenizer, tokenizer_files
from hspace.toy.train import TRAIN_SEED_OFFSET, min_snr_weights
from hspace.toy.world import make_dataset, sample_factors

#: What the denoiser predicts: the noise, or v = sqrt(a) * noise - sqrt(1 - a) * latent.
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: Autoencoder: 32 x 32 x 3 <-> 16 x 16 x 4, no attention (flat-coloured faces need none).
TEXT_VAE_CONFIG: dict = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    mid_block_add_attention=False,
)

#: Denoiser on the 16 x 16 latent: cross-attention at 8 x 8 and in the mid-block; h = 64 x 8 x 8.
TEXT_UNET_CONFIG: dict = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=8,
)

#: The U-Net option that also adds the caption to the timestep embedding (diffusers' ``TextTimeEmbedding``:
#: attention pooling over the text encoder's outputs), so the caption modulates every ResNet block
#: as the timestep does, at every resolution, besides the cross-attention at 8 x 8.
POOLED_TEXT_CONFIG: dict = dict(addition_embed_type="text", addition_embed_type_num_heads=4)

#: Scheduler: 1000 training steps, linear betas 1e-4 .. 0.02 (the DDPM paper's), epsilon prediction.
TEXT_SCHEDULER_CONFIG: dict = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=1e-4,
    beta_end=0.02,
    prediction_type="epsilon",
    clip_sample=False,  # latents are not bounded to [-1, 1]
    steps_offset=1,
)


def text_encoder_config() -> CLIPTextConfig:
    """A 2-layer, 64-wide CLIP text transformer over the caption vocabulary."""
    vocab, _ = build_vocabulary()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=64,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def build_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**TEXT_VAE_CONFIG)


def build_denoiser(seed: int = 0, pooled_text: bool = False) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """Freshly initialised U-Net and text encoder (deterministic from ``seed``)."""
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**TEXT_UNET_CONFIG, **(POOLED_TEXT_CONFIG if pooled_text else {}))
    text_encoder = CLIPTextModel(text_encoder_config())
    return unet, text_encoder


def add_pooled_text(unet: UNet2DConditionModel, seed: int = 0) -> UNet2DConditionModel:
    """``unet`` with the pooled-caption path added, computing exactly what ``unet`` computes.

    Every weight is ``unet``'s; the new ``add_embedding`` ends in a LayerNorm whose scale and bias
    start at zero, so the U-Net's output is unchanged until training opens the path.
    """
    if unet.config.addition_embed_type is not None:
        raise ValueError(f"the U-Net already has addition_embed_type={unet.config.addition_embed_type!r}")
    torch.manual_seed(seed + 2)
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}  # "_use_default_values"
    grown = UNet2DConditionModel(**(config | POOLED_TEXT_CONFIG))  # would reset what it names
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or any(not k.startswith("add_embedding.") for k in missing):
        raise ValueError(f"cannot add the pooled-caption path: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        grown.add_embedding.norm2.weight.zero_()
        grown.add_embedding.norm2.bias.zero_()
    return grown


def _images_to_model_range(images_uint8: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous()


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKL, images: torch.Tensor, batch: int = 512
) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and standard deviation of every image (uint8 [N, H, W, 3])."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(_images_to_model_range(images[i : i + batch])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(mean: torch.Tensor, std: torch.Tensor) -> float:
    """One over the standard deviation of sampled latents (exact over the posterior: var(mean) + E[var])."""
    var = mean.double().var() + std.double().pow(2).mean()
    return float(1.0 / var.sqrt())


def v_loss_weights(alpha_bar: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights min(SNR + 1, gamma) / (SNR + 1) of the v-prediction loss; ones if gamma <= 0.

    The v loss is (SNR + 1) times the loss on the predicted clean latent. These weights cap that
    factor at ``gamma``, so the nearly clean steps do not dominate (as Min-SNR does), but keep it
    at least 1 at high noise, where Min-SNR's factor min(SNR, gamma) vanishes: at high noise the
    best prediction is the mean face of the caption, which is where a caption's global factors
    (a hat, the pose) are decided.
    """
    if gamma <= 0:
        return torch.ones_like(alpha_bar)
    snr_plus_one = 1 / (1 - alpha_bar)
    return snr_plus_one.clamp(max=gamma) / snr_plus_one


def prediction_target(
    noise: torch.Tensor, latent: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the denoiser learns to output for ``latent`` noised with ``noise`` to level ``alpha_bar``."""
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latent
    return noise


def scheduler_config(prediction_type: str = "epsilon") -> dict:
    """The export's ``DDPMScheduler`` configuration for a denoiser trained on ``prediction_type``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return TEXT_SCHEDULER_CONFIG | {"prediction_type": prediction_type}


def export_pipeline(
    directory: Path,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    prediction_type: str = "epsilon",
) -> Path:
    """Save the components as a ``StableDiffusionPipeline`` directory with the caption tokenizer."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(),
        unet=unet,
        scheduler=DDPMScheduler(**scheduler_config(prediction_type)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory)
    tokenizer_files(directory / "tokenizer")  # vocab.json + merges.txt instead of tokenizer.json
    return directory


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
            pe.lerp_(p, 1 - decay)


class _Log:
    """Mean loss over the last ``every`` steps, printed and appended to ``log.jsonl``."""

    def __init__(self, path: Path, every: int):
        self.path, self.every, self.t0, self.losses = path, every, time.time(), []

    def __call__(self, phase: str, step: int, loss: float, force: bool = False) -> None:
        self.losses.append(loss)
        if (step + 1) % self.every and not force:
            return
        rec = {
            "phase": phase,
            "step": step + 1,
            "loss": float(np.mean(self.losses)),
            "s": time.time() - self.t0,
        }
        self.losses = []
        print(json.dumps(rec), flush=True)
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")


def _from_export(cls, directory: Path):
    """A diffusers model from an export's subfolder, with only that folder's configuration.

    Unlike ``from_pretrained``, which records the folder as ``_name_or_path`` and would write it
    into the next export's configuration.
    """
    model = cls.from_config(cls.load_config(directory))
    model.load_state_dict(load_file(str(directory / "diffusion_pytorch_model.safetensors")))
    return model


class _Components:
    """Everything a checkpoint holds: autoencoder, U-Net, text encoder, their EMA copies, optimisers."""

    def __init__(
        self,
        seed: int,
        lr: float,
        vae_lr: float,
        text_lr: float | None = None,
        init: Path | None = None,
        pooled_text: bool = False,
    ):
        if init is None:
            self.vae = build_vae(seed)
            self.unet, self.text_encoder = build_denoiser(seed, pooled_text)
        else:  # an exported pipeline's weights (its autoencoder is kept frozen)
            self.vae = _from_export(AutoencoderKL, init / "vae")
            self.unet = _from_export(UNet2DConditionModel, init / "unet")
            self.text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder")
            if pooled_text and self.unet.config.addition_embed_type is None:
                self.unet = add_pooled_text(self.unet, seed)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=vae_lr, weight_decay=0.0)
        self.ema_unet = copy.deepcopy(self.unet).requires_grad_(False)
        self.ema_text = copy.deepcopy(self.text_encoder).requires_grad_(False)
        self.params = list(self.unet.parameters()) + list(self.text_encoder.parameters())
        if text_lr is None:
            groups = [{"params": self.params, "lr": lr, "base_lr": lr}]
        else:  # the text path: the text encoder, the U-Net's cross-attention and pooled-caption path
            cross = [
                p for n, p in self.unet.named_parameters() if ".attn2." in n or n.startswith("add_embedding.")
            ]
            cross_ids = {id(p) for p in cross}
            rest = [p for p in self.unet.parameters() if id(p) not in cross_ids]
            text_path = list(self.text_encoder.parameters()) + cross
            groups = [
                {"params": text_path, "lr": text_lr, "base_lr": text_lr},
                {"params": rest, "lr": lr, "base_lr": lr},
            ]
        self.opt = torch.optim.AdamW(groups, weight_decay=0.0)

    def state(self, step: int, with_denoiser: bool) -> dict:
        state = {"step": step, "vae": self.vae.state_dict(), "vae_opt": self.vae_opt.state_dict()}
        if with_denoiser:
            state |= {
                "unet": self.unet.state_dict(),
                "text_encoder": self.text_encoder.state_dict(),
                "ema_unet": self.ema_unet.state_dict(),
                "ema_text_encoder": self.ema_text.state_dict(),
                "opt": self.opt.state_dict(),
            }
        return state

    def load(self, path: Path) -> int:
        """Restore from checkpoint ``path`` (``weights_only``); returns its step."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.vae.load_state_dict(state["vae"])
            self.vae_opt.load_state_dict(state["vae_opt"])
            if "unet" in state:
                self.unet.load_state_dict(state["unet"])
                self.text_encoder.load_state_dict(state["text_encoder"])
                self.ema_unet.load_state_dict(state["ema_unet"])
                self.ema_text.load_state_dict(state["ema_text_encoder"])
                self.opt.load_state_dict(state["opt"])
            return int(state["step"])
        except Exception as e:  # unpickling, missing keys, shape mismatches: all name the file
            raise ValueError(f"corrupt or foreign checkpoint {path}: {e}") from e


def _vae_step(c: _Components, images: torch.Tensor, step: int, seed: int, batch_size: int, hp: dict) -> float:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = _images_to_model_range(images[torch.randint(0, len(images), (batch_size,), generator=gen)])
    post = c.vae.encode(x).latent_dist
    rec = c.vae.decode(post.sample(generator=gen)).sample
    kl = post.kl() / post.mean[0].numel()  # per latent element
    loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + hp["kl_weight"] * kl.mean()
    for g in c.vae_opt.param_groups:
        g["lr"] = hp["vae_lr"] * min(1.0, (step + 1) / hp["warmup"])
    c.vae_opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(c.vae.parameters(), 1.0)
    c.vae_opt.step()
    _check_finite(loss, step)
    return loss.item()


def _denoiser_step(
    c: _Components, data: dict, step: int, k: int, seed: int, batch_size: int, hp: dict
) -> float:
    """One U-Net + text encoder step; ``k`` counts denoiser steps (warm-up and EMA schedule)."""
    lat_mean, lat_std, scale, alphas = data["mean"], data["std"], data["scale"], data["alphas"]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(0, len(lat_mean), (batch_size,), generator=gen)
    z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) * scale
    noise = torch.randn(z0.shape, generator=gen)
    t = torch.randint(0, len(alphas), (batch_size,), generator=gen)
    rng = np.random.default_rng([seed, step, 0xCA97])
    captions = [caption_for(data["factors"][int(i)], rng) for i in idx]
    tok = data["tokenizer"]
    ids = tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    for g in c.opt.param_groups:
        g["lr"] = g.get("base_lr", hp["lr"]) * min(1.0, (k + 1) / hp["warmup"])
    pred = c.unet(zt, t, encoder_hidden_states=c.text_encoder(ids.input_ids)[0]).sample
    if hp["prediction_type"] == "v_prediction":
        weights = v_loss_weights(a.flatten(), hp["min_snr_gamma"])
    else:
        weights = min_snr_weights(a.flatten(), hp["min_snr_gamma"])
    target = prediction_target(noise, z0, a, hp["prediction_type"])
    per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
    loss = (per_sample * weights).mean()
    c.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(c.params, 1.0)
    c.opt.step()
    d = min(hp["ema_decay"], (1 + k) / (10 + k))
    _ema_update(c.ema_unet, c.unet, d)
    _ema_update(c.ema_text, c.text_encoder, d)
    _check_finite(loss, step)
    return loss.item()


def _autoencoder_steps(init: Path | None, steps: int, vae_steps: int) -> int:
    """The run's autoencoder steps (none when it starts from ``init``), after checking the arguments."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if init is not None:
        if not (Path(init) / "model_index.json").is_file():
            raise ValueError(f"--init {init}: not an exported pipeline directory (no model_index.json)")
        return 0
    if vae_steps < 1:
        raise ValueError(f"vae_steps must be >= 1, got {vae_steps}")
    return vae_steps


def train(
    out: Path,
    steps: int,
    vae_steps: int = 600,
    batch_size: int = 32,
    vae_batch_size: int = 16,
    lr: float = 1e-3,
    vae_lr: float = 2e-3,
    kl_weight: float = 1e-4,
    warmup: int = 100,
    ema_decay: float = 0.995,
    min_snr_gamma: float = 5.0,
    n_images: int = 20_000,
    checkpoint_every: int = 50,
    export_every: int = 250,
    log_every: int = 25,
    seed: int = 0,
    threads: int | None = None,
    stop_after: int | None = None,
    init: Path | None = None,
    text_lr: float | None = None,
    prediction_type: str = "epsilon",
    pooled_text: bool = False,
) -> Path:
    """Train (or resume) the text toy in ``out``; returns the exported pipeline directory.

    ``init``: an exported pipeline directory to train on from instead of from scratch (a second
    run): its autoencoder is kept frozen with its latent scaling factor, there is no autoencoder
    phase (``vae_steps`` is ignored) and the ``steps`` denoiser steps start from its U-Net and
    text encoder. ``text_lr``: the learning rate of the text path (the text encoder, the U-Net's
    cross-attention layers and its pooled-caption path if any; default ``lr``), the rest of the
    U-Net keeping ``lr``.
    ``prediction_type``: ``"epsilon"`` (Min-SNR-``min_snr_gamma`` weighted noise loss) or
    ``"v_prediction"`` (:func:`v_loss_weights`); a run from ``init`` may change it, and the
    export's scheduler says which it is. ``pooled_text``: the U-Net also adds the caption to its
    timestep embedding (:data:`POOLED_TEXT_CONFIG`); from an ``init`` without that path, the path
    is added (:func:`add_pooled_text`) and the rest starts from ``init``'s weights.

    ``vae_steps`` autoencoder steps come first, then ``steps`` denoiser steps; the checkpoint's
    step counts both, so ``steps`` can be raised on a later call to train on. ``stop_after``
    ends the run after that many steps in all (a checkpoint is written there), as an
    interruption would; the export is then the latest one, if any.
    """
    vae_steps = _autoencoder_steps(init, steps, vae_steps)
    scheduler_config(prediction_type)  # validates it before any work
    if threads:
        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, export_dir = out / "checkpoint.pt", out / "pipeline"
    log = _Log(out / "log.jsonl", log_every)
    total = vae_steps + steps
    end = total if stop_after is None else min(total, stop_after)
    hp = dict(
        lr=lr,
        vae_lr=vae_lr,
        kl_weight=kl_weight,
        warmup=warmup,
        ema_decay=ema_decay,
        min_snr_gamma=min_snr_gamma,
        prediction_type=prediction_type,
    )

    c = _Components(
        seed, lr, vae_lr, text_lr=text_lr, init=None if init is None else Path(init), pooled_text=pooled_text
    )
    start = c.load(ckpt_path) if ckpt_path.exists() else 0
    if start:
        print(f"resumed from step {start}", flush=True)

    t0 = time.time()
    seeds = range(TRAIN_SEED_OFFSET, TRAIN_SEED_OFFSET + n_images)
    images = torch.from_numpy(make_dataset(seeds)[0])
    print(f"generated {n_images} training faces in {time.time() - t0:.1f}s", flush=True)

    def checkpoint_due(step: int) -> bool:
        return (step + 1) % checkpoint_every == 0 or step + 1 in (vae_steps, end)

    # phase 1: the autoencoder
    c.vae.train()
    for step in range(start, min(vae_steps, end)):
        log("vae", step, _vae_step(c, images, step, seed, vae_batch_size, hp), force=step + 1 == vae_steps)
        if checkpoint_due(step):
            _save(ckpt_path, c.state(step + 1, with_denoiser=False))
    if end <= vae_steps:
        return export_dir

    # phase 2: the denoiser and text encoder on the frozen autoencoder's latents
    c.vae.eval().requires_grad_(False)
    t0 = time.time()
    lat_mean, lat_std = encode_dataset(c.vae, images)
    if init is None:
        c.vae.register_to_config(scaling_factor=latent_scaling_factor(lat_mean, lat_std))
    scale = float(c.vae.config.scaling_factor)  # kept from ``init``: its U-Net learnt latents of that scale
    print(
        f"encoded {n_images} faces in {time.time() - t0:.1f}s; latent scaling factor {scale:.4f}", flush=True
    )
    data = {
        "mean": lat_mean,
        "std": lat_std,
        "scale": scale,
        "alphas": DDPMScheduler(**TEXT_SCHEDULER_CONFIG).alphas_cumprod,
        "factors": [sample_factors(s) for s in seeds],
        "tokenizer": load_tokenizer(),
    }
    c.unet.train()
    c.text_encoder.train()
    for step in range(max(start, vae_steps), end):
        k = step - vae_steps
        log("unet", step, _denoiser_step(c, data, step, k, seed, batch_size, hp), force=step + 1 == end)
        if checkpoint_due(step):
            _save(ckpt_path, c.state(step + 1, with_denoiser=True))
        if (k + 1) % export_every == 0:
            export_pipeline(export_dir, c.vae, c.ema_unet, c.ema_text, prediction_type)
    if end == total:
        export_pipeline(export_dir, c.vae, c.ema_unet, c.ema_text, prediction_type)
    return export_dir


def _check_finite(loss: torch.Tensor, step: int) -> None:
    if not math.isfinite(loss.item()):
        raise FloatingPointError(f"loss is {loss.item()} at step {step}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=3000, help="denoiser steps (after the autoencoder's)")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--vae-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--text-lr",
        type=float,
        default=None,
        help="learning rate of the text encoder, the U-Net's cross-attention and pooled-caption path "
        "(default: --lr)",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="an exported pipeline to train on from (no autoencoder phase; its autoencoder stays frozen)",
    )
    p.add_argument("--warmup", type=int, default=100, help="denoiser warm-up steps")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default="epsilon")
    p.add_argument(
        "--pooled-text",
        action="store_true",
        help="also add the pooled caption to the U-Net's timestep embedding (added to an --init U-Net)",
    )
    p.add_argument(
        "--min-snr-gamma",
        type=float,
        default=5.0,
        help="loss weight cap (Min-SNR for epsilon, min(SNR + 1, gamma) / (SNR + 1) for v); <= 0: none",
    )
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--n-images", type=int, default=20_000)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--export-every", type=int, default=250)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name in (
        "steps",
        "vae_steps",
        "batch_size",
        "vae_batch_size",
        "n_images",
        "checkpoint_every",
        "warmup",
    ):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    path = train(
        a.out,
        a.steps,
        vae_steps=a.vae_steps,
        batch_size=a.batch_size,
        vae_batch_size=a.vae_batch_size,
        lr=a.lr,
        vae_lr=a.vae_lr,
        n_images=a.n_images,
        checkpoint_every=a.checkpoint_every,
        export_every=a.export_every,
        seed=a.seed,
        threads=a.threads,
        init=a.init,
        text_lr=a.text_lr,
        warmup=a.warmup,
        ema_decay=a.ema_decay,
        prediction_type=a.prediction_type,
        min_snr_gamma=a.min_snr_gamma,
        pooled_text=a.pooled_text,
    )
    print(f"exported {path}")


if __name__ == "__main__":
    main()
