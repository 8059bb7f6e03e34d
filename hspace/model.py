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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from hspace.io import read_json

logger = logging.getLogger(__name__)

SchedulerKind = Literal["ddpm", "ddim"]

#: A Hugging Face hub model id, ``owner/name``; anything else is a local path.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class CapturePoint:
    """Where h lives: the output (or input) of one named module of the denoiser.

    ``module`` is a dotted path inside the denoiser (``mid_block``, ``up_blocks.0``,
    ``transformer_blocks.14``); ``where`` is ``output`` (the paper's h-space: the mid-block
    output) or ``input`` (h "before" the mid-block, as the paper's code also offers). Written as a
    spec string ``mid_block`` / ``mid_block:input``.
    """

    module: str = "mid_block"
    where: Literal["output", "input"] = "output"

    @classmethod
    def parse(cls, spec: str | CapturePoint) -> CapturePoint:
        """``"mid_block"``, ``"mid_block:input"``, ``"transformer_blocks.14"`` -> a CapturePoint."""
        if isinstance(spec, CapturePoint):
            return spec
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"capture point must be a module path such as 'mid_block', got {spec!r}")
        module, _, where = spec.strip().partition(":")
        where = where or "output"
        if where not in ("output", "input"):
            raise ValueError(f"capture point {spec!r}: after ':' write 'input' or 'output', got {where!r}")
        if not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", module):
            raise ValueError(f"capture point {spec!r}: {module!r} is not a dotted module path")
        return cls(module, where)  # type: ignore[arg-type]

    @property
    def spec(self) -> str:
        return self.module if self.where == "output" else f"{self.module}:{self.where}"

    def __str__(self) -> str:
        return self.spec


class HSpaceHook:
    """The one hook through which h is captured, shifted or replaced, at a :class:`CapturePoint`.

    Per forward call of the module, in this order: ``replace`` (a tensor broadcastable to h) takes
    the place of h, then ``delta`` is added, then the resulting h (the one the rest of the network
    sees) is kept in ``self.h`` when ``capture_h`` is set. ``self.mid_input`` holds the module's
    input when ``capture_input`` is set (for an output capture point). Tensors are in map layout
    [N, C, H, W]: a transformer block's tokens [N, L, D] are seen as [N, D, gh, gw] through
    ``grid`` = (gh, gw). A module returning a tuple (a U-Net down block) has h as its first item.
    Set the attributes between forward calls; the hook is added and removed by
    :meth:`HSpaceModel.hooks`.
    """

    def __init__(
        self,
        *,
        capture_h: bool = True,
        capture_input: bool = False,
        grid: tuple[int, int] | None = None,
    ) -> None:
        self.capture_h = capture_h
        self.capture_input = capture_input
        self.grid = grid
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

    # -- layout ---------------------------------------------------------------------------------
    def to_map(self, h: Tensor) -> Tensor:
        """[N, L, D] tokens -> [N, D, gh, gw] (a view); maps pass unchanged."""
        if h.ndim != 3:
            return h
        if self.grid is None:
            raise ValueError(f"h has token shape {tuple(h.shape)} but the capture point has no grid")
        return h.transpose(1, 2).unflatten(2, self.grid)

    def from_map(self, m: Tensor, like: Tensor) -> Tensor:
        """A map (or a broadcastable [C, H, W] / [N, C, H, W]) back in ``like``'s layout."""
        if like.ndim != 3:
            return m
        m = m if m.ndim == 4 else m[None]
        return m.flatten(2).transpose(1, 2)

    def edit(self, h: Tensor) -> Tensor:
        """h after ``replace`` and ``delta``; captured when asked (returns ``h`` itself if unchanged)."""
        out = h
        if self.replace is not None:
            want = self.to_map(h).shape[-3:]
            if self.replace.shape[-3:] != want:
                raise ValueError(f"h replacement has shape {tuple(self.replace.shape)}, h is {tuple(want)}")
            new = self.from_map(self.replace.to(device=h.device, dtype=h.dtype), h)
            # same memory layout as the real output, so the rest of the network computes bit-identically
            out = torch.empty_like(h).copy_(new.expand_as(h))
        if self.delta is not None:
            out = out + self.from_map(self.delta.to(device=h.device, dtype=h.dtype), h)
        if self.capture_h:
            self.h = self.to_map(out)
        return out

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """Forward hook (output capture point)."""
        self.calls += 1
        if self.capture_input:
            self.mid_input = self.to_map(args[0] if args else kwargs["hidden_states"])
        h = output[0] if isinstance(output, tuple) else output
        new = self.edit(h)
        if new is h:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook (input capture point): edits the module's ``hidden_states`` input."""
        self.calls += 1
        h = args[0] if args else kwargs["hidden_states"]
        new = self.edit(h)
        if new is h:
            return None
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}


