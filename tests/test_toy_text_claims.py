"""h-space claims on the shipped text toy: directions found under the empty prompt, and beyond it.

As ``tests/test_toy_claims.py`` does for the unconditional toy: PCA directions and supervised
mean-difference directions (paper eq. 11) are found from h recorded under the empty prompt
(no guidance: both branches would see the same prompt), applied to held-out seeds with identical
noise, and compared with matched-norm random directions; the toy classifier reads the effect (logits
for binary factors). Then what a text model adds: the same directions applied under prompts that
do not name their attribute (transfer) and against a prompt that does; directions built from the
conditional against the unconditional branch's h; and the disentangling of the world's correlated
pair (paper Table I). Every test logs its numbers (``pytest -s``, lines starting ``[claim]``).
"""

from __future__ import annotations

import json

import pytest
import torch

from hspace.classifier import score_images
from hspace.directions import Direction, disentangle, random_like, supervised_direction
from hspace.grade import REFERENCE_MULTIPLE
from hspace.pca import PerTimestepPCA
from hspace.sampling import DEFAULT_RECORD_BRANCH, Edit, HSpaceSampler
from hspace.toy import load_toy_classifier, load_toy_text_model
from hspace.toy.captions import caption_seed
from hspace.toy.evaluate import confident_reads, edit_effects, with_step_norms
from hspace.toy.text_evaluate import DEFAULT_GUIDANCE
from pipeline.config import ModelConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("all_torch_threads")]

STEPS = 20  # DDPM steps (eta = 1)
N_TRAIN = 512  # annotated samples for PCA and supervised directions (as the unconditional toy)
N_EVAL = 32  # held-out seeds per PCA effect (claim 2 has SUPERVISED_SEEDS)
N_RANDOM = 4  # random draws per baseline
TRAIN_SEEDS = list(range(1_100_000, 1_100_000 + N_TRAIN))
EVAL_SEEDS = list(range(2_100_000, 2_100_000 + N_EVAL))
Q = 0.2  # top / bottom quantile of the mean difference
STRONG = ["grey_hair", "glasses", "hat"]
EMPTY = {"prompt": "", "guidance_scale": 1.0}


def log(title: str, payload: dict) -> None:
    print(f"\n[claim] {title}: {json.dumps(payload, default=float)}")


def known_failures(cases, measured: dict[str, float], unit: str) -> list:
    """Parametrize ``cases``, marking those in ``measured`` (the shipped weights miss the claim) xfail."""
    return [
        pytest.param(c, marks=pytest.mark.xfail(reason=f"measured {measured[c]:.3f} {unit}", strict=False))
        if c in measured
        else c
        for c in cases
    ]


@pytest.fixture(scope="module")
def toy():
    """The shipped text toy, the toy classifier and the DDPM sampler every test uses."""
    model, clf = load_toy_text_model(), load_toy_classifier()
    return {
        "model": model,
        "clf": clf,
        "sampler": HSpaceSampler(model, sampler="ddpm", num_inference_steps=STEPS),
    }


@pytest.fixture(scope="module")
def world(toy):
    """N_TRAIN annotated samples under the empty prompt, with their h."""
    traj = toy["sampler"].sample(TRAIN_SEEDS, **EMPTY)
    return {**toy, "traj": traj, "scores": score_images(toy["clf"], traj.images)}


def test_h_is_recorded_under_the_empty_prompt(world):
    traj = world["traj"]
    assert tuple(traj.h.shape) == (N_TRAIN, STEPS, 64, 8, 8)
    assert torch.isfinite(traj.h).all()


def test_pca_directions_move_attributes_far_more_than_random(world):
    """Top principal directions each move some attribute beyond 5x the random 95th percentile."""
    clf, sampler, traj = world["clf"], world["sampler"], world["traj"]
    pca = PerTimestepPCA(n_components=6, n_steps=STEPS, timesteps=sampler.timesteps)
    for i in range(0, N_TRAIN, 128):
        pca.partial_fit(traj.h[i : i + 128])
    k = 4
    norms = 2.0 * pca.explained_variance_[:, 0].sqrt().float()  # every edit: 2 sigma of component 0
    pcs = [with_step_norms(pca.direction(j, name=f"pc{j}"), norms) for j in range(k)]
    rnd = [
        with_step_norms(random_like(pcs[0], seed=300 + r, name=f"random{r}"), norms) for r in range(N_RANDOM)
    ]
    eff = edit_effects(sampler, clf, pcs + rnd, EVAL_SEEDS, [1.0], conditioning=EMPTY)
    mean = eff.mean()[:, 0].abs()  # [D, A]
    p95 = torch.quantile(mean[k:], 0.95, dim=0)
    ratio = (mean[:k] / p95.clamp_min(1e-6)).max(1)
    log("pca best attribute and ratio to random p95", {
        pcs[j].name: [clf.attributes[int(ratio.indices[j])], round(float(ratio.values[j]), 2)] for j in range(k)
    })  # fmt: skip
    strong = [j for j in range(k) if ratio.values[j] >= 5.0]
    assert len(strong) >= 3, f"only {strong} of the top {k} PCs beat 5x the random p95"


