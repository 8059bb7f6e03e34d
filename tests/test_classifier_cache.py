"""Classifiers fetched from URLs: a private cache keyed by content, re-fetched on every run."""

from __future__ import annotations

import io
import os
import secrets
import stat
import time
from pathlib import Path

import fsspec
import pytest
import torch

from hspace import classifier as hclf
from hspace.classifier import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    classifier_cache_dir,
    classifier_fingerprint,
    load_classifier,
    resolve_classifier_dir,
)
from hspace.toy.classifier import AttributeClassifier

try:  # `python -m pytest` puts the repo root on sys.path; bare `pytest` only puts tests/ there
    from tests.s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
except ModuleNotFoundError:  # pragma: no cover
    from s3_server import s3_bucket, s3_server  # noqa: F401


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own XDG cache home."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "hspace" / "classifiers"


def save_classifier(directory: Path, seed: int) -> AttributeClassifier:
    torch.manual_seed(seed)
    clf = AttributeClassifier(["round"], [True], image_size=16, width=8).eval()
    clf.save_pretrained(directory)
    return clf


def upload(local: Path, url: str, storage_options: dict | None = None) -> None:
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        fs.pipe(f"{root}/{name}", (local / name).read_bytes())


@pytest.fixture
def remote(tmp_path) -> tuple[str, Path]:
    """A classifier at a fresh memory:// URL, and a local copy of the same files."""
    url = f"memory://clf-{secrets.token_hex(4)}/model"
    save_classifier(tmp_path / "v1", 0)
    upload(tmp_path / "v1", url)
    return url, tmp_path / "v1"


def test_url_classifier_lands_in_a_private_content_addressed_cache(remote, cache_home):
    url, local = remote
    path = resolve_classifier_dir(url)
    assert path.parent == cache_home and path.name == hclf._content_key(hclf._file_digests(local))
    for d in (cache_home, cache_home.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    # the fingerprint is of the bytes used, so the URL and a local copy of the same files agree
    assert classifier_fingerprint(url) == classifier_fingerprint(str(local))
    x = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(load_classifier(url)(x), load_classifier(str(local))(x))
    assert [p.name for p in cache_home.iterdir()] == [path.name]  # no temporary files left


def test_changed_remote_weights_give_a_new_fingerprint(remote, tmp_path):
    url, _ = remote
    before, first = classifier_fingerprint(url), resolve_classifier_dir(url)
    save_classifier(tmp_path / "v2", 1)
    upload(tmp_path / "v2", url)
    assert classifier_fingerprint(url) == classifier_fingerprint(str(tmp_path / "v2")) != before
    assert resolve_classifier_dir(url) != first


def test_interrupted_fetch_leaves_nothing_used_and_the_next_run_works(remote, cache_home, monkeypatch):
    url, local = remote
    from fsspec.implementations.memory import MemoryFileSystem

    original = MemoryFileSystem._open

    class FailsAfterOneRead(io.BytesIO):
        """The weights' stream: the first chunk arrives, then the connection drops."""

        def read(self, n=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection reset mid-copy")
            return super().read(n)

    def failing_open(self, path, mode="rb", **kwargs):
        f = original(self, path, mode, **kwargs)
        return FailsAfterOneRead(f.read()) if path.endswith(WEIGHTS_NAME) else f

    with monkeypatch.context() as mp:
        mp.setattr(hclf, "_CHUNK", 64)
        mp.setattr(MemoryFileSystem, "_open", failing_open)
        with pytest.raises(ConnectionResetError):
            resolve_classifier_dir(url)
    assert list(cache_home.iterdir()) == []
    # a process killed mid-fetch leaves a temporary directory behind: ignored, then cleaned
    leftover = cache_home / f"{hclf._TEMP_PREFIX}killed"
    leftover.mkdir()
    (leftover / WEIGHTS_NAME).write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(leftover, (old, old))
    path = resolve_classifier_dir(url)
    assert classifier_fingerprint(url) == classifier_fingerprint(str(local))
    assert [p.name for p in cache_home.iterdir()] == [path.name]


def test_planted_cache_entry_with_wrong_content_is_not_used(remote, cache_home, tmp_path):
    url, local = remote
    key = hclf._content_key(hclf._file_digests(local))
    planted = cache_home / key
    save_classifier(planted, 7)  # someone else's weights under the real content's name
    classifier_cache_dir()
    path = resolve_classifier_dir(url)
    assert path == planted
    assert (path / WEIGHTS_NAME).read_bytes() == (local / WEIGHTS_NAME).read_bytes()
    assert classifier_fingerprint(url) == classifier_fingerprint(str(local))


def test_cache_writable_by_others_is_refused(remote, cache_home):
    url, _ = remote
    classifier_cache_dir()
    cache_home.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        resolve_classifier_dir(url)
    cache_home.chmod(0o700)
    assert resolve_classifier_dir(url).parent == cache_home


def test_missing_remote_classifier_or_file_is_named(remote):
    url, _ = remote
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_classifier_dir(url + "-missing")
    fs, root = fsspec.core.url_to_fs(url)
    fs.rm(f"{root}/{WEIGHTS_NAME}")
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_NAME}"):
        resolve_classifier_dir(url)


@pytest.mark.s3
def test_s3_classifier_changes_are_noticed(s3_bucket, s3_server, tmp_path):  # noqa: F811
    options = s3_server.storage_options()
    url = f"{s3_bucket}/classifiers/round"
    save_classifier(tmp_path / "v1", 0)
    upload(tmp_path / "v1", url, options)
    first = classifier_fingerprint(url, options)
    assert first == classifier_fingerprint(str(tmp_path / "v1"))
    assert load_classifier(url, storage_options=options).attributes == ["round"]
    save_classifier(tmp_path / "v2", 1)
    upload(tmp_path / "v2", url, options)
    assert classifier_fingerprint(url, options) == classifier_fingerprint(str(tmp_path / "v2")) != first


def test_file_url_classifier_is_fetched_like_any_url(tmp_path, cache_home):
    save_classifier(tmp_path / "local", 3)
    path = resolve_classifier_dir((tmp_path / "local").as_uri())
    assert path.parent == cache_home
    assert classifier_fingerprint((tmp_path / "local").as_uri()) == classifier_fingerprint(
        str(tmp_path / "local")
    )
