"""An fsspec filesystem wrapper that counts what a run's readers fetch from activation shards.

``CountingFS(fs)`` forwards every call to ``fs`` and adds up the bytes that ``cat_file`` (whole
files) and ``cat_ranges`` (ranged reads) return for paths under ``activations/``; ``calls`` holds
the number of ranges of each ``cat_ranges`` call. ``open`` is refused: a read through a file
object's read-ahead cache would fetch bytes that the count could not see.
"""

from __future__ import annotations

from typing import Any


class CountingFS:
    """Counts bytes read from activation shards (``bytes_read``) and ranged-read calls (``calls``)."""

    def __init__(self, fs: Any) -> None:
        self._fs, self.bytes_read, self.calls = fs, 0, []

    def cat_ranges(self, paths, starts, ends, **kwargs):
        out = self._fs.cat_ranges(paths, starts, ends, **kwargs)
        self.calls.append(len(paths))
        self.bytes_read += sum(len(b) for p, b in zip(paths, out, strict=True) if "/activations/" in p)
        return out

    def cat_file(self, path, *args, **kwargs):
        data = self._fs.cat_file(path, *args, **kwargs)
        self.bytes_read += len(data) if "/activations/" in path else 0
        return data

    def open(self, *args, **kwargs):
        raise AssertionError(
            f"opened {args[0]}: reads must be whole-file or ranged, not through a read-ahead file"
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fs, name)