@pytest.fixture(scope="module")
def supervised(world) -> dict[str, Direction]:
    """Mean-difference directions (eq. 11) of the strong attributes, from h under the empty prompt."""
    clf, traj, scores = world["clf"], world["traj"], world["scores"]
    ts, fp = world["sampler"].timesteps, world["model"].fingerprint
    return {
        a: supervised_direction(traj.h, scores[:, clf.index(a)], Q, a, timesteps=ts, model_fingerprint=fp)
        for a in STRONG
    }


#: attributes whose supervised direction misses the 90% bar on the shipped weights (measured share)
SUPERVISED_NOT_YET: dict[str, float] = {}


SUPERVISED_SCALES = [1.0, 2.0]  # the mean difference (the claim) and twice it (the dose it takes)
#: held-out seeds of claim 2: a share near the 90% bar needs hundreds (standard error 1.3 points
#: at 512 seeds, 5.3 at 32)
SUPERVISED_SEEDS = list(range(2_600_000, 2_600_512))
SUPERVISED_RANDOM_SEEDS = SUPERVISED_SEEDS[:64]  # enough for the random baselines' mean effect


@pytest.fixture(scope="module")
def supervised_report(world, supervised) -> dict:
    """Per STRONG attribute and scale: the share of SUPERVISED_SEEDS moved toward the absent state,
    the mean move, and the largest |mean move| of two matched-norm random directions at the same
    scale (on SUPERVISED_RANDOM_SEEDS)."""
    clf, sampler = world["clf"], world["sampler"]
    dirs = [supervised[a] for a in STRONG]
    eff = edit_effects(
        sampler, clf, dirs, SUPERVISED_SEEDS, SUPERVISED_SCALES, toward_absent=STRONG, conditioning=EMPTY
    )
    rnd_dirs = [random_like(d, seed=17 + r, name=f"{d.name}_random{r}") for d in dirs for r in range(2)]
    rnd = edit_effects(sampler, clf, rnd_dirs, SUPERVISED_RANDOM_SEEDS, SUPERVISED_SCALES, conditioning=EMPTY)
    report = {}
    for i, a in enumerate(STRONG):
        c = clf.index(a)
        for j, scale in enumerate(SUPERVISED_SCALES):
            d = eff.deltas[i, j, :, c] * eff.signs[i]
            rnd_mean = rnd.deltas[2 * i : 2 * i + 2, j, :, c].mean(1).abs().max()
            report.setdefault(a, {})[f"{scale:g}x"] = {
                "frac_intended": float((d > 0).float().mean()),
                "n_seeds": len(d),
                "mean": float(d.mean()),
                "random_abs_mean": float(rnd_mean),
                "ratio": float(d.mean() / rnd_mean.clamp_min(1e-6)),
            }
    log("supervised (h, empty prompt; scale 1x = the mean difference)", report)
    return report


@pytest.mark.parametrize("attribute", known_failures(STRONG, SUPERVISED_NOT_YET, "of seeds"))
def test_supervised_directions_move_their_attribute_on_90_percent_of_seeds(supervised_report, attribute):
    """Mean-difference directions move their own attribute toward the state a seed lacks, >= 5x random."""
    r = supervised_report[attribute]["1x"]
    assert r["ratio"] >= 5, (attribute, r)
    assert r["frac_intended"] >= 0.9, (attribute, r)


@pytest.mark.parametrize("attribute", STRONG)
def test_twice_the_mean_difference_moves_at_least_as_many_seeds(supervised_report, attribute):
    """The dose: at twice its norm a direction moves no fewer seeds, still >= 5x random at that norm."""
    once, twice = supervised_report[attribute]["1x"], supervised_report[attribute]["2x"]
    assert twice["frac_intended"] >= once["frac_intended"], (attribute, once, twice)
    assert twice["ratio"] >= 5, (attribute, twice)


