"""Aggregate stage: turn scores and stored h into the catalog's directions (paper Sec. IV-V).

Per attribute (classifier column; quantiles of the logit for a binary attribute, of the value for
a continuous one):

- ``<attr>``: the supervised mean-difference direction v_t = mean(h_t | top q) - mean(h_t | bottom q)
  (eq. 11), from the h of those seeds only, read back through ``RunStore.read_h``;
- ``<attr>_boundary``: a second supervised finder, InterFaceGAN-style: a linear boundary
  (scikit-learn ``LogisticRegression``) fitted per step on the same top/bottom h, its unit normal
  oriented towards the top group and scaled to the mean difference's norm at that step, so both
  finders edit with the same strength and differ only in direction;
- ``<target>_disentangled``: the mean difference with the span of the configured other
  attributes' directions projected out (eq. 12);
- ``<attr>_conditional``: the mean difference taken within each state of a configured binary
  attribute and averaged, so that attribute is held fixed (``aggregate.condition``);
- ``random_<attr>_<i>``: matched-norm Gaussian baselines (same per-step norm as ``<attr>``).

Plus ``pca_<j>`` from the PCA stage (sigma = sqrt of the explained variance) and, for configured
seeds/steps/masks, ``jac_<name>_<i>`` Jacobian directions (Alg. 1/2, applied at every step).

Every non-PCA direction gets an exact ``sigma[t]``: the standard deviation over all generated
samples of h_t projected on the unit direction, from one streaming pass over the activation
shards (Ray tasks per step), so that "gamma sigma" means the same thing for every kind.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hspace.directions import (
    Direction,
    conditional_quantiles,
    disentangle,
    mean_difference,
    mean_difference_noise,
    random_like,
    select_quantiles,
)
from pipeline.ray_runtime import init_ray
from pipeline.storage import RunStore

if TYPE_CHECKING:
    from hspace.pca import PerTimestepPCA
    from pipeline.annotate import AnnotateResult
    from pipeline.config import AggregateConfig, BuildConfig
    from pipeline.generate import GenerateReport
    from pipeline.pca_stage import PCAStageResult

__all__ = [
    "AggregateResult",
    "aggregate",
    "attribute_directions",
    "boundary_normal",
    "mean_difference_and_boundary",
    "pca_directions",
    "projection_sigma_streaming",
    "random_baselines",
]

#: Bytes of float32 h the per-attribute task holds at a time (steps are read in chunks under it).
H_CHUNK_BYTES = 1 << 30


@dataclass
class AggregateResult:
    """The directions of a build, in catalog order, and what each finder reported."""

    directions: dict[str, Direction]
    #: random baseline name -> name of the direction whose norm it matches
    random_of: dict[str, str]
    #: attribute -> {"boundary_accuracy": ..., "cos_md_boundary": ..., ...}
    attribute_info: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, d in self.directions.items() if kind is None or d.kind == kind]


# ---------------------------------------------------------------------------------------------
# Per-attribute finders (pure functions: tested without Ray)


def boundary_normal(
    h_pos: np.ndarray, h_neg: np.ndarray, *, C: float = 1.0, max_iter: int = 1000
) -> tuple[np.ndarray, float]:
    """Unit normal [D] of a logistic-regression boundary between two groups, pointing to ``h_pos``.

    InterFaceGAN's recipe with a logistic loss instead of an SVM's: an L2-regularised
    ``LogisticRegression`` on the flattened h. Its weight vector lies in the span of the centred
    samples (the intercept absorbs the mean, the penalty kills anything orthogonal), so it is
    fitted exactly on the N coordinates of the samples in that span (thin SVD) and mapped back --
    the same solution as fitting on all D = C*H*W features, at O(N^2 D) instead of an iterative
    solve in D dimensions. Returns (normal, training accuracy).
    """
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([h_pos, h_neg]).reshape(len(h_pos) + len(h_neg), -1).astype(np.float64)
    y = np.concatenate([np.ones(len(h_pos)), np.zeros(len(h_neg))])
    xc = x - x.mean(0)
    u, s, vt = np.linalg.svd(xc, full_matrices=False)
    keep = s > s.max() * 1e-10
    z = u[:, keep] * s[keep]  # sample coordinates in the span, [N, r]; ||w|| is preserved by vt
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(z, y)
    w = clf.coef_[0] @ vt[keep]
    norm = np.linalg.norm(w)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("logistic regression found no boundary (zero or non-finite weights)")
    return (w / norm).astype(np.float32), float(clf.score(z, y))


def mean_difference_and_boundary(
    h_pos: torch.Tensor, h_neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Both supervised finders on explicit groups h_pos [P, T, C, H, W], h_neg [Q, T, C, H, W].

    Returns the mean difference [T, C, H, W] (eq. 11), the boundary direction [T, C, H, W] (unit
    normal per step scaled to the mean difference's norm there) and the per-step training accuracy.
    """
    md = mean_difference(h_pos, h_neg).to(torch.float32)
    normals, accs = [], []
    for t in range(md.shape[0]):
        n_t, acc = boundary_normal(h_pos[:, t].float().numpy(), h_neg[:, t].float().numpy())
        normals.append(torch.from_numpy(n_t).reshape(md.shape[1:]) * md[t].norm())
        accs.append(acc)
    return md, torch.stack(normals), accs


