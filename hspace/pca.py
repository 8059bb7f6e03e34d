"""Streaming PCA of h-space per timestep (paper section IV-A: PCA directions).

:class:`IncrementalPCA` is a torch estimator named like ``sklearn.decomposition.IncrementalPCA``:
``partial_fit`` on batches [N, D], ``merge`` of two states (so actors can fit disjoint data and
combine), ``transform``, and the learned attributes ``components_``, ``explained_variance_``,
``explained_variance_ratio_``, ``singular_values_``, ``mean_``, ``var_``, ``n_samples_seen_``.

The update is the incremental SVD of Ross et al. (2008) that scikit-learn uses: the scatter of
everything seen so far is represented by the rows ``diag(S) V`` plus a mean-correction row, a new
batch (or another state) is stacked under it, and the top-k right singular vectors of the stack
are kept. Accumulation is float64. The SVD of the stack is computed by default through the
smaller Gram matrix and ``eigh`` (``solver="gram"``; faster than a full SVD and exact to float64
rounding for the kept components), with a fallback to ``torch.linalg.svd`` when the kept spectrum
is numerically degenerate; ``solver="svd"`` forces the SVD.

:class:`PerTimestepPCA` keeps one estimator per sampler step, turns component j into a
:class:`~hspace.directions.Direction` with a sign made consistent across steps, and is stored as
safetensors with JSON metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from hspace.directions import Direction
from hspace.io import read_bytes, safetensors_from_bytes, write_bytes

_STATE_TENSORS = ("components_", "singular_values_", "mean_", "var_")
PCA_FORMAT = "hspace.pca/1"


def _flip_signs(vt: Tensor) -> Tensor:
    """Make the largest-magnitude entry of every row positive (scikit-learn's ``svd_flip`` on V)."""
    idx = vt.abs().argmax(dim=1)
    signs = torch.sign(vt.gather(1, idx[:, None])).squeeze(1)
    signs[signs == 0] = 1
    return vt * signs[:, None]


#: Extra columns and power iterations of the ``"lowrank"`` solver (torch.svd_lowrank).
LOWRANK_OVERSAMPLE = 10
LOWRANK_NITER = 4


class IncrementalPCA:
    """Streaming PCA in torch with float64 accumulation, mergeable across workers.

    Args:
        n_components: number of components k to keep.
        device: where the state lives (default CPU).
        dtype: accumulation dtype (float64 by default).
        solver: ``"gram"`` (eigh of the smaller Gram matrix of the stacked rows), ``"svd"``, or
            ``"lowrank"`` (``torch.svd_lowrank``: randomized, k + 10 columns, 4 power iterations;
            on a GPU cheaper than the Gram's eigh for large batches, see ``docs/benchmarks.md``).
    """

    def __init__(
        self,
        n_components: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        solver: str = "gram",
    ) -> None:
        if not isinstance(n_components, int) or isinstance(n_components, bool) or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}")
        if solver not in ("gram", "svd", "lowrank"):
            raise ValueError(f"solver must be 'gram', 'svd' or 'lowrank', got {solver!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.n_components = n_components
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.solver = solver
        self.n_samples_seen_: int = 0
        self.n_features_: int | None = None
        self.components_: Tensor | None = None
        self.singular_values_: Tensor | None = None
        self.mean_: Tensor | None = None
        self.var_: Tensor | None = None

    # ------------------------------------------------------------------ derived attributes
    @property
    def is_fitted(self) -> bool:
        return self.components_ is not None

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise ValueError("IncrementalPCA is not fitted yet: call partial_fit first")

    @property
    def explained_variance_(self) -> Tensor:
        """Variance along each component, S^2 / (n - 1)  [k]."""
        self._require_fitted()
        return self.singular_values_**2 / max(self.n_samples_seen_ - 1, 1)

    @property
    def total_variance_(self) -> Tensor:
        """Total (unbiased) variance of the data, sum of per-feature variances (0-d)."""
        self._require_fitted()
        n = self.n_samples_seen_
        return self.var_.sum() * n / max(n - 1, 1)

    @property
    def explained_variance_ratio_(self) -> Tensor:
        """Fraction of the total variance explained by each component  [k]."""
        total = self.total_variance_
        return self.explained_variance_ / total.clamp_min(torch.finfo(total.dtype).tiny)

    @property
    def residual_variance_(self) -> Tensor:
        """Variance outside the kept components: total - sum(explained_variance_), >= 0 (0-d)."""
        return (self.total_variance_ - self.explained_variance_.sum()).clamp_min(0)

    @property
    def noise_variance_(self) -> Tensor:
        """Residual variance per dimension of the orthogonal complement, residual / (D - k) (0-d).

        Assumes the residual is isotropic in the D - k dimensions the components leave out
        (scikit-learn's value averages the discarded eigenvalues of its last SVD instead).
        """
        d_rest = self.n_features_ - self.n_components
        if d_rest <= 0:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return self.residual_variance_ / d_rest

    # ------------------------------------------------------------------ fitting
    def _check_input(self, X: Tensor) -> Tensor:
        if not isinstance(X, Tensor):
            X = torch.as_tensor(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D [N, D], got shape {tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError("X has no rows")
        if self.n_features_ is not None and X.shape[1] != self.n_features_:
            raise ValueError(f"X has {X.shape[1]} features, the estimator was fitted with {self.n_features_}")
        X = X.to(device=self.device, dtype=self.dtype)
        if not bool(torch.isfinite(X).all()):
            raise ValueError("X contains NaN or inf")
        return X

    def partial_fit(self, X: Tensor) -> IncrementalPCA:
        """Update the fit with a batch X [N, D]; the first batch needs N >= n_components."""
        X = self._check_input(X)
        n, d = X.shape
        if not self.is_fitted:
            if self.n_components > d:
                raise ValueError(f"n_components={self.n_components} exceeds the number of features {d}")
            if n < self.n_components:
                raise ValueError(
                    f"the first batch has {n} rows but n_components={self.n_components}: "
                    "it needs at least n_components rows"
                )
        batch_mean = X.mean(0)
        batch_var = X.var(0, unbiased=False)
        self._combine(n, batch_mean, batch_var, X - batch_mean)
        return self

    def merge(self, other: IncrementalPCA) -> IncrementalPCA:
        """Fold another fitted state into this one (same result as one pass over both, up to
        what each state's truncation to k components had already discarded). Returns self."""
        if not isinstance(other, IncrementalPCA):
            raise ValueError(f"can only merge an IncrementalPCA, got {type(other).__name__}")
        if not other.is_fitted:
            return self
        if other.n_components != self.n_components:
            raise ValueError(f"n_components differ: {self.n_components} vs {other.n_components}")
        if self.n_features_ is not None and other.n_features_ != self.n_features_:
            raise ValueError(f"n_features differ: {self.n_features_} vs {other.n_features_}")
        rows = other.singular_values_[:, None].to(self.device, self.dtype) * other.components_.to(
            self.device, self.dtype
        )
        self._combine(
            other.n_samples_seen_,
            other.mean_.to(self.device, self.dtype),
            other.var_.to(self.device, self.dtype),
            rows,
        )
        return self

    def _combine(self, n_b: int, mean_b: Tensor, var_b: Tensor, rows_b: Tensor) -> None:
        """Merge a block with n_b samples, its mean/variance and rows whose Gram equals its scatter."""
        if not self.is_fitted:
            self.n_features_ = int(mean_b.shape[0])
            self._set_from_stack(rows_b, n_b, mean_b, var_b)
            return
        n_a = self.n_samples_seen_
        n = n_a + n_b
        delta = mean_b - self.mean_
        mean = self.mean_ + delta * (n_b / n)
        var = (self.var_ * n_a + var_b * n_b + delta**2 * (n_a * n_b / n)) / n
        correction = math.sqrt(n_a * n_b / n) * (self.mean_ - mean_b)
        stack = torch.cat([self.singular_values_[:, None] * self.components_, rows_b, correction[None]])
        self._set_from_stack(stack, n, mean, var)

    def _set_from_stack(self, stack: Tensor, n: int, mean: Tensor, var: Tensor) -> None:
        s, vt = self._top_right_singular(stack, self.n_components)
        self.components_ = _flip_signs(vt).contiguous()
        self.singular_values_ = s
        self.mean_ = mean
        self.var_ = var
        self.n_samples_seen_ = int(n)

    def _top_right_singular(self, a: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-k singular values [k] and right singular vectors [k, D] of a [R, D]."""
        r, d = a.shape
        if self.solver == "lowrank" and min(r, d) >= k:
            q = min(k + LOWRANK_OVERSAMPLE, r, d)
            devices = [a.device] if a.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # deterministic, global RNG untouched
                torch.manual_seed(0)
                _, s, v = torch.svd_lowrank(a, q=q, niter=LOWRANK_NITER)
            return s[:k], v[:, :k].T
        if self.solver == "gram" and min(r, d) >= k:
            if r <= d:
                evals, evecs = torch.linalg.eigh(a @ a.T)
                evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
                s = evals.clamp_min(0).sqrt()
                if bool(s[-1] > 1e-6 * s[0]):  # well separated from zero: V = A^T U / S is accurate
                    vt = (evecs.T @ a) / s[:, None]
                    return s, vt
            else:
                evals, evecs = torch.linalg.eigh(a.T @ a)
                s = evals.flip(0)[:k].clamp_min(0).sqrt()
                return s, evecs.flip(1)[:, :k].T
        _, s, vt = torch.linalg.svd(a, full_matrices=False)
        if s.shape[0] < k:
            raise ValueError(f"cannot keep {k} components from a block of rank <= {s.shape[0]}")
        return s[:k], vt[:k]

    def transform(self, X: Tensor) -> Tensor:
        """Coordinates of X [N, D] on the components: (X - mean_) @ components_^T  [N, k]."""
        self._require_fitted()
        out_dtype = X.dtype if X.is_floating_point() else torch.float32
        Xc = self._check_input(X) - self.mean_
        return (Xc @ self.components_.T).to(out_dtype)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Tensors (``components_``, ``singular_values_``, ``mean_``, ``var_``) and JSON-able scalars."""
        state: dict[str, Any] = {
            "n_components": self.n_components,
            "n_features_": self.n_features_,
            "n_samples_seen_": self.n_samples_seen_,
            "solver": self.solver,
        }
        if self.is_fitted:
            for key in _STATE_TENSORS:
                state[key] = getattr(self, key).detach().cpu()
        return state

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> IncrementalPCA:
        """Rebuild an estimator from :meth:`state_dict` output."""
        for key in ("n_components", "n_samples_seen_"):
            if key not in state:
                raise ValueError(f"PCA state is missing {key!r}")
        est = cls(int(state["n_components"]), device=device, dtype=dtype, solver=state.get("solver", "gram"))
        n = int(state["n_samples_seen_"])
        if n == 0:
            return est
        missing = [k for k in _STATE_TENSORS if k not in state]
        if missing:
            raise ValueError(f"PCA state with n_samples_seen_={n} is missing tensors {missing}")
        if n < 0:
            raise ValueError(f"PCA state has n_samples_seen_={n}; it must be >= 0")
        for key in _STATE_TENSORS:
            value = torch.as_tensor(state[key])
            if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                raise ValueError(f"PCA state tensor {key!r} must be finite floating point")
            setattr(est, key, value.to(device=est.device, dtype=dtype))
        if est.components_.ndim != 2 or est.mean_.ndim != 1:
            raise ValueError(
                f"PCA state tensors have the wrong rank: components_ {tuple(est.components_.shape)}, "
                f"mean_ {tuple(est.mean_.shape)}"
            )
        est.n_samples_seen_ = n
        est.n_features_ = int(est.mean_.shape[0])
        k, d = est.components_.shape
        if (
            k != est.n_components
            or d != est.n_features_
            or est.singular_values_.shape != (k,)
            or est.var_.shape != est.mean_.shape
        ):
            raise ValueError(
                f"PCA state tensors disagree: components_ {tuple(est.components_.shape)}, "
                f"singular_values_ {tuple(est.singular_values_.shape)}, mean_ {tuple(est.mean_.shape)}, "
                f"var_ {tuple(est.var_.shape)}"
            )
        return est


class PerTimestepPCA:
    """One :class:`IncrementalPCA` per sampler step over h [B, T, C, H, W].

    Sign rule (documented in every direction's provenance): at the anchor step (default 0, the
    noisiest) a component's largest-magnitude entry is positive; walking away from the anchor,
    step t's component is flipped when its dot product with the already aligned neighbouring
    step's component is negative. Components are not re-matched when their order swaps between
    steps (near-equal eigenvalues).
    """

    SIGN_RULE = (
        "anchor step: largest |entry| positive; others: dot product with the neighbour toward the anchor >= 0"
    )

    def __init__(
        self,
        n_components: int,
        n_steps: int,
        *,
        h_shape: Sequence[int] | None = None,
        timesteps: Tensor | Sequence[int] | None = None,
        model_fingerprint: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
        solver: str = "gram",
    ) -> None:
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        self.n_components = n_components
        self.n_steps = n_steps
        self.h_shape = tuple(int(s) for s in h_shape) if h_shape is not None else None
        self.timesteps = self._check_timesteps(timesteps)
        self.model_fingerprint = model_fingerprint
        self.device = device
        self.dtype = dtype
        self.solver = solver
        self.estimators = [
            IncrementalPCA(n_components, device=device, dtype=dtype, solver=solver) for _ in range(n_steps)
        ]

    def _check_timesteps(self, timesteps: Tensor | Sequence[int] | None) -> Tensor | None:
        if timesteps is None:
            return None
        ts = torch.as_tensor(timesteps).detach().cpu().to(torch.int64).reshape(-1)
        if ts.shape[0] != self.n_steps:
            raise ValueError(f"timesteps has {ts.shape[0]} entries but n_steps={self.n_steps}")
        return ts

    # ------------------------------------------------------------------ fitting
    def _set_h_shape(self, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        if self.h_shape is None:
            self.h_shape = shape
        elif self.h_shape != shape:
            raise ValueError(f"h has shape {shape} per step, expected {self.h_shape}")

    def partial_fit(self, h: Tensor, steps: Sequence[int] | None = None) -> PerTimestepPCA:
        """Update with h [B, T, C, H, W] (all steps), or [B, len(steps), C, H, W] for ``steps``."""
        if h.ndim != 5:
            raise ValueError(f"h must be [B, T, C, H, W], got shape {tuple(h.shape)}")
        steps = list(range(self.n_steps)) if steps is None else list(steps)
        if h.shape[1] != len(steps):
            raise ValueError(f"h has {h.shape[1]} steps, expected {len(steps)}")
        for i, step in enumerate(steps):
            self.partial_fit_step(step, h[:, i])
        return self

    def partial_fit_step(self, step: int, x: Tensor) -> PerTimestepPCA:
        """Update step ``step`` with x [B, C, H, W] or [B, D]."""
        if not 0 <= step < self.n_steps:
            raise ValueError(f"step {step} out of range for n_steps={self.n_steps}")
        if x.ndim == 4:
            self._set_h_shape(x.shape[1:])
        elif x.ndim != 2:
            raise ValueError(f"x must be [B, C, H, W] or [B, D], got shape {tuple(x.shape)}")
        self.estimators[step].partial_fit(x.reshape(x.shape[0], -1))
        return self

    def merge(self, other: PerTimestepPCA) -> PerTimestepPCA:
        """Merge another per-step state (e.g. fitted on other seeds or other steps). Returns self."""
        if other.n_steps != self.n_steps or other.n_components != self.n_components:
            raise ValueError(
                f"cannot merge PCA with (n_steps, n_components)=({other.n_steps}, {other.n_components}) "
                f"into ({self.n_steps}, {self.n_components})"
            )
        if other.h_shape is not None:
            self._set_h_shape(other.h_shape)
        if other.timesteps is not None:
            if self.timesteps is not None and not torch.equal(self.timesteps, other.timesteps):
                raise ValueError("cannot merge PCA states with different timesteps")
            self.timesteps = other.timesteps
        if other.model_fingerprint is not None:
            if self.model_fingerprint not in (None, other.model_fingerprint):
                raise ValueError(
                    f"cannot merge PCA states of different models: {self.model_fingerprint!r} vs "
                    f"{other.model_fingerprint!r}"
                )
            self.model_fingerprint = other.model_fingerprint
        for mine, theirs in zip(self.estimators, other.estimators, strict=True):
            mine.merge(theirs)
        return self

    # ------------------------------------------------------------------ results
    @property
    def fitted_steps(self) -> list[int]:
        return [t for t, e in enumerate(self.estimators) if e.is_fitted]

    def _require_all_fitted(self) -> None:
        missing = [t for t, e in enumerate(self.estimators) if not e.is_fitted]
        if missing:
            raise ValueError(f"PCA steps {missing} have no data yet")

    @property
    def components_(self) -> Tensor:
        """[T, k, D]"""
        self._require_all_fitted()
        return torch.stack([e.components_ for e in self.estimators])

    @property
    def explained_variance_(self) -> Tensor:
        """[T, k]"""
        self._require_all_fitted()
        return torch.stack([e.explained_variance_ for e in self.estimators])

    @property
    def explained_variance_ratio_(self) -> Tensor:
        """[T, k]"""
        self._require_all_fitted()
        return torch.stack([e.explained_variance_ratio_ for e in self.estimators])

    @property
    def n_samples_seen_(self) -> list[int]:
        return [e.n_samples_seen_ for e in self.estimators]

    def sign_aligned_components(self, j: int, anchor: int = 0) -> Tensor:
        """Component j at every step [T, D] with the sign rule of the class docstring."""
        self._require_all_fitted()
        if not 0 <= j < self.n_components:
            raise ValueError(f"component {j} out of range for n_components={self.n_components}")
        if not 0 <= anchor < self.n_steps:
            raise ValueError(f"anchor step {anchor} out of range for n_steps={self.n_steps}")
        comps = self.components_[:, j].clone()
        comps[anchor] = _flip_signs(comps[anchor : anchor + 1])[0]
        for t in list(range(anchor + 1, self.n_steps)):
            if float(comps[t] @ comps[t - 1]) < 0:
                comps[t] = -comps[t]
        for t in range(anchor - 1, -1, -1):
            if float(comps[t] @ comps[t + 1]) < 0:
                comps[t] = -comps[t]
        return comps

    def direction(
        self, j: int, name: str | None = None, anchor: int = 0, *, capture: str | None = None
    ) -> Direction:
        """Component j as a unit-norm per-step Direction with sigma = sqrt(explained_variance_[:, j]).

        ``capture``: the capture point the fitted h came from (``model.capture.spec``); the PCA
        state does not know it, so the caller names it, and the direction records it.
        """
        if self.h_shape is None:
            raise ValueError("h_shape is unknown: fit with [B, T, C, H, W] or pass h_shape=")
        comps = self.sign_aligned_components(j, anchor)
        ev = self.explained_variance_[:, j]
        return Direction(
            vector=comps.reshape(self.n_steps, *self.h_shape).to(torch.float32).cpu(),
            name=name or f"pca_{j}",
            kind="pca",
            units="unit",
            sigma=ev.sqrt().to(torch.float32).cpu(),
            timesteps=self.timesteps,
            model_fingerprint=self.model_fingerprint,
            provenance={
                "method": "per_timestep_incremental_pca",
                "component": j,
                "n_samples": self.n_samples_seen_,
                "explained_variance_ratio": [float(r) for r in self.explained_variance_ratio_[:, j]],
                "sign_rule": self.SIGN_RULE,
                "anchor_step": anchor,
            },
            capture=capture,
        )

    def directions(
        self, k: int | None = None, anchor: int = 0, *, capture: str | None = None
    ) -> list[Direction]:
        """The first k (default all) components as Directions ``pca_0 .. pca_{k-1}`` (``capture``
        as in :meth:`direction`)."""
        k = self.n_components if k is None else k
        if not 1 <= k <= self.n_components:
            raise ValueError(f"k must be in [1, {self.n_components}], got {k}")
        return [self.direction(j, anchor=anchor, capture=capture) for j in range(k)]

    def sigma_of(self, direction: Direction) -> Tensor:
        """Std of the data's projection on the unit ``direction`` at each step  [T] (float32).

        Uses the stored spectrum: var(u) = sum_j ev_j (c_j . u)^2 + noise * (1 - sum_j (c_j . u)^2),
        where noise = residual variance / (D - k) assumes the variance the top-k components miss
        is spread evenly over the remaining D - k dimensions. Exact for u in the span of the
        components; an estimate otherwise.
        """
        self._require_all_fitted()
        d = self.estimators[0].n_features_
        if int(torch.tensor(direction.h_shape).prod()) != d:
            raise ValueError(
                f"direction {direction.name!r} has h_shape {direction.h_shape}, PCA has {d} features"
            )
        if direction.per_step and direction.n_steps != self.n_steps:
            raise ValueError(
                f"direction {direction.name!r} has {direction.n_steps} steps, PCA has {self.n_steps}"
            )
        out = []
        for t, est in enumerate(self.estimators):
            u = direction.at_step(t).reshape(-1).to(device=est.device, dtype=est.dtype)
            norm = u.norm()
            if float(norm) == 0:
                raise ValueError(f"direction {direction.name!r} is zero at step {t}")
            c = est.components_ @ (u / norm)
            captured = (c**2).sum().clamp(max=1)
            var = (est.explained_variance_ * c**2).sum() + est.noise_variance_ * (1 - captured)
            out.append(var.clamp_min(0).sqrt())
        return torch.stack(out).to(torch.float32).cpu()

    # ------------------------------------------------------------------ files
    def to_safetensors_dict(
        self, dtype: torch.dtype | None = None
    ) -> tuple[dict[str, Tensor], dict[str, str]]:
        """Tensors ``step<t>.<attr>`` for every fitted step and JSON metadata (key ``config``).

        ``dtype`` casts the stored float tensors (e.g. float32 for a compact catalog file);
        the default keeps the accumulation dtype so a reload resumes exactly.
        """
        tensors: dict[str, Tensor] = {}
        steps: dict[str, Any] = {}
        for t, est in enumerate(self.estimators):
            state = est.state_dict()
            if not est.is_fitted:
                continue
            for key in _STATE_TENSORS:
                v = state[key]
                tensors[f"step{t}.{key}"] = (v.to(dtype) if dtype is not None else v).contiguous()
            steps[str(t)] = {"n_samples_seen_": state["n_samples_seen_"], "n_features_": state["n_features_"]}
        config = {
            "n_components": self.n_components,
            "n_steps": self.n_steps,
            "h_shape": list(self.h_shape) if self.h_shape is not None else None,
            "timesteps": self.timesteps.tolist() if self.timesteps is not None else None,
            "model_fingerprint": self.model_fingerprint,
            "solver": self.solver,
            "sign_rule": self.SIGN_RULE,
            "steps": steps,
        }
        return tensors, {"__format__": PCA_FORMAT, "config": json.dumps(config, sort_keys=True)}

    @classmethod
    def from_safetensors_dict(
        cls,
        tensors: Mapping[str, Tensor],
        metadata: Mapping[str, str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> PerTimestepPCA:
        """Rebuild from :meth:`to_safetensors_dict` output."""
        if metadata.get("__format__") != PCA_FORMAT or "config" not in metadata:
            raise ValueError(
                f"not a PerTimestepPCA file: metadata __format__ is {metadata.get('__format__')!r}"
            )
        config = _pca_config(metadata["config"])
        pca = cls(
            int(config["n_components"]),
            int(config["n_steps"]),
            h_shape=config.get("h_shape"),
            timesteps=config.get("timesteps"),
            model_fingerprint=config.get("model_fingerprint"),
            device=device,
            dtype=dtype,
            solver=config.get("solver", "gram"),
        )
        features = math.prod(pca.h_shape) if pca.h_shape is not None else None
        for key, scalars in config["steps"].items():
            t = int(key) if key.isdigit() else -1
            if not 0 <= t < pca.n_steps or not isinstance(scalars, dict):
                raise ValueError(f"PCA file config names step {key!r}; steps are 0..{pca.n_steps - 1}")
            state = dict(scalars, n_components=pca.n_components, solver=pca.solver)
            for attr in _STATE_TENSORS:
                name = f"step{t}.{attr}"
                if name not in tensors:
                    raise ValueError(f"PCA file is missing tensor {name!r}")
                state[attr] = tensors[name]
            est = IncrementalPCA.from_state_dict(state, device=device, dtype=dtype)
            if est.is_fitted and features is not None and est.n_features_ != features:
                raise ValueError(
                    f"PCA step {t} has {est.n_features_} features but h_shape {list(pca.h_shape)} has {features}"
                )
            pca.estimators[t] = est
        return pca

    def save(
        self, url: str, storage_options: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Write the state as safetensors to an fsspec URL."""
        from safetensors.torch import save

        tensors, metadata = self.to_safetensors_dict(dtype)
        write_bytes(url, save(tensors, metadata=metadata), storage_options)

    @classmethod
    def load(
        cls,
        url: str,
        storage_options: Mapping[str, Any] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> PerTimestepPCA:
        """Read a state written by :meth:`save`; a malformed file raises ValueError naming ``url``."""
        tensors, metadata = safetensors_from_bytes(read_bytes(url, storage_options), url)
        try:
            return cls.from_safetensors_dict(tensors, metadata, device=device, dtype=dtype)
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{url}: {err}") from None


def _pca_config(text: str) -> dict[str, Any]:
    """The ``config`` metadata of a PCA file, checked for the keys and types a reload needs."""
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"PCA file config is not valid JSON ({err})") from None
    if not isinstance(config, dict) or not isinstance(config.get("steps"), dict):
        raise ValueError("PCA file config must be a JSON object with a 'steps' object")
    for key in ("n_components", "n_steps"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"PCA file config {key!r} must be a positive int, got {value!r}")
    return config