SWAP_A = list(range(2_800_000, 2_800_032))  # rendered with the h of SWAP_B's seeds
SWAP_B = list(range(2_900_000, 2_900_032))
SWAP_FOLLOWS_FLOOR = 0.9  # claimed: the swapped render shows the donor's state on 90% of pairs


def test_h_swap_under_the_empty_prompt_carries_the_strong_attributes(world):
    """Rendering seed a with h_{T:1} of seed b (paper Fig. 2a) gives b's state of every STRONG
    attribute on at least SWAP_FOLLOWS_FLOOR of the pairs where a and b differ in it; the control,
    a's h plus a matched-norm random change (the swap's own per-step norm |h_b - h_a|), does so on
    at least 50 points fewer. So h carries these attributes: an edit that misses one on a seed is
    one that is too small there."""
    clf, sampler = world["clf"], world["sampler"]
    ta, tb = sampler.sample(SWAP_A, **EMPTY), sampler.sample(SWAP_B, **EMPTY)
    sa, sb = score_images(clf, ta.images), score_images(clf, tb.images)
    ss = score_images(clf, sampler.h_swap(SWAP_A, SWAP_B, **EMPTY).images)
    swaps = [Direction(vector=(tb.h[i] - ta.h[i]).float(), name=f"swap{i}") for i in range(len(SWAP_A))]
    rnd = [random_like(d, seed=900 + i, name=f"swap{i}_random") for i, d in enumerate(swaps)]
    edit = Edit(rnd, scales=torch.eye(len(rnd)))
    sr = score_images(clf, sampler.sample(SWAP_A, edit=edit, record_h=False, **EMPTY).images)
    report = {}
    for a in STRONG:
        c = clf.index(a)
        differ = (sa[:, c] > 0) != (sb[:, c] > 0)
        report[a] = {
            "pairs_that_differ": int(differ.sum()),
            "swap_follows_donor": float(((ss[:, c] > 0) == (sb[:, c] > 0))[differ].float().mean()),
            "random_follows_donor": float(((sr[:, c] > 0) == (sb[:, c] > 0))[differ].float().mean()),
        }
    log("h-swap under the empty prompt: share of differing pairs that take the donor's state", report)
    for a, r in report.items():
        assert r["pairs_that_differ"] >= 5, (a, r)
        assert r["swap_follows_donor"] >= SWAP_FOLLOWS_FLOOR, (a, r)
        assert r["swap_follows_donor"] - r["random_follows_donor"] >= 0.5, (a, r)


# ---------------------------------------------------------------------------------------------
# beyond the empty prompt: every render below is a paired difference (same seed, same noise)
HELD_OUT = list(range(2_300_000, 2_300_016))  # held-out seeds of the transfer and Table I renders
#: prompts that name none of STRONG (each followed on every sample at the default guidance:
#: tests/test_toy_text_prompts.py)
TRANSFER_PROMPTS = ["smiling", "dark skin", "eyes closed"]
TRANSFER_SHARE_FLOOR = 0.5  # claimed: under such a prompt a direction keeps half its effect or more


def scores_of(
    sampler: HSpaceSampler,
    clf,
    seeds: list[int],
    conditioning: dict,
    directions: list[Direction] | None = None,
    scales: torch.Tensor | None = None,
    units: str = "raw",
    branches: str = "both",
) -> torch.Tensor:
    """Classifier scores of ``seeds`` unedited [B, A], or edited [B, K, A] in one sampler call.

    ``scales`` [B, K, D]: edit k of seed b adds ``sum_d scales[b, k, d] * v_d`` (``units``) to h
    in ``branches`` (default both guidance branches, the library's default edit). Per-seed
    prompts follow their seed.
    """
    if directions is None:
        return score_images(clf, sampler.sample(seeds, record_h=False, **conditioning).images)
    b, k, d = scales.shape
    cond = {
        key: [x for x in v for _ in range(k)] if isinstance(v, list) else v for key, v in conditioning.items()
    }
    rows = [s for s in seeds for _ in range(k)]
    edit = Edit(directions, scales=scales.reshape(b * k, d), units=units, branches=branches)
    return score_images(clf, sampler.sample(rows, edit=edit, record_h=False, **cond).images).view(b, k, -1)


def toward_absent(base: torch.Tensor, clf, attributes: list[str]) -> torch.Tensor:
    """[B, len(attributes)]: -1 where the unedited render shows the binary attribute (logit > 0), else +1."""
    cols = [clf.index(a) for a in attributes]
    return torch.where(base[:, cols] > 0, -1.0, 1.0)


