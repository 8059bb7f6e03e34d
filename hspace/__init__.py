"""hspace: interpretable directions in the semantic latent space (h-space) of diffusion models.

The core API: :class:`HSpaceModel` (any supported diffusers denoiser -- pixel and latent U-Nets,
Stable Diffusion, SDXL, class-conditional U-Nets, DiT -- with its scheduler config and the one
h-space hook at a :class:`CapturePoint`), :class:`HSpaceSampler` (seeded sampling that records h,
applies :class:`Edit` s and swaps h), :class:`Trajectory` (its result) and :class:`Direction`.
"""

from __future__ import annotations

#: The package version (pyproject.toml reads it from here).
__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hspace.directions import Direction
    from hspace.model import (
        CapturePoint,
        HSpaceHook,
        HSpaceModel,
        MidBlockHook,
        use_forward_ad_safe_attention,
    )
    from hspace.sampling import Edit, HSpaceSampler, Trajectory

#: Where each name of the core API lives. They are imported on first use (PEP 562), so that
#: ``import hspace.io`` or the pipeline's run format does not pay for importing torch.
_HOMES = {
    "CapturePoint": "hspace.model",
    "Direction": "hspace.directions",
    "Edit": "hspace.sampling",
    "HSpaceHook": "hspace.model",
    "HSpaceModel": "hspace.model",
    "HSpaceSampler": "hspace.sampling",
    "MidBlockHook": "hspace.model",
    "Trajectory": "hspace.sampling",
    "use_forward_ad_safe_attention": "hspace.model",
}

__all__ = [
    "CapturePoint",
    "Direction",
    "Edit",
    "HSpaceHook",
    "HSpaceModel",
    "HSpaceSampler",
    "MidBlockHook",
    "Trajectory",
    "use_forward_ad_safe_attention",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'hspace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
