"""Evaluate stage: the effect matrix of every direction on held-out seeds (the paper's Table I, by machine).

For each direction d and each configured scale gamma, every held-out seed is rendered with
h_t + gamma * e_{d,t} at every step (mode "both") and once unedited; the classifier scores all
images. Effects are read in the classifier's own units (logit for a binary attribute, value for a
continuous one):

    delta[d, a, gamma] = mean over seeds of (score_a(edited by +gamma) - score_a(unedited))

The headline matrix holds ``plus`` = delta at the largest positive gamma, ``minus`` = delta at its
negative, and ``effect`` = (plus - minus) / 2 (the mean change per gamma step, symmetric).
``grades`` holds every direction's grade against the random baselines (:mod:`hspace.grade`).

Edit vectors: with ``evaluate.units: sigma`` e_{d,t} = sigma_{d,t} * v_{d,t} / ||v_{d,t}||, so gamma
counts standard deviations of the data along d; a random baseline uses the sigma of the direction
it is matched to, so its edit has exactly that direction's norm at every step (a matched-norm
control: any effect it shows is what an edit of that size does by itself). With ``units: raw``,
e = v as stored (random baselines already have matched norms).

Sampler: ``evaluate.sampler`` (default: the build's ``sampler``). Directions live on the build's
step grid; each evaluation step applies the vector of the nearest build timestep
(:func:`step_map`), so a coarser grid of the same schedule measures the same edit in fewer U-Net
passes (the integrated edit of a step grows with its length). ``effects["sampler"]`` records it.

Work: one Ray task per held-out seed (:func:`score_seed`, ``resources.workers`` in flight). Tasks,
not an actor pool: they run in the worker processes the aggregate stage's tasks already warmed
(torch and diffusers imported), and each process builds its :class:`EditScorer` (model, sampler,
classifier) once and keeps it for the seeds that follow, so the stage starts rendering at once
instead of spawning and importing fresh actors (docs/benchmarks.md). A task renders its seed
unedited and edited by every direction at every scale (1 + D*S images, :func:`seed_rows`) in one
sampler call and scores them in one classifier pass (:class:`SeedRenderer`); the unedited image is
rendered once per seed and shared by all directions. Every image's noise comes from its seed's own
generator, so the effects do not depend on the batch size or on how seeds are spread over
workers. Ray retries a task whose node died; :func:`~pipeline.ray_runtime.map_tasks_watched`
fails the stage when no node can host a task any more.
"""

from __future__ import annotations

import json
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
from pipeline.ray_runtime import CapacityWatch, actor_demand, map_tasks_watched

if TYPE_CHECKING:
    from hspace.model import HSpaceModel
    from hspace.sampling import HSpaceSampler
    from pipeline.config import BuildConfig, SamplerConfig

__all__ = [
    "EFFECTS_SCHEMA",
    "EditScorer",
    "EvaluateResult",
    "SeedRenderer",
    "edit_vectors",
    "effect_matrix",
    "evaluate",
    "evaluation_sampler",
    "graded_effects",
    "load_model",
    "own_attribute",
    "own_attributes",
    "score_seed",
    "seed_effects",
    "seed_rows",
    "split_scores",
    "step_map",
]

EFFECTS_SCHEMA = "hspace.effects/1"


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
    return HSpaceModel.from_pretrained(
        source, revision=cfg.model.revision, device=device, dtype=dtype, capture=cfg.model.capture
    )


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
        per_seed = _symmetric(d, i_plus, i_minus)
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


def _symmetric(d: np.ndarray, i_plus: int, i_minus: int | None) -> np.ndarray:
    """Per-seed effect [B, A] from score changes d [B, S, A]: (d(+gamma) - d(-gamma)) / 2, or d(+gamma)."""
    return (d[:, i_plus] - d[:, i_minus]) / 2 if i_minus is not None else d[:, i_plus]


def seed_effects(base: np.ndarray, edited: Mapping[str, np.ndarray], scales: Sequence[float]) -> np.ndarray:
    """Every held-out seed's own effect [D, B, A] (directions in ``edited`` order): the per-seed
    terms whose mean is :func:`effect_matrix`'s ``effect``; what ``hspace.grade`` resamples for a
    grade's confidence."""
    scales = [float(s) for s in scales]
    gamma = max(s for s in scales if s > 0)
    i_plus, i_minus = scales.index(gamma), (scales.index(-gamma) if -gamma in scales else None)
    b = np.asarray(base, np.float64)[:, None, :]
    return np.stack([_symmetric(np.asarray(s, np.float64) - b, i_plus, i_minus) for s in edited.values()])