def one_edit_per_row(signs: torch.Tensor) -> torch.Tensor:
    """Scales [B, D, D] for D directions: edit k of seed b is direction k alone, at ``signs[b, k]``."""
    return torch.diag_embed(signs)


@pytest.fixture(scope="module")
def transfer(world, supervised):
    """The empty-prompt directions on HELD_OUT under the empty prompt and under each TRANSFER_PROMPT.

    Per condition: each STRONG direction toward the state the seed lacks (scale +-1), one
    matched-norm random direction per STRONG direction (+1) and, under the empty prompt, the two
    Table I projections. ``effects`` [B, K, A]: the change of every score, multiplied by the row's
    sign (a positive own effect moves the attribute the intended way; a cross effect is then per
    unit of the intended move).
    """
    clf, sampler = world["clf"], world["sampler"]
    own = [supervised[a] for a in STRONG]
    rnd = [random_like(d, seed=400 + i, name=f"{d.name}_random") for i, d in enumerate(own)]
    grey, glasses = supervised["grey_hair"], supervised["glasses"]
    projected = [
        with_step_norms(disentangle(grey, [glasses]), grey.norm_per_step(), "grey_hair_perp_glasses"),
        with_step_norms(disentangle(glasses, [grey]), glasses.norm_per_step(), "glasses_perp_grey_hair"),
    ]
    out = {}
    for prompt in ["", *TRANSFER_PROMPTS]:
        cond = EMPTY if prompt == "" else {"prompt": prompt, "guidance_scale": DEFAULT_GUIDANCE}
        base = scores_of(sampler, clf, HELD_OUT, cond)
        signs = toward_absent(base, clf, STRONG)
        parts = [signs, torch.ones_like(signs)]
        dirs = own + rnd
        if prompt == "":
            parts.append(signs[:, [STRONG.index("grey_hair"), STRONG.index("glasses")]])
            dirs = dirs + projected
        row_signs = torch.cat(parts, 1)
        deltas = scores_of(sampler, clf, HELD_OUT, cond, dirs, one_edit_per_row(row_signs)) - base[:, None]
        out[prompt] = {
            "names": [d.name for d in dirs],
            "base": base,
            "effects": deltas * row_signs[:, :, None],
        }
    out["norms"] = {d.name: float(d.norm_per_step().mean()) for d in own + projected}
    return out


def transfer_numbers(transfer, clf, prompt: str) -> dict:
    """Per STRONG attribute: own effect, random |mean| (max over the three draws), ratio, share of empty."""
    report = {}
    for i, a in enumerate(STRONG):
        c = clf.index(a)
        eff = transfer[prompt]["effects"]
        own = float(eff[:, i, c].mean())
        rnd = float(eff[:, len(STRONG) :, c][:, : len(STRONG)].mean(0).abs().max())
        empty = float(transfer[""]["effects"][:, i, c].mean())
        report[a] = {
            "effect": round(own, 3),
            "frac_intended": round(float((eff[:, i, c] > 0).float().mean()), 3),
            "random_abs_mean": round(rnd, 3),
            "ratio_to_random": round(own / max(rnd, 1e-6), 1),
            "effect_empty_prompt": round(empty, 3),
            "share_of_empty": round(own / empty, 3),
        }
    return report


@pytest.mark.parametrize("prompt", TRANSFER_PROMPTS)
def test_empty_prompt_directions_transfer_to_prompts_that_do_not_name_them(world, transfer, prompt):
    """Claim 3: under a prompt that names none of them, the empty-prompt directions keep at least
    TRANSFER_SHARE_FLOOR of their empty-prompt effect (same seeds) and stay >= 5x random."""
    clf = world["clf"]
    report = transfer_numbers(transfer, clf, prompt)
    log(f"transfer to {prompt!r} (guidance {DEFAULT_GUIDANCE}, n={len(HELD_OUT)})", report)
    for a, r in report.items():
        assert r["share_of_empty"] >= TRANSFER_SHARE_FLOOR, (a, r)
        assert r["ratio_to_random"] >= 5, (a, r)


