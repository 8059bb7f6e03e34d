"""Build configuration: strict pydantic models loaded from YAML, checked before any work starts.

A config names the model, the sampler, how many seeded samples to draw and how to cut them into
seed blocks (the unit of work and of resumption), the Ray resources, where the run data and the
catalog live (fsspec URLs + storage_options) and the settings of every stage. Anything wrong -- an
unknown key, a wrong type, an impossible value, a sampler with more steps than the model was
trained with -- raises :class:`ConfigError` whose message names the field
(``sampler.num_inference_steps: ...``); command-line entry points turn it into exit code 2.

The dry run (seed blocks, shards, rows and bytes a build will write) is :mod:`pipeline.plan`.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hspace.catalog import _check_name as _catalog_check_name  # the catalog's own name rule
from hspace.catalog import _check_relpath as _catalog_check_relpath
from hspace.catalog import preview_path

__all__ = [
    "AggregateConfig",
    "AnnotateConfig",
    "BuildConfig",
    "CatalogConfig",
    "ConfigError",
    "EvaluateConfig",
    "GenerateConfig",
    "JacobianSpec",
    "ModelConfig",
    "ModelInfo",
    "PCAConfig",
    "ResourcesConfig",
    "SamplerConfig",
    "StorageConfig",
    "describe_model",
    "load_config",
    "probe_config",
    "load_config_or_exit",
    "validate_config",
]

#: Exit status of a command-line entry point given a bad config (same as argparse usage errors).
CONFIG_ERROR_EXIT_CODE = 2

#: Largest valid seed: seeds are stored as int64 in the run's shards, and ``torch.Generator.manual_seed``
#: wraps negative values around, so valid seeds are ``0 <= seed <= MAX_SEED``.
MAX_SEED = 2**63 - 1
SEED_RULE = "seeds must be in 0..2**63-1 (stored as int64; torch.Generator.manual_seed wraps beyond)"

#: Most seed blocks one build may have: every block is a manifest entry and a task (see pipeline.plan).
MAX_BLOCKS = 1_000_000

#: Seconds the dry run waits for a storage URL to answer.
PROBE_TIMEOUT_S = 10.0


class ConfigError(ValueError):
    """A build config is invalid; ``errors`` holds ``(field, message)`` pairs, the message names them."""

    def __init__(self, errors: Sequence[tuple[str, str]], source: str | None = None) -> None:
        self.errors = list(errors)
        self.source = source
        head = f"invalid build config {source}" if source else "invalid build config"
        lines = [f"{field}: {msg}" if field else msg for field, msg in self.errors]
        if len(lines) == 1:  # one problem, one line
            super().__init__(f"{head}: {lines[0]}")
        else:
            super().__init__(head + ":\n" + "\n".join("  " + line for line in lines))


class _Strict(BaseModel):
    """Base of every section: unknown keys and silent type coercions are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


def _check_seed(v: int | None) -> int | None:
    if v is not None and not 0 <= v <= MAX_SEED:
        raise ValueError(f"{v} out of range: {SEED_RULE}")
    return v


def _expand(path: str, field: str) -> Path:
    """``Path(path).expanduser()``; a ``~user`` that does not exist is a ConfigError naming ``field``."""
    try:
        return Path(path).expanduser()
    except RuntimeError as e:  # "Could not determine home directory."
        raise ConfigError([(field, f"cannot expand {path!r}: {e}")]) from None


def _check_protocol(url: str) -> str:
    """Every protocol of an fsspec URL (``simplecache::s3://...`` included) must have an implementation;
    a local path's ``~user`` must exist (it is expanded before any work)."""
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol is None and url.startswith("~"):
        try:
            Path(url).expanduser()
        except RuntimeError as e:
            raise ValueError(f"cannot expand {url!r}: {e}") from None
    for proto in (protocol or "file").split("::"):
        try:
            fsspec.get_filesystem_class(proto)
        except ValueError:
            raise ValueError(f"unknown storage protocol {proto!r} in {url!r}") from None
        except ImportError as e:
            raise ValueError(f"storage protocol {proto!r} of {url!r} is not installed: {e}") from None
    return url


#: The kinds of model a config may state (``hspace.model.KIND_NAMES``).
ModelKindName = Literal["pixel", "class", "latent", "text", "text-xl", "dit"]
#: The samplers (``hspace.model.SCHEDULERS``): each builds its diffusers scheduler from the model's config.
SamplerName = Literal["ddpm", "ddim", "dpm", "euler", "euler_a"]
#: Model kinds conditioned on text, and on class labels.
TEXT_KINDS = ("text", "text-xl")
CLASS_KINDS = ("class", "dit")


def _positive_dims(v: list[int] | None) -> list[int] | None:
    if v is not None and any(d <= 0 for d in v):
        raise ValueError(f"every dimension must be positive, got {v}")
    return v


def _check_capture(v: str | None) -> str | None:
    """A capture point spec (``mid_block``, ``mid_block:input``, ``transformer_blocks.14``), normalised."""
    if v is None:
        return None
    from hspace.model import CapturePoint

    return CapturePoint.parse(v).spec


def _string_list(v: Any) -> Any:
    """One string or a non-empty list of strings (checked before pydantic's union, whose errors
    would name each alternative)."""
    if v is None or isinstance(v, str):
        return v
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"must be a string or a list of strings, got {v!r}")
    if not v:
        raise ValueError("must list at least one string (or be left out)")
    return v


def _int_list(v: Any) -> Any:
    """One class id or a non-empty list of them, every id an int >= 0."""
    if v is None:
        return v
    labels = [v] if not isinstance(v, list) else v
    if not labels:
        raise ValueError("must list at least one class id (or be left out)")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        raise ValueError(f"must be a class id (int) or a list of them, got {v!r}")
    bad = [x for x in labels if x < 0]
    if bad:
        raise ValueError(f"class ids must be >= 0, got {bad}")
    return v


