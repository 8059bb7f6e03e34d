"""What a denoiser is conditioned on, and classifier-free guidance over its two branches.

One :class:`Conditioner` per kind of conditioning turns what a user asks for (prompts, negative
prompts, class labels, a guidance scale) into the keyword arguments of one denoiser call, using
the diffusers pipeline's own encoders (``encode_prompt``, SDXL's ``_get_add_time_ids``), never a
copy of them:

- :class:`Unconditional` (DDPM / LDM U-Nets): no arguments, no guidance;
- :class:`ClassLabels` (a class-embedding ``UNet2DModel``, the ``DiTTransformer2DModel``): class
  ids, with guidance against a null class where the model has one (DiT: id 1000);
- :class:`TextPrompts` (``StableDiffusionPipeline``) and :class:`TextPromptsXL`
  (``StableDiffusionXLPipeline``: two text encoders, pooled embeddings, time ids).

With guidance the denoiser sees every row twice in one call, as the pipelines do: Stable Diffusion
puts the unconditional branch first (``[uncond, cond]``), DiT the conditional one (``[cond,
uncond]``); :class:`Condition` records which, so the sampler and the h-space hook can address a
branch by name. The guided noise is ``eps_u + g (eps_c - eps_u)`` (Ho & Salimans), as in every
diffusers pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

Branch = Literal["cond", "uncond"]
#: Which branch's h a sampler records under guidance, and which branches an edit enters.
BRANCHES = ("cond", "uncond")


@dataclass
class Condition:
    """Keyword arguments of one denoiser call on ``rows`` samples, and how the call's batch splits.

    ``guided``: the call batch holds 2 * rows rows, one half per branch; ``uncond_first`` says
    which half comes first. Without guidance the batch is the rows themselves (one branch).
    """

    kwargs: dict[str, Any]
    rows: int
    guided: bool = False
    uncond_first: bool = True
    guidance_scale: float = 1.0

    def branch_rows(self, branch: Branch) -> slice:
        """The rows of the call batch that belong to ``branch`` (all rows without guidance)."""
        if not self.guided:
            return slice(0, self.rows)
        first = "uncond" if self.uncond_first else "cond"
        return slice(0, self.rows) if branch == first else slice(self.rows, 2 * self.rows)

    def model_input(self, x: Tensor) -> Tensor:
        """The denoiser's input for the call: x, or x twice under guidance."""
        return torch.cat([x, x]) if self.guided else x

    def guide(self, eps: Tensor) -> Tensor:
        """The guided noise ``eps_u + g (eps_c - eps_u)`` from the call's output (eps itself unguided)."""
        if not self.guided:
            return eps
        cond, uncond = eps[self.branch_rows("cond")], eps[self.branch_rows("uncond")]
        return uncond + self.guidance_scale * (cond - uncond)


@dataclass
class ConditionRequest:
    """What the user asked for, one entry per sample (already cycled over the seeds)."""

    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    class_labels: list[int] | None = None
    guidance_scale: float | None = None

    def rows(self, rows: slice) -> ConditionRequest:
        """The request for the samples in ``rows``."""

        def cut(values: list | None) -> list | None:
            return None if values is None else values[rows]

        return ConditionRequest(
            prompts=cut(self.prompts),
            negative_prompts=cut(self.negative_prompts),
            class_labels=cut(self.class_labels),
            guidance_scale=self.guidance_scale,
        )


def cycle(values: str | int | Sequence | None, n: int, what: str) -> list | None:
    """One value for every sample: a single value repeated, or a list cycled over the n samples."""
    if values is None:
        return None
    items = [values] if isinstance(values, (str, int)) else list(values)
    if not items:
        raise ValueError(f"{what} is empty")
    return [items[i % len(items)] for i in range(n)]