def test_projection_cuts_the_correlated_pairs_cross_effect_and_keeps_the_own(world, transfer):
    """Claim 6 (paper Table I): the grey-hair direction also moves glasses; projected orthogonal to
    the glasses direction (eq. 12) and renormalised to its per-step norm, it moves glasses less and
    still moves grey hair >= 5x random. Empty prompt, DDPM, HELD_OUT, toward the absent state."""
    clf = world["clf"]
    empty = transfer[""]
    names, eff = empty["names"], empty["effects"].mean(0)  # [K, A]
    rows = ["grey_hair", "grey_hair_perp_glasses", "glasses", "glasses_perp_grey_hair"]
    table = {r: {a: round(float(eff[names.index(r), clf.index(a)]), 3) for a in clf.attributes} for r in rows}
    log("Table I (empty prompt; mean signed effect per unit of the intended move)", table)
    cg, ca = clf.index("glasses"), clf.index("grey_hair")
    rnd_grey = float(eff[len(STRONG) : 2 * len(STRONG), ca].abs().max())
    summary = {
        "grey_raw": {"own": table["grey_hair"]["grey_hair"], "cross_glasses": table["grey_hair"]["glasses"]},
        "grey_projected": {
            "own": table["grey_hair_perp_glasses"]["grey_hair"],
            "cross_glasses": table["grey_hair_perp_glasses"]["glasses"],
        },
        "glasses_raw": {"own": table["glasses"]["glasses"], "cross_grey": table["glasses"]["grey_hair"]},
        "glasses_projected": {
            "own": table["glasses_perp_grey_hair"]["glasses"],
            "cross_grey": table["glasses_perp_grey_hair"]["grey_hair"],
        },
        "random_abs_mean_grey": round(rnd_grey, 3),
        "norms": transfer["norms"],
    }
    raw_cross = abs(float(eff[names.index("grey_hair"), cg]))
    proj_cross = abs(float(eff[names.index("grey_hair_perp_glasses"), cg]))
    proj_own = float(eff[names.index("grey_hair_perp_glasses"), ca])
    summary["grey_cross_cut"] = round(1 - proj_cross / max(raw_cross, 1e-6), 3)
    summary["grey_own_kept"] = round(proj_own / float(eff[names.index("grey_hair"), ca]), 3)
    summary["grey_projected_ratio_to_random"] = round(proj_own / max(rnd_grey, 1e-6), 1)
    log("Table I summary", summary)
    assert raw_cross > 0 and proj_cross < raw_cross, summary
    assert proj_own >= 5 * rnd_grey, summary


# h against the prompt: prompt -> (attribute, the prompt that says the opposite, guidances)
AGAINST = {
    "hat": ("hat", "no hat", [1.0, 4.0, DEFAULT_GUIDANCE]),
    "glasses": ("glasses", "no glasses", [1.0, 4.0, DEFAULT_GUIDANCE]),
}
# the edit in both guidance branches (the library's default) and, at the default guidance, in
# the conditional branch only
AGAINST_BRANCHES = ("both", "cond")
AGAINST_SCALES = [1.0, 2.0, 4.0]  # sigma of the direction (its data spread under the empty prompt)
AGAINST_POOL = list(range(2_400_000, 2_400_024))  # rendered under the prompt; edited where it holds
AGAINST_REFERENCE = AGAINST_POOL[:16]  # rendered under the opposite prompt, for its mean logit
AGAINST_REMOVED_FLOOR = 0.5  # claimed: at 4 sigma and the default guidance, removed on half or more


#: prompts whose attribute the edit does not remove at 4 sigma on the shipped weights (measured share removed)
AGAINST_NOT_YET = {"glasses": 0.0}


def opposite_h_swap(sampler, clf, seeds: list[int], prompt: str, opposite: str, g: float, c: int) -> dict:
    """``seeds`` under ``prompt`` with h_{T:1} (both branches) of the same seeds under ``opposite``.

    Whether the h of a sample that lacks the attribute removes it under the prompt that names it:
    where it does not, the prompt sets the attribute through what bypasses h (the up-blocks'
    cross-attention, the pooled caption), and no h edit is expected to win.
    """
    donor = sampler.sample(seeds, prompt=opposite, guidance_scale=g, record_branch="both")
    swapped = sampler.sample(seeds, record_h=False, prompt=prompt, guidance_scale=g, h_replace=donor)
    donor_scores = score_images(clf, donor.images)[:, c]
    scores = score_images(clf, swapped.images)[:, c]
    return {
        "donor_absent": round(float((donor_scores < 0).float().mean()), 3),
        "removed": round(float((scores < 0).float().mean()), 3),
        "mean_logit": round(float(scores.mean()), 3),
    }