def _supervised_pair(
    name: str,
    md: torch.Tensor,
    boundary: torch.Tensor,
    accs: Sequence[float],
    scores_pos: np.ndarray,
    scores_neg: np.ndarray,
    q: float,
    timesteps: torch.Tensor | None,
    model_fingerprint: str | None,
    provenance: dict[str, Any] | None,
    noise: Sequence[float] = (),
) -> tuple[Direction, Direction, dict[str, Any]]:
    """The mean-difference and boundary directions of one attribute, with their provenance.

    ``noise``: :func:`hspace.directions.mean_difference_noise` of each stored step (empty when a
    group has fewer than two samples); its mean is the mean difference's ``noise_fraction``.
    """
    cos = torch.nn.functional.cosine_similarity(md.flatten(1).double(), boundary.flatten(1).double(), dim=1)
    stats = {
        "n_pos": int(len(scores_pos)),
        "n_neg": int(len(scores_neg)),
        "score_pos_mean": float(np.mean(scores_pos)),
        "score_neg_mean": float(np.mean(scores_neg)),
        "boundary_train_accuracy": float(np.mean(accs)),
        "cos_mean_difference_boundary": float(cos.mean()),
    }
    base = dict(provenance or {}) | {
        "attribute": name,
        "q": float(q),
        "n_pos": stats["n_pos"],
        "n_neg": stats["n_neg"],
    }
    md_dir = Direction(
        vector=md,
        name=name,
        kind="supervised",
        units="raw",
        timesteps=timesteps,
        model_fingerprint=model_fingerprint,
        provenance=base
        | {
            "method": "mean_difference",
            "equation": "paper eq. 11",
            "score_pos_mean": stats["score_pos_mean"],
            "score_neg_mean": stats["score_neg_mean"],
        }
        | ({"noise_fraction": float(np.mean(noise))} if len(noise) and np.isfinite(noise).all() else {}),
    )
    b_dir = Direction(
        vector=boundary.to(torch.float32),
        name=f"{name}_boundary",
        kind="supervised",
        units="raw",
        timesteps=timesteps,
        model_fingerprint=model_fingerprint,
        provenance=base
        | {
            "method": "logistic_regression_boundary",
            "note": "unit normal of a per-step sklearn LogisticRegression boundary (InterFaceGAN-style), "
            "oriented to the top group, scaled to the mean difference's norm at each step",
            "train_accuracy": stats["boundary_train_accuracy"],
            "cos_to_mean_difference": stats["cos_mean_difference_boundary"],
            "sign_rule": "+gamma moves towards the top-scored side of the boundary",
        },
    )
    return md_dir, b_dir, stats


