"""``hspace explore``: open the catalog, load the model, bind 127.0.0.1 (unless told otherwise), serve.

The command-line layer of the explorer, kept here so ``hspace/cli.py`` only declares the options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hspace.explore.app import bind_socket, create_app, serve
from hspace.explore.explorer import Explorer

if TYPE_CHECKING:
    from hspace.model import HSpaceModel

__all__ = ["default_model", "run"]


def default_model(catalog: Any) -> str:
    """``toy`` when every model in the catalog was built from the shipped toy model; else a
    ValueError asking for ``--model`` (the explorer cannot guess another model's weights)."""
    sources = {}
    for name in catalog.models():
        versions = catalog.versions(name)
        manifest = catalog.read_manifest(name, versions[-1])
        sources[name] = (manifest.get("model") or {}).get("id")
    if not sources:
        raise FileNotFoundError(f"catalog {catalog.url} has no models (no complete versions)")
    if all(_is_toy(source) for source in sources.values()):
        return "toy"
    listed = ", ".join(f"{name} (built from {source})" for name, source in sorted(sources.items()))
    raise ValueError(f"--model is required: the catalog's models are not the toy model: {listed}")


def _is_toy(source: Any) -> bool:
    if source == "toy":
        return True
    from pathlib import Path

    from hspace.toy import TOY_MODEL_DIR

    try:
        return isinstance(source, str) and Path(source).resolve() == TOY_MODEL_DIR.resolve()
    except OSError:
        return False


def run(
    catalog_url: str,
    *,
    model: str | None,
    load_model: Callable[[str], HSpaceModel],
    storage_options: dict[str, Any],
    host: str,
    port: int,
    echo: Callable[[str], None] = print,
) -> None:
    """Open, load, bind, print the URL, and serve until interrupted.

    ``load_model`` turns the model's name (``--model``, or :func:`default_model`) into the model;
    the CLI passes its own loader, with the device, dtype and revision it was given.
    """
    from hspace import catalog as catalog_mod

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0: any free port), got {port}")
    cat = catalog_mod.open(catalog_url, storage_options)
    model = model or default_model(cat)
    hs_model = load_model(model)
    explorer = Explorer(cat, hs_model, model_label=model)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    echo(f"hspace explore: {catalog_url} with model {model} on http://{shown}:{bound_port}/ (Ctrl-C stops)")
    serve(create_app(explorer), sock)
