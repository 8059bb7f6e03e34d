"""Do a catalog's grade letters reproduce on other held-out seeds, and under a coarser sampler?

Renders every direction of a published version (unedited and at each of the config's evaluate
scales) on ``--seeds`` held-out seeds with each sampler asked for (or reads them back from
``--load``), keeps every seed's classifier scores, cuts the seeds into disjoint sets of
``--set-size`` and grades each set with the evaluate stage's own code (``effect_matrix``,
``seed_effects`` + ``hspace.grade``). It prints, over the non-random directions:

- ``retest``: letters equal (and within one letter) between every pair of sets under one sampler:
  the grades' own sampling noise;
- ``vs reference``: each set against the reference sampler's (the first) letters on every other
  set (independent seeds, so agreement is not inflated by shared seeds);
- ``confidence``: how often a letter of a given confidence (``hspace.grade``: the share of seed
  resamples keeping it) is the same on another set of the same sampler.

    python tests/benchmarks/grade_retest.py --config configs/quickstart.yaml --catalog catalog \
        --model toy-faces --seeds 32 --samplers ddpm:20 ddim:3 --out /tmp/retest.npz

A measurement tool (minutes to hours on a CPU), not a test. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from hspace.catalog import open as open_catalog
from hspace.classifier import load_classifier
from hspace.grade import LETTERS
from hspace.sampling import HSpaceSampler
from hspace.toy import resolve_classifier_source
from pipeline.config import load_config
from pipeline.evaluate import (
    SeedRenderer,
    edit_vectors,
    graded_effects,
    load_model,
    own_attributes,
)


def per_seed_scores(cfg, version, spec: str, seeds: list[int]) -> np.ndarray:
    """Scores [B, 1 + D*S, A] of every direction of ``version`` on ``seeds`` under sampler ``kind:steps``."""
    kind, steps = spec.split(":")
    effects = version.effects()
    names, directions = list(effects["directions"]), version.directions()
    model = load_model(cfg)
    build = HSpaceSampler(
        model, sampler=cfg.sampler.kind, num_inference_steps=cfg.sampler.num_inference_steps
    )
    sampler = HSpaceSampler(model, sampler=kind, num_inference_steps=int(steps))
    clf = load_classifier(resolve_classifier_source(cfg.annotate.classifier), "cpu", None)
    vectors = edit_vectors(
        {n: directions[n] for n in names}, effects["baseline_of"], cfg.evaluate.units, len(build.timesteps)
    )
    renderer = SeedRenderer(
        sampler,
        clf,
        [clf.index(a) for a in effects["attributes"]],
        np.stack([vectors[n].numpy() for n in names]),
        build.timesteps.tolist(),
        cfg.evaluate.scales,
        batch_size=cfg.evaluate.batch_size,
    )
    t0, out = time.perf_counter(), []
    for i, seed in enumerate(seeds):
        out.append(renderer.score(renderer.render(seed)))
        print(f"{spec}: seed {i + 1}/{len(seeds)} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return np.stack(out)


def graded(version, scores: np.ndarray) -> dict[str, dict]:
    """The evaluate stage's grade (letter and confidence) of every non-random direction."""
    effects = version.effects()
    names, random_of = list(effects["directions"]), effects["baseline_of"]
    binary = [effects["score_units"][a] == "logit" for a in effects["attributes"]]
    own = own_attributes(version.directions())
    matrix = graded_effects(
        scores, names, effects["scales"], effects["attributes"], binary, random_of, effects["kinds"], own
    )
    return {n: matrix["grades"][n] for n in names if n not in random_of}


def agreement(a: dict[str, dict], b: dict[str, dict]) -> tuple[int, int]:
    """(letters equal, letters at most one apart)."""
    gap = [abs(LETTERS.index(a[n]["letter"]) - LETTERS.index(b[n]["letter"])) for n in a]
    return sum(g == 0 for g in gap), sum(g <= 1 for g in gap)


BINS = ((0.0, 0.5), (0.5, 0.7), (0.7, 0.9), (0.9, 1.01))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--catalog", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--ref", default="latest")
    p.add_argument("--seeds", type=int, default=32, help="held-out seeds rendered per sampler")
    p.add_argument("--set-size", type=int, default=16, help="seeds per disjoint set")
    p.add_argument(
        "--samplers", nargs="+", default=["ddpm:20", "ddim:5"], help="kind:steps; the first is the reference"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="save every sampler's per-seed scores here (.npz)")
    p.add_argument("--load", nargs="*", default=[], help="kind:steps=FILE.npz: scores saved by --out")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    version = open_catalog(a.catalog).version(a.model, a.ref)
    seeds = list(range(cfg.evaluate.seed_start, cfg.evaluate.seed_start + a.seeds))
    loaded = dict(item.split("=", 1) for item in a.load)
    scores = {
        spec: np.load(loaded[spec])[spec.replace(":", "_")]
        if spec in loaded
        else per_seed_scores(cfg, version, spec, seeds)
        for spec in a.samplers
    }
    if a.out:
        np.savez(a.out, seeds=np.asarray(seeds), **{k.replace(":", "_"): v for k, v in scores.items()})
    k, reference = a.set_size, a.samplers[0]
    sets = {
        spec: [graded(version, s[i : i + k]) for i in range(0, len(s) - k + 1, k)]
        for spec, s in scores.items()
    }
    n = len(next(iter(sets.values()))[0])
    print(f"\n{version.version}: {n} non-random directions, sets of {k} seeds")
    print(
        "| sampler | sets | retest: equal, within one letter | vs reference on other sets: equal, within one |"
    )
    print("|---|---:|---:|---:|")
    for spec, graded_sets in sets.items():
        pairs = list(itertools.combinations(range(len(graded_sets)), 2))
        retest = [agreement(graded_sets[i], graded_sets[j]) for i, j in pairs]
        cross = [
            agreement(graded_sets[i], sets[reference][j])
            for i in range(len(graded_sets))
            for j in range(len(sets[reference]))
            if i != j
        ]
        print(f"| {spec} | {len(graded_sets)} | {_mean(retest)} | {_mean(cross)} |")
    print("\n| sampler | confidence | letters | same letter on another set |")
    print("|---|---|---:|---:|")
    for spec, graded_sets in sets.items():
        for lo, hi in BINS:
            same = [
                graded_sets[i][d]["letter"] == graded_sets[j][d]["letter"]
                for i, j in itertools.permutations(range(len(graded_sets)), 2)
                for d in graded_sets[i]
                if lo <= graded_sets[i][d]["confidence"] < hi
            ]
            rate = f"{np.mean(same):.0%}" if same else "-"
            print(
                f"| {spec} | [{lo:.1f}, {min(hi, 1.0):.1f}{']' if hi > 1 else ')'} | {len(same)} | {rate} |"
            )


def _mean(pairs: list[tuple[int, int]]) -> str:
    if not pairs:
        return "-"
    equal, near = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
    return f"{equal:.1f}, {near:.1f}"


if __name__ == "__main__":
    main()
