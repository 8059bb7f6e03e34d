"""The built-in test bed: procedural faces with known factors, a tiny DDPM and an attribute classifier.

The trained weights ship inside the package (``weights/ddpm`` in ``DDPMPipeline`` layout and
``weights/classifier``), so tests and the quick start never train and never reach a model hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hspace.model import HSpaceModel
    from hspace.toy.classifier import AttributeClassifier

WEIGHTS_DIR = Path(__file__).parent / "weights"
TOY_MODEL_DIR = WEIGHTS_DIR / "ddpm"
TOY_CLASSIFIER_DIR = WEIGHTS_DIR / "classifier"


def load_toy_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> HSpaceModel:
    """The shipped toy DDPM (32x32 faces, h = 64x8x8) as an :class:`~hspace.model.HSpaceModel`."""
    from hspace.model import HSpaceModel

    return HSpaceModel.from_pretrained(TOY_MODEL_DIR, device=device, dtype=dtype)


def load_toy_classifier(device: str | torch.device = "cpu") -> AttributeClassifier:
    """The shipped attribute classifier of the toy world (logits / values per factor)."""
    from hspace.toy.classifier import AttributeClassifier

    return AttributeClassifier.from_pretrained(TOY_CLASSIFIER_DIR, device=device)


__all__ = ["TOY_MODEL_DIR", "TOY_CLASSIFIER_DIR", "load_toy_model", "load_toy_classifier"]
