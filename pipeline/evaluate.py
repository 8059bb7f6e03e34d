"""Evaluate stage: the effect matrix of every direction on held-out seeds (the paper's Table I, by machine).

For each direction d and each configured scale gamma, every held-out seed is rendered with
h_t + gamma * e_{d,t} at every step (mode "both", one batch of B*S rows via
``HSpaceSampler.sample_edits``) and once unedited; the classifier scores all images. Effects are
read in the classifier's own units (logit for a binary attribute, value for a continuous one):

    delta[d, a, gamma] = mean over seeds of (score_a(edited by +gamma) - score_a(unedited))

The headline matrix holds ``plus`` = delta at the largest positive gamma, ``minus`` = delta at its
negative, and ``effect`` = (plus - minus) / 2 (the mean change per gamma step, symmetric).
``grades`` holds every direction's grade against the random baselines (:mod:`hspace.grade`).

Edit vectors: with ``evaluate.units: sigma`` e_{d,t} = sigma_{d,t} * v_{d,t} / ||v_{d,t}||, so gamma
counts standard deviations of the data along d; a random baseline uses the sigma of the direction
it is matched to, so its edit has exactly that direction's norm at every step (a matched-norm
control: any effect it shows is what an edit of that size does by itself). With ``units: raw``,
e = v as stored (random baselines already have matched norms).

Work is spread with Ray Data: one row per direction, a callable class holding model, sampler and
classifier in each actor of the pool.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hspace.directions import Direction
from hspace.grade import grade_directions
from pipeline.progress import progress_bar

if TYPE_CHECKING:
    from hspace.model import HSpaceModel
    from pipeline.config import BuildConfig

__all__ = [
    "EFFECTS_SCHEMA",
    "EditScorer",
    "EvaluateResult",
    "edit_vectors",
    "effect_matrix",
    "evaluate",
    "load_model",
    "own_attribute",
    "own_attributes",
]

EFFECTS_SCHEMA = "hspace.effects/1"
BASE_INDEX = -1  # the row of the unedited renders


def load_model(cfg: BuildConfig, device: str | None = None) -> HSpaceModel:
    """The config's model on ``device`` (default: cuda if the workers reserve GPUs and one is visible)."""
    from hspace.model import HSpaceModel
    from hspace.toy import resolve_model_source

    if device is None:
        device = "cuda" if cfg.resources.device == "cuda" and torch.cuda.is_available() else "cpu"
    dtype = (
        cfg.torch_dtype if device != "cpu" else torch.float32
    )  # half precision convs are slow/partial on CPU
    source = resolve_model_source(cfg.model.source)
    return HSpaceModel.from_pretrained(source, revision=cfg.model.revision, device=device, dtype=dtype)


def edit_vectors(
    directions: Mapping[str, Direction], random_of: Mapping[str, str], units: str, n_steps: int
) -> dict[str, torch.Tensor]:
    """The per-step edit vector e_d [T, C, H, W] float32 at gamma = 1 of every direction (see module doc)."""
    if units not in ("sigma", "raw"):
        raise ValueError(f"evaluate.units must be 'sigma' or 'raw', got {units!r}")
    out = {}
    for name, d in directions.items():
        reference = directions[random_of[name]] if name in random_of else d
        if units == "sigma" and reference.sigma is None:
            raise ValueError(f"evaluate.units=sigma: direction {reference.name!r} has no sigma")
        out[name] = d.in_units(units, n_steps, sigma=reference.sigma if units == "sigma" else None)
    return out


def own_attribute(d: Direction) -> str | None:
    """The attribute a supervised direction was built from (``provenance["attribute"]``; for a
    disentangled one, its source's); None for PCA, Jacobian, random and custom directions."""
    if d.kind == "supervised":
        attribute = d.provenance.get("attribute")
    elif d.kind == "disentangled":
        source = d.provenance.get("source_provenance")
        attribute = source.get("attribute") if isinstance(source, dict) else None
    else:
        attribute = None
    return attribute if isinstance(attribute, str) else None