class ModelConfig(_Strict):
    """Which diffusion model: ``toy`` (the shipped toy model), ``toy-text`` (the shipped
    text-to-image toy), a local directory or a hub id, and what it is conditioned on.

    Conditioning (``prompts``, ``negative_prompt``, ``class_labels``) is one value or a list:
    generation seed ``s`` gets entry ``s % len(list)``, in every stage (generate, evaluate), so a
    seed's conditioning does not depend on the block or the worker that renders it.
    """

    source: str = Field(min_length=1)
    revision: str | None = None
    #: ``pixel | class | latent | text | text-xl | dit``; read from ``model_index.json`` when the
    #: model is present locally; stated for dry runs of hub models not downloaded.
    kind: ModelKindName | None = None
    #: Where h is captured: a module path of the denoiser, ``:input`` for its input. Default: the
    #: U-Net's ``mid_block`` (the paper's h-space), a transformer's middle block.
    capture: str | None = None
    #: h-space shape [C, H, W] at the capture point; needed only for dry runs of hub models not
    #: present locally, or for capture points the config files do not determine.
    h_shape: list[int] | None = Field(default=None, min_length=3, max_length=3)
    #: [C, H, W] of what the denoiser denoises and of the images; stated like ``h_shape``.
    latent_shape: list[int] | None = Field(default=None, min_length=3, max_length=3)
    image_shape: list[int] | None = Field(default=None, min_length=3, max_length=3)
    #: Training steps of the model; read from the scheduler config when it is present.
    num_train_timesteps: int | None = Field(default=None, gt=0)
    #: Text models: the prompt(s), cycled over the seeds, and the negative prompt(s).
    prompts: str | list[str] | None = None
    negative_prompt: str | list[str] | None = None
    #: Class-conditional models (DiT, class U-Nets): the class id(s), cycled over the seeds.
    class_labels: int | list[int] | None = None
    #: Classifier-free guidance; None = the model's default (7.5 SD, 5 SDXL, 4 DiT, 1 = none otherwise).
    guidance_scale: float | None = Field(default=None, ge=0.0)
    #: Under guidance, whose h is stored: the unconditional branch (the paper's code) or the conditional one.
    record_branch: Literal["uncond", "cond"] = "uncond"

    _shapes = field_validator("h_shape", "latent_shape", "image_shape")(_positive_dims)
    _capture = field_validator("capture")(_check_capture)
    _lists = field_validator("prompts", "negative_prompt", mode="before")(_string_list)
    _labels = field_validator("class_labels", mode="before")(_int_list)

    @property
    def conditioned(self) -> bool:
        """Whether the config names any conditioning (prompts, class labels or a guidance scale)."""
        return any(
            x is not None
            for x in (self.prompts, self.negative_prompt, self.class_labels, self.guidance_scale)
        )

    def conditioning_for(self, seeds: Sequence[int]) -> dict[str, Any]:
        """``HSpaceSampler.sample`` keyword arguments for ``seeds``: seed ``s`` gets entry
        ``s % len`` of every list (prompts, negative prompts, class labels)."""

        def per_seed(values: Any) -> list | None:
            if values is None:
                return None
            items = values if isinstance(values, list) else [values]
            return [items[int(s) % len(items)] for s in seeds]

        out: dict[str, Any] = {}
        for key, values in (
            ("prompt", self.prompts),
            ("negative_prompt", self.negative_prompt),
            ("class_labels", self.class_labels),
        ):
            if values is not None:
                out[key] = per_seed(values)
        if self.guidance_scale is not None:
            out["guidance_scale"] = self.guidance_scale
        out["record_branch"] = self.record_branch
        return out


class SamplerConfig(_Strict):
    """The seeded sampler: DDPM (eta 1, the paper's default), DDIM (eta 0, any eta), or the
    samplers Stable Diffusion users run: ``dpm`` (DPM-Solver++), ``euler``, ``euler_a``."""

    kind: SamplerName = "ddpm"
    num_inference_steps: int = Field(default=50, gt=0)
    eta: float | None = Field(default=None, ge=0.0, le=1.0)


class GenerateConfig(_Strict):
    """Seeds ``seed_start .. seed_start + n_samples - 1``, cut into blocks of ``seeds_per_block``."""

    n_samples: int = Field(gt=0)
    seed_start: int = 0
    batch_size: int = Field(default=32, gt=0)
    seeds_per_block: int = Field(default=256, gt=0)
    #: Sampler steps whose h is stored (0 = noisiest); None = every step. ``capture_every: k``
    #: stores steps 0, k, 2k, ... instead. Directions are zero at the steps not stored.
    capture_steps: list[int] | None = None
    capture_every: int | None = Field(default=None, gt=0)

    _seed = field_validator("seed_start")(_check_seed)


class ResourcesConfig(_Strict):
    """Ray resources: the actor pool size and what each actor reserves."""

    workers: int = Field(default=1, gt=0)
    num_gpus_per_worker: float = Field(default=0.0, ge=0.0)
    num_cpus_per_worker: float = Field(default=1.0, gt=0.0)
    #: Passed to ``ray.init(address=...)``; None starts or joins the local / RAY_ADDRESS cluster.
    ray_address: str | None = None

    @property
    def device(self) -> str:
        """``cuda`` when workers reserve GPUs, else ``cpu``."""
        return "cuda" if self.num_gpus_per_worker > 0 else "cpu"


