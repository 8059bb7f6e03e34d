"""The toy world is deterministic, has the designed correlation, and the shipped classifier reads it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hspace.toy import load_toy_classifier
from hspace.toy.classifier import AttributeClassifier, evaluate_classifier
from hspace.toy.world import (
    FACTORS,
    GLASSES_GIVEN_DARK,
    GLASSES_GIVEN_GREY,
    make_dataset,
    render_face,
    render_seed,
    sample_factors,
)


def test_faces_are_a_deterministic_function_of_the_seed():
    a, fa = render_seed(123)
    b, fb = render_seed(123)
    c, _ = render_seed(124)
    assert fa == fb
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8


def test_64px_rendering_is_supported_and_other_sizes_are_refused():
    assert np.asarray(render_face(sample_factors(0), size=64)).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="size must be 32 or 64"):
        render_face(sample_factors(0), size=48)


def test_glasses_are_correlated_with_grey_hair_and_other_factors_are_not():
    _, labels = make_dataset(range(4000))
    grey = labels[:, FACTORS.index("grey_hair")] == 1
    glasses = labels[:, FACTORS.index("glasses")]
    # binomial standard error at n ~ 2000 is ~0.01; 0.04 is four of them
    assert abs(glasses[grey].mean() - GLASSES_GIVEN_GREY) < 0.04
    assert abs(glasses[~grey].mean() - GLASSES_GIVEN_DARK) < 0.04
    hat = labels[:, FACTORS.index("hat")]
    assert abs(hat[grey].mean() - hat[~grey].mean()) < 0.05


def test_every_factor_changes_the_image():
    base = sample_factors(5)
    img = np.asarray(render_face(base), dtype=np.int32)
    for name in FACTORS:
        value = getattr(base, name)
        new = (1 - value) if isinstance(value, int) else (-value if name != "smile" else 1 - value)
        changed = np.asarray(render_face(base.__class__(**{**base.__dict__, name: new})), dtype=np.int32)
        assert np.abs(changed - img).sum() > 0, name


def test_shipped_classifier_reads_fresh_generator_images():
    clf = load_toy_classifier()
    images, labels = make_dataset(range(50_000_000, 50_000_512))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    metrics = evaluate_classifier(clf, x, torch.from_numpy(labels))
    print(metrics)
    for name, value in metrics.items():
        if name.endswith("_accuracy"):
            assert value >= 0.98, (name, value)  # measured 1.000 on 2000 held-out images
        else:
            assert value <= 0.06, (name, value)  # measured MAE 0.011-0.029 (factor range 1-2)


def test_classifier_round_trips_through_safetensors(tmp_path):
    clf = load_toy_classifier()
    clf.save_pretrained(tmp_path)
    again = AttributeClassifier.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(clf(x), again(x))
    with pytest.raises(FileNotFoundError, match="no classifier"):
        AttributeClassifier.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        clf(torch.rand(3, 32, 32))


def test_face_regions_cover_the_drawn_parts_and_scale_with_the_image():
    from hspace.toy.world import FACE_REGIONS, FaceFactors, region_mask, render_face

    centred = dict(pose=0.0, face_width=0.0, skin_tone=0.0, background_hue=0.0, smile=1.0, hat=0, grey_hair=0)
    open_eyes = np.asarray(render_face(FaceFactors(**centred, eyes_open=1, glasses=0)), dtype=np.float32)
    shut_eyes = np.asarray(render_face(FaceFactors(**centred, eyes_open=0, glasses=0)), dtype=np.float32)
    change = np.abs(open_eyes - shut_eyes).sum(-1)
    eyes = region_mask("eyes")
    assert eyes.mean() == pytest.approx(0.109, abs=0.001)
    assert (change * eyes).sum() / change.sum() > 0.95  # opening the eyes changes pixels inside the box
    assert region_mask("mouth", 64).sum() == 4 * region_mask("mouth").sum()
    assert set(FACE_REGIONS) == {"mouth", "eyes"}
    with pytest.raises(ValueError, match="unknown face region"):
        region_mask("nose")


def test_background_colour_reads_the_world_constants_from_generator_images():
    from hspace.toy.evaluate import background_colour

    images, _ = make_dataset(range(64))
    sv = background_colour(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    # the world paints every background with HSV saturation 0.45 and value 0.85
    assert torch.allclose(sv[:, 0], torch.full((64,), 0.45), atol=0.02)
    assert torch.allclose(sv[:, 1], torch.full((64,), 0.85), atol=0.02)
    grey = torch.full((2, 3, 32, 32), 0.5)
    assert torch.allclose(background_colour(grey), torch.tensor([[0.0, 0.5], [0.0, 0.5]]))


def test_sample_quality_reads_the_models_samples_of_the_given_seeds():
    from hspace.sampling import HSpaceSampler
    from hspace.toy import load_toy_model
    from hspace.toy.evaluate import sample_quality

    q = sample_quality(
        HSpaceSampler(load_toy_model(), num_inference_steps=5), load_toy_classifier(), range(4)
    )
    assert q["n"] == 4 and set(q["frequencies"]) == {"eyes_open", "glasses", "hat", "grey_hair"}
    assert 0.0 <= q["confident_fraction"] <= 1.0
    assert set(q["background"]) == {"saturation", "value"}


def test_a_confident_read_needs_every_binary_logit_past_the_margin():
    from hspace.toy.evaluate import confident_reads

    clf = load_toy_classifier()
    binary = [i for i, b in enumerate(clf.binary) if b]
    continuous = [i for i, b in enumerate(clf.binary) if not b]
    scores = torch.full((3, 2, len(clf.attributes)), 5.0)
    scores[0, 1, binary[-1]] = -1.9  # one binary factor within the margin: not a confident read
    scores[1, 0, binary[0]] = -2.0  # exactly at the margin counts, whatever the sign
    scores[2, :, continuous[0]] = 0.0  # continuous factors (regressed values) are not judged
    reads = confident_reads(scores, clf)
    assert reads.shape == (3, 2)
    assert reads.tolist() == [[True, False], [True, True], [True, True]]
    assert not confident_reads(scores, clf, margin=6.0).any()
