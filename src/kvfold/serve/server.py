"""Running the app with uvicorn: in the foreground (`kvfold serve`) or on a free port in a thread (tests,
benchmarks)."""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from .app import create_app
from .config import ServeConfig


class BackgroundServer:
    """Serve an app with uvicorn on a free port of `host`, in a daemon thread (tests, benchmarks).

    `with BackgroundServer(app) as server: ... server.url ...`; leaving the block stops it gracefully.
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.app, self.host, self.port, self.log_level = app, host, port, log_level
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level=self.log_level, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="kvfold-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def run_server(model, tokenizer, config: ServeConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve in the foreground until Ctrl-C (the `kvfold serve` command)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(model, tokenizer, config), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=10)
