"""The paper's claims, reproduced on the shipped toy model and judged by the shipped classifier.

Every claim is compared with matched-norm random directions on the same seeds (identical noise),
and every test prints its numbers (run with ``-s`` or read the captured log). Effects are read in
classifier logits (binary factors) or values (continuous ones), never in probabilities, which
saturate. Thresholds were set after measuring on the shipped model (the measured numbers are in
the comments next to each assertion): each lies well above the random baseline and below what the
model reaches.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hspace.classifier import score_images
from hspace.directions import disentangle, random_like, supervised_direction
from hspace.inversion import psnr, reconstruct, reconstruction_report
from hspace.jacobian import jacobian_directions
from hspace.pca import PerTimestepPCA
from hspace.sampling import Edit, HSpaceSampler
from hspace.toy import load_toy_classifier, load_toy_model
from hspace.toy.evaluate import edit_effects, image_quality, with_step_norms
from hspace.toy.figures import heatmap
from hspace.toy.world import FACE_REGIONS, make_dataset, region_mask

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_torch_threads")]

STEPS = 20  # DDPM steps (eta = 1, the paper's default sampler)
N_TRAIN = 512  # annotated model samples for PCA and supervised directions
N_EVAL = 32  # held-out seeds per effect measurement
N_RANDOM = 6  # random draws per baseline
N_RANDOM_CONTROL = 2  # random draws per seed for the h-swap, Jacobian and real-image controls
N_SUPERVISED_RANDOM = 1  # matched-norm random draws per supervised direction (measured ratios 14-154x)
N_MASKED = 8  # seeds for the masked Jacobian's locality
N_JACOBIAN = 16  # seeds for the unmasked Jacobian direction against random ones
TRAIN_SEEDS = list(range(1_000_000, 1_000_000 + N_TRAIN))
EVAL_SEEDS = list(range(2_000_000, 2_000_000 + N_EVAL))
Q = 0.2  # top / bottom quantile for mean-difference directions
STRONG = ["glasses", "hat", "grey_hair"]
WEAKER = ["pose", "face_width", "skin_tone"]
SEMANTIC = ["grey_hair", "glasses", "hat", "pose"]


def log(title: str, payload: dict) -> None:
    print(f"\n[claim] {title}: {json.dumps(payload, indent=None, default=float)}")


@pytest.fixture(scope="module")
def world():
    """Model, classifier, sampler, and N_TRAIN annotated samples with their h and x_T."""
    torch.manual_seed(0)
    model = load_toy_model()
    clf = load_toy_classifier()
    sampler = HSpaceSampler(model, sampler="ddpm", num_inference_steps=STEPS)
    traj = sampler.sample(TRAIN_SEEDS)
    scores = score_images(clf, traj.images)
    return {"model": model, "clf": clf, "sampler": sampler, "traj": traj, "scores": scores}


@pytest.fixture(scope="module")
def supervised(world):
    """Mean-difference directions (eq. 11) per attribute, in h and in x_T."""
    clf, traj, scores = world["clf"], world["traj"], world["scores"]
    ts, fp = world["sampler"].timesteps, world["model"].fingerprint
    dirs_h, dirs_x = {}, {}
    for a in clf.attributes:
        s = scores[:, clf.index(a)]
        dirs_h[a] = supervised_direction(traj.h, s, Q, f"{a}", timesteps=ts, model_fingerprint=fp)
        dirs_x[a] = supervised_direction(traj.x_T, s, Q, f"{a}_xT", space="x_T")
    return dirs_h, dirs_x


def test_sample_quality_is_reported_and_model_samples_look_like_the_world(world):
    """The N_TRAIN samples of the fixture, read by the classifier, against as many generator images."""
    q = image_quality(world["traj"].images, world["clf"])
    log("sample quality", q)
    # measured on 128 other seeds: 0.98 confident; binary rates within 0.04 of the world's except
    # eyes open (0.36 vs 0.54); background saturation 0.451 vs 0.449
    assert q["confident_fraction"] >= 0.9
    for name, f in q["frequencies"].items():
        assert abs(f["model"] - f["generator"]) <= 0.25, name
    for key, b in q["background"].items():
        assert abs(b["model"] - b["generator"]) <= 0.05, (key, b)


def test_pca_directions_move_attributes_far_more_than_random(world):
    """Claim 1: top principal directions each move some attribute beyond the random 95th percentile."""
    clf, sampler, traj = world["clf"], world["sampler"], world["traj"]
    pca = PerTimestepPCA(n_components=6, n_steps=STEPS, timesteps=sampler.timesteps)
    for i in range(0, N_TRAIN, 128):
        pca.partial_fit(traj.h[i : i + 128])
    k = 4
    # every direction, PCA or random, edits with the same per-step norm: 2 sigma of component 0
    norms = 2.0 * pca.explained_variance_[:, 0].sqrt().float()
    pcs = [with_step_norms(pca.direction(j, name=f"pc{j}"), norms) for j in range(k)]
    rnd = [
        with_step_norms(random_like(pcs[0], seed=100 + r, name=f"random{r}"), norms) for r in range(N_RANDOM)
    ]
    eff = edit_effects(sampler, clf, pcs + rnd, EVAL_SEEDS, [1.0])
    mean = eff.mean()[:, 0].abs()  # [D, A]
    p95 = torch.quantile(mean[k:], 0.95, dim=0)  # per attribute
    table = {
        pcs[j].name: {a: round(float(mean[j, i]), 3) for i, a in enumerate(clf.attributes)} for j in range(k)
    }
    ratio = (mean[:k] / p95.clamp_min(1e-6)).max(1)
    log("pca effects |mean delta| (pcs)", table)
    log("pca random p95", {a: round(float(p95[i]), 3) for i, a in enumerate(clf.attributes)})
    log("pca best ratio to random p95", {pcs[j].name: round(float(ratio.values[j]), 2) for j in range(k)})
    strong = [j for j in range(k) if ratio.values[j] > 3.0]
    assert len(strong) >= 3, f"only {strong} of the top {k} PCs beat 3x the random p95"


def test_supervised_directions_move_their_attribute_monotonically_on_most_seeds(world, supervised):
    """Claim 2: mean-difference directions move their own attribute on >= 90% of seeds, monotonically.

    A binary attribute is edited toward the state the seed lacks (+gamma where the unedited render
    lacks it, -gamma where it has it): a face that already wears glasses cannot gain them, and its
    saturated logit then moves by noise only. Continuous attributes are edited by +gamma.
    """
    clf, sampler = world["clf"], world["sampler"]
    dirs_h, dirs_x = supervised
    attrs = list(clf.attributes)
    binary = [a for a in attrs if clf.binary[clf.index(a)]]
    claimed = STRONG + WEAKER
    # Half and full scale for the attributes whose monotonicity is asserted; full scale for the
    # other claimed ones, rendered in one call with the matched-norm random baselines
    # (N_SUPERVISED_RANDOM draws per claimed attribute) on the same seeds. Eyes, smile and
    # background hue are not claimed here (the masked Jacobian covers the local attributes, the
    # h-swap the background) and not rendered.
    rest = WEAKER
    rnd_dirs = [
        random_like(dirs_h[a], seed=7 + r, name=f"{a}_random{r}")
        for a in claimed
        for r in range(N_SUPERVISED_RANDOM)
    ]
    eff_strong = edit_effects(
        sampler, clf, [dirs_h[a] for a in STRONG], EVAL_SEEDS, [0.5, 1.0], toward_absent=STRONG
    )
    eff_rest = edit_effects(
        sampler,
        clf,
        [dirs_h[a] for a in rest] + rnd_dirs,
        EVAL_SEEDS,
        [1.0],
        toward_absent=[a if a in binary else None for a in rest] + [None] * len(rnd_dirs),
    )
    report = {}
    for a in claimed:
        c = clf.index(a)
        # the change in the intended direction (sign-corrected for seeds edited toward absence)
        if a in STRONG:
            i = STRONG.index(a)
            d_half = eff_strong.deltas[i, 0, :, c] * eff_strong.signs[i]
            d_full = eff_strong.deltas[i, 1, :, c] * eff_strong.signs[i]
        else:
            i = rest.index(a)
            d_half, d_full = None, eff_rest.deltas[i, 0, :, c] * eff_rest.signs[i]
        r = {"frac_intended": float((d_full > 0).float().mean()), "mean": float(d_full.mean())}
        if d_half is not None:
            r["frac_monotone"] = float(((d_full > d_half) & (d_half > 0)).float().mean())
            r["mean_half"] = float(d_half.mean())
        if a in binary:
            r["seeds_edited_toward_absence"] = int(
                (eff_strong.signs[i] if a in STRONG else eff_rest.signs[i]).lt(0).sum()
            )
        k = len(rest) + N_SUPERVISED_RANDOM * claimed.index(a)
        rnd_mean = eff_rest.deltas[k : k + N_SUPERVISED_RANDOM, 0, :, c].mean(1).abs().max()
        r["random_abs_mean"] = float(rnd_mean)
        r["ratio"] = float(d_full.mean() / rnd_mean.clamp_min(1e-6))
        report[a] = r
    log("supervised (h) per attribute", report)
    # x_T as the latent (paper Fig. 8a), at the same scale convention
    eff_x = edit_effects_xT(sampler, clf, dirs_x, STRONG, EVAL_SEEDS)
    log("supervised (x_T) per attribute", eff_x)
    # The paper's bar (>= 90% of seeds, monotone in gamma, far above random) for the global
    # accessories; measured 0.94-1.0 of seeds toward the missing state and 14-154x random.
    for a in STRONG:
        r = report[a]
        assert r["frac_intended"] >= 0.9, (a, r)
        assert r["mean"] > r["mean_half"] > 0, (a, r)
        assert r["ratio"] >= 5, (a, r)
    # Geometry and colour: measured 0.91-1.0 of seeds, 14-42x random.
    for a in WEAKER:
        r = report[a]
        assert r["frac_intended"] >= 0.85, (a, r)
        assert r["ratio"] >= 5, (a, r)
    # h needs far fewer samples than x_T (paper Fig. 8a): h's mean effect is many times x_T's.
    for a in STRONG:
        assert report[a]["mean"] > 3 * eff_x[a]["mean"], (a, report[a], eff_x[a])


def edit_effects_xT(sampler, clf, dirs_x, attrs, seeds) -> dict:
    """Shift x_T by the x_T mean-difference direction and report the same numbers."""
    base = sampler.sample(seeds, record_h=False)
    base_scores = score_images(clf, base.images)
    out = {}
    for a in attrs:
        shifted = base.x_T + dirs_x[a].vector[None]
        imgs = sampler.sample(seeds, x_T=shifted, record_h=False).images
        d = score_images(clf, imgs)[:, clf.index(a)] - base_scores[:, clf.index(a)]
        out[a] = {"frac_intended": float((d > 0).float().mean()), "mean": float(d.mean())}
    return out


def test_disentangling_cuts_the_cross_effect_of_the_correlated_pair(world, supervised, tmp_path):
    """Claim 3 (Table I): projection cuts the glasses<->grey-hair cross-effect, keeping the own effect.

    Rows: each raw mean difference, its projection off the other (eq. 12), and its conditional
    mean difference (top and bottom quantiles taken within each state of the other attribute),
    all at the raw direction's per-step norm. Protocol: DDIM (eta = 0, so an image is fixed by x_T
    and the edit; the paper's eq. 13 setting), gamma 0.5 of the mean difference, 64 held-out seeds
    in 8 groups of 8. With DDPM (eta = 1) the fresh noise of every step lets the model re-draw the
    correlated attribute, and the cut is smaller.
    """
    clf, model, traj, scores = world["clf"], world["model"], world["traj"], world["scores"]
    sampler = HSpaceSampler(model, sampler="ddim", num_inference_steps=STEPS)
    dirs_h, _ = supervised
    cg, ca = clf.index("glasses"), clf.index("grey_hair")
    g, a = dirs_h["glasses"], dirs_h["grey_hair"]
    g_norm, a_norm = g.norm_per_step(), a.norm_per_step()
    g_cond = supervised_direction(
        traj.h, scores[:, cg], Q, "glasses_given_grey", condition_on=scores[:, ca] > 0
    )
    a_cond = supervised_direction(
        traj.h, scores[:, ca], Q, "grey_given_glasses", condition_on=scores[:, cg] > 0
    )
    rows = [
        g,
        with_step_norms(disentangle(g, [a]), g_norm, "glasses_perp_grey"),
        with_step_norms(g_cond, g_norm),
        a,
        with_step_norms(disentangle(a, [g]), a_norm, "grey_perp_glasses"),
        with_step_norms(a_cond, a_norm),
    ]
    cosine = torch.nn.functional.cosine_similarity(g.vector.flatten(1), a.vector.flatten(1), dim=1)
    log("cosine(glasses, grey_hair) per step", {"min": float(cosine.min()), "max": float(cosine.max())})
    seeds = list(range(4_000_000, 4_000_000 + 64))
    gamma = 0.5
    eff = edit_effects(sampler, clf, rows, seeds, [gamma])
    groups = eff.deltas[:, 0].reshape(len(rows), 8, 8, -1).mean(2)  # [D, 8 groups, A]
    m, s = groups.mean(1), groups.std(1)
    matrix = {
        d.name: {c: f"{m[i, j]:+.2f}±{s[i, j]:.2f}" for j, c in enumerate(clf.attributes)}
        for i, d in enumerate(rows)
    }
    log(f"Table I effect matrix, gamma {gamma} (mean±std over 8 groups of 8 seeds)", matrix)
    summary = {}
    for own, cross, base in (("glasses", "grey_hair", 0), ("grey_hair", "glasses", 3)):
        co, cc = clf.index(own), clf.index(cross)
        for variant, i in (("projected", base + 1), ("conditional", base + 2)):
            summary[f"{own}_{variant}"] = {
                "own_raw": float(m[base, co]),
                "own": float(m[i, co]),
                "cross_raw": float(m[base, cc]),
                "cross": float(m[i, cc]),
                "cross_cut": float(1 - m[i, cc].abs() / m[base, cc].abs()),
                "own_kept": float(m[i, co] / m[base, co]),
                "own_is_largest": bool(m[i, co].abs() >= m[i].abs().max()),
            }
    log("cross-effect cut and own effect kept", summary)
    heatmap(m.numpy(), [d.name for d in rows], list(clf.attributes), title="Table I on the toy model").save(
        tmp_path / "table1.png"
    )
    (tmp_path / "table1.json").write_text(
        json.dumps(
            {
                "gamma": gamma,
                "rows": [d.name for d in rows],
                "columns": clf.attributes,
                "mean": m.tolist(),
                "std": s.tolist(),
            }
        )
    )
    assert (tmp_path / "table1.png").stat().st_size > 0
    # eq. 12 on glasses (the paper's example): measured cross-effect on grey hair cut 0.76, own kept 0.76.
    r = summary["glasses_projected"]
    assert r["cross_cut"] >= 0.6 and r["own_kept"] >= 0.6 and r["own_is_largest"], summary
    # eq. 12 on grey hair cuts its effect on glasses (measured 0.52, overshooting to -2.7) but keeps
    # only 0.40 of its own effect: with cosine up to 0.93 between the two mean differences, taking
    # glasses out takes most of grey hair with it. That half of the claim does not hold here.
    assert summary["grey_hair_projected"]["cross_cut"] >= 0.25, summary
    # The conditional mean difference keeps the own effect (measured 1.31 and 0.90) and cuts the
    # cross-effect by about half (0.49 and 0.47), its own attribute the largest effect in its row.
    for own in ("glasses", "grey_hair"):
        r = summary[f"{own}_conditional"]
        assert r["cross_cut"] >= 0.3 and r["own_kept"] >= 0.8 and r["own_is_largest"], summary


JAC_STEP = 18  # a late step (t ~ 100 of 1000): the image's layout is settled, details are not
JAC_EDIT_STEPS = list(range(JAC_STEP - 2, STEPS))  # the direction is applied around its own step


def test_masked_jacobian_direction_stays_inside_the_mask(world):
    """Claim 4: a masked Jacobian direction changes pixels mostly inside the mask; unmasked beat random.

    Protocol: top singular direction of J_t (eq. 9 with a mask, and unmasked) at step JAC_STEP,
    added at steps JAC_EDIT_STEPS (around the step it was found at) with the norm of h itself.
    Locality, on the first N_MASKED seeds, both signs: the share of the final image's change
    energy inside the mask, against the mask's share of the area and against the unmasked top
    direction's share. Strength, on N_JACOBIAN seeds: the unmasked top direction's change energy
    against random directions of the same norm applied at the same steps (2 draws per seed).
    """
    model, sampler = world["model"], world["sampler"]
    seeds = list(range(5_000_000, 5_000_000 + N_JACOBIAN))
    traj = sampler.sample(seeds, record_x=True)
    x_t, t = traj.x_t[:, JAC_STEP], int(sampler.timesteps[JAC_STEP])
    h_norm = traj.h.flatten(2).norm(dim=2).mean(1)  # [B] mean per-step |h| of each sample
    local = seeds[:N_MASKED]

    def edited(vectors: torch.Tensor) -> torch.Tensor:
        """Seed b of ``local`` edited by +-vectors[b] (rescaled to |h_b|), in one batch: [2B, 3, H, W]."""
        n = len(local)
        dirs = [_as_direction(vectors[b] * h_norm[b] / vectors[b].norm(), f"jac{b}") for b in range(n)]
        scales = torch.cat([torch.eye(n), -torch.eye(n)])  # row b: +v_b, row n + b: -v_b
        return sampler.sample(
            local + local, edit=Edit(dirs, scales=scales, steps=JAC_EDIT_STEPS), record_h=False
        ).images

    def change_energy(vectors: torch.Tensor) -> torch.Tensor:
        """Per-pixel squared change of each edited render: [2B, H, W]."""
        return ((edited(vectors) - traj.images[:N_MASKED].repeat(2, 1, 1, 1)) ** 2).sum(1)

    def shares_in(mask: torch.Tensor, energy: torch.Tensor) -> list[float]:
        return ((energy * mask).flatten(1).sum(1) / energy.flatten(1).sum(1).clamp_min(1e-12)).tolist()

    free = jacobian_directions(model, x_t, t, k=1, oversample=6)
    assert bool(free.converged.all())
    energy_free = change_energy(free.vectors[:N_MASKED, 0])  # rendered once, read in every mask
    report = {}
    for name in FACE_REGIONS:
        mask = torch.from_numpy(region_mask(name))
        masked = jacobian_directions(model, x_t[:N_MASKED], t, k=1, mask=mask, oversample=6)
        assert bool(masked.converged.all())
        shares = shares_in(mask, change_energy(masked.vectors[:, 0]))
        shares_free = shares_in(mask, energy_free)
        report[name] = {
            "area_share": float(mask.mean()),
            "masked_share": float(np.mean(shares)),
            "unmasked_share": float(np.mean(shares_free)),
            "masked_shares": shares,
        }
    # unmasked top directions against random ones of the same norm, at the same steps
    u = free.vectors[:, 0] * (h_norm / free.vectors[:, 0].flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    n, draws = len(seeds), N_RANDOM_CONTROL
    r = torch.randn((draws * n, *u.shape[1:]), generator=torch.Generator().manual_seed(0))
    r = r * (u.repeat(draws, 1, 1, 1).flatten(1).norm(dim=1) / r.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
    img_u = sampler.sample(
        seeds,
        edit=Edit([_as_direction(v, "u") for v in u], scales=torch.eye(n), steps=JAC_EDIT_STEPS),
        record_h=False,
    ).images
    img_r = sampler.sample(
        seeds * draws,
        edit=Edit([_as_direction(v, "r") for v in r], scales=torch.eye(draws * n), steps=JAC_EDIT_STEPS),
        record_h=False,
    ).images
    energy_u = (img_u - traj.images).pow(2).flatten(1).sum(1)
    energy_r = (img_r - traj.images.repeat(draws, 1, 1, 1)).pow(2).flatten(1).sum(1).view(draws, n).mean(0)
    ratios = energy_u / energy_r.clamp_min(1e-12)  # per seed, against the mean of its random draws
    report["unmasked_vs_random"] = {
        "median": float(ratios.median()),
        "frac_above_1": float((ratios > 1).float().mean()),
        "quartiles": torch.quantile(ratios, torch.tensor([0.25, 0.75])).tolist(),
    }
    log("masked jacobian", report)
    # measured (8 seeds): masked share 3.0x (mouth) and 3.5x (eyes) the mask's area share, against
    # 1.6x and 2.4x for the unmasked top direction. Unmasked vs random (16 seeds, 2 draws): median
    # 115x, quartiles 106-164x, every seed above 1. (Applied at every step instead, a direction from
    # step 18 does far less: median 3.8x, 88% of seeds; a direction from the middle step is not local.)
    share_over_area, masked_over_free = 2.0, 1.3
    for name in FACE_REGIONS:
        r = report[name]
        assert r["masked_share"] > share_over_area * r["area_share"], (name, r)
        assert r["masked_share"] > masked_over_free * r["unmasked_share"], (name, r)
    assert report["unmasked_vs_random"]["median"] > 20.0, report["unmasked_vs_random"]
    assert report["unmasked_vs_random"]["frac_above_1"] >= 0.9, report["unmasked_vs_random"]


def _random_inversion(inv):
    """The same inversion with x_T replaced by fresh noise: the reconstruction a broken inversion gives."""
    import dataclasses

    return dataclasses.replace(
        inv, x_T=torch.randn(inv.x_T.shape, generator=torch.Generator().manual_seed(0))
    )


def _as_direction(vector: torch.Tensor, name: str):
    from hspace.directions import Direction

    return Direction(vector=vector.detach().float(), name=name, kind="jacobian")


def test_h_swap_moves_global_attributes_towards_the_donor(world):
    """Claim 5: rendering seed a with h_{T:1} of seed b moves a's global attributes toward b's.

    The control adds to a's h a random direction with the swap's own per-step norm |h_b - h_a|
    (N_RANDOM_CONTROL draws per seed): a change of h that large, pointing nowhere in particular.
    """
    clf, sampler = world["clf"], world["sampler"]
    a_seeds = list(range(6_000_000, 6_000_032))
    b_seeds = list(range(6_100_000, 6_100_032))
    ta, tb = sampler.sample(a_seeds), sampler.sample(b_seeds)
    sa, sb = score_images(clf, ta.images), score_images(clf, tb.images)
    ss = score_images(clf, sampler.h_swap(a_seeds, b_seeds).images)
    # random controls: row r * n + i edits seed a_i by its r-th random direction
    n, draws = len(a_seeds), N_RANDOM_CONTROL
    swap_norms = (tb.h - ta.h).flatten(2).norm(dim=2)  # [n, T]
    noise = torch.randn((draws * n, *ta.h.shape[1:]), generator=torch.Generator().manual_seed(11))
    noise = noise * (swap_norms.repeat(draws, 1) / noise.flatten(2).norm(dim=2)).view(
        *noise.shape[:2], 1, 1, 1
    )
    dirs = [_as_direction(v, f"swap_random{i}") for i, v in enumerate(noise)]
    sr = score_images(
        clf,
        sampler.sample(a_seeds * draws, edit=Edit(dirs, scales=torch.eye(draws * n)), record_h=False).images,
    )
    report = {}
    for a in SEMANTIC + ["background_hue"]:
        c = clf.index(a)
        before = (sa[:, c] - sb[:, c]).abs()
        after = (ss[:, c] - sb[:, c]).abs()
        after_random = (sr[:, c] - sb[:, c].repeat(draws)).abs()
        report[a] = {
            "gap_before": float(before.mean()),
            "gap_after": float(after.mean()),
            "closed_fraction": float(1 - after.mean() / before.mean()),
            "closed_fraction_random": float(1 - after_random.mean() / before.mean()),
        }
    log("h-swap: distance to donor's scores", report)
    # measured: grey 0.93, glasses 0.77, hat 0.90, pose 0.96 of the gap closed (random: 0.02-0.07);
    # background 0.04
    closed = [a for a in SEMANTIC if report[a]["closed_fraction"] > 0.5]
    assert len(closed) >= 3, f"h-swap closed more than half the gap for only {closed}"
    assert all(report[a]["closed_fraction"] > 0.2 for a in SEMANTIC)
    assert all(report[a]["closed_fraction_random"] < 0.1 for a in SEMANTIC), report
    # and, as in the paper's Fig. 2a, the background is not swapped with h
    assert report["background_hue"]["closed_fraction"] < 0.2


def test_real_images_are_inverted_reconstructed_and_edited(world, supervised):
    """Claim 6: generator images (not model samples) -> DDIM inversion -> reconstruction -> edit."""
    model, clf = world["model"], world["clf"]
    dirs_h, _ = supervised
    images, _ = make_dataset(range(7_000_000, 7_000_016))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    report = reconstruction_report(model, x, num_inference_steps=STEPS)
    rec = report.reconstruction.images
    noise_psnr = float(
        psnr(x, reconstruct(model, _random_inversion(report.inversion), record_h=False).images).mean()
    )
    results = {
        "psnr": report.psnr.tolist(),
        "psnr_mean": report.mean_psnr,
        "psnr_from_random_x_T": noise_psnr,
    }
    rec_scores = score_images(clf, rec)
    for a in ("grey_hair", "hat"):
        c = clf.index(a)
        # row 0: the attribute's direction; rows 1..: random directions of the same per-step norm
        dirs = [dirs_h[a]] + [random_like(dirs_h[a], seed=50 + r) for r in range(N_RANDOM_CONTROL)]
        deltas = []
        for d in dirs:
            edited = reconstruct(model, report.inversion, edit=Edit(d, scales=1.0), record_h=False).images
            deltas.append(score_images(clf, edited)[:, c] - rec_scores[:, c])
        d, rnd = deltas[0], torch.stack(deltas[1:])
        results[a] = {
            "frac_moved": float((d > 0).float().mean()),
            "mean_delta": float(d.mean()),
            "random_abs_mean_delta": float(rnd.mean(1).abs().max()),
        }
    log("real images", results)
    # measured: 27.3 dB (9.0 from random x_T); grey hair moves 16/16, hat 14/16, 59x and 250x random
    assert report.mean_psnr > 22.0
    assert report.mean_psnr > noise_psnr + 10
    for a in ("grey_hair", "hat"):
        assert results[a]["frac_moved"] >= 0.8, a
        assert results[a]["mean_delta"] > 5 * results[a]["random_abs_mean_delta"], (a, results[a])