def own_attributes(directions: Mapping[str, Direction]) -> dict[str, str | None]:
    """direction -> :func:`own_attribute` (None: graded by its largest effect)."""
    return {name: own_attribute(d) for name, d in directions.items()}


# ---------------------------------------------------------------------------------------------
# The effect matrix from raw scores (pure: tested without Ray or a model)


def effect_matrix(
    base: np.ndarray,
    edited: Mapping[str, np.ndarray],
    scales: Sequence[float],
    attributes: Sequence[str],
    binary: Sequence[bool],
    random_of: Mapping[str, str],
    kinds: Mapping[str, str],
) -> dict[str, Any]:
    """effects.json content from base scores [B, A] and edited scores {name: [B, S, A]}.

    ``delta``/``stderr`` per direction, attribute and scale; the headline matrix (``plus``,
    ``minus``, ``effect``) at the largest positive scale; the share of seeds whose own change
    (per-seed effect) is positive / negative (``share_up`` / ``share_down``); per-attribute random
    baseline spread and every direction's effect in units of that spread (``z``).
    """
    scales = [float(s) for s in scales]
    positive = [s for s in scales if s > 0]
    if not positive:
        raise ValueError(f"evaluate.scales needs a positive scale for the effect matrix, got {scales}")
    gamma = max(positive)
    i_plus = scales.index(gamma)
    i_minus = scales.index(-gamma) if -gamma in scales else None
    names = list(edited)
    n_a = len(attributes)
    delta, stderr = {}, {}
    plus = np.zeros((len(names), n_a))
    minus = np.full((len(names), n_a), np.nan)
    share_up, share_down = np.zeros((len(names), n_a)), np.zeros((len(names), n_a))
    for r, name in enumerate(names):
        s = np.asarray(edited[name], np.float64)
        if s.ndim != 3 or s.shape[0] != base.shape[0] or s.shape[1] != len(scales) or s.shape[2] != n_a:
            raise ValueError(
                f"scores of {name!r} have shape {s.shape}, expected [{base.shape[0]}, {len(scales)}, {n_a}]"
            )
        d = s - np.asarray(base, np.float64)[:, None, :]  # [B, S, A]
        mean = d.mean(0)
        se = d.std(0, ddof=1) / math.sqrt(d.shape[0]) if d.shape[0] > 1 else np.zeros_like(mean)
        delta[name] = {
            a: {_key(g): float(mean[j, k]) for j, g in enumerate(scales)} for k, a in enumerate(attributes)
        }
        stderr[name] = {
            a: {_key(g): float(se[j, k]) for j, g in enumerate(scales)} for k, a in enumerate(attributes)
        }
        plus[r] = mean[i_plus]
        if i_minus is not None:
            minus[r] = mean[i_minus]
        per_seed = (d[:, i_plus] - d[:, i_minus]) / 2 if i_minus is not None else d[:, i_plus]  # [B, A]
        share_up[r], share_down[r] = (per_seed > 0).mean(0), (per_seed < 0).mean(0)
    effect = (plus - minus) / 2 if i_minus is not None else plus
    randoms = [r for r, n in enumerate(names) if n in random_of]
    baseline, z = {}, np.full_like(effect, np.nan)
    if randoms:
        rnd = np.abs(effect[randoms])  # [R, A]
        spread = np.sqrt((effect[randoms] ** 2).mean(0))  # RMS effect of random edits per attribute
        for k, a in enumerate(attributes):
            baseline[a] = {
                "n": len(randoms),
                "rms": float(spread[k]),
                "mean_abs": float(rnd[:, k].mean()),
                "max_abs": float(rnd[:, k].max()),
                "p95_abs": float(np.percentile(rnd[:, k], 95)),
            }
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(spread > 0, effect / spread, np.nan)

    def rows(m: np.ndarray) -> list[list[float | None]]:
        return [[None if not np.isfinite(x) else float(x) for x in row] for row in m]

    return {
        "schema": EFFECTS_SCHEMA,
        "attributes": list(attributes),
        "score_units": {a: ("logit" if b else "value") for a, b in zip(attributes, binary, strict=True)},
        "scales": scales,
        "gamma": gamma,
        "directions": names,
        "kinds": {n: kinds[n] for n in names},
        "baseline_of": {n: random_of[n] for n in names if n in random_of},
        "n_seeds": int(base.shape[0]),
        "base_mean": {a: float(np.mean(base[:, k])) for k, a in enumerate(attributes)},
        "matrix": {
            "rows": names,
            "columns": list(attributes),
            "plus": rows(plus),
            "minus": rows(minus) if i_minus is not None else None,
            "effect": rows(effect),
            "z": rows(z),
            "share_up": rows(share_up),
            "share_down": rows(share_down),
        },
        "delta": delta,
        "stderr": stderr,
        "random_baseline": baseline,
    }