class Conditioner:
    """Base class: the conditioning of one kind of model (see the module docstring)."""

    #: "none" | "class" | "text" | "text-xl", as recorded in catalogs.
    name = "none"
    #: The guidance scale a sample gets when the caller names none.
    default_guidance = 1.0
    #: Whether guidance is possible at all.
    supports_guidance = False

    def resolve_guidance(self, guidance_scale: float | None) -> float:
        """The guidance scale to use; ValueError for a bad one or one this model cannot use."""
        g = self.default_guidance if guidance_scale is None else guidance_scale
        if (
            isinstance(g, bool)
            or not isinstance(g, (int, float))
            or not torch.isfinite(torch.tensor(float(g)))
        ):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if g < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {g}")
        if g > 1 and not self.supports_guidance:
            raise ValueError(
                f"guidance_scale={g}: this model ({self.name} conditioning) has no unconditional branch "
                "to guide against; use guidance_scale=1"
            )
        return float(g)

    def check(self, request: ConditionRequest) -> None:
        """ValueError naming an argument this kind of model does not take."""
        if request.prompts is not None or request.negative_prompts is not None:
            raise ValueError(f"this model ({self.name} conditioning) takes no prompt")
        if request.class_labels is not None:
            raise ValueError(f"this model ({self.name} conditioning) takes no class labels")

    def encode(
        self, request: ConditionRequest, n: int, device: torch.device, dtype: torch.dtype
    ) -> Condition:
        """The denoiser's keyword arguments for the request's ``n`` samples."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        return {"conditioning": self.name, "default_guidance": self.default_guidance}


class Unconditional(Conditioner):
    """No conditioning: DDPM, DDIM and LDM U-Nets."""

    def encode(
        self, request: ConditionRequest, n: int, device: torch.device, dtype: torch.dtype
    ) -> Condition:
        return Condition(kwargs={}, rows=n)


class ClassLabels(Conditioner):
    """Class ids for ``class_labels=``; guidance against ``null_class`` where the model has one.

    DiT's pipeline puts the conditional branch first and uses id 1000 (one past ImageNet's
    classes) as the null class; a class-embedding UNet2DModel has no null class, so no guidance.
    """

    name = "class"

    def __init__(self, num_classes: int | None, null_class: int | None, uncond_first: bool = False) -> None:
        self.num_classes = num_classes
        self.null_class = null_class
        self.uncond_first = uncond_first
        self.supports_guidance = null_class is not None
        self.default_guidance = 4.0 if null_class is not None else 1.0

    def check(self, request: ConditionRequest) -> None:
        if request.prompts is not None or request.negative_prompts is not None:
            raise ValueError("this model is class-conditional: give class_labels, not a prompt")
        if request.class_labels is None:
            raise ValueError("this model is class-conditional: class_labels are required")
        for label in request.class_labels:
            if isinstance(label, bool) or not isinstance(label, int):
                raise ValueError(f"class labels must be ints, got {label!r}")
            if label < 0 or (self.num_classes is not None and label >= self.num_classes):
                raise ValueError(f"class label {label} is out of range 0..{(self.num_classes or 1) - 1}")

    def encode(
        self, request: ConditionRequest, n: int, device: torch.device, dtype: torch.dtype
    ) -> Condition:
        labels = torch.tensor(request.class_labels, device=device).reshape(-1)
        g = self.resolve_guidance(request.guidance_scale)
        if g > 1:
            null = torch.full_like(labels, int(self.null_class))  # type: ignore[arg-type]
            both = torch.cat([null, labels]) if self.uncond_first else torch.cat([labels, null])
            return Condition({"class_labels": both}, n, True, self.uncond_first, g)
        return Condition({"class_labels": labels}, n, guidance_scale=g)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "num_classes": self.num_classes, "null_class": self.null_class}


class TextPrompts(Conditioner):
    """Prompts and negative prompts through a ``StableDiffusionPipeline``'s own ``encode_prompt``."""

    name = "text"
    default_guidance = 7.5
    supports_guidance = True

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def check(self, request: ConditionRequest) -> None:
        if request.class_labels is not None:
            raise ValueError("this model is text-conditional: give a prompt, not class labels")
        for what, values in (("prompt", request.prompts), ("negative_prompt", request.negative_prompts)):
            for value in values or []:
                if not isinstance(value, str):
                    raise ValueError(f"{what} must be strings, got {value!r}")

    def _prompts(self, request: ConditionRequest, n: int) -> tuple[list[str], list[str] | None]:
        prompts = request.prompts if request.prompts is not None else [""] * n
        return prompts, request.negative_prompts

    def encode(
        self, request: ConditionRequest, n: int, device: torch.device, dtype: torch.dtype
    ) -> Condition:
        prompts, negative = self._prompts(request, n)
        g = self.resolve_guidance(request.guidance_scale)
        guided = g > 1 and getattr(self.pipeline.unet.config, "time_cond_proj_dim", None) is None
        embeds, negative_embeds = self.pipeline.encode_prompt(
            prompts, device, 1, guided, negative_prompt=negative
        )
        kwargs: dict[str, Any] = {
            "encoder_hidden_states": torch.cat([negative_embeds, embeds]) if guided else embeds
        }
        return Condition(kwargs, n, guided, True, g)


class TextPromptsXL(TextPrompts):
    """SDXL: two text encoders and pooled embeddings (``encode_prompt``) plus the size and crop
    time ids (``_get_add_time_ids``) at the pipeline's default resolution."""

    name = "text-xl"
    default_guidance = 5.0

    def __init__(self, pipeline: Any, image_size: tuple[int, int]) -> None:
        super().__init__(pipeline)
        self.image_size = image_size

    def encode(
        self, request: ConditionRequest, n: int, device: torch.device, dtype: torch.dtype
    ) -> Condition:
        pipe = self.pipeline
        prompts, negative = self._prompts(request, n)
        g = self.resolve_guidance(request.guidance_scale)
        guided = g > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=negative,
        )  # fmt: skip
        if pipe.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = pipe.text_encoder_2.config.projection_dim
        size = tuple(self.image_size)
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                          text_encoder_projection_dim=projection_dim)  # fmt: skip
        time_ids = time_ids.to(device).repeat(n, 1)
        if guided:
            kwargs = {
                "encoder_hidden_states": torch.cat([negative_embeds, embeds]),
                "added_cond_kwargs": {
                    "text_embeds": torch.cat([negative_pooled, pooled]),
                    "time_ids": torch.cat([time_ids, time_ids]),
                },
            }
        else:
            kwargs = {
                "encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids},
            }
        return Condition(kwargs, n, guided, True, g)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "image_size": list(self.image_size)}