@pytest.fixture(scope="module")
def against_table(world, supervised) -> dict:
    """Claim 4's measurements: minus the empty-prompt direction of the prompt's own attribute.

    Per (prompt, guidance, branches the edit enters), on the pool samples whose unedited render
    shows the attribute: the fraction on which it is gone (logit < 0), the fraction the classifier
    reads confidently (``confident_reads``: a large edit can break the face) and the mean logit change
    as a share of the gap between those samples' mean logit and the opposite prompt's mean logit
    (1 = as far as the prompt "no hat" goes), at 1, 2 and 4 sigma.
    """
    clf, sampler = world["clf"], world["sampler"]
    table = {}
    for prompt, (attr, opposite, guidances) in AGAINST.items():
        c, d = clf.index(attr), supervised[attr]
        for g in guidances:
            base = scores_of(sampler, clf, AGAINST_POOL, {"prompt": prompt, "guidance_scale": g})[:, c]
            ref = scores_of(sampler, clf, AGAINST_REFERENCE, {"prompt": opposite, "guidance_scale": g})[:, c]
            present = [s for s, v in zip(AGAINST_POOL, base.tolist(), strict=True) if v > 0]
            row = {
                "n_present": len(present),
                "n_pool": len(AGAINST_POOL),
                "opposite_mean_logit": round(float(ref.mean()), 3),
            }
            for branches in AGAINST_BRANCHES if g == DEFAULT_GUIDANCE else AGAINST_BRANCHES[:1]:
                branch_row = dict(row)
                if len(present) >= 3:
                    kept = base[base > 0]
                    scales = -torch.tensor(AGAINST_SCALES).view(1, -1, 1).expand(len(present), -1, 1)
                    cond = {"prompt": prompt, "guidance_scale": g}
                    edited_all = scores_of(
                        sampler, clf, present, cond, [d], scales, units="sigma", branches=branches
                    )
                    edited = edited_all[:, :, c]
                    gap = float(kept.mean() - ref.mean())
                    branch_row["present_mean_logit"] = round(float(kept.mean()), 3)
                    for j, s in enumerate(AGAINST_SCALES):
                        change = float((edited[:, j] - kept).mean())
                        branch_row[f"{s:g}sigma"] = {
                            "removed": round(float((edited[:, j] < 0).float().mean()), 3),
                            "confident": round(
                                float(confident_reads(edited_all[:, j], clf).float().mean()), 3
                            ),
                            "logit_change": round(change, 3),
                            "share_of_gap": round(-change / gap, 3) if gap > 0 else None,
                        }
                table[(prompt, g, branches)] = branch_row
            if g == DEFAULT_GUIDANCE and len(present) >= 3:
                table[(prompt, g, "both")]["h_swap"] = opposite_h_swap(
                    sampler, clf, present, prompt, opposite, g, c
                )
    log(
        f"against the prompt (minus the direction, n={len(AGAINST_POOL)} pool seeds)",
        {f"{p!r} guidance {g:g} edit in {b}": row for (p, g, b), row in table.items()},
    )
    return table


@pytest.mark.parametrize("prompt", known_failures(AGAINST, AGAINST_NOT_YET, "removed"))
def test_h_edit_against_the_prompt_goes_further_with_scale(against_table, prompt):
    """Claim 4. Claimed: with the default edit (both branches) the share grows with the scale at
    every guidance, and at 4 sigma and the default guidance the attribute is removed on at least
    AGAINST_REMOVED_FLOOR of the samples; the edit in the conditional branch alone removes it on at
    least as many samples at every scale (guidance multiplies that branch's change)."""
    rows = {(g, b): row for (p, g, b), row in against_table.items() if p == prompt}
    for key, row in rows.items():
        assert row["n_present"] >= 3, (key, row)
        shares = [row[f"{s:g}sigma"]["share_of_gap"] for s in AGAINST_SCALES]
        assert all(x is not None for x in shares), (key, row)
        if key[1] == "both":
            assert shares == sorted(shares), (key, row)
    both, cond = rows[(DEFAULT_GUIDANCE, "both")], rows[(DEFAULT_GUIDANCE, "cond")]
    assert both[f"{AGAINST_SCALES[-1]:g}sigma"]["removed"] >= AGAINST_REMOVED_FLOOR, both
    for s in AGAINST_SCALES:
        assert cond[f"{s:g}sigma"]["removed"] >= both[f"{s:g}sigma"]["removed"], (s, cond, both)


