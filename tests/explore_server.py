"""The explorer's real uvicorn server on a free loopback port, in a thread of the test process."""

from __future__ import annotations

import threading
import time
from typing import Any


def start_explorer(explorer: Any) -> tuple[str, Any, threading.Thread]:
    """(base URL, uvicorn server, its thread) once the server answers; set ``server.should_exit``
    and join the thread to stop it."""
    import uvicorn

    from hspace.explore.app import bind_socket, create_app

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(explorer), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the explorer did not start"
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    return f"http://{host}:{port}", server, thread
