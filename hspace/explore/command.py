"""``hspace explore``: open the catalog, load the model, bind 127.0.0.1 (unless told otherwise), serve.

The command-line layer of the explorer, kept here so ``hspace/cli.py`` only declares the options.
On a loopback address the server answers only loopback Host names (and ``--allow-host`` ones);
on any other address it also warns and requires a per-launch access token, printed in the URL
(``--no-token`` turns that off, ``--token`` turns it on for loopback too; see
:mod:`hspace.explore.guard`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hspace.explore.app import bind_socket, create_app, serve
from hspace.explore.explorer import Explorer
from hspace.explore.guard import AccessPolicy, is_loopback, new_token

if TYPE_CHECKING:
    from hspace.model import HSpaceModel

__all__ = ["default_model", "run", "shown_url"]


def default_model(catalog: Any) -> str:
    """``toy`` (``toy-text``) when every model in the catalog was built from the shipped toy model
    (the shipped text toy); else a ValueError asking for ``--model`` (the explorer cannot guess
    another model's weights, nor serve two different models at once)."""
    from hspace.toy import toy_model_name

    sources = {}
    for name in catalog.models():
        versions = catalog.versions(name)
        manifest = catalog.read_manifest(name, versions[-1])
        sources[name] = (manifest.get("model") or {}).get("id")
    if not sources:
        raise FileNotFoundError(f"catalog {catalog.url} has no models (no complete versions)")
    toys = {toy_model_name(source) for source in sources.values()}
    if len(toys) == 1 and None not in toys:
        return toys.pop()
    listed = ", ".join(f"{name} (built from {source})" for name, source in sorted(sources.items()))
    raise ValueError(f"--model is required: the catalog's models are not one toy model: {listed}")


def shown_url(bound_host: str, port: int, token: str | None) -> str:
    """The URL to open: the bound address (127.0.0.1 / [::1] for a wildcard one), with the token."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(bound_host, bound_host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def run(
    catalog_url: str,
    *,
    model: str | None,
    load_model: Callable[[str], HSpaceModel],
    storage_options: dict[str, Any],
    host: str,
    port: int,
    allow_hosts: Sequence[str] = (),
    token: bool | None = None,
    echo: Callable[[str], None] = print,
    warn: Callable[[str], None] = _stderr,
) -> None:
    """Open, load, bind, print the URL, and serve until interrupted.

    ``load_model`` turns the model's name (``--model``, or :func:`default_model`) into the model;
    the CLI passes its own loader, with the device, dtype and revision it was given.

    ``token``: None requires the access token only off loopback; True always; False never.
    """
    from hspace import catalog as catalog_mod

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535 (0: any free port), got {port}")
    AccessPolicy.for_server(host, port, allow_hosts)  # a bad --allow-host exits before any work
    cat = catalog_mod.open(catalog_url, storage_options)
    model = model or default_model(cat)
    hs_model = load_model(model)
    explorer = Explorer(cat, hs_model, model_label=model)
    sock = bind_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    local = is_loopback(bound_host)
    secret = new_token() if (token if token is not None else not local) else None
    policy = AccessPolicy.for_server(host, bound_port, allow_hosts, secret)
    if not local:
        warn(
            f"hspace explore: WARNING: listening on {bound_host}, not loopback: other machines can reach "
            f"this server, which reads {catalog_url} with your storage credentials. "
            + (
                "Every request needs the access token in the URL below."
                if secret
                else "--no-token: anyone who can reach the port can use it."
            )
            + " Browsers must use a name it answers to: 127.0.0.1, localhost, "
            + ", ".join(sorted({n for n, _ in policy.hosts} - {"127.0.0.1", "localhost", "::1"}) or ["–"])
            + " (add others with --allow-host NAME)."
        )
    url = shown_url(bound_host, bound_port, secret)
    echo(f"hspace explore: {catalog_url} with model {model} on {url} (Ctrl-C stops)")
    serve(create_app(explorer, policy=policy), sock)
