"""Directions in h-space and the small algebra on them (paper sections IV-V).

A :class:`Direction` is a tensor ``[T, C, H, W]`` (one vector per sampler step) or ``[C, H, W]``
(the same vector at every step), with a name, a kind, units, an optional per-step ``sigma`` and
provenance. It is stored as safetensors with JSON metadata in the header, on any fsspec URL;
nothing a reader loads can execute code.

Conventions:

- ``units="raw"``: the vector is in h-space units as computed (a mean difference, say);
  ``units="unit"``: every step has unit L2 norm (PCA components, Jacobian singular vectors).
- ``sigma[t]`` is the standard deviation of the data's projection on the *unit* direction at
  step ``t``; an edit of ``s`` sigma at step ``t`` adds ``s * sigma[t] * v_t / ||v_t||``.

Functions, one equation each: :func:`mean_difference` (eq. 11), :func:`select_quantiles`,
:func:`supervised_direction`, :func:`disentangle` (eq. 12), :func:`random_like` (matched-norm
baseline).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from hspace.io import read_safetensors, write_bytes

KINDS = ("pca", "jacobian", "supervised", "disentangled", "random", "custom")
UNITS = ("raw", "unit")
FORMAT_KEY = "__format__"
FORMAT_VALUE = "hspace.directions/1"
ORDER_KEY = "__directions__"
_RESERVED_SUFFIXES = (".sigma", ".timesteps")


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"Direction name must be a non-empty string, got {name!r}")
    if name.startswith("__") or name.endswith(_RESERVED_SUFFIXES):
        raise ValueError(
            f"Direction name {name!r} is reserved: names may not start with '__' "
            f"or end with {', '.join(_RESERVED_SUFFIXES)}"
        )


@dataclass
class Direction:
    """A direction in h-space: ``vector`` [T, C, H, W] per step, or [C, H, W] for every step."""

    vector: Tensor
    name: str
    kind: str = "custom"
    units: str = "raw"
    sigma: Tensor | None = None
    timesteps: Tensor | None = None
    model_fingerprint: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    #: The capture point h was taken at (``mid_block``, ``transformer_blocks.14``, ...); None when
    #: unknown (directions made before capture points existed, or by hand): compatible with any.
    capture: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.capture is not None and (not isinstance(self.capture, str) or not self.capture):
            raise ValueError(f"Direction {self.name!r}: capture must be a module path string or None")
        self._check_vector()
        if self.kind not in KINDS:
            raise ValueError(f"Direction {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.units not in UNITS:
            raise ValueError(f"Direction {self.name!r}: units must be one of {UNITS}, got {self.units!r}")
        if self.sigma is not None:
            self.sigma = self._per_step_tensor("sigma", self.sigma, torch.float32)
            if not bool(torch.isfinite(self.sigma).all()) or bool((self.sigma < 0).any()):
                raise ValueError(f"Direction {self.name!r}: sigma must be finite and >= 0")
        if self.timesteps is not None:
            self.timesteps = self._per_step_tensor("timesteps", self.timesteps, torch.int64)
            if self.sigma is not None and self.sigma.shape[0] != self.timesteps.shape[0]:
                raise ValueError(f"Direction {self.name!r}: sigma and timesteps differ in length")
        self._check_provenance()

    def _check_vector(self) -> None:
        """The vector is a finite floating-point tensor [T, C, H, W] or [C, H, W]."""
        if not isinstance(self.vector, Tensor):
            raise ValueError(
                f"Direction {self.name!r}: vector must be a torch.Tensor, got {type(self.vector).__name__}"
            )
        if self.vector.ndim not in (3, 4):
            raise ValueError(
                f"Direction {self.name!r}: vector must be [T,C,H,W] or [C,H,W], got shape {tuple(self.vector.shape)}"
            )
        if not self.vector.is_floating_point():
            raise ValueError(
                f"Direction {self.name!r}: vector must be floating point, got {self.vector.dtype}"
            )
        if not bool(torch.isfinite(self.vector).all()):
            raise ValueError(f"Direction {self.name!r}: vector has non-finite values")

    def _per_step_tensor(self, what: str, value: Any, dtype: torch.dtype) -> Tensor:
        """``value`` as a 1-D CPU tensor [T] of ``dtype``, with one entry per step of a per-step vector."""
        t = torch.as_tensor(value).detach().cpu().to(dtype)
        if t.ndim != 1:
            raise ValueError(f"Direction {self.name!r}: {what} must be 1-D [T], got shape {tuple(t.shape)}")
        if self.per_step and t.shape[0] != self.n_steps:
            raise ValueError(
                f"Direction {self.name!r}: {what} has {t.shape[0]} entries but vector has {self.n_steps} steps"
            )
        return t

    def _check_provenance(self) -> None:
        """The fingerprint is a string or None; provenance is a JSON-serialisable dict."""
        if self.model_fingerprint is not None and not isinstance(self.model_fingerprint, str):
            raise ValueError(f"Direction {self.name!r}: model_fingerprint must be a string or None")
        if not isinstance(self.provenance, dict):
            raise ValueError(f"Direction {self.name!r}: provenance must be a dict")
        try:
            json.dumps(self.provenance)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"Direction {self.name!r}: provenance must be JSON-serialisable ({err})"
            ) from None

    # ------------------------------------------------------------------ shape helpers
    @property
    def per_step(self) -> bool:
        """True when the vector has one entry per sampler step ([T, C, H, W])."""
        return self.vector.ndim == 4

    @property
    def n_steps(self) -> int | None:
        """T for a per-step direction, None for a [C, H, W] direction applied at every step."""
        return int(self.vector.shape[0]) if self.per_step else None

    @property
    def h_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the h-space the direction lives in."""
        return tuple(int(s) for s in self.vector.shape[-3:])  # type: ignore[return-value]

    def at_step(self, i: int) -> Tensor:
        """The [C, H, W] vector used at step ``i`` (0 = noisiest)."""
        if not self.per_step:
            return self.vector
        if not -self.n_steps <= i < self.n_steps:  # type: ignore[operator]
            raise ValueError(f"Direction {self.name!r}: step {i} out of range for {self.n_steps} steps")
        return self.vector[i]

    def expand(self, n_steps: int) -> Tensor:
        """The vector as [T, C, H, W] for a sampler with ``n_steps`` steps."""
        if self.per_step:
            if self.n_steps != n_steps:
                raise ValueError(
                    f"Direction {self.name!r} has {self.n_steps} steps, cannot expand to {n_steps}"
                )
            return self.vector
        return self.vector.unsqueeze(0).expand(n_steps, *self.vector.shape)

    def in_units(self, units: str, n_steps: int, sigma: Tensor | Sequence[float] | None = None) -> Tensor:
        """The edit added to h at gamma = 1, as [T, C, H, W] float32 on the vector's device.

        ``units="raw"``: v_t as stored; ``units="sigma"``: sigma_t * v_t / ||v_t||, so gamma counts
        standard deviations of the data along the direction. ``sigma`` [T] (or one value for every
        step) replaces the direction's own, e.g. a random baseline edited with its reference's sigma.
        """
        if units not in ("raw", "sigma"):
            raise ValueError(f"Direction {self.name!r}: units must be 'raw' or 'sigma', got {units!r}")
        v = self.expand(n_steps).detach().float()
        if units == "raw":
            return v
        sigma = self.sigma if sigma is None else sigma
        if sigma is None:
            raise ValueError(
                f"direction {self.name!r} has no sigma: use units='raw' or give it a sigma per step"
            )
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).to(v.device)
        if s.numel() == 1:
            s = s.expand(n_steps)
        if s.numel() != n_steps:
            raise ValueError(
                f"direction {self.name!r}: sigma has {s.numel()} entries but the sampler has {n_steps} steps"
            )
        norms = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
        return v * (s / norms).view(-1, 1, 1, 1)

    def norm_per_step(self) -> Tensor:
        """L2 norm of the vector at each step: [T], or [1] for a [C, H, W] direction."""
        v = self.vector if self.per_step else self.vector.unsqueeze(0)
        return v.flatten(1).norm(dim=1)

    def normalized(self) -> Direction:
        """Unit L2 norm at every step (steps with zero norm stay zero); sigma is unchanged."""
        v = self.vector if self.per_step else self.vector.unsqueeze(0)
        norms = v.flatten(1).norm(dim=1).clamp_min(torch.finfo(v.dtype).tiny)
        unit = v / norms.view(-1, 1, 1, 1)
        return replace(self, vector=unit if self.per_step else unit[0], units="unit")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Direction:
        """Copy with the vector moved/cast (sigma and timesteps stay on the CPU)."""
        return replace(self, vector=self.vector.to(device=device, dtype=dtype))

    # ------------------------------------------------------------------ compatibility
    def check_compatible(
        self,
        model_h_shape: Sequence[int],
        timesteps: Tensor | Sequence[int] | None = None,
        fingerprint: str | None = None,
        capture: str | None = None,
    ) -> None:
        """Raise ValueError naming what does not match a model's capture point and h shape, sampler
        timesteps or fingerprint.

        A direction without stored timesteps (fingerprint, capture point) is compatible with any,
        as long as a per-step direction has as many steps as ``timesteps``.
        """
        want = tuple(int(s) for s in model_h_shape)
        if capture is not None and self.capture is not None and capture != self.capture:
            raise ValueError(
                f"Direction {self.name!r} was found at capture point {self.capture!r} with h_shape "
                f"{self.h_shape}; the model captures at {capture!r} with h_shape {want}"
            )
        if self.h_shape != want:
            raise ValueError(
                f"Direction {self.name!r}: h_shape {self.h_shape} does not match the model's {want}"
            )
        if timesteps is not None:
            ts = torch.as_tensor(timesteps).detach().cpu().to(torch.int64).reshape(-1)
            if self.per_step and self.n_steps != ts.shape[0]:
                raise ValueError(
                    f"Direction {self.name!r}: has {self.n_steps} steps but the sampler has {ts.shape[0]} timesteps"
                )
            if self.sigma is not None and self.sigma.shape[0] != ts.shape[0]:
                raise ValueError(
                    f"Direction {self.name!r}: sigma has {self.sigma.shape[0]} steps but the sampler has "
                    f"{ts.shape[0]} timesteps"
                )
            if self.timesteps is not None and not torch.equal(self.timesteps, ts):
                raise ValueError(
                    f"Direction {self.name!r}: timesteps {self.timesteps.tolist()} do not match the sampler's "
                    f"{ts.tolist()}"
                )
        if (
            fingerprint is not None
            and self.model_fingerprint is not None
            and fingerprint != self.model_fingerprint
        ):
            raise ValueError(
                f"Direction {self.name!r}: model_fingerprint {self.model_fingerprint!r} does not match the "
                f"model's {fingerprint!r}"
            )

    # ------------------------------------------------------------------ serialisation
    def metadata(self) -> dict[str, Any]:
        """The JSON-able description stored next to the tensors."""
        return {
            "name": self.name,
            "kind": self.kind,
            "units": self.units,
            "shape": list(self.vector.shape),
            "dtype": str(self.vector.dtype).removeprefix("torch."),
            "per_step": self.per_step,
            "model_fingerprint": self.model_fingerprint,
            "provenance": self.provenance,
            **({"capture": self.capture} if self.capture is not None else {}),
        }

    def to_safetensors_dict(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors (keys ``<name>``, ``<name>.sigma``, ``<name>.timesteps``) and string metadata
        (key ``<name>``, a JSON object); several directions' dicts can be merged into one file.
        Each tensor is its own copy: directions made with one sampler share its timesteps tensor,
        and safetensors refuses to write tensors that share memory."""
        tensors = {self.name: self.vector.detach().cpu().clone().contiguous()}
        if self.sigma is not None:
            tensors[f"{self.name}.sigma"] = self.sigma.clone().contiguous()
        if self.timesteps is not None:
            tensors[f"{self.name}.timesteps"] = self.timesteps.clone().contiguous()
        return tensors, {self.name: json.dumps(self.metadata(), sort_keys=True)}

    @classmethod
    def from_safetensors_dict(
        cls, tensors: Mapping[str, Tensor], metadata: Mapping[str, str], name: str | None = None
    ) -> Direction:
        """Rebuild one direction from :meth:`to_safetensors_dict` output (or a merged file's content).

        ``name`` may be omitted when the dict holds exactly one direction.
        """
        names = direction_names(metadata)
        if name is None:
            if len(names) != 1:
                raise ValueError(f"name is required: the file holds {len(names)} directions {names}")
            name = names[0]
        if name not in names:
            raise ValueError(f"no direction named {name!r}; present: {names}")
        if name not in tensors:
            raise ValueError(f"direction {name!r} has metadata but no tensor")
        try:
            meta = json.loads(metadata[name])
        except json.JSONDecodeError as err:
            raise ValueError(f"direction {name!r}: metadata is not valid JSON ({err})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"direction {name!r}: metadata must be a JSON object, got {type(meta).__name__}")
        return cls(
            vector=tensors[name],
            name=name,
            kind=meta.get("kind", "custom"),
            units=meta.get("units", "raw"),
            sigma=tensors.get(f"{name}.sigma"),
            timesteps=tensors.get(f"{name}.timesteps"),
            model_fingerprint=meta.get("model_fingerprint"),
            provenance=meta.get("provenance") or {},
            capture=meta.get("capture"),
        )

    def save(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        """Write this direction as a safetensors file to an fsspec URL."""
        save_directions([self], url, storage_options)

    @classmethod
    def load(
        cls, url: str, storage_options: Mapping[str, Any] | None = None, name: str | None = None
    ) -> Direction:
        """Read a direction from a safetensors file on an fsspec URL (``name`` if it holds several).

        A file that is not a well-formed direction file raises ValueError naming ``url``.
        """
        tensors, metadata = read_safetensors(url, storage_options)
        with _naming(url):
            return cls.from_safetensors_dict(tensors, metadata, name)


@contextmanager
def _naming(url: str) -> Iterator[None]:
    """Prefix ValueErrors raised while reading ``url`` with it, so the message names the file."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"{url}: {err}") from None


# ---------------------------------------------------------------------- files with many directions
def direction_names(metadata: Mapping[str, str]) -> list[str]:
    """Names of the directions described in a safetensors metadata dict, in saved order.

    safetensors does not keep header order, so files written here list the names under
    ``__directions__``; otherwise every non-reserved key is a name, sorted.
    """
    names = sorted(k for k in metadata if not k.startswith("__"))
    if ORDER_KEY in metadata:
        try:
            order = json.loads(metadata[ORDER_KEY])
        except json.JSONDecodeError:
            raise ValueError(f"metadata {ORDER_KEY!r} is not valid JSON") from None
        if not isinstance(order, list) or not all(isinstance(n, str) for n in order):
            raise ValueError(f"metadata {ORDER_KEY!r} must be a JSON list of names")
        if sorted(order) != names:
            raise ValueError(f"metadata {ORDER_KEY!r} lists {order} but the file describes {names}")
        return list(order)
    return names


def directions_to_safetensors(directions: Iterable[Direction]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Merge several directions into one (tensors, metadata) pair; names must be unique."""
    tensors: dict[str, Tensor] = {}
    metadata: dict[str, str] = {FORMAT_KEY: FORMAT_VALUE}
    for d in directions:
        if d.name in metadata:
            raise ValueError(f"duplicate direction name {d.name!r}")
        t, m = d.to_safetensors_dict()
        tensors.update(t)
        metadata.update(m)
    metadata[ORDER_KEY] = json.dumps([k for k in metadata if not k.startswith("__")])
    return tensors, metadata


def save_directions(
    directions: Iterable[Direction], url: str, storage_options: Mapping[str, Any] | None = None
) -> None:
    """Write directions to one safetensors file on an fsspec URL (no pickle)."""
    from safetensors.torch import save

    tensors, metadata = directions_to_safetensors(directions)
    data = save(tensors, metadata=metadata)
    write_bytes(url, data, storage_options)


def load_directions(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Direction]:
    """Read every direction in a safetensors file, keyed by name."""
    tensors, metadata = read_safetensors(url, storage_options)
    with _naming(url):
        return {n: Direction.from_safetensors_dict(tensors, metadata, n) for n in direction_names(metadata)}


# ---------------------------------------------------------------------- supervised directions (eq. 11)
def _check_groups(h_pos: Tensor, h_neg: Tensor) -> None:
    """Two groups [N+, ...] and [N-, ...] that agree beyond the first axis, one sample each or more."""
    if h_pos.ndim < 2 or h_neg.ndim < 2:
        raise ValueError(
            f"h_pos and h_neg must be [N, ...], got {tuple(h_pos.shape)} and {tuple(h_neg.shape)}"
        )
    if h_pos.shape[1:] != h_neg.shape[1:]:
        raise ValueError(
            f"h_pos {tuple(h_pos.shape)} and h_neg {tuple(h_neg.shape)} differ beyond the first axis"
        )
    if h_pos.shape[0] == 0 or h_neg.shape[0] == 0:
        raise ValueError("h_pos and h_neg need at least one sample each")


def mean_difference(h_pos: Tensor, h_neg: Tensor) -> Tensor:
    """v = mean(h_pos) - mean(h_neg) over the first axis (paper eq. 11), accumulated in float64.

    ``h_pos`` [N+, ...] and ``h_neg`` [N-, ...] must agree beyond the first axis; the result has
    that shape and the inputs' dtype (at least float32).
    """
    _check_groups(h_pos, h_neg)
    out_dtype = torch.promote_types(torch.promote_types(h_pos.dtype, h_neg.dtype), torch.float32)
    v = h_pos.to(torch.float64).mean(0) - h_neg.to(torch.float64).mean(0)
    return v.to(out_dtype)


def mean_difference_noise(h_pos: Tensor, h_neg: Tensor) -> Tensor:
    """How much of ``mean_difference(h_pos, h_neg)`` is sampling noise, per step.

    Each element of a difference of two group means has standard error
    sqrt(var_pos / n_pos + var_neg / n_neg); the noise's expected norm is the root of the summed
    squares over a step's elements. Returned over the norm of the estimate itself: [T] for h
    [N, T, C, H, W] (one value per step), a 0-d tensor for one latent per sample [N, C, H, W].
    The noise is a random part of every edit along the direction: near 1 the estimate is mostly
    noise, and halving it takes four times the samples. Needs two samples per group (float64);
    inf or nan where the estimate is exactly 0.
    """
    _check_groups(h_pos, h_neg)
    if h_pos.shape[0] < 2 or h_neg.shape[0] < 2:
        raise ValueError(
            f"the noise of a mean difference needs two samples per group, got {h_pos.shape[0]} and {h_neg.shape[0]}"
        )
    start = 2 if h_pos.ndim == 5 else 1
    var_pos, mean_pos = torch.var_mean(h_pos.to(torch.float64).flatten(start), dim=0)
    var_neg, mean_neg = torch.var_mean(h_neg.to(torch.float64).flatten(start), dim=0)
    noise = (var_pos / h_pos.shape[0] + var_neg / h_neg.shape[0]).sum(-1).sqrt()
    return noise / (mean_pos - mean_neg).norm(dim=-1)  # inf (or nan) where the estimate is 0


def select_quantiles(scores: Tensor | Sequence[float], q: float) -> tuple[Tensor, Tensor]:
    """Indices of the top and bottom ``q`` fraction of ``scores`` [N]: (pos_idx, neg_idx).

    n = max(1, floor(q * N)) samples each; ``q`` in (0, 0.5] keeps the two sets disjoint. Ties are
    broken by index (stable sort), so the selection is deterministic.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(s.shape)}")
    if not (isinstance(q, (int, float)) and 0.0 < q <= 0.5):
        raise ValueError(f"q must be in (0, 0.5], got {q!r}")
    if s.shape[0] < 2:
        raise ValueError(f"need at least 2 scores, got {s.shape[0]}")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contain NaN or inf")
    n = max(1, math.floor(q * s.shape[0] + 1e-9))
    order = torch.sort(s, descending=True, stable=True).indices
    return order[:n].clone(), order.flip(0)[:n].clone()


def conditional_quantiles(
    scores: Tensor | Sequence[float], strata: Tensor | Sequence[int], q: float
) -> list[tuple[int, Tensor, Tensor]]:
    """Top and bottom ``q`` fraction of ``scores`` within each stratum: [(stratum, pos_idx, neg_idx)].

    Indices refer to the full ``scores``; strata are integer labels (bool is taken as 0/1), in
    ascending order. Each stratum needs at least 2 samples.
    """
    s = torch.as_tensor(scores).reshape(-1)
    labels = torch.as_tensor(strata).reshape(-1).detach().cpu()
    if labels.shape[0] != s.shape[0]:
        raise ValueError(f"condition_on has {labels.shape[0]} entries but there are {s.shape[0]} samples")
    if labels.dtype.is_floating_point and not bool((labels == labels.round()).all()):
        raise ValueError("condition_on must hold integer stratum labels (e.g. scores > 0), not scores")
    labels = labels.long()
    out = []
    for k in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == k).flatten()
        if idx.numel() < 2:
            raise ValueError(
                f"stratum {k} of condition_on has {idx.numel()} sample(s); each needs at least 2"
            )
        pos, neg = select_quantiles(s[idx], q)
        out.append((int(k), idx[pos], idx[neg]))
    return out


def conditional_mean_difference(
    latents: Tensor, scores: Tensor, q: float, strata: Tensor | Sequence[int]
) -> tuple[Tensor, Tensor, Tensor, dict[str, int]]:
    """Equal-weight mean over strata of the within-stratum top-q minus bottom-q mean difference.

    Why: when attribute B is correlated with attribute A in the data, the plain mean difference
    for A (eq. 11) also carries B, and projecting an entangled B direction out of it (eq. 12)
    cannot remove A's share of B exactly. Within a stratum of B (B fixed), B cannot differ between
    A's top and bottom sets, so the average of the within-stratum differences holds B fixed, the
    "conditional" reading of the paper's disentangling. Returns (vector float32, all positive
    indices, all negative indices, {stratum: size}).
    """
    selections = conditional_quantiles(scores, strata, q)
    labels = torch.as_tensor(strata).reshape(-1).long()
    diffs = [mean_difference(latents[pos], latents[neg]).to(torch.float64) for _, pos, neg in selections]
    v = torch.stack(diffs).mean(0).to(torch.float32)
    sizes = {str(k): int((labels == k).sum()) for k, _, _ in selections}
    return v, torch.cat([p for _, p, _ in selections]), torch.cat([n for _, _, n in selections]), sizes


def projection_sigma(latents: Tensor, vector: Tensor) -> Tensor:
    """Std (unbiased) of the projection of ``latents`` on the unit ``vector``, per step.

    latents [N, T, C, H, W] with vector [T, C, H, W] -> [T]; latents [N, *shape] with vector
    [*shape] -> [1].
    """
    x = latents.to(torch.float64)
    v = vector.to(torch.float64)
    if x.ndim == 5 and v.ndim == 4 and x.shape[1:] == v.shape:
        unit = v.flatten(1) / v.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-300)
        proj = torch.einsum("ntd,td->nt", x.flatten(2), unit)
    elif x.shape[1:] == v.shape:
        proj = x.reshape(x.shape[0], -1) @ (v.reshape(-1, 1) / v.norm().clamp_min(1e-300))
    else:
        raise ValueError(f"latents {tuple(x.shape)} do not match vector {tuple(v.shape)}")
    return proj.std(dim=0, unbiased=True).to(torch.float32)


