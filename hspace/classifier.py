"""Attribute classifiers: what hspace needs from one, how one is stored, loaded and fingerprinted.

The paper labels samples with pretrained attribute classifiers (Sec. V, "Classifier annotation")
before taking mean differences. To hspace a classifier is a :class:`BaseAttributeClassifier`: an
``nn.Module`` with named outputs (``attributes``), a flag per output saying whether it is a binary
attribute (read as a logit) or a continuous one (read as a value), and
``forward(images [B, 3, H, W] in [0, 1]) -> [B, A]`` at a fixed ``image_size``. On disk it is a
directory with ``config.json`` (the constructor's keyword arguments) and ``model.safetensors``
(never pickle). :func:`score_images` is the one way images are scored, in mini-batches.

The one implementation is a small CNN, :class:`AttributeClassifier`: the toy world trains it
(:mod:`hspace.toy.classifier`) and the pipeline loads the same layout trained on other data (e.g.
CelebA attributes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from hspace.io import read_json, safetensors_from_bytes

__all__ = [
    "AttributeClassifier",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "BaseAttributeClassifier",
    "classifier_cache_dir",
    "classifier_fingerprint",
    "fetch_classifier",
    "load_classifier",
    "resolve_classifier_dir",
    "score_images",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_FILES = (CONFIG_NAME, WEIGHTS_NAME)

C = TypeVar("C", bound="BaseAttributeClassifier")


class BaseAttributeClassifier(nn.Module):
    """Images [B, 3, H, W] in [0, 1] -> scores [B, A]: logits where ``binary[i]``, values elsewhere.

    Subclasses build the network in ``__init__`` (calling ``super().__init__(attributes, binary,
    image_size)``), implement ``forward`` and add their own constructor arguments to :meth:`config`.
    """

    def __init__(self, attributes: Sequence[str], binary: Sequence[bool], image_size: int) -> None:
        super().__init__()
        if len(attributes) != len(binary):
            raise ValueError(f"attributes ({len(attributes)}) and binary ({len(binary)}) differ in length")
        self.attributes = list(attributes)
        self.binary = [bool(b) for b in binary]
        self.image_size = int(image_size)

    def check_images(self, images: Tensor) -> None:
        """Raise ValueError unless ``images`` is [B, 3, image_size, image_size]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            raise ValueError(
                f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}"
            )

    def index(self, attribute: str) -> int:
        """Column of ``attribute`` in the output, with a clear error for unknown names."""
        try:
            return self.attributes.index(attribute)
        except ValueError:
            raise KeyError(
                f"unknown attribute {attribute!r}; this classifier has {self.attributes}"
            ) from None

    # --- persistence -------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor's keyword arguments, stored as ``config.json``."""
        return {"attributes": self.attributes, "binary": self.binary, "image_size": self.image_size}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` to a local directory."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(d / WEIGHTS_NAME)
        )

    @classmethod
    def from_pretrained(cls: type[C], directory: str | Path, device: str | torch.device = "cpu") -> C:
        """Read a :meth:`save_pretrained` directory; the model is in eval mode on ``device``.

        A config that does not build the model, or weights that are not finite tensors of the
        model's names and shapes, raise ValueError naming the file.
        """
        d = Path(directory)
        if not all((d / name).is_file() for name in _FILES):
            raise FileNotFoundError(f"no classifier at {d}: expected {CONFIG_NAME} and {WEIGHTS_NAME}")
        config_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
        try:
            config = read_json(config_path)
            if not isinstance(config, dict):
                raise TypeError(f"expected a JSON object, got {type(config).__name__}")
            model = cls(**config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{config_path}: not a valid classifier config ({err})") from None
        state, _ = safetensors_from_bytes(weights_path.read_bytes(), str(weights_path))
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{weights_path}: non-finite weights in {bad}")
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"{weights_path}: weights do not fit the config's model ({err})") from None
        return model.to(device).eval()


class AttributeClassifier(BaseAttributeClassifier):
    """A small CNN mapping images [B, 3, H, W] in [0, 1] to scores [B, A]: the architecture of every
    stored classifier (the toy world's, trained by :mod:`hspace.toy.classifier`, and others).

    Scores are logits for binary attributes (``binary[i]`` true) and values for continuous ones.
    """

    def __init__(self, attributes: list[str], binary: list[bool], image_size: int = 32, width: int = 32):
        super().__init__(attributes, binary, image_size)
        self.width = int(width)
        w = self.width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())

        self.features = nn.Sequential(
            block(3, w, 1),
            block(w, w, 1),
            block(w, 2 * w, 2),
            block(2 * w, 2 * w, 1),
            block(2 * w, 4 * w, 2),
            block(4 * w, 4 * w, 2),
        )
        side = image_size // 8
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(4 * w * side * side, 256), nn.SiLU(), nn.Linear(256, len(attributes))
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.head(self.features(images * 2.0 - 1.0))

    def config(self) -> dict:
        return super().config() | {"width": self.width}


def resolve_classifier_dir(spec: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """Local directory of a classifier: a local dir or an fsspec URL (the shipped toy classifier's
    name, ``toy``, is resolved by :func:`hspace.toy.resolve_classifier_source`).

    A URL (``s3://bucket/clf``) is fetched on every call into :func:`classifier_cache_dir`, under
    the sha256 of the bytes fetched (see :func:`fetch_classifier`), because
    :meth:`BaseAttributeClassifier.from_pretrained` reads local files: changed remote weights land
    in a new directory and so get a new fingerprint.
    """
    if "://" not in spec:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"classifier directory {path} does not exist")
        return path
    return fetch_classifier(spec, storage_options)


# ---------------------------------------------------------------------------------------------
# the private, content-addressed cache of classifiers fetched from URLs
_TEMP_PREFIX = ".fetch-"
_CHUNK = 1 << 20


def classifier_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/hspace/classifiers`` (default ``~/.cache``), created private (mode 0o700).

    Refuses (PermissionError) a directory owned by another user or writable by group or others,
    where someone else could plant weights.
    """
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    cache = base / "hspace" / "classifiers"
    for d in (cache.parent, cache):
        d.mkdir(mode=0o700, exist_ok=True, parents=True)
        st = d.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise PermissionError(
                f"classifier cache {d} is owned by another user or writable by others; "
                "fix its owner/permissions (chmod 700) or set XDG_CACHE_HOME"
            )
    return cache


def _file_digests(directory: Path) -> dict[str, str]:
    """sha256 of each classifier file in ``directory``."""
    out = {}
    for name in _FILES:
        digest = hashlib.sha256()
        with open(directory / name, "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        out[name] = digest.hexdigest()
    return out


def _content_key(digests: Mapping[str, str]) -> str:
    """One sha256 over the files' names and digests: the cache directory's name."""
    return hashlib.sha256(json.dumps(dict(digests), sort_keys=True).encode()).hexdigest()


def _verified(directory: Path) -> bool:
    """True when ``directory`` holds the classifier files whose content its name is the hash of."""
    try:
        return directory.is_dir() and _content_key(_file_digests(directory)) == directory.name
    except OSError:
        return False


def _clean_stale(cache: Path, max_age_s: float = 3600.0) -> None:
    """Remove temporary directories of interrupted fetches (older than ``max_age_s``: a younger
    one may belong to a fetch still running in another process)."""
    for entry in cache.glob(f"{_TEMP_PREFIX}*"):
        if time.time() - entry.stat().st_mtime > max_age_s:
            shutil.rmtree(entry, ignore_errors=True)


def fetch_classifier(url: str, storage_options: Mapping[str, Any] | None = None) -> Path:
    """Fetch a classifier directory URL into the cache; its local directory, named by content.

    Every file is copied to a private temporary directory in the cache and hashed as it is copied;
    the directory is then renamed (atomically) to the sha256 of the contents. An interrupted fetch
    leaves at most a temporary directory, which is never read and is removed later; an entry whose
    files do not hash to its name (a partial or planted copy) is never used and is replaced.
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    if not fs.exists(root):
        raise FileNotFoundError(f"classifier {url} does not exist")
    cache = classifier_cache_dir()
    _clean_stale(cache)
    staging = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=cache))
    try:
        digests = {}
        for name in _FILES:
            remote = f"{root.rstrip('/')}/{name}"
            if not fs.isfile(remote):
                raise FileNotFoundError(f"classifier {url} has no {name}")
            digest = hashlib.sha256()
            with fs.open(remote, "rb") as src, open(staging / name, "wb") as dst:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
            digests[name] = digest.hexdigest()
        final = cache / _content_key(digests)
        if not _verified(final):
            if final.exists():
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.rename(staging, final)
            except OSError:  # another process renamed the same content first
                if not _verified(final):
                    raise
        return final
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load_classifier(
    spec: str, device: str | torch.device = "cpu", storage_options: Mapping[str, Any] | None = None
) -> BaseAttributeClassifier:
    """The classifier named by ``spec`` (see :func:`resolve_classifier_dir`), in eval mode on ``device``.

    Every stored classifier uses the CNN architecture :class:`AttributeClassifier` with its own
    ``config.json``.
    """
    return AttributeClassifier.from_pretrained(resolve_classifier_dir(spec, storage_options), device=device)


def classifier_fingerprint(spec: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Short sha256 over the classifier's config and weights (changes when the classifier does).

    For a URL it is the hash of the bytes fetched on this call, never of the URL.
    """
    root = resolve_classifier_dir(spec, storage_options)
    digest = hashlib.sha256()
    for name in _FILES:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"classifier file {path} is missing")
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def score_images(
    classifier: BaseAttributeClassifier,
    images: Tensor,
    columns: Sequence[int] | None = None,
    batch_size: int = 512,
) -> Tensor:
    """Classifier scores float32 on the CPU: [..., A] (or [..., len(columns)]) for images [..., 3, H, W] in [0, 1].

    Leading dimensions are flattened for scoring and restored; images are moved to the
    classifier's device in mini-batches of ``batch_size`` and resized (bilinear, antialiased) when
    they are not ``image_size`` square, so a classifier can judge a model of another resolution.
    """
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:]).float()
    size = classifier.image_size
    cols = list(range(len(classifier.attributes))) if columns is None else list(columns)
    device = next(classifier.parameters()).device
    out = []
    for i in range(0, flat.shape[0], batch_size):
        batch = flat[i : i + batch_size].to(device)
        if batch.shape[-2:] != (size, size):
            batch = nn.functional.interpolate(batch, size=(size, size), mode="bilinear", antialias=True)
        out.append(classifier(batch)[:, cols].float().cpu())
    scores = torch.cat(out) if out else torch.zeros(0, len(cols))
    return scores.reshape(*lead, len(cols))
