"""Catalog manifests of any model kind: what the model is (kind, capture point, shapes) and what its
samples were conditioned on, recorded from ``HSpaceModel.describe()``; manifests written before
these fields existed still read."""

from __future__ import annotations

import json

import pytest
import torch

from hspace import catalog as hcat
from hspace.catalog import ManifestError
from hspace.directions import Direction

DESCRIPTION = {
    "kind": "text",
    "pipeline_class": "StableDiffusionPipeline",
    "capture": "mid_block",
    "h_shape": [32, 4, 4],
    "latent_shape": [4, 8, 8],
    "image_shape": [3, 16, 16],
    "conditioning": "text",
    "default_guidance": 7.5,
}
CONDITIONING = {"conditioning": "text", "prompts": ["a face"], "guidance_scale": 3.0, "record_branch": "cond"}


def _direction(capture: str | None = "mid_block") -> Direction:
    torch.manual_seed(0)
    return Direction(vector=torch.randn(3, 32, 4, 4), name="smile", kind="supervised", capture=capture)


def test_manifest_records_the_model_description_and_conditioning(tmp_path):
    cat = hcat.open(str(tmp_path))
    cat.publish("m", [_direction()], metadata={"model": DESCRIPTION, "conditioning": CONDITIONING})
    version = cat.version("m")
    info = version.model_info
    assert {k: info[k] for k in hcat.MODEL_DESCRIPTION_FIELDS} == {
        k: DESCRIPTION[k] for k in hcat.MODEL_DESCRIPTION_FIELDS
    }
    assert version.conditioning == CONDITIONING
    assert version.direction("smile").capture == "mid_block"


def test_a_manifest_without_the_model_fields_still_loads(tmp_path):
    """A version written before kinds and capture points existed: the new fields read as None / {}."""
    cat = hcat.open(str(tmp_path))
    cat.publish("m", [_direction(capture=None)], metadata={"model_id": "google/ddpm-ema-celebahq-256"})
    path = tmp_path / "m" / "versions" / cat.resolve("m") / "manifest.json"
    manifest = json.loads(path.read_text())
    assert "conditioning" not in manifest and "kind" not in manifest["model"]  # the old layout
    version = hcat.open(str(tmp_path)).version("m")
    assert version.model_info["kind"] is None and version.model_info["capture"] is None
    assert version.model_info["id"] == "google/ddpm-ema-celebahq-256"
    assert version.conditioning == {}
    assert version.direction("smile").capture is None


@pytest.mark.parametrize(
    ("field", "value"),
    [("kind", 3), ("capture", ["mid_block"]), ("h_shape", [32, 4]), ("image_shape", [3, 0, 16])],
)
def test_a_manifest_with_a_malformed_model_field_names_it(tmp_path, field, value):
    cat = hcat.open(str(tmp_path))
    cat.publish("m", [_direction()], metadata={"model": DESCRIPTION})
    manifest = cat.read_manifest("m", cat.resolve("m"))
    manifest["model"][field] = value
    raw = json.dumps(manifest).encode()
    with pytest.raises(ManifestError, match=f"model.{field}"):
        hcat.parse_manifest(raw, path="manifest.json", model="m", version=manifest["version"])


def test_conditioning_must_be_an_object(tmp_path):
    cat = hcat.open(str(tmp_path))
    cat.publish("m", [_direction()], metadata={"model": DESCRIPTION})
    manifest = cat.read_manifest("m", cat.resolve("m"))
    manifest["conditioning"] = "a face"
    with pytest.raises(ManifestError, match="conditioning"):
        hcat.parse_manifest(json.dumps(manifest).encode(), path="x", model="m", version=manifest["version"])