#: The name this hook had when h was always the mid-block output.
MidBlockHook = HSpaceHook


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


def _load_pixel(
    path_or_id: str | Path, revision: str | None, local: bool
) -> tuple[nn.Module, dict[str, Any]]:
    """UNet + scheduler config of a pixel model, from a directory or a hub id."""
    if local:
        return _load_local(Path(path_or_id).expanduser())
    try:
        return _load_hub(str(path_or_id), revision)
    except Exception as error:  # no network, unknown repo, bad revision
        raise FileNotFoundError(
            f"{path_or_id!r}: no such local directory, and loading it as a hub id failed "
            f"(revision={revision!r}): {error}"
        ) from error


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


# ---------------------------------------------------------------------------------------------
# the kinds of model
@dataclass(frozen=True)
class ModelKind:
    """One kind of diffusers model hspace runs, as named by its pipeline class.

    ``denoiser`` and ``vae`` are the pipeline's component names; ``conditioning`` is the kind of
    :class:`hspace.conditioning.Conditioner`.
    """

    name: str
    pipeline_class: str
    denoiser: str = "unet"
    vae: str | None = None
    conditioning: str = "none"


PIXEL = ModelKind("pixel", "DDPMPipeline")
CLASS_PIXEL = ModelKind("class", "DDPMPipeline", conditioning="class")
LATENT = ModelKind("latent", "LDMPipeline", vae="vqvae")
TEXT = ModelKind("text", "StableDiffusionPipeline", vae="vae", conditioning="text")
TEXT_XL = ModelKind("text-xl", "StableDiffusionXLPipeline", vae="vae", conditioning="text-xl")
DIT = ModelKind("dit", "DiTPipeline", denoiser="transformer", vae="vae", conditioning="class")
#: Pipeline class (``model_index.json``'s ``_class_name``) -> kind. DDIMPipeline shares DDPM's layout.
PIPELINE_KINDS: dict[str, ModelKind] = {
    "DDPMPipeline": PIXEL,
    "DDIMPipeline": PIXEL,
    "LDMPipeline": LATENT,
    "StableDiffusionPipeline": TEXT,
    "StableDiffusionXLPipeline": TEXT_XL,
    "DiTPipeline": DIT,
}
KIND_NAMES = ("pixel", "class", "latent", "text", "text-xl", "dit")

#: Sampler name -> diffusers scheduler class name; every one is built from the model's scheduler config.
SCHEDULERS = {
    "ddpm": "DDPMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
}


def pipeline_class_name(path_or_id: str | Path, revision: str | None = None) -> str | None:
    """The pipeline class diffusers would load for a directory or hub id (``model_index.json``'s
    ``_class_name``), or None when there is no ``model_index.json`` (a bare U-Net)."""
    if _is_local_path(path_or_id):
        index = Path(path_or_id).expanduser() / "model_index.json"
        if not index.is_file():
            return None
        try:
            config = read_json(index)
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{index}: not valid JSON ({err})") from None
    else:
        from diffusers import DiffusionPipeline

        try:
            config = DiffusionPipeline.load_config(str(path_or_id), revision=revision)
        except OSError:
            return None
    name = config.get("_class_name") if isinstance(config, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"{path_or_id}: model_index.json has no _class_name string")
    return name