def graded_effects(
    scores: np.ndarray,
    names: Sequence[str],
    scales: Sequence[float],
    attributes: Sequence[str],
    binary: Sequence[bool],
    random_of: Mapping[str, str],
    kinds: Mapping[str, str],
    own: Mapping[str, str | None],
) -> dict[str, Any]:
    """effects.json content with ``grades`` (each with its confidence) from every held-out seed's
    scores [B, 1 + D*S, A] (rows in :func:`seed_rows` order, directions in ``names`` order)."""
    base, edited = split_scores(scores, list(names), len(scales))
    effects = effect_matrix(base, edited, scales, attributes, binary, random_of, kinds)
    effects["grades"] = grade_directions(effects, own, seed_effect=seed_effects(base, edited, scales))
    return effects


def _key(g: float) -> str:
    return f"{g:+g}"


# ---------------------------------------------------------------------------------------------
# The Ray Data callable class


def step_map(from_timesteps: Sequence[int], to_timesteps: Sequence[int]) -> list[int]:
    """For each timestep of the evaluation sampler, the index of the nearest build timestep (the
    earlier, noisier one on a tie): how a direction found on the build's step grid is applied on
    another grid. The identity when both grids are equal; a subset when the evaluation grid is a
    coarser "leading" grid of the same schedule (20 steps 950, 900, .. 0 -> 5 steps 800, .. 0)."""
    source = np.asarray(list(from_timesteps), dtype=np.int64)
    if source.size == 0:
        raise ValueError("step_map: the build sampler has no timesteps")
    return [int(np.argmin(np.abs(source - int(t)))) for t in to_timesteps]


def seed_rows(n_directions: int, scales: Sequence[float]) -> torch.Tensor:
    """The per-row scales [1 + D*S, D] of one seed's renders: row 0 unedited, then row
    ``1 + d*S + j`` edits direction d alone by ``scales[j]``."""
    s = torch.as_tensor([float(x) for x in scales], dtype=torch.float32)
    rows = torch.zeros(1 + n_directions * len(s), n_directions)
    for d in range(n_directions):
        rows[1 + d * len(s) : 1 + (d + 1) * len(s), d] = s
    return rows


class SeedRenderer:
    """Renders and scores one held-out seed unedited and edited by every direction at every scale.

    All 1 + D*S images of a seed go through one sampler call (U-Net batches of ``batch_size`` rows)
    and one classifier call. Every image's noise comes from its seed's own generator, so a seed's
    scores do not depend on which actor renders it or which other seeds it is rendered with.
    ``vectors`` [D, T, C, H, W] are the raw edit vectors on the build's step grid
    (``build_timesteps``); each evaluation step uses the nearest build step (:func:`step_map`).
    """

    def __init__(
        self,
        sampler: HSpaceSampler,
        classifier: Any,
        columns: Sequence[int],
        vectors: np.ndarray | torch.Tensor,
        build_timesteps: Sequence[int],
        scales: Sequence[float],
        *,
        batch_size: int | None = None,
        classifier_batch_size: int = 512,
    ) -> None:
        steps = step_map(build_timesteps, sampler.timesteps.tolist())
        # indexing copies: the input may be a read-only array (a Ray object)
        v = torch.as_tensor(np.asarray(vectors, dtype=np.float32)[:, steps])
        self.sampler, self.classifier, self.columns = sampler, classifier, list(columns)
        self.edits = [Direction(vector=v[i].clone(), name=f"edit{i}") for i in range(v.shape[0])]
        self.row_scales = seed_rows(len(self.edits), scales)
        self.batch_size, self.classifier_batch_size = batch_size, classifier_batch_size

    def render(self, seed: int, conditioning: dict[str, Any] | None = None) -> torch.Tensor:
        """Images [1 + D*S, 3, H, W] in [0, 1] of one seed (row order of :func:`seed_rows`), under
        the seed's ``conditioning`` (``HSpaceSampler.sample`` keywords for that one seed)."""
        from hspace.sampling import Edit

        n = self.row_scales.shape[0]
        edit = Edit(self.edits, scales=self.row_scales, mode="both", units="raw")
        return self.sampler.sample(
            [seed] * n, edit=edit, record_h=False, batch_size=self.batch_size, **(conditioning or {})
        ).images

    def score(self, images: torch.Tensor) -> np.ndarray:
        """Classifier outputs [N, A] for images [N, 3, H, W] (resized to the classifier's input if needed)."""
        from hspace.classifier import score_images

        return score_images(self.classifier, images, self.columns, self.classifier_batch_size).numpy()