def supervised_direction(
    latents: Tensor,
    scores: Tensor | Sequence[float],
    q: float,
    name: str,
    *,
    space: str = "h",
    timesteps: Tensor | None = None,
    model_fingerprint: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    condition_on: Tensor | Sequence[int] | None = None,
    capture: str | None = None,
) -> Direction:
    """Mean-difference direction (eq. 11) between the top and bottom ``q`` fraction by score.

    ``latents`` is h [N, T, C, H, W] (per-step direction) or one latent per sample [N, C, H, W],
    e.g. x_T [N, 3, H, W] (``space="x_T"``) as in the paper's Fig. 8a comparison. ``sigma`` is the
    std of all N latents' projection on the unit direction at each step.

    ``condition_on`` [N] (integer stratum per sample, e.g. whether a correlated attribute is
    present) makes it a *conditional* mean difference: the top and bottom ``q`` are taken within
    each stratum and the per-stratum differences are averaged with equal weight, so a correlated
    attribute that is constant within strata does not leak in (see :func:`conditional_mean_difference`).

    ``capture``: the capture point the latents were recorded at (``model.capture.spec``), stored
    on the direction so that a model capturing elsewhere refuses it.

    ``provenance["noise_fraction"]``: :func:`mean_difference_noise` averaged over the steps, how
    much of the direction is sampling noise (unconditional only, two samples per group or more,
    and only where it is finite).
    """
    if latents.ndim not in (4, 5):
        raise ValueError(f"latents must be [N,T,C,H,W] or [N,C,H,W], got shape {tuple(latents.shape)}")
    s = torch.as_tensor(scores).reshape(-1)
    if s.shape[0] != latents.shape[0]:
        raise ValueError(f"scores has {s.shape[0]} entries but latents has {latents.shape[0]} samples")
    noise_fraction = None
    if condition_on is None:
        pos, neg = select_quantiles(s, q)
        v = mean_difference(latents[pos], latents[neg]).to(torch.float32)
        strata_sizes = None
        if pos.numel() >= 2 and neg.numel() >= 2:
            noise_fraction = float(mean_difference_noise(latents[pos], latents[neg]).mean())
            noise_fraction = noise_fraction if math.isfinite(noise_fraction) else None  # JSON holds no inf
    else:
        v, pos, neg, strata_sizes = conditional_mean_difference(latents, s, q, condition_on)
    # sigma only for per-step h: a [C,H,W] direction is used at every step, where its spread differs.
    sigma = projection_sigma(latents, v) if latents.ndim == 5 else None
    s64 = s.to(torch.float64)
    prov: dict[str, Any] = {
        "method": "mean_difference",
        "space": space,
        "q": float(q),
        "n": int(latents.shape[0]),
        "n_pos": int(pos.numel()),
        "n_neg": int(neg.numel()),
        "score_pos_mean": float(s64[pos].mean()),
        "score_neg_mean": float(s64[neg].mean()),
    }
    if noise_fraction is not None:
        prov["noise_fraction"] = noise_fraction
    if strata_sizes is not None:
        prov["method"] = "conditional_mean_difference"
        prov["strata_sizes"] = strata_sizes
    prov.update(dict(provenance or {}))
    return Direction(
        vector=v,
        name=name,
        kind="supervised",
        units="raw",
        sigma=sigma,
        timesteps=timesteps,
        model_fingerprint=model_fingerprint,
        provenance=prov,
        capture=capture,
    )