def kind_for_pipeline(class_name: str, source: Any = "model") -> ModelKind:
    """The :class:`ModelKind` of a diffusers pipeline class; ValueError naming an unsupported one."""
    if class_name not in PIPELINE_KINDS:
        supported = ", ".join(sorted(PIPELINE_KINDS))
        raise ValueError(
            f"{source}: hspace does not support diffusers' {class_name} (its denoiser has no h-space "
            f"capture point hspace knows); supported pipelines: {supported}"
        )
    return PIPELINE_KINDS[class_name]


def _is_class_conditional_unet(unet: nn.Module) -> bool:
    """A UNet2DModel with a class embedding (``num_class_embeds`` or ``class_embed_type``)."""
    return getattr(unet, "class_embedding", None) is not None


def _load_pipeline(path_or_id: str | Path, kind: ModelKind, revision: str | None) -> Any:
    """A diffusers pipeline of ``kind``, loaded by diffusers itself (safetensors, no remote code)."""
    import diffusers

    cls = getattr(diffusers, kind.pipeline_class)
    extra: dict[str, Any] = {}
    if kind is TEXT:
        extra = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        return cls.from_pretrained(str(path_or_id), revision=revision, **extra)
    except ImportError as err:
        raise ImportError(
            f"{path_or_id}: loading a {kind.pipeline_class} needs its text encoders' library; "
            f"install it with: pip install 'hspace[text]' ({err})"
        ) from err


def default_capture(kind: ModelKind, denoiser: nn.Module) -> str:
    """The paper's h-space: the U-Net mid-block output; for a transformer, the middle block's output."""
    if kind.denoiser == "transformer":
        blocks = getattr(denoiser, "transformer_blocks", None)
        if blocks is None or len(blocks) == 0:
            raise ValueError("the transformer has no transformer_blocks to capture h from")
        return f"transformer_blocks.{len(blocks) // 2}"
    return "mid_block"


def _make_conditioner(kind: ModelKind, denoiser: nn.Module, pipeline: Any, image_size: tuple[int, int]):
    from hspace import conditioning

    if kind.conditioning == "text":
        return conditioning.TextPrompts(pipeline)
    if kind.conditioning == "text-xl":
        return conditioning.TextPromptsXL(pipeline, image_size)
    if kind.conditioning == "class":
        config = denoiser.config
        if kind is DIT:
            # DiT's label embedding has one row past its classes for the null class (id 1000 for
            # ImageNet's 1000, which DiTPipeline hard-codes); its pipeline puts the conditional branch first
            n = int(config.num_embeds_ada_norm)
            return conditioning.ClassLabels(num_classes=n, null_class=n)
        return conditioning.ClassLabels(
            num_classes=getattr(config, "num_class_embeds", None), null_class=None
        )
    return conditioning.Unconditional()


