"""hspace: interpretable directions in the semantic latent space (h-space) of diffusion models.

The core API: :class:`HSpaceModel` (a diffusers UNet2DModel + scheduler config with h-space
hooks), :class:`HSpaceSampler` (seeded sampling that records h, applies :class:`Edit` s and
swaps h), :class:`Trajectory` (its result) and :class:`Direction`.
"""

from __future__ import annotations

#: The package version (pyproject.toml reads it from here).
__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hspace.directions import Direction
    from hspace.model import HSpaceModel, MidBlockHook, use_forward_ad_safe_attention
    from hspace.sampling import Edit, HSpaceSampler, Trajectory

#: Where each name of the core API lives. They are imported on first use (PEP 562), so that
#: ``import hspace.io`` or the pipeline's run format does not pay for importing torch.
_HOMES = {
    "Direction": "hspace.directions",
    "Edit": "hspace.sampling",
    "HSpaceModel": "hspace.model",
    "HSpaceSampler": "hspace.sampling",
    "MidBlockHook": "hspace.model",
    "Trajectory": "hspace.sampling",
    "use_forward_ad_safe_attention": "hspace.model",
}

__all__ = [
    "Direction",
    "Edit",
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
