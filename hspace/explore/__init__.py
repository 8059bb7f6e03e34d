"""``hspace explore``: a live direction explorer in the browser for one catalog and one model.

Pick a catalog model and version, see its directions grouped by kind (preview strip, provenance,
units, effect row, grade), move sliders for several directions at once on one or several seeds or
an uploaded, DDIM-inverted image, h-swap two seeds, and compare two versions.

Starlette + uvicorn with one static HTML/JS page, rather than Gradio: the page needs precise
control of requests (per-client sequence numbers so stale slider positions are dropped, batched
renders on one worker) that is a few lines of fetch() here, with two small, well-kept dependencies
and no front-end build step. Install with ``pip install 'hspace[explore]'``; ``import hspace``
never imports this package.

Modules: :mod:`~hspace.explore.render_queue` (coalescing, latest-wins render worker),
:mod:`~hspace.explore.explorer` (catalog reads and model work), :mod:`~hspace.explore.app`
(the web app), :mod:`~hspace.explore.guard` (which Host names, origins and tokens are answered:
the explorer reads catalogs with its user's credentials), :mod:`~hspace.explore.command` (what the
``hspace explore`` command runs).
"""

from __future__ import annotations
