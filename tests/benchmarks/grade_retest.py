"""Do a catalog's grade letters reproduce on other held-out seeds, and under a coarser sampler?

Renders every direction of a published version (unedited and at each of the config's evaluate
scales) on ``--seeds`` held-out seeds with each sampler asked for, keeps every seed's classifier
scores, and grades disjoint halves of the seeds with the evaluate stage's own code
(``effect_matrix`` + ``hspace.grade``). It prints, per sampler and seed count, how many of the
non-random directions get the same letter on

- ``retest``: two disjoint seed sets under the same sampler (the grades' own sampling noise);
- ``vs reference``: each set against the reference sampler's letters on the *other* half's seeds
  (independent seeds, so agreement is not inflated by shared seeds).

    python tests/benchmarks/grade_retest.py --config configs/quickstart.yaml --catalog catalog \\
        --model toy-faces --seeds 32 --samplers ddpm:20 ddim:5 --out /tmp/retest.npz

A measurement tool (minutes to hours on a CPU), not a test. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hspace.catalog import open as open_catalog
from hspace.classifier import load_classifier
from hspace.grade import grade_directions
from hspace.sampling import HSpaceSampler
from hspace.toy import resolve_classifier_source
from pipeline.config import load_config
from pipeline.evaluate import (
    SeedRenderer,
    edit_vectors,
    effect_matrix,
    load_model,
    own_attributes,
    split_scores,
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


def letters(version, scores: np.ndarray) -> dict[str, str]:
    """The evaluate stage's letter of every non-random direction from per-seed scores."""
    effects = version.effects()
    names, random_of = list(effects["directions"]), effects["baseline_of"]
    base, edited = split_scores(scores, names, len(effects["scales"]))
    binary = [effects["score_units"][a] == "logit" for a in effects["attributes"]]
    matrix = effect_matrix(
        base, edited, effects["scales"], effects["attributes"], binary, random_of, effects["kinds"]
    )
    grades = grade_directions(matrix, own_attributes(version.directions()))
    return {n: grades[n]["letter"] for n in names if n not in random_of}


def same(a: dict[str, str], b: dict[str, str]) -> int:
    return sum(a[n] == b[n] for n in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--catalog", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--ref", default="latest")
    p.add_argument("--seeds", type=int, default=32, help="held-out seeds (even; split in two halves)")
    p.add_argument(
        "--samplers", nargs="+", default=["ddpm:20", "ddim:5"], help="kind:steps; the first is the reference"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="save every sampler's per-seed scores here (.npz)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config(a.config)
    version = open_catalog(a.catalog).version(a.model, a.ref)
    seeds = list(range(cfg.evaluate.seed_start, cfg.evaluate.seed_start + a.seeds))
    scores = {spec: per_seed_scores(cfg, version, spec, seeds) for spec in a.samplers}
    if a.out:
        np.savez(a.out, seeds=np.asarray(seeds), **{k.replace(":", "_"): v for k, v in scores.items()})
    half, reference = a.seeds // 2, a.samplers[0]
    print(f"\n{version.version}: letters equal, of the non-random directions")
    print("| sampler | seeds per set | retest (disjoint sets) | vs reference on the other set |")
    print("|---|---:|---:|---:|")
    for spec, s in scores.items():
        for k in sorted({half, half // 2, half * 3 // 4}):
            one, two = letters(version, s[:k]), letters(version, s[half : half + k])
            ref_one = letters(version, scores[reference][:half])
            ref_two = letters(version, scores[reference][half:])
            print(
                f"| {spec} | {k} | {same(one, two)} / {len(one)} | "
                f"{same(one, ref_two)}, {same(two, ref_one)} / {len(one)} |"
            )


if __name__ == "__main__":
    main()
