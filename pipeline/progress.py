"""Progress bars of the stages: drawn on a terminal, left out of logs.

A bar redrawn with carriage returns turns a ``ray job submit`` log or a CI log into one long
line, so a bar is shown only when asked for (``progress``) and stderr is a terminal; the stages'
summary lines are printed either way.
"""

from __future__ import annotations

from typing import Any


def progress_bar(*, total: int, desc: str, unit: str, progress: bool) -> Any:
    """A ``tqdm`` bar that is disabled unless ``progress`` and stderr is a terminal."""
    from tqdm.auto import tqdm

    # tqdm's disable=None: disabled when its output stream is not a TTY
    return tqdm(total=total, desc=desc, unit=unit, disable=None if progress else True)