def test_without_guidance_the_edit_against_the_prompt_goes_further_with_scale(against_table):
    """Claim 4 at guidance 1 (the conditional branch alone, nothing extrapolated): for every
    prompt, glasses included, the default edit's share of the gap grows with the scale and at
    4 sigma it removes the attribute on some samples. What guidance adds is measured above."""
    report = {}
    for prompt in AGAINST:
        row = against_table[(prompt, 1.0, "both")]
        shares = [row[f"{s:g}sigma"]["share_of_gap"] for s in AGAINST_SCALES]
        report[prompt] = {"shares": shares, "removed_4sigma": row[f"{AGAINST_SCALES[-1]:g}sigma"]["removed"]}
        assert shares == sorted(shares) and shares[-1] > 0, (prompt, row)
        assert report[prompt]["removed_4sigma"] > 0, (prompt, row)
    log("against the prompt at guidance 1", report)


def test_h_edit_against_the_prompt_wins_where_the_opposite_prompts_h_does(against_table):
    """Claim 4, by what h carries under the prompt: the seeds' own h from the opposite prompt
    (``h_swap`` above, both branches) either removes the attribute (on >= 90%: h carries it there,
    and the default edit at 4 sigma removes it on at least AGAINST_REMOVED_FLOOR) or keeps it
    (removed on < 50%: the prompt sets it past h, and no default edit of the table removes it on
    more than half). The default edit enters the branches the swap replaces; the edit in the
    conditional branch alone is multiplied by the guidance scale, past any h a sample has, and is
    not covered (its largest removal is logged)."""
    verdicts = {}
    for prompt in AGAINST:
        rows = {b: row for (p, g, b), row in against_table.items() if p == prompt and g == DEFAULT_GUIDANCE}
        swap = rows["both"]["h_swap"]
        assert swap["donor_absent"] >= 0.9, (prompt, swap)  # the donors do lack the attribute
        best = max(rows["both"][f"{s:g}sigma"]["removed"] for s in AGAINST_SCALES)
        edit = rows["both"][f"{AGAINST_SCALES[-1]:g}sigma"]["removed"]
        cond_best = max(rows["cond"][f"{s:g}sigma"]["removed"] for s in AGAINST_SCALES)
        verdicts[prompt] = {
            "swap_removed": swap["removed"],
            "edit_removed_4sigma": edit,
            "best_default_edit": best,
            "best_cond_only_edit": cond_best,
        }
        if swap["removed"] >= 0.9:
            assert edit >= AGAINST_REMOVED_FLOOR, (prompt, verdicts[prompt])
        else:
            assert swap["removed"] < 0.5, (prompt, verdicts[prompt])  # neither way: the claim is void
            assert best <= 0.5, (prompt, verdicts[prompt])
    log("against the prompt: the opposite prompt's h against the edits", verdicts)


BRANCH_TRAIN = list(range(1_200_000, 1_200_128))  # random captions, guidance 7.5, both branches
BRANCH_EVAL = list(range(2_500_000, 2_500_016))  # held-out seeds under their own random captions


BRANCH_MARGIN = 1.1  # one branch beats the other on a count only when better by more than 10%


def branch_verdict(report: dict) -> str:
    """'cond' or 'uncond' when one branch's directions move their attribute more (in random bands)
    on a majority of the attributes *and* leak less on a majority of those whose leakage both
    branches have (an attribute without a reference has none), each by more than BRANCH_MARGIN;
    else 'mixed'."""
    wins = {"cond": [0, 0], "uncond": [0, 0]}
    leaks = [
        r for r in report.values() if r["cond"]["leakage"] is not None and r["uncond"]["leakage"] is not None
    ]
    for me, other in (("cond", "uncond"), ("uncond", "cond")):
        wins[me][0] = sum(
            r[me]["multiple"] > BRANCH_MARGIN * max(r[other]["multiple"], 0) for r in report.values()
        )
        wins[me][1] = sum(r[me]["leakage"] * BRANCH_MARGIN < r[other]["leakage"] for r in leaks)
    for br, (more, less) in wins.items():
        if more * 2 > len(report) and less * 2 > len(leaks):
            return br
    return "mixed"


