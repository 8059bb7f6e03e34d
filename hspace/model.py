"""A diffusers UNet2DModel with its scheduler config, and hooks on its bottleneck (h-space).

h-space (paper Sec. III, after Kwon et al.) is the output of the U-Net's middle block at every
denoising step. We never re-implement the U-Net forward: one forward hook on ``unet.mid_block``
reads h (and, if asked, the mid-block input), adds an edit delta (paper eq. 6-7:
h_t <- h_t + gamma * v_t) or replaces h (the h-swap of paper Fig. 2a). The skip connections pass
unchanged, as in the paper.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hspace.io import read_json

logger = logging.getLogger(__name__)

SchedulerKind = Literal["ddpm", "ddim"]

#: A Hugging Face hub model id, ``owner/name``; anything else is a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class MidBlockHook:
    """A forward hook on ``unet.mid_block`` that captures, shifts or replaces h.

    Per forward call, in this order: ``replace`` (a tensor broadcastable to h) takes the place of
    the mid-block output, then ``delta`` is added, then the resulting h (the one the decoder
    sees) is kept in ``self.h`` when ``capture_h`` is set. ``self.mid_input`` holds the mid-block
    input when ``capture_input`` is set. Set the attributes between forward calls; the hook
    itself is added and removed by :meth:`HSpaceModel.hooks`.
    """

    def __init__(self, *, capture_h: bool = True, capture_input: bool = False) -> None:
        self.capture_h = capture_h
        self.capture_input = capture_input
        self.delta: Tensor | None = None
        self.replace: Tensor | None = None
        self.h: Tensor | None = None
        self.mid_input: Tensor | None = None
        self.calls = 0

    def clear(self) -> None:
        """Forget the captured tensors and the edit (the hook stays attached)."""
        self.delta = None
        self.replace = None
        self.h = None
        self.mid_input = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
        self.calls += 1
        if self.capture_input:
            self.mid_input = args[0] if args else kwargs["hidden_states"]
        h = output
        if self.replace is not None:
            if self.replace.shape[-3:] != h.shape[-3:]:
                raise ValueError(
                    f"h replacement has shape {tuple(self.replace.shape)}, h is {tuple(h.shape)}"
                )
            # same memory layout as the real output, so the decoder computes bit-identically
            h = torch.empty_like(output).copy_(self.replace.to(device=h.device, dtype=h.dtype).expand_as(h))
        if self.delta is not None:
            h = h + self.delta.to(device=h.device, dtype=h.dtype)
        if self.capture_h:
            self.h = h
        return None if h is output else h


def _use_classic_attention(unet: nn.Module) -> list[tuple[nn.Module, Any]]:
    """Set ``AttnProcessor()`` on every module with ``set_processor``; returns (module, old processor)."""
    from diffusers.models.attention_processor import AttnProcessor

    saved = []
    for module in unet.modules():
        if hasattr(module, "set_processor"):
            saved.append((module, getattr(module, "processor", None)))
            module.set_processor(AttnProcessor())
    return saved


def use_forward_ad_safe_attention(unet: nn.Module) -> nn.Module:
    """Set the classic ``AttnProcessor()`` on every attention module; returns ``unet``.

    The default SDPA processor has no forward-AD formula on some backends, which breaks the
    JVPs of the Jacobian method (paper Alg. 1). UNet2DModel has no ``set_attn_processor``, so
    every module with ``set_processor`` gets one. Outputs are unchanged up to float rounding.
    :func:`forward_ad_safe` does the same for the duration of a block only.
    """
    _use_classic_attention(unet)
    return unet


@contextmanager
def forward_ad_safe(unet: nn.Module) -> Iterator[nn.Module]:
    """Temporarily make ``unet`` usable under forward-mode AD, restoring it on exit.

    - every attention module gets the classic ``AttnProcessor`` (SDPA kernels lack forward-AD
      formulas on some backends), as in :func:`use_forward_ad_safe_attention`;
    - every GroupNorm gets a contiguous input (on the CPU, GroupNorm under forward AD fails on
      the channels_last-strided tensors attention blocks produce);
    - blocks compiled by :func:`hspace.accel.accelerate` run their eager forward (``torch.func``
      transforms do not go through compiled graphs).
    """
    from hspace.accel import eager

    saved = _use_classic_attention(unet)
    handles = [
        m.register_forward_pre_hook(
            lambda _m, args: tuple(a.contiguous() if isinstance(a, Tensor) else a for a in args)
        )
        for m in unet.modules()
        if isinstance(m, nn.GroupNorm)
    ]
    try:
        with eager(unet):
            yield unet
    finally:
        for h in handles:
            h.remove()
        for module, processor in saved:
            if processor is not None:
                module.set_processor(processor)


def unet_fingerprint(unet: nn.Module) -> str:
    """Short sha256 of the U-Net config (without private ``_`` keys such as the load path) and its
    weights as float32, to tie directions to a model wherever it was loaded from."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(unet, "config", {})).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def _is_local_path(path_or_id: str | Path) -> bool:
    text = str(path_or_id)
    return isinstance(path_or_id, Path) or not HUB_ID.match(text) or Path(text).exists()