class HSpaceModel:
    """A diffusers denoiser (eval mode, no grad) with its scheduler config, VAE, conditioning and
    h-space hook at one :class:`CapturePoint`.

    Every kind in :data:`PIPELINE_KINDS` (pixel and latent U-Nets, Stable Diffusion 1.x / 2.x,
    SDXL, class-conditional U-Nets, DiT) goes through the same hook and the same sampler; the
    pipeline's own components do the rest (prompt encoding, VAE decode and encode). Build it with
    :meth:`from_pretrained` (a directory or hub id), :meth:`from_pipeline` (an in-memory diffusers
    pipeline), or directly from an in-memory ``UNet2DModel`` and a scheduler config dict.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler_config: dict[str, Any],
        *,
        model_id: str = "in-memory",
        revision: str | None = None,
        fingerprint: str | None = None,
        kind: ModelKind | None = None,
        pipeline: Any = None,
        capture: str | CapturePoint | None = None,
    ) -> None:
        if kind is None:
            kind = CLASS_PIXEL if _is_class_conditional_unet(unet) else PIXEL
        self.kind = kind
        self.denoiser = unet.eval().requires_grad_(False)
        self.pipeline = pipeline
        self.vae = getattr(pipeline, kind.vae) if (pipeline is not None and kind.vae) else None
        if self.vae is not None:
            self.vae.eval().requires_grad_(False)
        self.scheduler_config = dict(scheduler_config)
        self.model_id = model_id
        self.revision = revision
        self._fingerprint = fingerprint
        self.capture = CapturePoint.parse(capture or default_capture(kind, self.denoiser))
        self._capture_module = self._resolve_capture_module()
        self.conditioner = _make_conditioner(kind, self.denoiser, pipeline, self.image_shape[1:])
        self._h_shape: tuple[int, int, int] | None = None
        self._mid_input_shape: tuple[int, int, int] | None = None

    def _resolve_capture_module(self) -> nn.Module:
        try:
            return self.denoiser.get_submodule(self.capture.module)
        except AttributeError:
            top = [name for name, _ in self.denoiser.named_children()]
            raise ValueError(
                f"capture point {self.capture.spec!r}: the {type(self.denoiser).__name__} has no module "
                f"{self.capture.module!r}; its top-level modules are {top}"
            ) from None

    @property
    def unet(self) -> nn.Module:
        """The denoiser (a U-Net, or DiT's transformer); the name predates transformer support."""
        return self.denoiser

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
        capture: str | CapturePoint | None = None,
    ) -> HSpaceModel:
        """Load from a local directory or a hub id; the kind comes from ``model_index.json``.

        A DDPM / DDIM pipeline directory (``unet/`` + ``scheduler/``) or a bare UNet directory loads
        as today; an ``LDMPipeline``, ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline`` or
        ``DiTPipeline`` is loaded by diffusers itself. ``capture`` names the h-space module
        (default: the U-Net's ``mid_block``, a transformer's middle block). The fingerprint is
        computed from the denoiser's weights as stored (float32), before the cast to ``dtype``, so
        an fp16 load matches directions found with the fp32 load. ``channels_last`` and ``compile``
        are the speed options of :func:`hspace.accel.accelerate`.
        """
        local = _is_local_path(path_or_id)
        if local and not Path(path_or_id).expanduser().is_dir():
            raise FileNotFoundError(f"model directory not found: {Path(path_or_id).expanduser()}")
        try:
            class_name = pipeline_class_name(path_or_id, revision)
        except Exception as error:
            if local:
                raise
            raise FileNotFoundError(
                f"{path_or_id!r}: reading its model_index.json failed: {error}"
            ) from error
        kind = kind_for_pipeline(class_name, path_or_id) if class_name is not None else PIXEL
        source = str(Path(path_or_id).expanduser()) if local else str(path_or_id)
        pipeline = None
        if kind is PIXEL:
            unet, config = _load_pixel(path_or_id, revision, local)
        else:
            pipeline = _load_pipeline(source, kind, revision)
            unet, config = getattr(pipeline, kind.denoiser), dict(pipeline.scheduler.config)
        fingerprint = unet_fingerprint(unet)
        model = cls(
            unet, config, model_id=source, revision=revision, fingerprint=fingerprint,
            kind=kind if kind is not PIXEL else None, pipeline=pipeline, capture=capture,
        )  # fmt: skip
        model.to(device=device, dtype=None if dtype == model.dtype else dtype)
        if channels_last or compile:
            from hspace.accel import accelerate

            accelerate(model.denoiser, channels_last=channels_last, compile=compile)
        return model

    @classmethod
    def from_pipeline(
        cls, pipeline: Any, *, capture: str | CapturePoint | None = None, model_id: str = "in-memory"
    ) -> HSpaceModel:
        """An in-memory diffusers pipeline of a supported kind (its components are used, not copied)."""
        kind = kind_for_pipeline(type(pipeline).__name__, model_id)
        unet = getattr(pipeline, kind.denoiser)
        if kind is PIXEL:
            return cls(unet, dict(pipeline.scheduler.config), model_id=model_id, capture=capture)
        return cls(
            unet, dict(pipeline.scheduler.config), model_id=model_id, kind=kind, pipeline=pipeline,
            capture=capture,
        )  # fmt: skip

    # -- properties ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    @property
    def is_latent(self) -> bool:
        """True when the denoiser works on VAE latents (images are decoded by the VAE)."""
        return self.vae is not None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(channels, H, W) of what the denoiser denoises (the image itself for a pixel model)."""
        config = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(config.in_channels), int(height), int(width))

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (1 for a pixel model), as diffusers computes it."""
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, H, W) of the images the model makes (decoded by the VAE for latent models)."""
        c, h, w = self.latent_shape
        if self.vae is None:
            return (c, h, w)
        f = self.vae_scale_factor
        return (int(self.vae.config.out_channels), h * f, w * f)

    @property
    def h_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of h at the capture point, measured once by a dry forward at batch 1."""
        if self._h_shape is None:
            self._probe_shapes()
        assert self._h_shape is not None
        return self._h_shape

    @property
    def mid_input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the capture module's input."""
        if self._mid_input_shape is None:
            self._probe_shapes()
        assert self._mid_input_shape is not None
        return self._mid_input_shape

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """(gh, gw) of a transformer's patch tokens, so that tokens read as a map; None for U-Nets."""
        if self.kind.denoiser != "transformer":
            return None
        config = self.denoiser.config
        _, height, width = self.latent_shape
        return (height // int(config.patch_size), width // int(config.patch_size))

    @property
    def fingerprint(self) -> str:
        """Short sha256 of the denoiser's config and weights (see :func:`unet_fingerprint`)."""
        if self._fingerprint is None:
            self._fingerprint = unet_fingerprint(self.denoiser)
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        """What a catalog records about the model: kind, pipeline, capture point, shapes, conditioning."""
        return {
            "kind": self.kind.name,
            "pipeline_class": self.kind.pipeline_class,
            "capture": self.capture.spec,
            "h_shape": list(self.h_shape),
            "latent_shape": list(self.latent_shape),
            "image_shape": list(self.image_shape),
            **self.conditioner.describe(),
        }

    def _probe_shapes(self) -> None:
        from hspace.conditioning import ConditionRequest

        x = torch.zeros(1, *self.latent_shape, device=self.device, dtype=self.dtype)
        request = ConditionRequest(guidance_scale=1.0)
        if self.conditioner.name in ("text", "text-xl"):
            request.prompts = [""]
        elif self.conditioner.name == "class":
            request.class_labels = [0]
        cond = self.conditioner.encode(request, 1, self.device, self.dtype)
        capture_input = self.capture.where == "output"
        with self.hooks(capture_input=capture_input) as hook, torch.no_grad():
            self.predict(x, torch.tensor(0, device=self.device), cond)
            assert hook.h is not None
            self._h_shape = tuple(hook.h.shape[1:])  # type: ignore[assignment]
            mid = hook.mid_input if hook.mid_input is not None else hook.h
            self._mid_input_shape = tuple(mid.shape[1:])  # type: ignore[assignment]

    # -- behaviour ----------------------------------------------------------------------------
    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> HSpaceModel:
        """Move/cast the denoiser (and the pipeline's other modules) in place; returns self."""
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if not kwargs:
            return self
        modules = [self.denoiser]
        if self.pipeline is not None:
            modules = [c for c in self.pipeline.components.values() if isinstance(c, nn.Module)]
        for module in modules:
            module.to(**kwargs)
        return self

    def make_scheduler(self, kind: str = "ddpm", **overrides: Any):
        """A fresh scheduler of a :data:`SCHEDULERS` kind from the model's scheduler config (+ overrides)."""
        import diffusers

        if kind not in SCHEDULERS:
            raise ValueError(f"scheduler kind must be one of {', '.join(SCHEDULERS)}, got {kind!r}")
        config = {k: v for k, v in self.scheduler_config.items() if not k.startswith("_")}
        config.update(overrides)
        return getattr(diffusers, SCHEDULERS[kind]).from_config(config)

    @contextmanager
    def hooks(self, *, capture_h: bool = True, capture_input: bool = False) -> Iterator[HSpaceHook]:
        """Attach one :class:`HSpaceHook` at the capture point for the duration of the block."""
        if capture_input and self.capture.where == "input":
            raise ValueError(
                "the capture point is a module input already: there is no separate input to record"
            )
        hook = HSpaceHook(capture_h=capture_h, capture_input=capture_input, grid=self.token_grid)
        module = self._capture_module
        if self.capture.where == "input":
            handle = module.register_forward_pre_hook(hook.pre, with_kwargs=True)
        else:
            handle = module.register_forward_hook(hook, with_kwargs=True)
        try:
            yield hook
        finally:
            handle.remove()

    def predict(self, x: Tensor, timestep: Tensor, cond: Any) -> Tensor:
        """The denoiser's noise prediction for the call batch ``x`` under ``cond`` (a
        :class:`hspace.conditioning.Condition`), unguided; a learned-variance output's second half
        (DiT) is dropped, as its pipeline does. Hooks, if attached, apply."""
        if self.kind.denoiser == "transformer":
            t = timestep if torch.is_tensor(timestep) else torch.tensor(timestep)
            t = t.reshape(-1).to(x.device).expand(x.shape[0])
            out = self.denoiser(x, timestep=t, **cond.kwargs).sample
        else:
            out = self.denoiser(x, timestep, **cond.kwargs).sample
        channels = self.latent_shape[0]
        return out[:, :channels] if out.shape[1] == 2 * channels else out

    def predict_noise(self, x_t: Tensor, timestep: int | Tensor, cond: Any = None) -> Tensor:
        """eps_theta(x_t, t) for an unconditional model, or under ``cond`` (hooks, if attached, apply)."""
        if cond is None:
            from hspace.conditioning import Condition

            cond = Condition({}, int(x_t.shape[0]))
        return self.predict(x_t, timestep if torch.is_tensor(timestep) else torch.tensor(timestep), cond)

    def decode(self, x0: Tensor) -> Tensor:
        """Images [B, C, H, W] float32 in [0, 1] from denoised samples (VAE-decoded latents for a
        latent model), as the pipelines' post-processing does."""
        if self.vae is not None:
            vae = self.vae
            latents = x0.to(device=self.device, dtype=vae.dtype)
            config = vae.config
            mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
            if mean is not None and std is not None:  # SDXL's VAE with latent statistics
                shape = (1, -1, 1, 1)
                mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
                std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
                latents = latents * std / config.scaling_factor + mean
            else:
                latents = latents / config.scaling_factor
            x0 = vae.decode(latents).sample
        return (x0 / 2 + 0.5).clamp(0, 1).float()

    def encode(self, images: Tensor) -> Tensor:
        """The denoiser's x_0 for images [B, C, H, W] in [0, 1]: 2x - 1 for a pixel model; the VAE's
        latent (the mode of an AutoencoderKL's posterior, a VQModel's pre-quantisation latent) times
        its scaling factor for a latent model."""
        x = images.to(device=self.device) * 2 - 1
        if self.vae is None:
            return x.to(self.dtype)
        encoded = self.vae.encode(x.to(self.vae.dtype))
        if hasattr(encoded, "latent_dist"):
            latents = encoded.latent_dist.mode()
        else:
            latents = encoded.latents
        return latents * self.vae.config.scaling_factor

    def __repr__(self) -> str:
        return (
            f"HSpaceModel(model_id={self.model_id!r}, kind={self.kind.name!r}, capture={self.capture.spec!r}, "
            f"revision={self.revision!r}, device={self.device}, dtype={self.dtype}, "
            f"image_shape={self.image_shape})"
        )
