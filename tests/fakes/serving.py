"""Run a fake's ASGI app with uvicorn in a thread on a free loopback port (shared by every fake)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


@contextmanager
def serve_app(app: Any, name: str, **options: Any) -> Iterator[int]:
    """Yield the port `app` listens on; stop the server when the block ends."""
    config = uvicorn.Config(app, host="127.0.0.1", port=options.pop("port", 0), log_level="warning",
                            timeout_graceful_shutdown=1, lifespan="off", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name=name)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.01)
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)


def wait_for(condition: Callable[[], object], seconds: float = 10.0) -> None:
    """Poll until `condition()` holds: a fake may finish a request after the client gave up on it."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def free_port() -> int:
    """A loopback port nothing listens on right now (for servers started in another process)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