# ---------------------------------------------------------------------- disentangling (eq. 12)
def _per_step_stack(vs: Sequence[Tensor]) -> tuple[list[Tensor], int | None]:
    """Bring vectors of shape [T, ...] or [...] to a common [T, D] (T=1 when none is per-step)."""
    steps = {v.shape[0] for v in vs if v.ndim == 4}
    if len(steps) > 1:
        raise ValueError(f"per-step directions disagree on the number of steps: {sorted(steps)}")
    n_steps = steps.pop() if steps else None
    t = n_steps or 1
    out = []
    for v in vs:
        w = v.to(torch.float64)
        w = w.unsqueeze(0).expand(t, *w.shape) if w.ndim == 3 else w
        out.append(w.reshape(t, -1))
    return out, n_steps


def project_out(v: Tensor, basis: Tensor, rtol: float = 1e-10) -> Tensor:
    """v - V (V^T V)^+ V^T v for v [D] and V [D, m]: the part of v orthogonal to span(V).

    Uses the SVD of V (pseudo-inverse with relative cutoff ``rtol``), which equals eq. 12 when V
    has full column rank and stays stable when the others are nearly collinear.
    """
    u, s, _ = torch.linalg.svd(basis, full_matrices=False)
    keep = s > rtol * s.max().clamp_min(torch.finfo(s.dtype).tiny)
    u = u[:, keep]
    return v - u @ (u.T @ v)


