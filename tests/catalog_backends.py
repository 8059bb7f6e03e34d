"""Catalog test backends: one fixture giving an empty catalog on a local directory, ``memory://``,
a moto S3 server on loopback (through s3fs) or a lock-file backend (any other fsspec filesystem).

Import the fixtures into a test module::

    from tests.catalog_backends import any_cat, s3_bucket, s3_server  # noqa: F401
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import fsspec
import pytest
import torch

from hspace import catalog as hcat
from hspace.directions import Direction

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.flaky_fs import FlakyFileSystem
    from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
except ModuleNotFoundError:  # pragma: no cover
    from flaky_fs import FlakyFileSystem
    from s3_server import s3_bucket, s3_server  # noqa: F401

T, C, H, W = 3, 4, 2, 2
META = {"model_id": "toy/ddpm", "sampler": "ddpm", "inputs": {"seeds": 8}}
BACKENDS = ["local", "memory", pytest.param("s3", marks=pytest.mark.s3)]
ALL_BACKENDS = [*BACKENDS, "lockfile"]


def make_direction(name: str, seed: int, *, kind: str = "supervised") -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction(
        vector=torch.randn(T, C, H, W, generator=g),
        name=name,
        kind=kind,
        sigma=torch.rand(T, generator=g) + 0.5,
        timesteps=torch.tensor([999, 500, 0]),
        model_fingerprint="fp123",
        provenance={"seed": seed},
    )


def open_backend(request: pytest.FixtureRequest, kind: str, tmp_path, **kwargs) -> Iterator[hcat.Catalog]:
    """A fresh, empty catalog of ``kind``; removes in-memory state afterwards."""
    if kind == "local":
        yield hcat.open(str(tmp_path / "catalog"), **kwargs)
    elif kind == "s3":
        server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        yield hcat.open(f"{bucket}/catalog", storage_options=server.storage_options(), **kwargs)
    elif kind in ("memory", "lockfile"):
        root = f"/catalog-{uuid.uuid4().hex}"
        mem = fsspec.filesystem("memory")
        if kind == "memory":
            yield hcat.open(f"memory://{root}", **kwargs)
        else:  # a filesystem the catalog knows nothing about: lock files with tokens
            yield hcat.Catalog(FlakyFileSystem(mem), root, f"flaky://{root}", **kwargs)
        if mem.exists(root):
            mem.rm(root, recursive=True)
    else:
        raise AssertionError(kind)


@pytest.fixture(params=BACKENDS)
def any_cat(request, tmp_path) -> Iterator[hcat.Catalog]:
    """An empty catalog on a local directory, memory:// and (marked s3) a moto S3 server."""
    yield from open_backend(request, request.param, tmp_path)
