"""hspace: interpretable directions in the semantic latent space (h-space) of diffusion models.

The core API: :class:`HSpaceModel` (a diffusers UNet2DModel + scheduler config with h-space
hooks), :class:`HSpaceSampler` (seeded sampling that records h, applies :class:`Edit` s and
swaps h), :class:`Trajectory` (its result) and :class:`Direction`.
"""

from __future__ import annotations

#: The package version (pyproject.toml reads it from here).
__version__ = "0.1.0"

from hspace.directions import Direction
from hspace.model import HSpaceModel, MidBlockHook, use_forward_ad_safe_attention
from hspace.sampling import Edit, HSpaceSampler, Trajectory

__all__ = [
    "Direction",
    "Edit",
    "HSpaceModel",
    "HSpaceSampler",
    "MidBlockHook",
    "Trajectory",
    "use_forward_ad_safe_attention",
]