def attribute_directions(
    h: np.ndarray | torch.Tensor,
    scores: np.ndarray,
    q: float,
    name: str,
    *,
    timesteps: torch.Tensor | None = None,
    model_fingerprint: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[Direction, Direction, dict[str, Any]]:
    """Mean-difference ``name`` and boundary ``name_boundary`` directions of one attribute.

    h [N, T, C, H, W] of all samples in memory and their scores [N]; the top / bottom ``q``
    fractions by score are the two groups. Returns (mean difference, boundary, stats).
    """
    h = torch.as_tensor(np.asarray(h))
    scores = np.asarray(scores, dtype=np.float64)
    if h.ndim != 5 or h.shape[0] != scores.shape[0]:
        raise ValueError(
            f"h must be [N, T, C, H, W] with N = len(scores) = {len(scores)}, got {tuple(h.shape)}"
        )
    pos, neg = select_quantiles(torch.from_numpy(scores), q)
    md, boundary, accs = mean_difference_and_boundary(h[pos], h[neg])
    noise = _step_noise(h[pos], h[neg])
    return _supervised_pair(
        name,
        md,
        boundary,
        accs,
        scores[pos.numpy()],
        scores[neg.numpy()],
        q,
        timesteps,
        model_fingerprint,
        provenance,
        noise,
    )


def _step_noise(h_pos: torch.Tensor, h_neg: torch.Tensor) -> list[float]:
    """Per-step noise fraction of the groups' mean difference; empty below two samples a group."""
    if h_pos.shape[0] < 2 or h_neg.shape[0] < 2:
        return []
    return mean_difference_noise(h_pos, h_neg).tolist()


def random_baselines(references: Sequence[Direction], n: int) -> tuple[list[Direction], dict[str, str]]:
    """``n`` matched-norm random directions per reference: ``random_<ref>_<i>``, seeded deterministically."""
    out, of = [], {}
    for a, ref in enumerate(references):
        for i in range(n):
            r = random_like(ref, seed=7919 * (a + 1) + i, name=f"random_{ref.name}_{i}")
            out.append(r)
            of[r.name] = ref.name
    return out, of


def pca_directions(pca: PerTimestepPCA) -> list[Direction]:
    """``pca_<j>`` for every component; with PCA on a subset of steps (``pca.steps``), the
    components live at those steps and the vector (and sigma) is zero at the others, so an edit
    touches only the steps the PCA covers."""
    fitted = pca.fitted_steps
    if len(fitted) == pca.n_steps:
        return pca.directions()
    if not fitted:
        raise ValueError("the PCA stage fitted no step")
    from hspace.pca import PerTimestepPCA as _PCA

    sub = _PCA(pca.n_components, len(fitted), h_shape=pca.h_shape, model_fingerprint=pca.model_fingerprint)
    sub.estimators = [pca.estimators[t] for t in fitted]
    out = []
    for d in sub.directions():
        vector = torch.zeros(pca.n_steps, *d.vector.shape[1:])
        sigma = torch.zeros(pca.n_steps)
        vector[fitted], sigma[fitted] = d.vector, d.sigma
        out.append(
            replace(
                d,
                vector=vector,
                sigma=sigma,
                timesteps=pca.timesteps,
                provenance=d.provenance | {"steps": fitted, "other_steps": "zero (not in pca.steps)"},
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Streaming sigma: std of every direction's projection over all stored samples


def _unit_rows(directions: Sequence[Direction], step: int) -> np.ndarray:
    """[n_dirs, D] float32 unit vectors of the directions at ``step``."""
    rows = []
    for d in directions:
        v = d.at_step(step).reshape(-1).double()
        rows.append((v / v.norm().clamp_min(1e-300)).float().numpy())
    return np.stack(rows)


def _projection_moments(
    run_url: str, storage_options: dict, step: int, units: np.ndarray, batch_size: int
) -> np.ndarray:
    """[3, n_dirs] float64: count, sum and sum of squares of h_step @ units.T over every stored seed."""
    store = RunStore(run_url, storage_options)
    out = np.zeros((3, units.shape[0]))
    for batch in store.iter_step_batches(step, batch_size):
        proj = (batch.h.reshape(batch.h.shape[0], -1).astype(np.float32) @ units.T).astype(np.float64)
        out[0] += proj.shape[0]
        out[1] += proj.sum(0)
        out[2] += (proj**2).sum(0)
    return out


def projection_sigma_streaming(
    store: RunStore,
    directions: Sequence[Direction],
    n_steps: int,
    *,
    batch_size: int = 256,
    use_ray: bool = True,
    steps: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """sigma[t] (unbiased std of <h_t, v_t/||v_t||> over every stored sample) for each direction.

    One Ray task per stored step (``steps``; default every step) reads that step's shards once and
    projects on every direction at once; sigma is 0 at the steps not stored.
    """
    if not directions:
        return {}
    stored = list(range(n_steps)) if steps is None else list(steps)
    units = {t: _unit_rows(directions, t) for t in stored}
    if use_ray:
        import ray

        task = ray.remote(num_cpus=1)(_projection_moments)
        moments = ray.get(
            [task.remote(store.url, store.storage_options, t, units[t], batch_size) for t in stored]
        )
    else:
        moments = [
            _projection_moments(store.url, store.storage_options, t, units[t], batch_size) for t in stored
        ]
    m = np.stack(moments)  # [T stored, 3, n_dirs]
    n, s, ss = m[:, 0], m[:, 1], m[:, 2]
    if (n < 2).any():
        raise ValueError(f"sigma needs at least 2 stored samples per step in {store.url}")
    var = np.clip((ss - s**2 / n) / (n - 1), 0.0, None)
    sigma = np.zeros((n_steps, len(directions)))
    sigma[stored] = np.sqrt(var)  # [T, n_dirs]
    return {d.name: torch.from_numpy(sigma[:, i]).float() for i, d in enumerate(directions)}


# ---------------------------------------------------------------------------------------------
# Ray task bodies


def _step_chunks(store: RunStore, seeds: np.ndarray, steps: Sequence[int]) -> list[list[int]]:
    """Consecutive runs of the stored ``steps`` whose float32 h of ``seeds`` fits in :data:`H_CHUNK_BYTES`."""
    steps = list(steps)
    probe = store.read_h(seeds[:1], steps=steps[:1])
    per_step = len(seeds) * int(np.prod(probe.shape[2:])) * 4
    chunk = max(1, min(len(steps), H_CHUNK_BYTES // max(per_step, 1)))
    return [steps[start : start + chunk] for start in range(0, len(steps), chunk)]


def _all_steps(parts: Sequence[torch.Tensor], steps: Sequence[int], n_steps: int) -> torch.Tensor:
    """[n_steps, C, H, W] from the stored steps' values (concatenated ``parts``); zero at the
    steps the build does not store (``generate.capture_steps``), so an edit leaves them alone."""
    stored = torch.cat(list(parts))
    if len(steps) == n_steps:
        return stored
    out = torch.zeros(n_steps, *stored.shape[1:], dtype=stored.dtype)
    out[list(steps)] = stored
    return out


def _attribute_task(
    run_url: str,
    storage_options: dict,
    seeds: np.ndarray,
    scores: np.ndarray,
    q: float,
    name: str,
    n_steps: int,
    timesteps: list[int] | None,
    model_fingerprint: str | None,
    provenance: dict,
    stored_steps: list[int] | None = None,
) -> tuple[dict, dict, dict]:
    """Read back h of the top/bottom seeds only, steps in memory-bounded chunks; build both directions."""
    store = RunStore(run_url, storage_options)
    scores = np.array(scores, np.float64)  # a writable copy (Ray hands out read-only arrays)
    pos, neg = (i.numpy() for i in select_quantiles(torch.from_numpy(scores), q))
    seeds = np.asarray(seeds)
    md_parts, b_parts, accs, noise = [], [], [], []
    stored = list(range(n_steps)) if stored_steps is None else list(stored_steps)
    for steps in _step_chunks(store, seeds[np.concatenate([pos, neg])], stored):
        h = torch.from_numpy(
            store.read_h(seeds[np.concatenate([pos, neg])], steps=steps)
        )  # one read for both groups
        md, boundary, acc = mean_difference_and_boundary(h[: len(pos)], h[len(pos) :])
        noise += _step_noise(h[: len(pos)], h[len(pos) :])
        md_parts.append(md)
        b_parts.append(boundary)
        accs += acc
    ts = torch.tensor(timesteps) if timesteps is not None else None
    md_dir, b_dir, stats = _supervised_pair(
        name,
        _all_steps(md_parts, stored, n_steps),
        _all_steps(b_parts, stored, n_steps),
        accs,
        scores[pos],
        scores[neg],
        q,
        ts,
        model_fingerprint,
        provenance,
        noise,
    )
    return _to_wire(md_dir), _to_wire(b_dir), stats


def _conditional_task(
    run_url: str,
    storage_options: dict,
    seeds: np.ndarray,
    scores: np.ndarray,
    strata: np.ndarray,
    q: float,
    name: str,
    n_steps: int,
    timesteps: list[int] | None,
    model_fingerprint: str | None,
    provenance: dict,
    stored_steps: list[int] | None = None,
) -> dict:
    """The conditional mean difference ``name``: within-stratum quantiles, h of those seeds only."""
    store = RunStore(run_url, storage_options)
    scores, strata, seeds = np.array(scores, np.float64), np.array(strata, np.int64), np.asarray(seeds)
    selections = conditional_quantiles(torch.from_numpy(scores), torch.from_numpy(strata), q)
    rows = np.concatenate([np.concatenate([p.numpy(), n.numpy()]) for _, p, n in selections])
    parts = []
    stored = list(range(n_steps)) if stored_steps is None else list(stored_steps)
    for steps in _step_chunks(store, seeds[rows], stored):
        h = torch.from_numpy(store.read_h(seeds[rows], steps=steps))  # one read for every stratum's groups
        diffs, at = [], 0
        for _, pos, neg in selections:
            h_pos, h_neg = h[at : at + len(pos)], h[at + len(pos) : at + len(pos) + len(neg)]
            diffs.append(mean_difference(h_pos, h_neg).to(torch.float64))
            at += len(pos) + len(neg)
        parts.append(torch.stack(diffs).mean(0).to(torch.float32))
    prov = dict(provenance) | {
        "method": "conditional_mean_difference",
        "q": float(q),
        "strata": {
            str(k): {"n": int((strata == k).sum()), "n_pos": len(p), "n_neg": len(n)}
            for k, p, n in selections
        },
    }
    d = Direction(
        vector=_all_steps(parts, stored, n_steps),
        name=name,
        kind="supervised",
        units="raw",
        timesteps=torch.tensor(timesteps) if timesteps is not None else None,
        model_fingerprint=model_fingerprint,
        provenance=prov,
    )
    return _to_wire(d)


def _score_provenance(
    cfg: BuildConfig, is_binary: bool, seeds: np.ndarray, classifier_fingerprint: str | None
) -> dict:
    """What every supervised direction records about the scores it was selected by."""
    return {
        "score": "logit" if is_binary else "value",
        "classifier": cfg.annotate.classifier if cfg.annotate else None,
        "classifier_fingerprint": classifier_fingerprint,
        "n_samples": int(len(seeds)),
    }


def _to_wire(d: Direction) -> dict:
    """A Direction as plain tensors + JSON for Ray's object store (safetensors-style, no custom classes)."""
    tensors, meta = d.to_safetensors_dict()
    return {"tensors": {k: v.numpy() for k, v in tensors.items()}, "meta": meta}


def _from_wire(w: dict) -> Direction:
    return Direction.from_safetensors_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in w["tensors"].items()}, w["meta"]
    )


def _jacobian_mask(box: list[int] | None, model: Any) -> torch.Tensor | None:
    """The pixel mask [1, 1, H, W] of a configured box [y0, x0, y1, x1] (end-exclusive), or None."""
    if box is None:
        return None
    y0, x0, y1, x1 = box
    mask = torch.zeros(1, 1, *model.image_shape[1:], device=model.device, dtype=model.dtype)
    mask[..., y0:y1, x0:x1] = 1.0
    return mask


def _jacobian_task(cfg_json: dict, spec: dict, model_fingerprint: str | None) -> list[dict]:
    """Jacobian directions (paper Alg. 1/2 or block Krylov) at one seed and step; runs where the model
    can be loaded."""
    from hspace.jacobian import jacobian_directions
    from hspace.sampling import HSpaceSampler
    from pipeline.config import BuildConfig
    from pipeline.evaluate import load_model

    cfg = BuildConfig.model_validate(cfg_json)
    model = load_model(cfg)
    sampler = HSpaceSampler(
        model,
        sampler=cfg.sampler.kind,
        num_inference_steps=cfg.sampler.num_inference_steps,
        eta=cfg.sampler.eta,
    )
    conditioning = cfg.model.conditioning_for([spec["seed"]])
    traj = sampler.sample([spec["seed"]], record_h=False, record_x=True, **conditioning)
    step = spec["step"]
    conditioning.pop("record_branch", None)  # the Jacobian is on the guided output (both branches)
    result = jacobian_directions(
        model,
        traj.x_t[:, step].to(model.device, model.dtype),
        int(sampler.timesteps[step]),
        spec["k"],
        method=spec["method"],
        mask=_jacobian_mask(spec.get("mask"), model),
        oversample=spec["oversample"],
        n_iter=spec["n_iter"],
        tol=spec["tol"],
        **conditioning,
    )
    label = spec["name"] or f"s{spec['seed']}t{step}"
    directions = result.to_directions(
        name_prefix=f"jac_{label}",
        seed=int(spec["seed"]),
        step=int(step),
        model_fingerprint=model_fingerprint,
    )
    return [_to_wire(d) for d in directions]


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class _RunFacts:
    """What every supervised task needs besides its own scores."""

    run_url: str
    storage_options: dict
    seeds: np.ndarray
    quantile: float
    n_steps: int
    timesteps: list[int] | None
    model_fingerprint: str | None
    stored_steps: list[int] | None = None


def _check_named_attributes(agg: AggregateConfig, attributes: Sequence[str], binary: Sequence[bool]) -> None:
    """The configured disentangle / condition names must be annotated attributes (binary when held fixed)."""
    for section, pairs in (
        ("disentangle", [(t, o) for t, others in agg.disentangle.items() for o in [t, *others]]),
        ("condition", list(agg.condition.items())),
    ):
        missing = sorted({a for pair in pairs for a in pair} - set(attributes))
        if missing:
            raise ValueError(
                f"aggregate.{section} names {missing}, which are not annotated attributes {list(attributes)}"
            )
    continuous = [o for o in agg.condition.values() if not binary[list(attributes).index(o)]]
    if continuous:
        raise ValueError(
            f"aggregate.condition holds {continuous} fixed, but only binary attributes have states"
        )


def _submit_supervised(cfg: BuildConfig, facts: _RunFacts, annotated: AnnotateResult) -> tuple[list, list]:
    """One Ray task per attribute (reads only its top/bottom seeds' h) and one per conditional
    direction (reads only its within-stratum quantiles' h); returns both lists of object refs."""
    import ray

    scores, attributes, binary = annotated.scores, list(annotated.attributes), list(annotated.binary)
    common = (facts.run_url, facts.storage_options, facts.seeds)

    def provenance(attr: str) -> dict:
        is_bin = binary[attributes.index(attr)]
        return _score_provenance(cfg, is_bin, facts.seeds, annotated.classifier_fingerprint)

    def column(attr: str) -> np.ndarray:
        return scores.column(attr).to_numpy().astype(np.float64)

    tail = (facts.n_steps, facts.timesteps, facts.model_fingerprint)
    task = ray.remote(num_cpus=1)(_attribute_task)
    stored = facts.stored_steps
    refs = [
        task.remote(*common, column(a), facts.quantile, a, *tail, provenance(a), stored) for a in attributes
    ]
    ctask = ray.remote(num_cpus=1)(_conditional_task)
    cond_refs = []
    for attr, other in cfg.aggregate.condition.items():
        strata = (scores.column(other).to_numpy() > 0).astype(np.int64)
        prov = provenance(attr) | {"attribute": attr, "conditioned_on": other}
        args = (column(attr), strata, facts.quantile, f"{attr}_conditional", *tail, prov)
        cond_refs.append(ctask.remote(*common, *args, stored))
    return refs, cond_refs


def _submit_jacobians(cfg: BuildConfig, model_fingerprint: str | None) -> list:
    """One task per configured seed/step, reserving what a generate worker reserves."""
    if not cfg.jacobian:
        return []
    import ray

    res = cfg.resources
    task = ray.remote(num_cpus=res.num_cpus_per_worker, num_gpus=res.num_gpus_per_worker)(_jacobian_task)
    cfg_json = cfg.model_dump(mode="json")
    return [task.remote(cfg_json, spec.model_dump(mode="json"), model_fingerprint) for spec in cfg.jacobian]


def _collect_supervised(
    refs: list, attributes: Sequence[str], progress: bool
) -> tuple[dict[str, Direction], dict[str, Direction], dict[str, dict[str, Any]]]:
    """Mean-difference and boundary directions per attribute, and what each boundary fit reported."""
    import ray

    supervised: dict[str, Direction] = {}
    boundaries: dict[str, Direction] = {}
    info: dict[str, dict[str, Any]] = {}
    for attr, ref in zip(attributes, refs, strict=True):
        md_w, b_w, stats = ray.get(ref)
        supervised[attr], boundaries[attr] = _from_wire(md_w), _from_wire(b_w)
        info[attr] = stats
        if progress:
            print(
                f"aggregate: {attr}: boundary accuracy {stats['boundary_train_accuracy']:.3f}, "
                f"cos(mean difference, boundary) {stats['cos_mean_difference_boundary']:.3f}"
            )
    return supervised, boundaries, info


def _catalog_order(
    supervised: dict[str, Direction],
    boundaries: dict[str, Direction],
    derived: Sequence[Direction],
    pca: Sequence[Direction],
    jacobians: Sequence[Direction],
    randoms: Sequence[Direction],
) -> list[Direction]:
    """Every direction in catalog order: mean differences, boundaries, disentangled and conditional,
    PCA, Jacobian, random baselines."""
    return [*supervised.values(), *boundaries.values(), *derived, *pca, *jacobians, *randoms]


def _with_sigmas(
    store: RunStore,
    directions: list[Direction],
    keep: set[str],
    n_steps: int,
    timesteps: torch.Tensor | None,
    batch_size: int,
    stored_steps: Sequence[int] | None = None,
    capture: str | None = None,
) -> dict[str, Direction]:
    """Exact sigma over all stored samples (one streaming pass) of every direction not named in
    ``keep`` (the PCA directions, whose sigma is the explained variance's square root); every
    direction records the ``capture`` point its h came from."""
    need = [d for d in directions if d.name not in keep]
    sigmas = projection_sigma_streaming(store, need, n_steps, batch_size=batch_size, steps=stored_steps)
    ts = timesteps.to(torch.int64) if timesteps is not None else None
    out = {}
    for d in directions:
        if d.name not in keep:
            d = replace(d, sigma=sigmas[d.name], timesteps=ts if d.per_step else None)
        if capture is not None:
            d = replace(d, capture=capture)
        if d.sigma is not None and not bool(torch.isfinite(d.sigma).all()):
            raise ValueError(f"aggregate: direction {d.name!r} got a non-finite sigma")
        out[d.name] = d
    return out


def aggregate(
    cfg: BuildConfig,
    store: RunStore,
    generated: GenerateReport,
    pca: PCAStageResult | None,
    annotated: AnnotateResult | None,
    *,
    progress: bool = True,
) -> AggregateResult:
    """All directions of the build (see the module docstring) from the earlier stages' results.

    Without annotations (or without an ``aggregate`` section) only the PCA and Jacobian directions
    are built. Raises if no direction results.
    """
    import ray

    init_ray(cfg)
    t0 = time.perf_counter()
    agg = cfg.aggregate if annotated is not None else None
    n_steps = cfg.sampler.num_inference_steps
    stored = cfg.capture_steps
    timesteps = torch.tensor(generated.timesteps) if generated.timesteps is not None else None
    refs, cond_refs, attributes = [], [], []
    if agg is not None:
        attributes = list(annotated.attributes)
        _check_named_attributes(agg, attributes, annotated.binary)
        seeds = annotated.scores.column("seed").to_numpy()
        ts_list = list(generated.timesteps) if generated.timesteps is not None else None
        facts = _RunFacts(
            store.url,
            store.storage_options,
            seeds,
            agg.quantile,
            n_steps,
            ts_list,
            generated.model_fingerprint,
            stored if len(stored) < n_steps else None,
        )
        refs, cond_refs = _submit_supervised(cfg, facts, annotated)
    jac_refs = _submit_jacobians(cfg, generated.model_fingerprint)  # in parallel with the above

    supervised, boundaries, info = _collect_supervised(refs, attributes, progress)
    jacobians = [_from_wire(w) for ws in ray.get(jac_refs) for w in ws]
    conditional = [_from_wire(w) for w in ray.get(cond_refs)]
    disentangled = [  # eq. 12: the span of the other directions projected out
        disentangle(supervised[target], [supervised[o] for o in others], name=f"{target}_disentangled")
        for target, others in (agg.disentangle.items() if agg is not None else [])
    ]
    randoms, random_of = random_baselines(  # matched-norm baselines of every mean difference
        list(supervised.values()), agg.random_baselines if agg is not None else 0
    )
    from_pca = pca_directions(pca.pca) if pca is not None else []
    ordered = _catalog_order(
        supervised, boundaries, [*disentangled, *conditional], from_pca, jacobians, randoms
    )
    keep = {d.name for d in from_pca}
    capture = (generated.model_description or {}).get("capture") or cfg.model.capture
    directions = _with_sigmas(
        store, ordered, keep, n_steps, timesteps, cfg.pca.batch_size, stored, capture=capture
    )
    if not directions:
        raise ValueError(
            "aggregate: no directions (no PCA state, no annotate/aggregate sections, no jacobian specs)"
        )
    seconds = time.perf_counter() - t0
    if progress:
        kinds: dict[str, int] = {}
        for d in directions.values():
            kinds[d.kind] = kinds.get(d.kind, 0) + 1
        print(f"aggregate: {len(directions)} directions {kinds} in {seconds:.1f}s")
    return AggregateResult(directions, random_of, info, seconds)
