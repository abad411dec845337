"""Checking an MLflow tracking URI before MLflow is given it, in seconds at most.

MLflow's own client retries an unreachable server for minutes and then prints a urllib3 traceback;
the CLI's commands (``audit``, ``compare``, ``demo``) and the readers call
:func:`check_tracking_uri` first, so a malformed, silent or refused store is one line within
seconds. This module imports neither torch nor mlflow, so that check runs before either is loaded.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cluster_tracking.errors import ConfigError, PlatformError

#: Seconds a tracking server's ``/health`` check (and a W&B request) may take.
PROBE_TIMEOUT = 5.0

#: ``HOST:PORT`` with no scheme (``127.0.0.1:5000``, ``localhost:5000/``): a server address that
#: lacks its ``http://``, which MLflow would otherwise read as a folder or an unknown scheme.
_HOST_PORT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*:\d{1,5}/?$")

#: Schemes of MLflow tracking URIs (database schemes may add ``+driver``).
TRACKING_SCHEMES = (
    "http",
    "https",
    "sqlite",
    "postgresql",
    "mysql",
    "mssql",
    "file",
    "databricks",
    "databricks-uc",
    "uc",
)


def check_tracking_uri_form(uri: str) -> tuple[str, str]:
    """Check the form of an MLflow tracking URI without reaching it: a scheme MLflow knows, a
    host for HTTP, and no bare ``HOST:PORT`` (which lacks ``http://``).

    Returns:
        The URI without surrounding blanks, and its scheme in lower case (``""`` for a path).

    Raises:
        ConfigError: the URI is malformed; the message shows the fix.
    """
    text = str(uri).strip()
    if _HOST_PORT.match(text):
        raise ConfigError(
            f"tracking URI {text!r} is a server address without its scheme; write "
            f"http://{text.rstrip('/')} (or https://)."
        )
    parsed = urllib.parse.urlparse(text)
    scheme = parsed.scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter: a path
        scheme = ""
    if scheme and scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise ConfigError(
            f"tracking URI {text!r}: unknown scheme {scheme + ':'!r}; use http(s)://HOST:PORT, "
            "sqlite:///FILE.db, a database URI (postgresql://...) or a folder."
        )
    if scheme in ("http", "https") and not parsed.hostname:
        raise ConfigError(f"tracking URI {text!r} names no host; write http://HOST:PORT.")
    return text, scheme


def check_tracking_uri(uri: str, *, existing: bool = True) -> None:
    """Check an MLflow tracking URI before MLflow is given it, in seconds at most.

    The scheme must be one MLflow knows; an HTTP server must answer ``/health`` within
    :data:`PROBE_TIMEOUT` seconds (connect and read); a local folder store (``file:``, a plain
    path) needs ``MLFLOW_ALLOW_FILE_STORE=true`` under MLflow 3, which refuses it otherwise;
    with ``existing``, a local store must already exist (an audit never creates one).

    Raises:
        ConfigError: a malformed URI or an unknown scheme (exit 2).
        PlatformError: the server does not answer, the store does not exist, or MLflow would
            refuse it (exit 5).
    """
    text, scheme = check_tracking_uri_form(uri)
    if not scheme and text.lower() in TRACKING_SCHEMES:
        return  # a bare profile URI: "databricks", "databricks-uc", "uc"
    if scheme in ("", "file") and not _file_store_allowed():
        raise PlatformError(
            f"{text} is a file store (an mlruns/ folder), which MLflow 3 refuses by default: "
            "set MLFLOW_ALLOW_FILE_STORE=true to read it, or migrate it to a database once with "
            "`mlflow migrate-filestore` and pass --tracking-uri sqlite:///mlflow.db."
        )
    if existing or scheme in ("http", "https"):
        _check_tracking_store(text)


def _file_store_allowed() -> bool:
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true", "yes")


class ServerUnreachable(Exception):
    """An HTTP tracking server did not pass its ``/health`` check (:func:`probe_health`), or
    nothing listens at its address.

    Attributes:
        status: the HTTP status it answered (500 or more), or ``None`` when it did not answer.
        reason: why it did not answer (the connection's error), or ``None``.
    """

    def __init__(self, message: str, status: int | None = None, reason: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def probe_health(uri: str, timeout: float) -> None:
    """Ask an HTTP tracking server's ``/health`` (connect and read within ``timeout`` seconds).

    The one health probe of cluster-tracking: the CLI checks a server with it before MLflow is
    given the URI, and the MLflow sink after a request failed. Any answer below HTTP 500 passes
    (a proxy without ``/health`` answers 404: let MLflow talk to it); a URI that is not HTTP is
    not probed.

    Raises:
        ServerUnreachable: the server answered 500 or more, or did not answer.
    """
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return
    except urllib.error.HTTPError as error:
        if error.code >= 500:
            raise ServerUnreachable(
                f"{url} answered HTTP {error.code}", status=error.code
            ) from error
    except (OSError, ValueError) as error:
        raise ServerUnreachable(
            f"no answer from {url}: {error}", reason=getattr(error, "reason", error)
        ) from error


def check_connectable(uri: str, timeout: float) -> None:
    """Fail fast when nothing listens at an HTTP tracking URI (MLflow's own client would retry
    a refused connection for minutes): a TCP connect within ``timeout`` seconds, no request, so
    a server that accepts is given its time. A URI that is not HTTP is not checked.

    Raises:
        ServerUnreachable: the connection was refused or timed out.
    """
    if not uri.startswith(("http://", "https://")):
        return
    parsed = urllib.parse.urlsplit(uri)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "localhost", port), timeout).close()
    except OSError as error:
        raise ServerUnreachable(
            f"cannot connect to {parsed.netloc}: {error}", reason=error
        ) from error


def _check_tracking_store(uri: str) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            probe_health(uri, PROBE_TIMEOUT)
        except ServerUnreachable as error:
            if error.status is not None:
                raise PlatformError(
                    f"the MLflow server at {uri} answers HTTP {error.status}; is it healthy?"
                ) from error
            raise PlatformError(
                f"cannot reach the MLflow server at {uri} ({_first_line(error.reason)}); start "
                "it, or pass --tracking-uri / set MLFLOW_TRACKING_URI."
            ) from error
        return
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "sqlite":
        database = uri.split(":///", 1)[1] if ":///" in uri else ""
        if database and database != ":memory:" and not Path(database).exists():
            raise PlatformError(
                f"no MLflow store at {uri} (the file does not exist); pass --tracking-uri or set "
                "MLFLOW_TRACKING_URI to the store or server that holds the run."
            )
    elif parsed.scheme in ("", "file"):
        folder = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else uri)
        if not folder.is_dir():
            raise PlatformError(
                f"no MLflow store at {uri} (no such folder); pass --tracking-uri or set "
                "MLFLOW_TRACKING_URI to the store or server that holds the run."
            )


def _first_line(error: object) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]