def test_the_default_record_branch_is_the_one_whose_directions_measure_better(toy):
    """Claim 5: supervised directions from the conditional against the unconditional branch's h.

    Both branches' h of the same BRANCH_TRAIN samples (random captions, guidance 7.5); each
    direction is applied with the default edit (both branches, scale +-1 toward the absent state)
    to BRANCH_EVAL under their own random captions. Per direction: own effect in units of the
    attribute's random band (the largest |mean effect| of the six matched-norm random directions,
    one per direction), and
    leakage as ``hspace.grade`` defines it (the largest |effect on b| over the other attributes b,
    divided by the best own effect on b of any direction built for b). The sampler's and the
    pipeline's default must be the branch that wins on both counts; 'mixed' keeps 'uncond'.
    """
    clf, sampler, model = toy["clf"], toy["sampler"], toy["model"]
    ts, fp = sampler.timesteps, model.fingerprint
    captions = [caption_seed(s)[0] for s in BRANCH_TRAIN]
    traj = sampler.sample(
        BRANCH_TRAIN, prompt=captions, guidance_scale=DEFAULT_GUIDANCE, record_branch="both"
    )
    scores = score_images(clf, traj.images)
    branches = {"cond": traj.h, "uncond": traj.h_uncond}
    dirs, rnd = [], []
    for br, h in branches.items():
        for a in STRONG:
            d = supervised_direction(
                h, scores[:, clf.index(a)], Q, f"{a}_{br}", timesteps=ts, model_fingerprint=fp
            )
            dirs.append(d)
            rnd.append(random_like(d, seed=500 + len(rnd), name=f"{a}_{br}_random"))
    del traj, branches
    cond = {"prompt": [caption_seed(s)[0] for s in BRANCH_EVAL], "guidance_scale": DEFAULT_GUIDANCE}
    base = scores_of(sampler, clf, BRANCH_EVAL, cond)
    signs = toward_absent(base, clf, STRONG).repeat(1, 2)  # [B, 6]: cond dirs, then uncond dirs
    row_signs = torch.cat([signs, torch.ones_like(signs)], 1)
    deltas = (
        scores_of(sampler, clf, BRANCH_EVAL, cond, dirs + rnd, one_edit_per_row(row_signs)) - base[:, None]
    )
    eff = (deltas * row_signs[:, :, None]).mean(0)  # [12, A]
    k = len(STRONG)
    cols = [clf.index(a) for a in STRONG]
    log(
        "record branch effect matrix (rows: directions then their random draws; columns: STRONG)",
        {d.name: [round(float(eff[r, c]), 3) for c in cols] for r, d in enumerate(dirs + rnd)},
    )
    own = {
        (br, a): float(eff[j * k + i, cols[i]])
        for j, br in enumerate(("cond", "uncond"))
        for i, a in enumerate(STRONG)
    }
    # one random band per attribute, over all six draws: the two branches' directions have almost
    # the same per-step norms, and three draws per branch alone give bands that differ by noise
    band = {a: float(eff[2 * k :, cols[i]].abs().max()) for i, a in enumerate(STRONG)}
    # hspace.grade's reference: the best own effect on b of any direction built for b, counted only
    # at REFERENCE_MULTIPLE times b's random band or more
    reference = {
        a: max(own[("cond", a)], own[("uncond", a)])
        for a in STRONG
        if max(own[("cond", a)], own[("uncond", a)]) >= REFERENCE_MULTIPLE * band[a]
    }
    report = {}
    for i, a in enumerate(STRONG):
        report[a] = {}
        for j, br in enumerate(("cond", "uncond")):
            row = eff[j * k + i]
            shares = [
                (abs(float(row[cols[m]])) / reference[b], b)
                for m, b in enumerate(STRONG)
                if b != a and b in reference
            ]
            leak, into = max(shares) if shares else (None, None)
            report[a][br] = {
                "effect": round(own[(br, a)], 3),
                "random_band": round(band[a], 3),
                "multiple": round(own[(br, a)] / max(band[a], 1e-6), 1),
                "leakage": None if leak is None else round(leak, 3),
                "leaks_into": into,
                "norm": round(float(dirs[j * k + i].norm_per_step().mean()), 3),
            }
        cosine = torch.nn.functional.cosine_similarity(
            dirs[i].vector.flatten(1), dirs[k + i].vector.flatten(1), dim=1
        )
        report[a]["cosine_cond_uncond"] = round(float(cosine.mean()), 4)
    verdict = branch_verdict(report)
    log(
        f"record branch (guidance {DEFAULT_GUIDANCE}, n_train={len(BRANCH_TRAIN)}, n_eval={len(BRANCH_EVAL)})",
        report,
    )
    log("record branch verdict", {"verdict": verdict, "default": DEFAULT_RECORD_BRANCH})
    expected = "cond" if verdict == "cond" else "uncond"
    assert DEFAULT_RECORD_BRANCH == expected, (verdict, report)
    assert ModelConfig.model_fields["record_branch"].default == DEFAULT_RECORD_BRANCH
