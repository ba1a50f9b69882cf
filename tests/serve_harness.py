"""One way for test modules to run the Serve app on a private local Ray and reach it over HTTP."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

#: The fusion model of every test app runs tests/test_service_runners.behaviour_runner (the runner= hook).
BEHAVIOUR_MODEL = {
    "name": "fusion",
    "num_cpus": 1,
    "runner": "test_service_runners:behaviour_runner",
    "graceful_shutdown_timeout_s": 5,
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 120.0) -> None:
    """Poll ``GET /ready`` until it answers 200; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("service not ready")


@contextmanager
def serve_app(args: dict) -> Iterator[tuple[str, Callable[[], None]]]:
    """Start a 2-CPU local Ray, Serve on a free port, and the app built from ``args``.

    Yields ``(base_url, start)``; ``start()`` deploys the app again (a restart after
    ``serve.delete``). Ray is private to the caller (``address="local"``), so a Ray
    cluster that happens to run on the machine is never joined.
    """
    import ray
    from ray import serve

    from serve_app.builder import build_app

    # Replicas import the test runners by module name.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        def start() -> None:
            serve.run(build_app(args), name="recon3d", route_prefix="/", blocking=False)
            wait_ready(url)

        start()
        yield url, start
    finally:
        serve.shutdown()
        ray.shutdown()