def disentangle(v: Direction, others: Direction | Sequence[Direction], name: str | None = None) -> Direction:
    """v <- [I - V (V^T V)^-1 V^T] v at every step (paper eq. 12): remove the span of ``others``.

    The result is orthogonal, step by step, to every other direction. If any input is per-step
    the result is [T, C, H, W]; a [C, H, W] input is used at every step. sigma is dropped (the
    projection changes it), timesteps, fingerprint and capture point are kept from ``v``; directions
    found at different capture points are refused (their h are not the same space).
    """
    others = [others] if isinstance(others, Direction) else list(others)
    if not others:
        raise ValueError("disentangle needs at least one other direction")
    for o in others:
        if o.h_shape != v.h_shape:
            raise ValueError(f"direction {o.name!r} has h_shape {o.h_shape}, {v.name!r} has {v.h_shape}")
        if o.capture is not None and v.capture is not None and o.capture != v.capture:
            raise ValueError(
                f"direction {o.name!r} was found at capture point {o.capture!r}, {v.name!r} at {v.capture!r}"
            )
    flat, n_steps = _per_step_stack([v.vector.detach().cpu()] + [o.vector.detach().cpu() for o in others])
    target, rest = flat[0], flat[1:]
    out = torch.stack(
        [project_out(target[t], torch.stack([o[t] for o in rest], dim=1)) for t in range(target.shape[0])]
    )
    shape = (n_steps, *v.h_shape) if n_steps is not None else v.h_shape
    vec = out.reshape(shape).to(v.vector.dtype)
    ts = v.timesteps
    if ts is not None and n_steps is not None and ts.shape[0] != n_steps:
        ts = None
    prov = {
        "method": "projection",
        "source": v.name,
        "source_kind": v.kind,
        "removed": [o.name for o in others],
        "source_provenance": v.provenance,
    }
    return Direction(
        vector=vec.to(v.vector.device),
        name=name or f"{v.name}_disentangled",
        kind="disentangled",
        units="raw",
        sigma=None,
        timesteps=ts,
        model_fingerprint=v.model_fingerprint,
        provenance=prov,
        capture=v.capture,
    )


# ---------------------------------------------------------------------- random baseline
def random_like(v: Direction, seed: int, name: str | None = None) -> Direction:
    """A Gaussian random direction with the same per-step norm as ``v``, deterministic from ``seed``.

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` so it is the same on any device;
    sigma is dropped (it belongs to ``v``'s direction, not to this one); the capture point is ``v``'s.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in 0..2**63-1, got {seed!r}")
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(v.vector.shape, generator=g, dtype=torch.float64)
    flat = r.reshape(v.n_steps or 1, -1)
    target = v.norm_per_step().detach().cpu().to(torch.float64)
    flat = flat / flat.norm(dim=1, keepdim=True) * target.unsqueeze(1)
    return Direction(
        vector=flat.reshape(v.vector.shape).to(dtype=v.vector.dtype, device=v.vector.device),
        name=name or f"{v.name}_random{seed}",
        kind="random",
        units=v.units,
        sigma=None,
        timesteps=v.timesteps,
        model_fingerprint=v.model_fingerprint,
        provenance={"method": "gaussian_matched_norm", "seed": seed, "like": v.name},
        capture=v.capture,
    )