def split_scores(
    scores: np.ndarray, names: Sequence[str], n_scales: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-seed scores [B, 1 + D*S, A] -> unedited [B, A] and {direction: [B, S, A]} for :func:`effect_matrix`."""
    scores = np.asarray(scores)
    if scores.ndim != 3 or scores.shape[1] != 1 + len(names) * n_scales:
        raise ValueError(f"scores have shape {scores.shape}, expected [B, {1 + len(names) * n_scales}, A]")
    return scores[:, 0], {
        n: scores[:, 1 + i * n_scales : 1 + (i + 1) * n_scales] for i, n in enumerate(names)
    }


class EditScorer:
    """Model, evaluation sampler and classifier of one worker process; maps a held-out seed to its
    scores (see :class:`SeedRenderer`). Built once per process by :func:`_scorer` and kept for the
    stage's next seeds.

    A seed's result: ``scores`` [1 + D*S, A] float32 (row order of :func:`seed_rows`) and
    ``preview`` [1 + D*S, 3, H, W] uint8 when asked for (an empty [0, 3, H, W] array otherwise).
    """

    def __init__(self, cfg_json: dict, attributes: list[str], vectors: np.ndarray) -> None:
        from hspace.classifier import load_classifier
        from hspace.sampling import HSpaceSampler
        from hspace.toy import resolve_classifier_source
        from pipeline.config import BuildConfig

        cfg = BuildConfig.model_validate(cfg_json)
        model = load_model(cfg)
        build = HSpaceSampler(
            model,
            sampler=cfg.sampler.kind,
            num_inference_steps=cfg.sampler.num_inference_steps,
            eta=cfg.sampler.eta,
        )
        spec = evaluation_sampler(cfg)
        sampler = HSpaceSampler(
            model, sampler=spec.kind, num_inference_steps=spec.num_inference_steps, eta=spec.eta
        )
        classifier = load_classifier(
            resolve_classifier_source(cfg.annotate.classifier), str(model.device), cfg.storage.storage_options
        )
        self.renderer = SeedRenderer(
            sampler,
            classifier,
            [classifier.index(a) for a in attributes],
            vectors,
            build.timesteps.tolist(),
            cfg.evaluate.scales,
            batch_size=cfg.evaluate.batch_size,
            classifier_batch_size=cfg.annotate.batch_size,
        )
        self.model_cfg = cfg.model  # the held-out seeds get the conditioning generate gives a seed

    def __call__(self, seed: int, preview: bool) -> dict[str, Any]:
        conditioning = self.model_cfg.conditioning_for([int(seed)])
        conditioning.pop("record_branch")
        images = self.renderer.render(int(seed), conditioning)
        keep = images if preview else images[:0]
        return {
            "seed": int(seed),
            "scores": self.renderer.score(images),
            "preview": (keep * 255).round().to(torch.uint8).numpy(),
        }


#: This worker process's scorer and the key it was built for (see :func:`_scorer`).
_PROCESS_SCORER: tuple[str, EditScorer] | None = None


def _scorer(cfg_json: dict, attributes: list[str], edits_ref: list) -> EditScorer:
    """The :class:`EditScorer` of this process for (config, attributes, edit vectors), built on
    first use and kept: every later seed of the stage that lands on this worker reuses it (only
    the latest is kept, so a worker never holds an earlier build's model)."""
    global _PROCESS_SCORER
    import ray

    key = json.dumps([cfg_json, attributes, edits_ref[0].hex()], sort_keys=True)
    if _PROCESS_SCORER is None or _PROCESS_SCORER[0] != key:
        _PROCESS_SCORER = None  # release the previous model before loading the next
        _PROCESS_SCORER = (key, EditScorer(cfg_json, attributes, ray.get(edits_ref[0])))
    return _PROCESS_SCORER[1]


def score_seed(
    cfg_json: dict, attributes: list[str], edits_ref: list, seed: int, preview: bool
) -> dict[str, Any]:
    """The evaluate stage's Ray task: one held-out seed's scores (and preview images if asked).

    ``edits_ref`` is ``[ObjectRef]`` of the stacked edit vectors (in a list, so Ray passes the
    reference and a warm worker does not fetch the vectors again).
    """
    return _scorer(cfg_json, attributes, edits_ref)(seed, preview)


def evaluation_sampler(cfg: BuildConfig) -> SamplerConfig:
    """The sampler the evaluate stage renders with: ``evaluate.sampler``, or the build's own."""
    return cfg.evaluate.sampler if cfg.evaluate is not None and cfg.evaluate.sampler else cfg.sampler


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
    edits_ref = [ray.put(stacked)]
    previewed = set(seeds[: min(n_preview, len(seeds))])
    task = ray.remote(score_seed).options(
        num_cpus=res.num_cpus_per_worker,
        num_gpus=res.num_gpus_per_worker or 0,
        name="evaluate-seed",
        max_retries=3,  # a task whose node or worker process died runs again elsewhere
    )
    watch = CapacityWatch(
        "evaluate", actor_demand(res.num_cpus_per_worker, res.num_gpus_per_worker), unit="a seed's task"
    )
    rows: dict[int, dict[str, Any]] = {}
    with progress_bar(total=len(seeds), desc="evaluate seeds", unit="seed", progress=progress) as bar:

        def keep(seed: int, row: dict[str, Any]) -> None:
            rows[seed] = row
            bar.update(1)

        map_tasks_watched(
            lambda seed: task.remote(cfg_json, list(attributes), edits_ref, seed, seed in previewed),
            seeds,
            watch,
            in_flight=max(1, min(res.workers, len(seeds))),
            on_result=keep,
        )
    missing = [seed for seed in seeds if seed not in rows]
    if missing:
        raise RuntimeError(f"evaluate: no result for seeds {missing}")
    n_scales = len(ev.scales)
    scores = np.stack([np.asarray(rows[seed]["scores"]) for seed in seeds])  # [B, 1 + D*S, A]
    effects = graded_effects(
        scores,
        names,
        ev.scales,
        attributes,
        binary,
        random_of,
        {n: d.kind for n, d in directions.items()},
        own_attributes(directions),
    )
    spec = evaluation_sampler(cfg)
    effects |= {
        "units": ev.units,
        "mode": "both",
        "seed_start": ev.seed_start,
        "sampler": {"kind": spec.kind, "num_inference_steps": spec.num_inference_steps, "eta": spec.eta},
        "note": "delta = mean over held-out seeds of score(edited) - score(unedited), in logits for binary "
        "attributes and values for continuous ones; effect = (plus - minus) / 2; random baselines "
        "use the sigma of the direction they are matched to (equal edit norm)",
    }
    # preview strips: scales sorted, the unedited image inserted at 0
    order = sorted(range(n_scales), key=lambda j: ev.scales[j])
    preview_scales = sorted([*ev.scales, 0.0])
    shown = [np.asarray(rows[seed]["preview"]) for seed in seeds[: min(n_preview, len(seeds))]]
    strips = np.stack(shown) if shown else np.zeros((0, scores.shape[1], 3, 1, 1), np.uint8)
    cut = sum(1 for s in ev.scales if s < 0)
    previews = {}
    for i, n in enumerate(names):
        p = strips[:, 1 + i * n_scales : 1 + (i + 1) * n_scales][:, order]
        previews[n] = np.concatenate([p[:, :cut], strips[:, :1], p[:, cut:]], axis=1)
    n_images = len(seeds) * (1 + len(names) * len(ev.scales))
    seconds = time.perf_counter() - t0
    if progress:
        print(
            f"evaluate: {len(names)} directions x {len(ev.scales)} scales x {len(seeds)} seeds = "
            f"{n_images} images in {seconds:.1f}s ({n_images / max(seconds, 1e-9):.1f} images/s)"
        )
    return EvaluateResult(effects, previews, preview_scales, n_images, seconds)
