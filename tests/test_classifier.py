"""hspace.classifier: the attribute-classifier contract, its safetensors layout and batched scoring."""

from __future__ import annotations

import pytest
import torch

from hspace.classifier import (
    BaseAttributeClassifier,
    classifier_fingerprint,
    load_classifier,
    resolve_classifier_dir,
    score_images,
)
from hspace.toy import TOY_CLASSIFIER_DIR, resolve_classifier_source
from hspace.toy.classifier import AttributeClassifier


@pytest.fixture()
def tiny(tmp_path):
    torch.manual_seed(0)
    clf = AttributeClassifier(["round", "size"], [True, False], image_size=16, width=8).eval()
    clf.save_pretrained(tmp_path / "clf")
    return clf, tmp_path / "clf"


def test_saved_classifier_loads_as_the_same_function_and_is_fingerprinted(tiny):
    clf, path = tiny
    assert isinstance(clf, BaseAttributeClassifier)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    again = load_classifier(str(path))
    assert again.attributes == ["round", "size"] and again.binary == [True, False] and again.width == 8
    x = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(again(x), clf(x))
    before = classifier_fingerprint(str(path))
    AttributeClassifier(["round", "size"], [True, False], image_size=16, width=8).save_pretrained(path)
    assert classifier_fingerprint(str(path)) != before
    assert resolve_classifier_dir(resolve_classifier_source("toy")) == TOY_CLASSIFIER_DIR
    assert resolve_classifier_source(str(path)) == str(path)  # a directory or URL is passed on as given
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_classifier_dir(str(path / "missing"))
    with pytest.raises(KeyError, match="unknown attribute 'smile'"):
        clf.index("smile")


def test_score_images_batches_selects_columns_keeps_leading_dims_and_resizes(tiny):
    clf, _ = tiny
    x = torch.rand(2, 3, 3, 16, 16)
    with torch.no_grad():
        want = clf(x.reshape(6, 3, 16, 16)).reshape(2, 3, 2)
    got = score_images(clf, x, batch_size=4)
    assert got.shape == (2, 3, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(score_images(clf, x, [1], batch_size=5), want[..., 1:])
    big = torch.nn.functional.interpolate(x.reshape(6, 3, 16, 16), scale_factor=2, mode="nearest")
    assert score_images(clf, big).shape == (6, 2)  # 32 px images are resized to the classifier's 16
    assert score_images(clf, torch.zeros(0, 3, 16, 16)).shape == (0, 2)
    with pytest.raises(ValueError, match=r"images must be \[B, 3, H, W\]"):
        clf(torch.zeros(1, 1, 16, 16))