class StorageConfig(_Strict):
    """Where the run's intermediate data lives (any fsspec URL)."""

    run_url: str = Field(min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    #: Most activation bytes (float16 h, before compression) the build may write; the dry run and
    #: the build refuse a config beyond it before any work.
    max_bytes: int | None = Field(default=None, gt=0)

    _protocol = field_validator("run_url")(_check_protocol)


class CatalogConfig(_Strict):
    """Where the published catalog lives and under which model name and ref."""

    url: str = Field(min_length=1)
    storage_options: dict[str, Any] = Field(default_factory=dict)
    model_name: str
    ref: str = "latest"

    _protocol = field_validator("url")(_check_protocol)

    @field_validator("model_name", "ref")
    @classmethod
    def _catalog_name(cls, v: str) -> str:
        # The catalog's own rule, so a name it would refuse at publish time fails here instead.
        try:
            return _catalog_check_name(v, "catalog")
        except ValueError as e:
            raise ValueError(str(e).replace("invalid catalog name ", "")) from None


class PCAConfig(_Strict):
    """Streaming per-timestep PCA (paper Sec. IV-A): k components at the chosen sampler steps."""

    n_components: int = Field(default=16, gt=0)
    #: Sampler step indices (0 = noisiest); None = every step.
    steps: list[int] | None = None
    backend: Literal["torch", "sklearn"] = "torch"
    batch_size: int = Field(default=256, gt=0)
    #: Checkpoint an actor's state to the run dir every this many batches.
    checkpoint_every: int = Field(default=8, gt=0)
    steps_per_actor: int = Field(default=10, gt=0)
    num_cpus_per_actor: float = Field(default=1.0, gt=0.0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0.0)


class AnnotateConfig(_Strict):
    """Attribute classifier that scores the final images: ``toy`` or a local/URL directory."""

    classifier: str = Field(default="toy", min_length=1)
    #: Attributes to build directions for; None = every attribute of the classifier.
    attributes: list[str] | None = Field(default=None, min_length=1)
    batch_size: int = Field(default=64, gt=0)

    @field_validator("classifier")
    @classmethod
    def _url_protocol(cls, v: str) -> str:
        return _check_protocol(v) if "://" in v else v


class AggregateConfig(_Strict):
    """Supervised directions (paper eq. 11) from quantiles, disentangling (eq. 12), baselines."""

    quantile: float = Field(default=0.1, gt=0.0, le=0.5)
    #: direction -> directions to project out of it.
    disentangle: dict[str, list[str]] = Field(default_factory=dict)
    #: attribute -> binary attribute to hold fixed: ``<attr>_conditional``, the mean difference
    #: taken within each state of the other attribute and averaged (hspace.directions).
    condition: dict[str, str] = Field(default_factory=dict)
    random_baselines: int = Field(default=2, ge=0)


class EvaluateConfig(_Strict):
    """Effect matrix on held-out seeds: every direction at every scale, scored by the classifier."""

    seed_start: int
    n_seeds: int = Field(default=16, gt=0)
    scales: list[float] = Field(default_factory=lambda: [-2.0, 2.0], min_length=1)
    units: Literal["sigma", "raw"] = "sigma"
    batch_size: int = Field(default=16, gt=0)
    #: The sampler the edits are rendered with (None: the build's ``sampler``). A direction is
    #: applied at the build step nearest to each evaluation timestep, so a coarser grid of the same
    #: schedule (e.g. DDIM with 5 of the build's 20 DDPM steps) measures the same edit for less.
    sampler: SamplerConfig | None = None

    _seed = field_validator("seed_start")(_check_seed)


#: ``JacobianSpec.oversample`` when the spec leaves it out, per method (docs/benchmarks.md,
#: equal-accuracy table): Alg. 1 with 8 extra vectors took k = 32 to |cos| >= 0.99 against the
#: explicit SVD in 9 iterations instead of 41 with none; the Krylov method gains nothing from them
#: (its basis grows past k anyway) and pays for them in every product.
DEFAULT_OVERSAMPLE = {"krylov": 0, "subspace": 8, "sequential": 8}


class JacobianSpec(_Strict):
    """One image-specific Jacobian direction set (paper Alg. 1/2, or block Krylov) at ``seed`` and
    sampler ``step``."""

    name: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$")
    seed: int
    step: int = Field(ge=0)
    k: int = Field(default=3, gt=0)
    #: "krylov" (block Krylov iteration) reached the accuracy of the explicit SVD with about half
    #: the J^T J products of Alg. 1 on the toy model (docs/benchmarks.md); "subspace" is the
    #: paper's Alg. 1, "sequential" its Alg. 2.
    method: Literal["subspace", "sequential", "krylov"] = "krylov"
    #: Extra vectors iterated beside the k wanted ones; left out (or null): ``DEFAULT_OVERSAMPLE``
    #: of the method.
    oversample: int = Field(default=0, ge=0)
    n_iter: int = Field(default=100, gt=0)
    #: The residual ||J^T J v - s^2 v|| / s_1^2 at the equal-accuracy point was 3.9e-4 (Alg. 1,
    #: k = 32) to 1.4e-4 (Krylov, k = 32), so 2e-4 stops at or after that point.
    tol: float = Field(default=2e-4, gt=0)
    #: Pixel box [y0, x0, y1, x1] (end-exclusive) of a local edit; None = whole image.
    mask: list[int] | None = Field(default=None, min_length=4, max_length=4)

    _seed = field_validator("seed")(_check_seed)

    @model_validator(mode="before")
    @classmethod
    def _method_oversample(cls, data: Any) -> Any:
        """An oversample left out (or null) becomes the method's default."""
        if isinstance(data, dict) and data.get("oversample") is None:
            method = data.get("method", cls.model_fields["method"].default)
            data = {**data, "oversample": DEFAULT_OVERSAMPLE.get(method, 0) if isinstance(method, str) else 0}
        return data

    @field_validator("mask")
    @classmethod
    def _box(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            y0, x0, y1, x1 = v
            if min(v) < 0 or y1 <= y0 or x1 <= x0:
                raise ValueError(f"mask must be [y0, x0, y1, x1] with 0 <= y0 < y1, 0 <= x0 < x1, got {v}")
        return v


class BuildConfig(_Strict):
    """A whole catalog build. Cross-field checks that need no model live here; see :func:`validate_config`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: ModelConfig
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    generate: GenerateConfig
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: StorageConfig
    catalog: CatalogConfig
    pca: PCAConfig = Field(default_factory=PCAConfig)
    annotate: AnnotateConfig | None = None
    aggregate: AggregateConfig | None = None
    evaluate: EvaluateConfig | None = None
    jacobian: list[JacobianSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_field(self) -> BuildConfig:
        errors = [e for check in _CROSS_FIELD_CHECKS for e in check(self)]
        if errors:
            # Raised as a plain ValueError so pydantic wraps it; validate_config re-splits the fields.
            raise ValueError("\n".join(f"{f}: {m}" for f, m in errors))
        return self

    @property
    def torch_dtype(self) -> Any:
        """The torch dtype named by ``dtype`` (torch imported lazily)."""
        import torch

        return getattr(torch, self.dtype)

    @property
    def capture_steps(self) -> list[int]:
        """Sampler steps whose h the build stores (``generate.capture_steps`` / ``capture_every``;
        every step by default)."""
        steps, g = self.sampler.num_inference_steps, self.generate
        if g.capture_steps is not None:
            return sorted(set(g.capture_steps))
        return list(range(0, steps, g.capture_every or 1))

    @property
    def pca_steps(self) -> list[int]:
        """Sampler steps the PCA covers (every stored step when ``pca.steps`` is None)."""
        if self.pca.steps is None:
            return self.capture_steps
        return sorted(self.pca.steps)

    @property
    def seeds(self) -> range:
        """Every generation seed."""
        return range(self.generate.seed_start, self.generate.seed_start + self.generate.n_samples)


Errors = list[tuple[str, str]]


def _sampler_errors(cfg: BuildConfig) -> Errors:
    samplers = [("sampler", cfg.sampler)]
    if cfg.evaluate is not None and cfg.evaluate.sampler is not None:
        samplers.append(("evaluate.sampler", cfg.evaluate.sampler))
    errors: Errors = []
    for where, spec in samplers:
        if spec.kind == "ddpm" and spec.eta not in (None, 1.0):
            errors.append(
                (f"{where}.eta", f"ddpm sampling has eta=1; for eta={spec.eta} set {where}.kind: ddim")
            )
        elif spec.kind not in ("ddpm", "ddim") and spec.eta is not None:
            errors.append(
                (f"{where}.eta", f"eta applies to ddim only; {where}.kind {spec.kind!r} takes none")
            )
    return errors


def _capture_steps_errors(cfg: BuildConfig) -> Errors:
    g, steps = cfg.generate, cfg.sampler.num_inference_steps
    if g.capture_steps is None:
        return []
    errors: Errors = []
    if g.capture_every is not None:
        errors.append(("generate.capture_every", "give generate.capture_steps or capture_every, not both"))
    if not g.capture_steps:
        errors.append(
            ("generate.capture_steps", "must list at least one step (or be left out for all steps)")
        )
    bad = [s for s in g.capture_steps if not 0 <= s < steps]
    if bad:
        errors.append(
            (
                "generate.capture_steps",
                f"steps {bad} outside 0..{steps - 1} (sampler.num_inference_steps={steps})",
            )
        )
    if len(set(g.capture_steps)) != len(g.capture_steps):
        errors.append(("generate.capture_steps", f"duplicate steps in {g.capture_steps}"))
    return errors


def _conditioning_shape_errors(cfg: BuildConfig) -> Errors:
    """Conditioning that no kind of model takes together; the checks against the model's kind are
    in :func:`_model_errors`."""
    m = cfg.model
    errors: Errors = []
    if m.class_labels is not None and (m.prompts is not None or m.negative_prompt is not None):
        errors.append(("model.class_labels", "a model takes prompts or class labels, not both"))
    if m.negative_prompt is not None and m.prompts is None:
        errors.append(("model.negative_prompt", "needs model.prompts"))
    return errors


def _pca_steps_errors(cfg: BuildConfig) -> Errors:
    pca_steps, steps = cfg.pca.steps, cfg.sampler.num_inference_steps
    if pca_steps is None:
        return []
    errors: Errors = []
    if not pca_steps:
        errors.append(("pca.steps", "must list at least one step (or be null for all steps)"))
    bad = [s for s in pca_steps if not 0 <= s < steps]
    if bad:
        errors.append(
            ("pca.steps", f"steps {bad} outside 0..{steps - 1} (sampler.num_inference_steps={steps})")
        )
    stored = set(cfg.capture_steps)
    unstored = [s for s in pca_steps if 0 <= s < steps and s not in stored]
    if unstored and not bad:
        errors.append(
            ("pca.steps", f"steps {unstored} are not stored (generate.capture_steps / capture_every)")
        )
    if len(set(pca_steps)) != len(pca_steps):
        errors.append(("pca.steps", f"duplicate steps in {pca_steps}"))
    return errors


def _pca_size_errors(cfg: BuildConfig) -> Errors:
    pca, errors = cfg.pca, []
    if pca.n_components > cfg.generate.n_samples:
        errors.append(
            ("pca.n_components", f"{pca.n_components} exceeds generate.n_samples={cfg.generate.n_samples}")
        )
    if pca.backend == "sklearn" and pca.batch_size < pca.n_components:
        errors.append(
            (
                "pca.batch_size",
                f"{pca.batch_size} < pca.n_components={pca.n_components}; "
                "scikit-learn's partial_fit needs at least n_components rows per batch",
            )
        )
    return errors


def _needs_annotate_errors(cfg: BuildConfig) -> Errors:
    """The stages that use classifier scores need the annotate section."""
    if cfg.annotate is not None:
        return []
    errors: Errors = []
    if cfg.aggregate is not None:
        errors.append(("aggregate", "needs an annotate section (a classifier to score samples)"))
    if cfg.evaluate is not None:
        errors.append(("evaluate", "needs an annotate section (the classifier scores the edits)"))
    return errors


def _seed_range_errors(cfg: BuildConfig) -> Errors:
    """The last seed of each range must be a valid seed too, and the blocks a bounded number."""
    g, errors = cfg.generate, []
    if g.seed_start + g.n_samples - 1 > MAX_SEED:
        errors.append(
            (
                "generate.n_samples",
                f"seed_start + n_samples - 1 = {g.seed_start + g.n_samples - 1}: {SEED_RULE}",
            )
        )
    n_blocks = -(-g.n_samples // g.seeds_per_block)
    if n_blocks > MAX_BLOCKS:
        errors.append(
            (
                "generate.seeds_per_block",
                f"n_samples={g.n_samples} in blocks of {g.seeds_per_block} is {n_blocks} seed blocks, more than "
                f"the limit {MAX_BLOCKS}; raise generate.seeds_per_block",
            )
        )
    ev = cfg.evaluate
    if ev is not None and ev.seed_start + ev.n_seeds - 1 > MAX_SEED:
        errors.append(
            ("evaluate.n_seeds", f"seed_start + n_seeds - 1 = {ev.seed_start + ev.n_seeds - 1}: {SEED_RULE}")
        )
    return errors


def _evaluate_errors(cfg: BuildConfig) -> Errors:
    if cfg.evaluate is None:
        return []
    lo, hi = cfg.evaluate.seed_start, cfg.evaluate.seed_start + cfg.evaluate.n_seeds
    g0, g1 = cfg.generate.seed_start, cfg.generate.seed_start + cfg.generate.n_samples
    if lo < g1 and g0 < hi:
        return [
            (
                "evaluate.seed_start",
                f"evaluation seeds {lo}..{hi - 1} overlap the generation seeds "
                f"{g0}..{g1 - 1}; held-out seeds must be disjoint",
            )
        ]
    return []


def _unknown_attribute_errors(cfg: BuildConfig, field: str, names: Sequence[str]) -> Errors:
    attrs = cfg.annotate.attributes if cfg.annotate is not None else None
    unknown = [a for a in names if attrs is not None and a not in attrs]
    return [(field, f"unknown attributes {unknown}; annotate.attributes is {attrs}")] if unknown else []


def _disentangle_errors(cfg: BuildConfig) -> Errors:
    if cfg.aggregate is None:
        return []
    errors: Errors = []
    for target, others in cfg.aggregate.disentangle.items():
        field = f"aggregate.disentangle.{target}"
        if not others:
            errors.append((field, "list at least one direction to project out"))
        if target in others:
            errors.append((field, f"'{target}' cannot be projected out of itself"))
        errors += _unknown_attribute_errors(cfg, field, [target, *others])
    return errors


def _condition_errors(cfg: BuildConfig) -> Errors:
    if cfg.aggregate is None:
        return []
    errors: Errors = []
    for target, other in cfg.aggregate.condition.items():
        field = f"aggregate.condition.{target}"
        if target == other:
            errors.append((field, f"'{target}' cannot be held fixed while it is edited"))
        errors += _unknown_attribute_errors(cfg, field, [target, other])
    return errors


def _quantile_errors(cfg: BuildConfig) -> Errors:
    agg, n = cfg.aggregate, cfg.generate.n_samples
    if agg is not None and n * agg.quantile < 1:
        return [("aggregate.quantile", f"{agg.quantile} of generate.n_samples={n} selects no sample")]
    return []


def _jacobian_errors(cfg: BuildConfig) -> Errors:
    steps = cfg.sampler.num_inference_steps
    errors: Errors = [
        (f"jacobian[{i}].step", f"{spec.step} outside 0..{steps - 1}")
        for i, spec in enumerate(cfg.jacobian)
        if spec.step >= steps
    ]
    names = [s.name for s in cfg.jacobian if s.name]
    if len(set(names)) != len(names):
        errors.append(("jacobian", f"duplicate names {names}"))
    return errors


#: Checks between fields of one config (no model, no I/O), one per section, in reporting order.
_CROSS_FIELD_CHECKS = (
    _sampler_errors,
    _capture_steps_errors,
    _conditioning_shape_errors,
    _seed_range_errors,
    _pca_steps_errors,
    _pca_size_errors,
    _needs_annotate_errors,
    _evaluate_errors,
    _disentangle_errors,
    _condition_errors,
    _quantile_errors,
    _jacobian_errors,
)


# ---------------------------------------------------------------------------------------------
# The model, described without loading weights


@dataclass(frozen=True)
class ModelInfo:
    """What the pipeline needs to know about a model before loading it.

    ``location`` is a local directory or a hub id; ``kind`` (``hspace.model.KIND_NAMES``),
    ``capture`` (the capture point spec), the shapes and ``num_train_timesteps`` are None when
    neither the model files nor the config give them. ``num_classes``: a class-conditional
    model's class count.
    """

    location: str
    revision: str | None
    is_local: bool
    h_shape: tuple[int, int, int] | None
    image_size: int | None
    num_train_timesteps: int | None
    kind: str | None = None
    capture: str | None = None
    latent_shape: tuple[int, int, int] | None = None
    image_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None


def _toy_model_dir(name: str) -> Path:
    """The shipped model that ``name`` (``toy`` / ``toy-text``) stands for."""
    try:
        from hspace.toy import resolve_model_source

        toy_dir = resolve_model_source(name)
    except ImportError as e:  # the toy package is part of this project; a broken install is fatal
        raise ConfigError(
            [
                (
                    "model.source",
                    f"{name!r} needs the shipped weights of hspace.toy, which failed to import: {e}",
                )
            ]
        ) from e
    return Path(toy_dir)


#: The names that stand for the shipped models (``hspace.toy.TOY_MODEL_DIRS``).
TOY_MODEL_NAMES = ("toy", "toy-text")


def _looks_like_path(source: str) -> bool:
    from hspace.model import HUB_ID

    return source.startswith(("/", "./", "../", "~")) or "\\" in source or not HUB_ID.match(source)


def unet_h_shape(unet_config: dict[str, Any]) -> tuple[tuple[int, int, int], int]:
    """``(h_shape, image_size)`` of a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` config.

    The mid-block sees ``block_out_channels[-1]`` channels at the input size divided by two for
    every down block except the last (diffusers adds no downsampler to the final block).
    """
    size = unet_config["sample_size"]
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    channels = int(unet_config["block_out_channels"][-1])
    n_down = len(unet_config["down_block_types"])
    side = size // (2 ** (n_down - 1))
    return (channels, side, side), size


def transformer_h_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """h [D, gh, gw] of a ``DiTTransformer2DModel`` block: its tokens (one per patch, width
    heads x head dim) seen as a map over the patch grid."""
    size = config["sample_size"]
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    patch = int(config["patch_size"])
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return (inner, height // patch, width // patch)


#: Component folders of each kind: (denoiser, vae).
_COMPONENTS = {
    "pixel": ("unet", None),
    "class": ("unet", None),
    "latent": ("unet", "vqvae"),
    "text": ("unet", "vae"),
    "text-xl": ("unet", "vae"),
    "dit": ("transformer", "vae"),
}


def _kind_of(index: dict[str, Any] | None, denoiser: dict[str, Any] | None) -> str | None:
    """The kind from ``model_index.json``'s pipeline class (a bare U-Net: pixel, or class with a
    class embedding); None when unknown."""
    from hspace.model import PIPELINE_KINDS

    name = index.get("_class_name") if isinstance(index, dict) else None
    kind = PIPELINE_KINDS[name].name if name in PIPELINE_KINDS else None
    if kind in (None, "pixel") and denoiser is not None:
        has_classes = denoiser.get("num_class_embeds") or denoiser.get("class_embed_type")
        return "class" if has_classes else "pixel"
    return kind


def _local_config_files(root: Path) -> dict[str, dict[str, Any] | None]:
    """``index`` (model_index.json), ``denoiser``, ``vae`` and ``scheduler`` configs of a local model."""
    from hspace.io import read_json

    index = read_json(root / "model_index.json", missing_ok=True)
    kind = _kind_of(index, None)
    folder, vae_folder = _COMPONENTS.get(kind or "pixel", ("unet", None))
    denoiser = read_json(root / folder / "config.json", missing_ok=True)
    if denoiser is None and index is None:
        denoiser = read_json(root / "config.json", missing_ok=True)  # a bare UNet directory
    vae = read_json(root / vae_folder / "config.json", missing_ok=True) if vae_folder else None
    sched = read_json(root / "scheduler" / "scheduler_config.json", missing_ok=True)
    return {"index": index, "denoiser": denoiser, "vae": vae, "scheduler": sched}


def _hub_cached_config_files(repo_id: str, revision: str | None) -> dict[str, dict[str, Any] | None]:
    """Configs of a hub model from the local Hugging Face cache only (never the network)."""
    from hspace.io import read_json

    out: dict[str, dict[str, Any] | None] = {"index": None, "denoiser": None, "vae": None, "scheduler": None}
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return out

    def cached(name: str) -> dict[str, Any] | None:
        hit = try_to_load_from_cache(repo_id, name, revision=revision)
        return read_json(hit, missing_ok=True) if isinstance(hit, str) else None

    out["index"] = cached("model_index.json")
    folder, vae_folder = _COMPONENTS.get(_kind_of(out["index"], None) or "pixel", ("unet", None))
    out["denoiser"] = cached(f"{folder}/config.json")
    out["vae"] = cached(f"{vae_folder}/config.json") if vae_folder else None
    out["scheduler"] = cached("scheduler/scheduler_config.json")
    return out


def _derived_shapes(
    kind: str, denoiser: dict[str, Any], vae: dict[str, Any] | None, capture: str | None
) -> tuple[tuple | None, tuple, tuple | None, int | None, str]:
    """``(h_shape, latent_shape, image_shape, num_classes, capture)`` from the config files; h is
    None for a capture point other than the default module (its shape needs a forward pass)."""
    from hspace.model import CapturePoint

    size = denoiser["sample_size"]
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    latent = (int(denoiser["in_channels"]), int(height), int(width))
    if kind == "dit":
        default = f"transformer_blocks.{int(denoiser['num_layers']) // 2}"
        point = CapturePoint.parse(capture or default)
        blocks = point.module.split(".")
        known = (
            len(blocks) == 2
            and blocks[0] == "transformer_blocks"
            and blocks[1].isdigit()
            and int(blocks[1]) < int(denoiser["num_layers"])
        )
        h = transformer_h_shape(denoiser) if known else None
        num_classes = int(denoiser.get("num_embeds_ada_norm") or 0) or None
    else:
        point = CapturePoint.parse(capture or "mid_block")
        h = unet_h_shape(denoiser)[0] if point.module == "mid_block" else None
        num_classes = denoiser.get("num_class_embeds")
    image = latent
    if vae is not None:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        image = (int(vae.get("out_channels", 3)), height * factor, width * factor)
    elif _COMPONENTS[kind][1] is not None:
        image = None  # a latent model whose VAE config is not at hand
    return h, latent, image, num_classes, point.spec


def _model_files(model: ModelConfig) -> tuple[dict[str, dict[str, Any] | None], str, bool]:
    """``(config files, location, is_local)`` of ``model.source``; ConfigError naming
    ``model.source`` for a missing directory or one without a denoiser config."""
    source = model.source
    if source in TOY_MODEL_NAMES:
        root = _toy_model_dir(source)
        files = _local_config_files(root)
        if files["denoiser"] is None:
            raise ConfigError(
                [("model.source", f"toy model {root} has no unet/config.json (toy weights not built)")]
            )
        return files, str(root), True
    if _expand(source, "model.source").is_dir():
        root = _expand(source, "model.source")
        try:
            files = _local_config_files(root)
        except ValueError as e:
            raise ConfigError([("model.source", str(e))]) from None
        if files["denoiser"] is None:
            raise ConfigError(
                [
                    (
                        "model.source",
                        f"{root} has no denoiser config (unet/config.json or transformer/config.json "
                        "of a diffusers pipeline directory, or a bare UNet's config.json)",
                    )
                ]
            )
        return files, str(root), True
    if _looks_like_path(source):
        raise ConfigError([("model.source", f"local model directory {source!r} does not exist")])
    return _hub_cached_config_files(source, model.revision), source, False


def _files_kind(files: dict[str, dict[str, Any] | None], location: str) -> str | None:
    """The kind the model's files say (None without files); ConfigError for an unsupported pipeline."""
    from hspace.model import PIPELINE_KINDS

    index_class = files["index"].get("_class_name") if isinstance(files["index"], dict) else None
    if index_class is not None and index_class not in PIPELINE_KINDS:
        supported = ", ".join(sorted(PIPELINE_KINDS))
        raise ConfigError(
            [
                (
                    "model.source",
                    f"{location}: hspace does not support diffusers' {index_class}; supported: {supported}",
                )
            ]
        )
    return _kind_of(files["index"], files["denoiser"]) if files["denoiser"] or files["index"] else None


def _stated(v: list[int] | None) -> tuple[int, ...] | None:
    return tuple(v) if v is not None else None


def describe_model(model: ModelConfig) -> ModelInfo:
    """Resolve ``model.source`` and read its kind and shapes from config files (no weights loaded).

    Raises ConfigError naming ``model.source`` for a missing local directory, and the stated field
    (``model.kind``, ``model.h_shape``, ``model.latent_shape``, ``model.image_shape``,
    ``model.num_train_timesteps``) when a stated value contradicts the model's own config.
    """
    files, location, is_local = _model_files(model)
    errors: list[tuple[str, str]] = []
    kind = _files_kind(files, location)
    if kind is not None and model.kind is not None and kind != model.kind:
        errors.append(("model.kind", f"{model.kind!r} contradicts the model's files ({kind!r})"))
    kind = kind or model.kind
    h_shape, latent_shape = _stated(model.h_shape), _stated(model.latent_shape)
    image_shape = _stated(model.image_shape)
    capture, num_classes = _check_capture(model.capture), None
    if files["denoiser"] is not None and kind is not None:
        try:
            derived = _derived_shapes(kind, files["denoiser"], files["vae"], model.capture)
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError([("model.source", f"{location}: unreadable denoiser config ({e})")]) from None
        d_h, d_latent, d_image, num_classes, capture = derived
        for field, stated, found in (
            ("model.h_shape", h_shape, d_h),
            ("model.latent_shape", latent_shape, d_latent),
            ("model.image_shape", image_shape, d_image),
        ):
            if stated is not None and found is not None and stated != found:
                errors.append((field, f"{list(stated)} contradicts the model's config ({list(found)})"))
        h_shape, latent_shape, image_shape = d_h or h_shape, d_latent, d_image or image_shape
    elif capture is None and kind is not None and kind != "dit":
        capture = "mid_block"
    n_train = model.num_train_timesteps
    sched_cfg = files["scheduler"]
    if sched_cfg is not None and "num_train_timesteps" in sched_cfg:
        derived_n = int(sched_cfg["num_train_timesteps"])
        if n_train is not None and n_train != derived_n:
            errors.append(
                ("model.num_train_timesteps", f"{n_train} contradicts the scheduler config ({derived_n})")
            )
        n_train = derived_n
    if errors:
        raise ConfigError(errors)
    image_size = image_shape[1] if image_shape is not None else None
    return ModelInfo(
        location, model.revision, is_local, h_shape, image_size, n_train,  # type: ignore[arg-type]
        kind=kind, capture=capture, latent_shape=latent_shape, image_shape=image_shape,  # type: ignore[arg-type]
        num_classes=num_classes,
    )  # fmt: skip


def activation_bytes(cfg: BuildConfig, h_shape: Sequence[int] | None) -> int | None:
    """float16 h bytes the build stores: samples x stored steps x prod(h_shape) x 2 (None if h is unknown)."""
    if h_shape is None:
        return None
    return cfg.generate.n_samples * len(cfg.capture_steps) * math.prod(h_shape) * 2


def _class_errors(m: ModelConfig, info: ModelInfo) -> Errors:
    """A class-conditional model (DiT, class U-Net) needs class labels in range, no prompts."""
    errors: Errors = [
        (field, f"the model is class-conditional ({info.kind}): give model.class_labels")
        for field, value in (("model.prompts", m.prompts), ("model.negative_prompt", m.negative_prompt))
        if value is not None
    ]
    if m.class_labels is None:
        errors.append(("model.class_labels", f"required: the model is class-conditional ({info.kind})"))
    labels = [m.class_labels] if isinstance(m.class_labels, int) else (m.class_labels or [])
    too_big = [x for x in labels if info.num_classes is not None and x >= info.num_classes]
    if too_big:
        errors.append(
            ("model.class_labels", f"{too_big} out of range 0..{info.num_classes - 1} for this model")  # type: ignore[operator]
        )
    g = m.guidance_scale
    if info.kind == "class" and g is not None and g > 1:
        errors.append(
            ("model.guidance_scale", f"{g}: a class U-Net has no null class to guide against; use 1")
        )
    return errors


def _unconditional_errors(m: ModelConfig, kind: str) -> Errors:
    """An unconditional model (pixel, latent) takes no prompt, class or guidance."""
    errors: Errors = [
        (field, f"the model ({kind}) is unconditional and takes none")
        for field, value in (
            ("model.prompts", m.prompts),
            ("model.negative_prompt", m.negative_prompt),
            ("model.class_labels", m.class_labels),
        )
        if value is not None
    ]
    if m.guidance_scale is not None and m.guidance_scale > 1:
        errors.append(
            ("model.guidance_scale", f"{m.guidance_scale}: the model ({kind}) is unconditional; use 1")
        )
    return errors


def _conditioning_errors(cfg: BuildConfig, info: ModelInfo) -> Errors:
    """The config's conditioning against what the model's kind takes (nothing to check when the
    kind is unknown)."""
    m, kind = cfg.model, info.kind
    if kind is None:
        return []
    if kind in TEXT_KINDS:
        errors: Errors = []
        if m.class_labels is not None:
            errors.append(
                ("model.class_labels", f"the model is text-conditional ({kind}): give model.prompts")
            )
    elif kind in CLASS_KINDS:
        errors = _class_errors(m, info)
    else:
        errors = _unconditional_errors(m, kind)
    return errors


def _model_errors(cfg: BuildConfig, info: ModelInfo) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = _conditioning_errors(cfg, info)
    samplers = [("sampler", cfg.sampler)]
    if cfg.evaluate is not None and cfg.evaluate.sampler is not None:
        samplers.append(("evaluate.sampler", cfg.evaluate.sampler))
    for where, spec in samplers:
        steps = spec.num_inference_steps
        if info.num_train_timesteps is not None and steps > info.num_train_timesteps:
            errors.append(
                (
                    f"{where}.num_inference_steps",
                    f"{steps} exceeds the model's num_train_timesteps={info.num_train_timesteps}",
                )
            )
    max_bytes = cfg.storage.max_bytes
    if max_bytes is not None:
        need = activation_bytes(cfg, info.h_shape)
        if need is None:
            errors.append(("model.h_shape", "unknown: state it so that storage.max_bytes can be checked"))
        elif need > max_bytes:
            errors.append(
                (
                    "storage.max_bytes",
                    f"the build would write {need} bytes of float16 h ({cfg.generate.n_samples} samples x "
                    f"{len(cfg.capture_steps)} stored steps x h {list(info.h_shape or [])}), more than "
                    f"{max_bytes}; store fewer steps (generate.capture_steps / capture_every) or samples",
                )
            )
    if info.h_shape is not None:
        dim = math.prod(info.h_shape)
        if cfg.pca.n_components > dim:
            errors.append(("pca.n_components", f"{cfg.pca.n_components} exceeds the h-space dimension {dim}"))
        errors += [
            (
                f"jacobian[{i}].k",
                f"{spec.k} exceeds the h-space dimension {dim} (h shape {list(info.h_shape)})",
            )
            for i, spec in enumerate(cfg.jacobian)
            if spec.k > dim
        ]
    if info.image_size is not None:
        for i, spec in enumerate(cfg.jacobian):
            if spec.mask is not None and max(spec.mask[2], spec.mask[3]) > info.image_size:
                errors.append((f"jacobian[{i}].mask", f"{spec.mask} exceeds the {info.image_size}px image"))
    return errors


def _classifier_attributes(config_bytes: bytes, where: str) -> list[str]:
    """The attribute names in a classifier's ``config.json`` (hspace.classifier layout); no weights read."""
    import json

    try:
        data = json.loads(config_bytes)
    except (ValueError, RecursionError) as e:
        raise ConfigError([("annotate.classifier", f"{where} is not valid JSON: {e}")]) from None
    attrs = data.get("attributes") if isinstance(data, dict) else None
    if not isinstance(attrs, list) or not all(isinstance(a, str) for a in attrs):
        raise ConfigError([("annotate.classifier", f"{where} has no 'attributes' list of names")])
    return attrs


def _local_classifier_attributes(cfg: BuildConfig) -> list[str] | None:
    """Attributes of a ``toy`` or local-directory classifier; None for URL classifiers (see the dry run)."""
    if cfg.annotate is None or "://" in cfg.annotate.classifier:
        return None
    from hspace.classifier import CONFIG_NAME

    if cfg.annotate.classifier == "toy":
        from hspace.toy import TOY_CLASSIFIER_DIR

        path = Path(TOY_CLASSIFIER_DIR)
    else:
        path = _expand(cfg.annotate.classifier, "annotate.classifier")
        if not path.is_dir():
            raise ConfigError([("annotate.classifier", f"classifier directory {path} does not exist")])
    config = path / CONFIG_NAME
    try:
        return _classifier_attributes(config.read_bytes(), str(config))
    except OSError as e:
        raise ConfigError([("annotate.classifier", f"cannot read {config}: {e.strerror or e}")]) from None


def _attribute_errors(cfg: BuildConfig, available: Sequence[str] | None) -> Errors:
    """``annotate.attributes`` (when omitted: the names aggregate uses) must be attributes the classifier has."""
    if cfg.annotate is None or available is None:
        return []
    if cfg.annotate.attributes is None:  # every attribute of the classifier: aggregate must name some of them
        errors: Errors = []
        if cfg.aggregate is not None:
            for section in ("disentangle", "condition"):
                for target, other in getattr(cfg.aggregate, section).items():
                    names = [target, *([other] if isinstance(other, str) else other)]
                    unknown = [a for a in names if a not in available]
                    if unknown:
                        errors.append(
                            (
                                f"aggregate.{section}.{target}",
                                f"unknown attributes {unknown}; classifier {cfg.annotate.classifier!r} has "
                                f"{list(available)}",
                            )
                        )
        return errors
    unknown = [a for a in cfg.annotate.attributes if a not in available]
    if unknown:
        return [
            (
                "annotate.attributes",
                f"{unknown} are not attributes of classifier {cfg.annotate.classifier!r} (it has {list(available)})",
            )
        ]
    return []


def _direction_names(cfg: BuildConfig, attributes: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(direction, field, attribute)`` for the supervised directions a build will publish."""
    if cfg.aggregate is None:
        return []
    names = [(a, "annotate.attributes", a) for a in attributes]
    names += [(f"{a}_boundary", "annotate.attributes", a) for a in attributes]
    names += [(f"{t}_disentangled", f"aggregate.disentangle.{t}", t) for t in cfg.aggregate.disentangle]
    names += [(f"{t}_conditional", f"aggregate.condition.{t}", t) for t in cfg.aggregate.condition]
    return names


def _preview_errors(cfg: BuildConfig, attributes: Sequence[str] | None) -> Errors:
    """Preview files (``hspace.catalog.preview_path``) must be distinct and paths the catalog accepts.

    One error per attribute: the names derived from an attribute already reported are not repeated.
    """
    if cfg.evaluate is None or attributes is None:
        return []
    errors: Errors = []
    seen: dict[str, str] = {}
    reported: set[str] = set()
    for name, field, attribute in _direction_names(cfg, attributes):
        if attribute in reported:
            continue
        path = preview_path(name)
        if path in seen and seen[path] != name:
            errors.append((field, f"directions {seen[path]!r} and {name!r} would both publish {path}"))
            reported |= {attribute, seen[path]}
            continue
        seen[path] = name
        try:
            _catalog_check_relpath(path, "preview path")
        except ValueError as e:
            errors.append((field, f"direction {name!r}: the catalog refuses its preview: {e}"))
            reported.add(attribute)
    return errors


def _classifier_errors(cfg: BuildConfig) -> Errors:
    try:
        available = _local_classifier_attributes(cfg)
    except ConfigError as e:
        return e.errors
    attributes = cfg.annotate.attributes if cfg.annotate is not None else None
    return _attribute_errors(cfg, available) + _preview_errors(cfg, attributes or available)


# ---------------------------------------------------------------------------------------------
# Loading


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _split_validation_error(e: ValidationError) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for err in e.errors():
        loc = _format_loc(tuple(err["loc"]))
        msg = err["msg"]
        if err["type"] == "value_error" and not loc:
            # Our own cross-field errors: "field: message" lines.
            for line in str(err.get("ctx", {}).get("error", msg)).splitlines():
                field, _, rest = line.partition(": ")
                errors.append((field, rest) if rest else ("", line))
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if err["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in err:
            shown = repr(err["input"])
            msg += f" (got {shown if len(shown) < 80 else shown[:77] + '...'})"
        errors.append((loc, msg))
    return errors


#: Deepest nesting a config may have (the schema itself is 4 levels deep).
MAX_DEPTH = 32
#: Most values a config may expand to (aliases included); real configs have a few hundred.
MAX_VALUES = 100_000


def _shape_errors(data: Any) -> Errors:
    """Every inf / nan float anywhere in the raw mapping (lists and storage_options included);
    self-referencing (recursive YAML alias), absurdly deep nesting, or aliases that expand to more than
    ``MAX_VALUES`` values. Shared nodes are visited once (their expanded size is remembered)."""
    errors: Errors = []
    size_of: dict[int, int] = {}
    active: set[int] = set()

    def walk(loc: tuple[Any, ...], node: Any) -> int:
        if isinstance(node, float) and not math.isfinite(node):
            errors.append((_format_loc(loc), f"must be a finite number, got {node}"))
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in size_of:
            return size_of[id(node)]
        if id(node) in active:
            errors.append((_format_loc(loc), "refers to itself (a recursive YAML alias)"))
            return 1
        if len(loc) > MAX_DEPTH:
            errors.append((_format_loc(loc[:MAX_DEPTH]), f"nested more than {MAX_DEPTH} levels deep"))
            return 1
        active.add(id(node))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        size = 1 + sum(walk((*loc, key), value) for key, value in items)
        active.discard(id(node))
        size_of[id(node)] = size
        return size

    if walk((), data) > MAX_VALUES:
        errors.append(("", f"expands to more than {MAX_VALUES} values (YAML aliases repeating large nodes?)"))
    return errors


def validate_config(data: Any, *, source: str | None = None, check_model: bool = True) -> BuildConfig:
    """Validate a config mapping; with ``check_model`` also check it against the model's config files.

    Raises :class:`ConfigError` (and only that) for anything wrong with ``data``.
    """
    if not isinstance(data, dict):
        raise ConfigError([("", f"top level must be a mapping, got {type(data).__name__}")], source)
    shape = _shape_errors(data)
    try:
        cfg = BuildConfig.model_validate(data)
    except ValidationError as e:
        flagged = {f for f, _ in shape}
        rest = [(f, m) for f, m in _split_validation_error(e) if f not in flagged]
        raise ConfigError(shape + rest, source) from None
    if shape:  # inside free-form mappings such as storage_options, or cycles
        raise ConfigError(shape, source)
    if check_model:
        try:
            info = describe_model(cfg.model)
        except ConfigError as e:
            raise ConfigError(e.errors, source) from None
        errors = _model_errors(cfg, info) + _classifier_errors(cfg)
    else:
        errors = _preview_errors(cfg, cfg.annotate.attributes if cfg.annotate is not None else None)
    if errors:
        raise ConfigError(errors, source)
    return cfg


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping key given twice in a YAML document."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # unhashable key: the base class reports it
                continue
            seen[key] = line
            if first is not None:
                raise _DuplicateKeyError(
                    f"duplicate key {key!r} on line {line} (first given on line {first}); "
                    "YAML would silently keep only the last"
                )
        return super().construct_mapping(node, deep=deep)


def _read_text(path: Path) -> str:
    """The config file's text: a ConfigError naming the file for a directory, unreadable or non-UTF-8 file."""
    if path.is_dir():
        raise ConfigError([("", "is a directory, not a YAML file")], str(path))
    if not path.exists():
        raise FileNotFoundError(f"build config {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([("", f"cannot read: {e.strerror or e}")], str(path)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [("", f"not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); save it as UTF-8")],
            str(path),
        ) from None


def parse_yaml(text: str, source: str | None = None) -> Any:
    """YAML text -> data, refusing duplicate keys; ConfigError naming ``source`` for anything unparsable."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except _DuplicateKeyError as e:
        raise ConfigError([("", str(e))], source) from None
    except yaml.YAMLError as e:
        raise ConfigError([("", f"not valid YAML: {' '.join(str(e).split())}")], source) from None
    except RecursionError:
        raise ConfigError([("", "not valid YAML: nested too deeply")], source) from None
    except (ValueError, OverflowError) as e:  # e.g. a timestamp PyYAML cannot represent
        raise ConfigError([("", f"not valid YAML: {e}")], source) from None
    if data is None:
        raise ConfigError([("", "empty file: expected a YAML mapping of config sections")], source)
    return data


def load_config(path: str | Path, *, check_model: bool = True) -> BuildConfig:
    """Read and validate a YAML build config; raises ConfigError (or FileNotFoundError for the file)."""
    path = Path(path)
    data = parse_yaml(_read_text(path), str(path))
    return validate_config(data, source=str(path), check_model=check_model)


def load_config_or_exit(path: str | Path, *, check_model: bool = True) -> BuildConfig:
    """For CLIs: load the config, or print what is wrong to stderr and exit with status 2."""
    try:
        return load_config(path, check_model=check_model)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(CONFIG_ERROR_EXIT_CODE) from None


# ---------------------------------------------------------------------------------------------
# The dry run's probes (I/O, with a timeout)


def _with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """``fn()`` in a daemon thread; TimeoutError when it has not answered within ``timeout`` seconds."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller below
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True, name="hspace-config-probe")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout:g}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _reach_error(url: str, options: dict[str, Any]) -> str | None:
    """None when ``url`` (or its nearest existing parent) is a reachable directory, else the reason."""
    fs, path = fsspec.core.url_to_fs(url, **options)
    current = path.rstrip("/") or path
    while True:
        if fs.exists(current):
            if fs.isfile(current):
                return f"{current} is a file, not a directory"
            return None
        parent = fs._parent(current)
        if not parent or parent == current:
            return f"{current} does not exist (no bucket or root directory to write under)"
        current = parent


def _probe_url(field: str, url: str, options: dict[str, Any], timeout: float) -> Errors:
    try:
        reason = _with_timeout(lambda: _reach_error(url, options), timeout)
    except Exception as e:  # any failure to talk to the storage is the answer
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
    return [(field, f"cannot reach {url}: {reason}")] if reason else []


def _probe_classifier(cfg: BuildConfig, timeout: float) -> tuple[Errors, list[str]]:
    """A URL classifier's attributes from its ``config.json``, when it can be fetched."""
    if cfg.annotate is None or "://" not in cfg.annotate.classifier:
        return [], []
    from hspace.classifier import CONFIG_NAME

    url = f"{cfg.annotate.classifier.rstrip('/')}/{CONFIG_NAME}"
    options = cfg.storage.storage_options

    def fetch() -> bytes:
        fs, path = fsspec.core.url_to_fs(url, **options)
        return fs.cat_file(path)

    try:
        raw = _with_timeout(fetch, timeout)
    except Exception as e:
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        return [], [f"note: annotate.classifier: attributes not checked, cannot fetch {url} ({reason})"]
    try:
        available = _classifier_attributes(raw, url)
    except ConfigError as e:
        return e.errors, []
    attributes = cfg.annotate.attributes
    return _attribute_errors(cfg, available) + _preview_errors(cfg, attributes or available), []


def probe_config(
    cfg: BuildConfig, *, timeout: float = PROBE_TIMEOUT_S, source: str | None = None
) -> list[str]:
    """The dry run's checks that need I/O: the run and catalog URLs answer, a URL classifier's attributes.

    Raises ConfigError naming the field (``storage.run_url: cannot reach ...``); returns notes about
    what could not be checked. Each probe waits at most ``timeout`` seconds.
    """
    errors = _probe_url("storage.run_url", cfg.storage.run_url, cfg.storage.storage_options, timeout)
    errors += _probe_url("catalog.url", cfg.catalog.url, cfg.catalog.storage_options, timeout)
    clf_errors, notes = _probe_classifier(cfg, timeout)
    if errors or clf_errors:
        raise ConfigError(errors + clf_errors, source)
    return notes