def _load_local(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """UNet + scheduler config from a DDPMPipeline directory or a bare UNet directory."""
    from diffusers import DDPMScheduler, UNet2DModel

    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if (path / "unet" / "config.json").is_file():
        unet = UNet2DModel.from_pretrained(path, subfolder="unet", low_cpu_mem_usage=False)
        candidates = [path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"]
    elif (path / "config.json").is_file():
        unet = UNet2DModel.from_pretrained(path, low_cpu_mem_usage=False)
        candidates = [path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"]
    else:
        raise FileNotFoundError(
            f"{path} holds neither unet/config.json (DDPMPipeline layout) nor config.json (bare UNet)"
        )
    for candidate in candidates:
        if candidate.is_file():
            return unet, _read_scheduler_config(candidate)
    logger.warning("no scheduler_config.json under %s: using DDPMScheduler defaults", path)
    return unet, dict(DDPMScheduler().config)


def _read_scheduler_config(path: Path) -> dict[str, Any]:
    """A scheduler_config.json: a JSON object whose num_train_timesteps (if given) is a positive int."""
    try:
        config = read_json(path)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: a scheduler config must be a JSON object, got {type(config).__name__}")
    steps = config.get("num_train_timesteps", 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{path}: num_train_timesteps must be a positive int, got {steps!r}")
    return config


def _load_hub(model_id: str, revision: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """UNet + scheduler config from the Hugging Face hub (``unet/`` subfolder or repo root)."""
    from diffusers import DDPMScheduler, UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(
            model_id, subfolder="unet", revision=revision, low_cpu_mem_usage=False
        )
    except OSError:
        unet = UNet2DModel.from_pretrained(model_id, revision=revision, low_cpu_mem_usage=False)
    try:
        config = DDPMScheduler.load_config(model_id, subfolder="scheduler", revision=revision)
    except OSError:
        config = DDPMScheduler.load_config(model_id, revision=revision)
    return unet, dict(config)


class HSpaceModel:
    """A UNet2DModel (eval mode, no grad by default) with its scheduler config and h-space hooks.

    Build it with :meth:`from_pretrained` (local directory or hub id) or directly from an
    in-memory ``UNet2DModel`` and a scheduler config dict.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler_config: dict[str, Any],
        *,
        model_id: str = "in-memory",
        revision: str | None = None,
        fingerprint: str | None = None,
    ) -> None:
        if getattr(unet, "mid_block", None) is None:
            raise ValueError("unet has no mid_block: h-space is the mid-block output")
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.model_id = model_id
        self.revision = revision
        self._fingerprint = fingerprint
        self._h_shape: tuple[int, int, int] | None = None
        self._mid_input_shape: tuple[int, int, int] | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        compile: bool | str = False,
    ) -> HSpaceModel:
        """Load from a local directory (``unet/`` + ``scheduler/``, or a bare UNet dir) or a hub id.

        The fingerprint is computed from the weights as stored (float32), before the cast to
        ``dtype``, so an fp16 load of a model matches directions found with its fp32 load.
        ``channels_last`` and ``compile`` are the speed options of :func:`hspace.accel.accelerate`
        (bfloat16 / float16 ``dtype`` keep the sampler's scheduler arithmetic in float32).
        """
        if _is_local_path(path_or_id):
            path = Path(path_or_id).expanduser()
            unet, config = _load_local(path)
            model_id = str(path)
        else:
            try:
                unet, config = _load_hub(str(path_or_id), revision)
            except Exception as error:  # no network, unknown repo, bad revision
                raise FileNotFoundError(
                    f"{path_or_id!r}: no such local directory, and loading it as a hub id failed "
                    f"(revision={revision!r}): {error}"
                ) from error
            model_id = str(path_or_id)
        fingerprint = unet_fingerprint(unet)
        unet = unet.to(device=device) if dtype == unet.dtype else unet.to(device=device, dtype=dtype)
        if channels_last or compile:
            from hspace.accel import accelerate

            accelerate(unet, channels_last=channels_last, compile=compile)
        return cls(unet, config, model_id=model_id, revision=revision, fingerprint=fingerprint)

    # -- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, H, W) of the images the U-Net denoises."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(self.unet.config.in_channels), int(height), int(width))

    @property
    def h_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the mid-block output, measured once by a dry forward at batch 1."""
        if self._h_shape is None:
            self._probe_shapes()
        assert self._h_shape is not None
        return self._h_shape

    @property
    def mid_input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the mid-block input."""
        if self._mid_input_shape is None:
            self._probe_shapes()
        assert self._mid_input_shape is not None
        return self._mid_input_shape

    @property
    def fingerprint(self) -> str:
        """Short sha256 of the U-Net config and weights (see :func:`unet_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = unet_fingerprint(self.unet)
        return self._fingerprint

    def _probe_shapes(self) -> None:
        x = torch.zeros(1, *self.image_shape, device=self.device, dtype=self.dtype)
        with self.hooks(capture_input=True) as hook, torch.no_grad():
            self.unet(x, 0)
            assert hook.h is not None and hook.mid_input is not None
            self._h_shape = tuple(hook.h.shape[1:])  # type: ignore[assignment]
            self._mid_input_shape = tuple(hook.mid_input.shape[1:])  # type: ignore[assignment]

    # -- behaviour ----------------------------------------------------------------------------
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> HSpaceModel:
        """Move/cast the U-Net in place; returns self."""
        self.unet.to(device=device, dtype=dtype)
        return self

    def make_scheduler(self, kind: SchedulerKind = "ddpm", **overrides: Any):
        """A fresh DDPMScheduler or DDIMScheduler from the model's scheduler config (+ overrides)."""
        from diffusers import DDIMScheduler, DDPMScheduler

        classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}
        if kind not in classes:
            raise ValueError(f"scheduler kind must be 'ddpm' or 'ddim', got {kind!r}")
        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        config.update(overrides)
        return classes[kind].from_config(config)

    @contextmanager
    def hooks(self, *, capture_h: bool = True, capture_input: bool = False) -> Iterator[MidBlockHook]:
        """Attach one :class:`MidBlockHook` to ``unet.mid_block`` for the duration of the block."""
        hook = MidBlockHook(capture_h=capture_h, capture_input=capture_input)
        handle = self.unet.mid_block.register_forward_hook(hook, with_kwargs=True)
        try:
            yield hook
        finally:
            handle.remove()

    def predict_noise(self, x_t: Tensor, timestep: int | Tensor) -> Tensor:
        """eps_theta(x_t, t): the U-Net output (hooks, if attached, apply)."""
        return self.unet(x_t, timestep).sample

    def __repr__(self) -> str:
        return (
            f"HSpaceModel(model_id={self.model_id!r}, revision={self.revision!r}, "
            f"device={self.device}, dtype={self.dtype}, image_shape={self.image_shape})"
        )
