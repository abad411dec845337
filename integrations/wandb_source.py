"""W&B as a source of audits: ``wandb-artifact://`` URIs, and the write-back of ``--log-to-run``.

Registered with the audit's loader registry (:mod:`cluster_tracking.audit.registry`) by
:func:`register_platform`, which the entry points of ``pyproject.toml`` (group
``cluster_tracking.sources``) name: the audit core never imports this module. wandb is imported
only when a source is read, so a missing package is one
:class:`~cluster_tracking.errors.PlatformError` naming the pip extra.

``wandb-artifact://<entity>/<project>/<name>[:<alias or version>]`` (default ``:latest``) is
downloaded with W&B's public API and read like a local folder; the run that logged it is where
``--log-to-run`` writes (:func:`log_to_wandb`).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cluster_tracking.audit.bundle import write_bundle
from cluster_tracking.audit.registry import SourcePlatform, register
from cluster_tracking.audit.sources import LoadedModel, RunTarget, SourceRef, load_file
from cluster_tracking.audit.writeback import audit_info
from cluster_tracking.errors import ClusterTrackingError, PlatformError, SourceError
from cluster_tracking.graph.safetensors_header import first_line
from cluster_tracking.integrations.tracking_uri import PROBE_TIMEOUT

if TYPE_CHECKING:
    from cluster_tracking.audit.run import AuditResult

_WANDB_HINT = "pip install 'cluster-tracking[wandb]'"

_WANDB_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _parse_wandb_uri(text: str, rest: str) -> SourceRef:
    path = rest.lstrip("/")
    body, _, alias = path.partition(":")
    parts = body.split("/")
    usage = (
        f"malformed W&B artifact URI {text!r}; write "
        "wandb-artifact://<entity>/<project>/<name>:<alias or version>, e.g. "
        "wandb-artifact://my-team/my-project/model-3k2j1x:v4 (':latest' when left out)."
    )
    if len(parts) != 3 or not all(part and _WANDB_PART.match(part) for part in parts):
        raise SourceError(usage)
    if alias and not _WANDB_PART.match(alias):
        raise SourceError(usage)
    entity, project, name = parts
    return SourceRef(
        uri=text,
        kind="wandb-artifact",
        entity=entity,
        project=project,
        name=name,
        alias=alias or "latest",
    )


# ---------------------------------------------------------------------------------------------
# Loaded models
# ---------------------------------------------------------------------------------------------


def load_wandb_source(
    ref: SourceRef, *, trust_pickle: bool = False, tracking_uri: str | None = None
) -> LoadedModel:
    """Download a W&B artifact with the public API and read it like a local folder.

    Needs a W&B server (wandb.ai or a local one at ``WANDB_BASE_URL``) and an API key. Every
    request has a short timeout, so an unreachable server fails in seconds. ``tracking_uri``
    (MLflow's) is not used.
    """
    api = wandb_api()
    name = f"{ref.entity}/{ref.project}/{ref.name}:{ref.alias}"
    try:
        artifact = api.artifact(name)
    except Exception as error:
        raise _wandb_error(error, f"artifact {name!r}") from error
    with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
        try:
            local = Path(artifact.download(root=scratch))
        except Exception as error:
            raise _wandb_error(error, f"the files of artifact {name!r}") from error
        loaded = load_file(local, trust_pickle=trust_pickle, source=ref.uri)
    loaded.label = name
    try:
        producer = artifact.logged_by()
    except Exception:
        producer = None
    if producer is not None:
        loaded.run = RunTarget(
            platform="wandb",
            run_id=producer.id,
            entity=producer.entity,
            project=producer.project,
            label=f"{producer.entity}/{producer.project}/{producer.id}",
        )
    return loaded


def wandb_api() -> Any:
    """``wandb.Api`` with a short timeout, its failures as :class:`PlatformError`.

    The W&B server is probed first: ``wandb.Api`` starts a background ``wandb-core`` service that
    keeps retrying an unreachable server, and the process then waits for it at exit.
    """
    try:
        import wandb
    except ImportError as error:
        raise PlatformError(
            f"wandb-artifact:// sources need the wandb package: {_WANDB_HINT}"
        ) from error
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if not _reachable(base):
        raise PlatformError(
            f"cannot reach W&B at {base}: check the network, or WANDB_BASE_URL for a local server."
        )
    silent = _silent(base)
    if silent:
        raise PlatformError(
            f"W&B at {base} accepts connections but does not answer HTTP ({silent}); check the "
            "server, or WANDB_BASE_URL."
        )
    try:
        return wandb.Api(timeout=int(PROBE_TIMEOUT))
    except Exception as error:
        raise _wandb_error(error, "the W&B API") from error


def _wandb_error(error: BaseException, what: str) -> SourceError:
    message = first_line(error)
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    name = type(error).__name__
    if name == "UsageError" and "api key" in message.lower():
        return PlatformError(
            f"W&B needs an API key to read {what}: run `wandb login` or set WANDB_API_KEY."
        )
    if "not found" in message.lower() or "does not exist" in message.lower():
        return SourceError(f"W&B has no {what} ({message}).")
    if not _reachable(base):
        return PlatformError(f"cannot reach W&B at {base} to read {what} ({message}).")
    return PlatformError(f"W&B at {base} failed to give {what} ({message}).")


def _silent(url: str) -> str | None:
    """Why ``url`` gives no HTTP answer within :data:`PROBE_TIMEOUT` seconds (connect and
    read), or ``None`` when it answers (any status: an error page is an answer)."""
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT):
            return None
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as error:
        return first_line(getattr(error, "reason", error))


def _reachable(url: str) -> bool:
    """Whether anything answers at ``url``'s host and port (a TCP connection, 2 s at most)."""
    parsed = urllib.parse.urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=2.0):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def log_to_wandb(result: AuditResult, target: RunTarget, step: int | None) -> str:
    """Resume the W&B run that logged the artifact and log the audit into it (public API)."""
    try:
        import wandb
    except ImportError as error:
        raise PlatformError(
            "logging to a W&B run needs the wandb package: pip install 'cluster-tracking[wandb]'"
        ) from error
    try:
        run = wandb.init(
            entity=target.entity,
            project=target.project,
            id=target.run_id,
            resume="allow",
            settings=wandb.Settings(silent=True, console="off", init_timeout=30),
        )
    except Exception as error:
        raise PlatformError(
            f"cannot resume the W&B run {target.label} ({str(error).splitlines()[0][:200]})."
        ) from error
    try:
        name = f"clusterability-audit-{target.run_id}"
        with tempfile.TemporaryDirectory(prefix="cluster-tracking-audit-") as scratch:
            info = audit_info(result, step, name)
            write_bundle(result, scratch, extra=info)
            artifact = wandb.Artifact(name, type="clusterability-audit", metadata=info)
            artifact.add_dir(scratch)
            if step is not None and step > int(run.step or 0):
                run.log(result.report.metrics(), step=step)
            else:
                run.log(result.report.metrics())
            run.log_artifact(artifact)
            logged_step = run.step
        run.finish()
    except ClusterTrackingError:
        raise
    except Exception as error:
        raise PlatformError(
            f"logging the audit to the W&B run {target.label} failed "
            f"({str(error).splitlines()[0][:200]})."
        ) from error
    return (
        f"W&B run {target.label}: metrics clusterability/* near step {logged_step}, artifact {name}"
    )


def register_platform() -> None:
    """Register W&B with the audit's loader registry (what the entry points name)."""
    register(
        SourcePlatform(
            name="wandb",
            schemes={"wandb-artifact": _parse_wandb_uri},
            kinds=("wandb-artifact",),
            load=load_wandb_source,
            log_to_run=log_to_wandb,
        )
    )
