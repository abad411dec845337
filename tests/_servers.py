"""Real servers on loopback for the tests: an MLflow tracking server with its own SQLite store.

``MlflowServer(root).start()`` runs ``mlflow server`` on a free port of 127.0.0.1, with the backend
store ``sqlite:///<root>/mlflow.db`` and artifacts served by the server itself from
``<root>/artifacts`` (``--serve-artifacts --artifacts-destination``), and waits for ``/health``.
``stop()`` ends the server's whole process group (the server and its uvicorn worker) and ``start()``
brings it back on the same port with the same store: what the fault-tolerance test needs.
``kill()`` is a crash (``kill -9``); ``pause()`` and ``resume()`` hang the server and bring it back
(``SIGSTOP``, ``SIGCONT``).

``DelayingProxy(target_port, delay)`` is a TCP proxy on 127.0.0.1 that holds every request for
``delay`` seconds before passing it on (a slow server, or a slow network in front of one).
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
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

    def kill(self) -> None:
        """``kill -9`` the server's process group (a crash: no shutdown, sockets reset)."""
        process, self._process = self._process, None
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=20.0)

    def pause(self) -> None:
        """``SIGSTOP`` the server's process group: it hangs, connections are accepted by the
        kernel and never answered, until :meth:`resume`."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """``SIGCONT`` the server's process group after :meth:`pause`."""
        if self._process is not None:
            os.killpg(self._process.pid, signal.SIGCONT)

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DelayingProxy:
    """A TCP proxy on 127.0.0.1 that delays every request by ``delay`` seconds.

    Each connection is relayed in its own thread. Bytes from the client that start a new request
    (the first bytes after the server's answer, or on a new connection) wait ``delay`` seconds and
    then go to the server on a fresh connection (the server's keep-alive timeout may have closed
    the last one while the request waited); answers pass at once. ``delay`` may be changed while
    the proxy runs. ``requests`` counts the requests it delayed.

    Args:
        target_port: the port of the server on 127.0.0.1.
        delay: seconds each request waits.
        port: the proxy's own port (0: a free one).
    """

    def __init__(self, target_port: int, delay: float = 0.0, port: int = 0) -> None:
        self.target_port = target_port
        self.delay = delay
        self.requests = 0
        self.request_lines: list[str] = []  # "METHOD /path" of every request, in order
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", port))
        self._listener.listen(64)
        self.port = int(self._listener.getsockname()[1])
        self.uri = f"http://127.0.0.1:{self.port}"
        self._closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        except OSError:
            client.close()
            return
        new_request = True
        try:
            while not self._closed:
                readable, _, _ = select.select([client, server], [], [], 1.0)
                for sock in readable:
                    if sock is not client and sock is not server:
                        continue  # the connection replaced for the request just sent
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        if new_request:
                            line = data.split(b"\r\n", 1)[0].decode("latin-1")
                            with self._lock:
                                self.requests += 1
                                self.request_lines.append(" ".join(line.split(" ")[:2]))
                            time.sleep(self.delay)
                            new_request = False
                            # the server may have closed the idle connection meanwhile (its
                            # keep-alive timeout): each request goes on a fresh one, as a slow
                            # front end would send it, not into a closed socket
                            server.close()
                            server = socket.create_connection(
                                ("127.0.0.1", self.target_port), timeout=30
                            )
                        server.sendall(data)
                    else:
                        new_request = True
                        client.sendall(data)
        except OSError:
            return
        finally:
            client.close()
            server.close()

    def close(self) -> None:
        """Stop accepting connections (open ones end within a second)."""
        self._closed = True
        self._listener.close()

    def __enter__(self) -> DelayingProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
