"""The README's pictures of the toy model: sample grids, edit strips and effect-matrix heatmaps (PIL only).

Kept apart from the math (GANSpace keeps its viewer apart from its estimators). ``python -m
hspace.toy.figures --out docs/images`` renders the README's figures from the shipped toy model;
``--text`` renders the text toy's edit strips instead (:func:`render_text_figures`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from hspace.images import image_grid

#: Nearest-neighbour enlargement of the 32 x 32 toy images in the README figures.
UPSCALE = 3


def heatmap(
    matrix: np.ndarray, rows: Sequence[str], cols: Sequence[str], title: str = "", cell: int = 64
) -> Image.Image:
    """A diverging heatmap (blue negative, red positive) with the value written in each cell."""
    m = np.asarray(matrix, dtype=np.float64)
    scale = float(np.nanmax(np.abs(m))) or 1.0
    left, top = 8 + 7 * max(len(r) for r in rows), 40
    img = Image.new("RGB", (left + cell * len(cols) + 8, top + cell * len(rows) + 8), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((4, 4), title, fill=(0, 0, 0))
    for j, c in enumerate(cols):
        d.text((left + j * cell + 2, top - 14), c[:10], fill=(0, 0, 0))
    for i, r in enumerate(rows):
        d.text((4, top + i * cell + cell // 2 - 5), r, fill=(0, 0, 0))
        for j in range(len(cols)):
            v = m[i, j] / scale
            color = (
                (255, int(255 * (1 - v)), int(255 * (1 - v)))
                if v >= 0
                else (int(255 * (1 + v)), int(255 * (1 + v)), 255)
            )
            x0, y0 = left + j * cell, top + i * cell
            d.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=(200, 200, 200))
            d.text((x0 + 6, y0 + cell // 2 - 5), f"{m[i, j]:+.2f}", fill=(0, 0, 0))
    return img


def render_readme_figures(out: Path, steps: int = 20, n_train: int = 512) -> dict:
    """Samples grid, PCA and supervised edit strips and the disentangling heatmap of the toy model."""
    from hspace.classifier import score_images
    from hspace.directions import disentangle, supervised_direction
    from hspace.pca import PerTimestepPCA
    from hspace.sampling import HSpaceSampler
    from hspace.toy import load_toy_classifier, load_toy_model
    from hspace.toy.evaluate import edit_effects, with_step_norms
    from hspace.toy.world import make_dataset

    out.mkdir(parents=True, exist_ok=True)
    model, clf = load_toy_model(), load_toy_classifier()
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=steps)
    samples = sampler.sample(list(range(48)), record_h=False).images
    image_grid(samples.reshape(4, 12, *samples.shape[1:]), upscale=UPSCALE).save(out / "samples.png")
    real, _ = make_dataset(range(48))
    real_t = torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255
    image_grid(real_t.reshape(4, 12, *real_t.shape[1:]), upscale=UPSCALE).save(out / "world.png")

    seeds = list(range(1_000_000, 1_000_000 + n_train))
    traj = sampler.sample(seeds)
    scores = score_images(clf, traj.images)
    pca = PerTimestepPCA(n_components=6, n_steps=steps, timesteps=sampler.timesteps)
    for i in range(0, n_train, 128):
        pca.partial_fit(traj.h[i : i + 128])
    strip_seeds = [11, 12, 13]
    rows, labels = [], []
    for j in range(4):
        strips = sampler.sample_edits(
            strip_seeds, pca.direction(j, name=f"pc{j}"), [-3, -1.5, 0, 1.5, 3], units="sigma"
        )
        rows.append(strips[0])
        labels.append(f"pc{j}")
    image_grid(torch.stack(rows), upscale=UPSCALE, row_labels=labels).save(out / "pca_edits.png")

    dirs = {
        a: supervised_direction(traj.h, scores[:, clf.index(a)], 0.2, a, timesteps=sampler.timesteps)
        for a in ("grey_hair", "glasses", "hat", "smile", "eyes_open", "pose")
    }
    rows, labels = [], []
    for a, d in dirs.items():
        rows.append(sampler.sample_edits([21], d, [-1.0, -0.5, 0, 0.5, 1.0])[0])
        labels.append(a)
    image_grid(torch.stack(rows), upscale=UPSCALE, row_labels=labels).save(out / "supervised_edits.png")

    g, a = dirs["glasses"], dirs["grey_hair"]
    cg, ca = clf.index("glasses"), clf.index("grey_hair")
    g_cond = supervised_direction(
        traj.h, scores[:, cg], 0.2, "glasses_given_grey", condition_on=scores[:, ca] > 0
    )
    a_cond = supervised_direction(
        traj.h, scores[:, ca], 0.2, "grey_given_glasses", condition_on=scores[:, cg] > 0
    )
    table = [
        g,
        with_step_norms(disentangle(g, [a], name="glasses_perp_grey"), g.norm_per_step()),
        with_step_norms(g_cond, g.norm_per_step()),
        a,
        with_step_norms(disentangle(a, [g], name="grey_perp_glasses"), a.norm_per_step()),
        with_step_norms(a_cond, a.norm_per_step()),
    ]
    # the acceptance test's Table I protocol: DDIM, gamma 0.5 of the mean difference, equal norms
    ddim = HSpaceSampler(model, sampler="ddim", num_inference_steps=steps)
    eff = edit_effects(ddim, clf, table, list(range(4_000_000, 4_000_064)), [0.5])
    cols = [c for c in clf.attributes]
    m = eff.mean()[:, 0].numpy()
    heatmap(m, [d.name for d in table], cols, title="effect (logit / value change) of each direction").save(
        out / "disentangle_heatmap.png"
    )
    result = {
        "rows": [d.name for d in table],
        "columns": cols,
        "matrix": m.tolist(),
        "protocol": "ddim, gamma 0.5, 64 seeds",
    }
    (out / "disentangle_matrix.json").write_text(json.dumps(result, indent=2))
    render_jacobian_figure(out / "jacobian_edits.png", model, sampler)
    return result


def render_jacobian_figure(
    path: Path, model, sampler, seeds: tuple[int, ...] = (5_000_000, 5_000_001, 5_000_002), step: int = 18
) -> None:
    """Masked Jacobian edits (paper Fig. 6): per seed, the top direction for a mouth and an eyes
    mask at a late step, added around that step at -1, -0.5, 0, 0.5, 1 times the norm of h."""
    from hspace.directions import Direction
    from hspace.jacobian import jacobian_directions
    from hspace.sampling import Edit
    from hspace.toy.world import FACE_REGIONS, region_mask

    traj = sampler.sample(list(seeds), record_x=True)
    x_t, t = traj.x_t[:, step], int(sampler.timesteps[step])
    h_norm = traj.h.flatten(2).norm(dim=2).mean(1)
    edit_steps = list(range(step - 2, len(sampler.timesteps)))
    rows, labels = [], []
    for name in FACE_REGIONS:
        mask = torch.from_numpy(region_mask(name, traj.images.shape[-1]))
        vecs = jacobian_directions(model, x_t, t, k=1, mask=mask, oversample=6).vectors[:, 0]
        for b, seed in enumerate(seeds):
            v = vecs[b] * h_norm[b] / vecs[b].norm()
            d = Direction(vector=v.float(), name=f"jac_{name}", kind="jacobian")
            row = [
                sampler.sample([seed], edit=Edit(d, scales=g, steps=edit_steps), record_h=False).images[0]
                for g in (-1.0, -0.5, 0.0, 0.5, 1.0)
            ]
            rows.append(torch.stack(row))
            labels.append(f"{name}, seed {b}")
    image_grid(torch.stack(rows), upscale=UPSCALE, row_labels=labels).save(path)


#: The text toy's edit strips: attributes, held-out seeds, sigma scales and the prompt they are shown under.
TEXT_EDIT_ATTRIBUTES = ("hat", "glasses")
TEXT_EDIT_SEEDS = (7, 8, 9)
TEXT_EDIT_SCALES = (-1.5, 0.0, 1.5)
TEXT_EDIT_PROMPT = "dark hair"


def render_text_figures(out: Path, steps: int = 20, n_train: int = 128) -> dict:
    """Edit strips of the shipped text toy: supervised mean-difference directions of
    :data:`TEXT_EDIT_ATTRIBUTES` found from ``n_train`` samples under the empty prompt (no guidance),
    applied in sigma units under :data:`TEXT_EDIT_PROMPT` at the default guidance (both branches)."""
    from hspace.classifier import score_images
    from hspace.directions import supervised_direction
    from hspace.sampling import HSpaceSampler
    from hspace.toy import load_toy_classifier, load_toy_text_model
    from hspace.toy.text_evaluate import DEFAULT_GUIDANCE

    out.mkdir(parents=True, exist_ok=True)
    model, clf = load_toy_text_model(), load_toy_classifier()
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=steps)
    traj = sampler.sample(list(range(1_000_000, 1_000_000 + n_train)), prompt="", guidance_scale=1.0)
    scores = score_images(clf, traj.images)
    written = {}
    for a in TEXT_EDIT_ATTRIBUTES:
        d = supervised_direction(traj.h, scores[:, clf.index(a)], 0.2, a, timesteps=sampler.timesteps)
        strips = sampler.sample_edits(
            list(TEXT_EDIT_SEEDS),
            d,
            list(TEXT_EDIT_SCALES),
            units="sigma",
            prompt=TEXT_EDIT_PROMPT,
            guidance_scale=DEFAULT_GUIDANCE,
        )
        path = out / f"text_edit_{a}.png"
        image_grid(
            strips,
            min_cell=128,
            row_labels=[f"seed {s}" for s in TEXT_EDIT_SEEDS],
            col_labels=[f"{g:+g}" for g in TEXT_EDIT_SCALES],
        ).save(path)
        written[a] = str(path)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description="Render the README figures from the shipped toy model")
    p.add_argument("--out", type=Path, default=Path("docs/images"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--text", action="store_true", help="the text toy's edit strips instead")
    a = p.parse_args()
    result = render_text_figures(a.out, a.steps) if a.text else render_readme_figures(a.out, a.steps)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