def _key(g: float) -> str:
    return f"{g:+g}"


# ---------------------------------------------------------------------------------------------
# The Ray Data callable class


class EditScorer:
    """Holds model, sampler and classifier; maps rows ``index`` (direction, or -1 = unedited) to scores.

    Output per row: ``scores`` [B, S, A] float32 (``[B, 1, A]`` for the unedited row) and
    ``preview`` [P, S, 3, H, W] uint8 (the first P seeds' images).
    """

    def __init__(
        self, cfg_json: dict, attributes: list[str], edits_ref: list, seeds: list[int], n_preview: int
    ) -> None:
        import ray

        from hspace.classifier import load_classifier
        from hspace.sampling import HSpaceSampler
        from hspace.toy import resolve_classifier_source
        from pipeline.config import BuildConfig

        cfg = BuildConfig.model_validate(cfg_json)
        self.cfg = cfg
        self.model = load_model(cfg)
        self.sampler = HSpaceSampler(
            self.model,
            sampler=cfg.sampler.kind,
            num_inference_steps=cfg.sampler.num_inference_steps,
            eta=cfg.sampler.eta,
        )
        self.classifier = load_classifier(
            resolve_classifier_source(cfg.annotate.classifier),
            str(self.model.device),
            cfg.storage.storage_options,
        )
        self.columns = [self.classifier.index(a) for a in attributes]
        vectors = ray.get(edits_ref[0])  # [D, T, C, H, W] float32
        self.edits = [
            Direction(vector=torch.from_numpy(np.array(v)), name=f"edit{i}") for i, v in enumerate(vectors)
        ]
        self.seeds, self.n_preview = list(seeds), n_preview
        self.scales = [float(s) for s in cfg.evaluate.scales]

    def _score(self, images: torch.Tensor) -> np.ndarray:
        """Classifier outputs for images [N, 3, H, W] (resized to the classifier's input if needed)."""
        from hspace.classifier import score_images

        return score_images(self.classifier, images, self.columns, self.cfg.annotate.batch_size).numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        scores, previews = [], []
        bs = self.cfg.evaluate.batch_size
        for index in batch["index"]:
            if int(index) == BASE_INDEX:
                images = self.sampler.sample(self.seeds, record_h=False, batch_size=bs).images[:, None]
            else:
                images = self.sampler.sample_edits(
                    self.seeds, self.edits[int(index)], self.scales, units="raw", mode="both", batch_size=bs
                )
            b, s = images.shape[:2]
            scores.append(self._score(images.reshape(b * s, *images.shape[2:])).reshape(b, s, -1))
            previews.append((images[: self.n_preview] * 255).round().to(torch.uint8).numpy())
        # rows differ in S (1 for the unedited row): ship ragged arrays as object columns
        return {
            "index": np.asarray(batch["index"]),
            "scores": _objects(scores),
            "preview": _objects(previews),
        }


def _objects(arrays: list[np.ndarray]) -> np.ndarray:
    out = np.empty(len(arrays), dtype=object)
    for i, a in enumerate(arrays):
        out[i] = a
    return out


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class EvaluateResult:
    """effects.json content plus preview images for the report."""

    effects: dict[str, Any]
    #: direction -> uint8 [P, S+1, 3, H, W]: the first seeds at the sorted scales with the unedited image at 0
    previews: dict[str, np.ndarray]
    preview_scales: list[float]
    n_images: int
    seconds: float


