"""The built-in test bed: procedural faces with known factors, a tiny DDPM and an attribute classifier.

The trained weights ship inside the package (``weights/ddpm`` in ``DDPMPipeline`` layout,
``weights/text`` in ``StableDiffusionPipeline`` layout for the captioned faces, and
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
TOY_TEXT_MODEL_DIR = WEIGHTS_DIR / "text"
#: The name that stands for the shipped toy model (``--model toy``, ``model.source: toy``).
TOY_MODEL_NAME = "toy"
#: The name that stands for the shipped text-to-image toy (``--model toy-text``, ``model.source: toy-text``).
TOY_TEXT_MODEL_NAME = "toy-text"
#: Every shipped model by the name that stands for it.
TOY_MODEL_DIRS = {TOY_MODEL_NAME: TOY_MODEL_DIR, TOY_TEXT_MODEL_NAME: TOY_TEXT_MODEL_DIR}
#: The name that stands for the shipped toy classifier (``annotate.classifier: toy``).
TOY_CLASSIFIER_NAME = "toy"


def resolve_model_source(source: str | Path) -> str | Path:
    """``toy`` / ``toy-text`` -> the shipped toy model's / text toy's directory; a local directory or
    hub id is returned as given.

    The engine (:mod:`hspace.model`) knows no model names; the CLI and the pipeline resolve these here.
    """
    if isinstance(source, str) and source in TOY_MODEL_DIRS:
        return TOY_MODEL_DIRS[source]
    return source


def toy_model_name(source: object) -> str | None:
    """The shipped model's name (``toy`` / ``toy-text``) that ``source`` stands for: the name itself
    or the shipped directory's path; None for any other model."""
    if not isinstance(source, (str, Path)):
        return None
    if isinstance(source, str) and source in TOY_MODEL_DIRS:
        return source
    try:
        resolved = Path(source).resolve()
    except (OSError, RuntimeError):
        return None
    return next((name for name, path in TOY_MODEL_DIRS.items() if path.resolve() == resolved), None)


def resolve_classifier_source(spec: str) -> str:
    """``toy`` -> the shipped classifier's directory; a local directory or URL is returned as given.

    :func:`hspace.classifier.load_classifier` takes directories and URLs only; the pipeline resolves
    this name here.
    """
    return str(TOY_CLASSIFIER_DIR) if spec == TOY_CLASSIFIER_NAME else spec


def load_toy_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> HSpaceModel:
    """The shipped toy DDPM (32x32 faces, h = 64x8x8) as an :class:`~hspace.model.HSpaceModel`."""
    from hspace.model import HSpaceModel

    return HSpaceModel.from_pretrained(TOY_MODEL_DIR, device=device, dtype=dtype)


def load_toy_classifier(device: str | torch.device = "cpu") -> AttributeClassifier:
    """The shipped attribute classifier of the toy world (logits / values per factor)."""
    from hspace.toy.classifier import AttributeClassifier

    return AttributeClassifier.from_pretrained(TOY_CLASSIFIER_DIR, device=device)


def load_toy_text_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The shipped text-to-image toy (captioned 32x32 faces) as a diffusers ``StableDiffusionPipeline``.

    Prompts name factors in the phrases of :data:`hspace.toy.captions.PHRASES`, e.g.
    ``"grey hair, glasses, smiling, facing left"``; the empty prompt samples the whole world.
    """
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        TOY_TEXT_MODEL_DIR, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def load_toy_text_model(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HSpaceModel:
    """The shipped text-to-image toy as an :class:`~hspace.model.HSpaceModel` (h = 64x8x8 per branch)."""
    from hspace.model import HSpaceModel

    return HSpaceModel.from_pretrained(TOY_TEXT_MODEL_DIR, device=device, dtype=dtype)


__all__ = [
    "TOY_CLASSIFIER_DIR",
    "TOY_CLASSIFIER_NAME",
    "TOY_MODEL_DIR",
    "TOY_MODEL_DIRS",
    "TOY_MODEL_NAME",
    "TOY_TEXT_MODEL_DIR",
    "TOY_TEXT_MODEL_NAME",
    "load_toy_classifier",
    "load_toy_model",
    "load_toy_text_model",
    "load_toy_text_pipeline",
    "resolve_classifier_source",
    "resolve_model_source",
    "toy_model_name",
]
