"""Debian's headless Chromium as the browser tests and benchmarks launch it (no browser downloads)."""

from __future__ import annotations

#: Installed by `make browser` (Debian's package).
CHROMIUM = "/usr/bin/chromium"

#: Headless as root, and quiet on a closed network (no background connections to refuse).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