def _collect(ds: Any, n: int, progress: bool) -> dict[int, Any]:
    """Rows of the evaluate dataset by index, with a progress bar over the directions (+ unedited)."""

    rows = {}
    with progress_bar(total=n, desc="evaluate directions", unit="dir", progress=progress) as bar:
        for r in ds.iter_rows():
            rows[int(r["index"])] = r
            bar.update(1)
    return rows


def evaluate(
    cfg: BuildConfig,
    directions: Mapping[str, Direction],
    random_of: Mapping[str, str],
    *,
    attributes: Sequence[str],
    binary: Sequence[bool],
    n_preview: int = 2,
    progress: bool = True,
) -> EvaluateResult:
    """Render and score every direction at every scale on the held-out seeds; build the effect matrix."""
    import ray

    if cfg.evaluate is None or cfg.annotate is None:
        raise ValueError("evaluate: the config needs evaluate and annotate sections")
    from pipeline.ray_runtime import init_ray

    init_ray(cfg)
    t0 = time.perf_counter()
    ev, res = cfg.evaluate, cfg.resources
    n_steps = cfg.sampler.num_inference_steps
    names = list(directions)
    vectors = edit_vectors(directions, random_of, ev.units, n_steps)
    stacked = np.stack([vectors[n].numpy() for n in names])
    seeds = list(range(ev.seed_start, ev.seed_start + ev.n_seeds))
    cfg_json = cfg.model_dump(mode="json")
    items = [{"index": BASE_INDEX}] + [{"index": i} for i in range(len(names))]
    ds = ray.data.from_items(items).map_batches(
        EditScorer,
        fn_constructor_kwargs={
            "cfg_json": cfg_json,
            "attributes": list(attributes),
            "edits_ref": [ray.put(stacked)],
            "seeds": seeds,
            "n_preview": min(n_preview, len(seeds)),
        },
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=max(1, min(res.workers, len(items)))),
        num_cpus=res.num_cpus_per_worker,
        num_gpus=res.num_gpus_per_worker or None,
    )
    rows = _collect(ds, len(items), progress)
    missing = [i for i in [BASE_INDEX, *range(len(names))] if i not in rows]
    if missing:
        raise RuntimeError(f"evaluate: no result for rows {missing}")
    base = np.asarray(rows[BASE_INDEX]["scores"])[:, 0, :]
    edited = {n: np.asarray(rows[i]["scores"]) for i, n in enumerate(names)}
    effects = effect_matrix(
        base, edited, ev.scales, attributes, binary, random_of, {n: d.kind for n, d in directions.items()}
    )
    effects["grades"] = grade_directions(effects, own_attributes(directions))
    effects |= {
        "units": ev.units,
        "mode": "both",
        "seed_start": ev.seed_start,
        "note": "delta = mean over held-out seeds of score(edited) - score(unedited), in logits for binary "
        "attributes and values for continuous ones; effect = (plus - minus) / 2; random baselines "
        "use the sigma of the direction they are matched to (equal edit norm)",
    }
    # preview strips: scales sorted, the unedited image inserted at 0
    order = sorted(range(len(ev.scales)), key=lambda j: ev.scales[j])
    preview_scales = sorted([*ev.scales, 0.0])
    base_prev = np.asarray(rows[BASE_INDEX]["preview"])  # [P, 1, 3, H, W]
    previews = {}
    for i, n in enumerate(names):
        p = np.asarray(rows[i]["preview"])[:, order]
        cut = sum(1 for s in ev.scales if s < 0)
        previews[n] = np.concatenate([p[:, :cut], base_prev, p[:, cut:]], axis=1)
    n_images = len(seeds) * (1 + len(names) * len(ev.scales))
    seconds = time.perf_counter() - t0
    if progress:
        print(
            f"evaluate: {len(names)} directions x {len(ev.scales)} scales x {len(seeds)} seeds = "
            f"{n_images} images in {seconds:.1f}s ({n_images / max(seconds, 1e-9):.1f} images/s)"
        )
    return EvaluateResult(effects, previews, preview_scales, n_images, seconds)
