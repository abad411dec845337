"""Real servers on loopback for the tests: an MLflow tracking server with its own SQLite store.

``MlflowServer(root).start()`` runs ``mlflow server`` on a free port of 127.0.0.1, with the backend
store ``sqlite:///<root>/mlflow.db`` and artifacts served by the server itself from
``<root>/artifacts`` (``--serve-artifacts --artifacts-destination``), and waits for ``/health``.
``stop()`` ends the server's whole process group (the server and its uvicorn worker) and ``start()``
brings it back on the same port with the same store: what the fault-tolerance test needs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def healthy(uri: str, timeout: float = 1.0) -> bool:
    """Whether ``uri/health`` answers 200."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _mlflow_command() -> list[str]:
    """The ``mlflow`` CLI of the interpreter running the tests."""
    sibling = Path(sys.executable).with_name("mlflow")
    if sibling.exists():
        return [str(sibling)]
    found = shutil.which("mlflow")
    if found:
        return [found]
    return [sys.executable, "-m", "mlflow"]


class MlflowServer:
    """An ``mlflow server`` process on loopback, restartable on the same port and store.

    Args:
        root: folder of the SQLite store, the artifacts and the server's log.
        port: the port (a free one by default).
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log_file = self.root / "server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 120.0) -> str:
        """Start the server and wait until ``/health`` answers; returns its URI."""
        if self.running:
            return self.uri
        command = [
            *_mlflow_command(),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {
            **os.environ,
            # The server's background job runner (8 extra processes) is not needed here.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        env.pop("MLFLOW_TRACKING_URI", None)
        log = open(self.log_file, "ab")
        self._process = subprocess.Popen(
            command,
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends the worker too
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if healthy(self.uri, timeout=1.0):
                return self.uri
            if self._process.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        tail = self.log_file.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mlflow server did not start on {self.uri}; its log ends with:\n{tail}")

    def stop(self, timeout: float = 20.0) -> None:
        """Terminate the server's process group and wait until the port is free."""
        process, self._process = self._process, None
        if process is None:
            return
        group = process.pid  # start_new_session: the group id is the server's pid
        try:
            os.killpg(group, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout=timeout)
        # The uvicorn worker may outlive the parent for a moment: wait for the port.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and healthy(self.uri, timeout=0.5):
            time.sleep(0.1)
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
