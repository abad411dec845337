"""The settings of an audit, checked before any source is read, and the parsers of their options.

:class:`AuditSettings` holds how every source of one ``audit`` or ``compare`` command is read and
measured; :meth:`AuditSettings.check` refuses a bad value with a
:class:`~cluster_tracking.errors.ConfigError` naming the option. The ``parse_*`` functions read
the CLI's text options; :func:`check_scheduler` and :func:`check_output_paths` check what the
command will reach or write.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from cluster_tracking.audit.registry import platform
from cluster_tracking.errors import ConfigError, PlatformError
from cluster_tracking.resources.limits import MAX_JOBS_NOTE, MAX_SHUFFLES, cpu_count

_BACKENDS = ("threading", "loky", "multiprocessing", "dask")


@dataclass(frozen=True)
class AuditSettings:
    """How every source of one command is measured and read.

    Attributes:
        k: number of clusters, or ``"auto"`` (the largest eigengap in 2..32).
        shuffles: weight-shuffled networks of the null model (0: none).
        method: the null model (``layer``, ``layer_nonzero``, ``layer_nonzero_distribution``,
            ``layer_all_distribution``, ``random_init``).
        seed: seed of every random draw (same seed, same numbers).
        jobs: parallel workers for the null networks (-1: all cores).
        backend, scheduler: joblib backend, and the Dask scheduler address for ``dask``.
        layers: the layers that make the graph, in data-flow order (``None``: all, as a chain).
        norm, preset: kernel-slice norm for convolutions and graph conventions (see
            :func:`~cluster_tracking.graph.weight_graph`).
        trust_pickle: unpickle pickled models for real (runs code from the file).
        tracking_uri: MLflow tracking server or store of ``runs:/``/``models:/`` sources.
        max_memory: bytes the readers and the run may use (``None``: half the memory available,
            :func:`~cluster_tracking.resources.limits.default_memory_limit`).
        arch: the architecture of a bare state_dict (:mod:`cluster_tracking.audit.architectures`: a
            torchvision or timm name, or ``package.module:function``); the state_dict is loaded
            into it and the model's data flow followed.
        input_shape: one example's shape (``(3, 224, 224)``), for models that ``torch.fx``
            cannot trace: they are followed with ``torch.export`` on ``zeros(1, *input_shape)``.
        allow_long_run: measure even when the run is estimated to take longer than
            :data:`~cluster_tracking.resources.limits.MAX_RUN_SECONDS`
            (:func:`~cluster_tracking.resources.limits.check_run_time`).
    """

    k: int | Literal["auto"] = 12
    shuffles: int = 50
    method: str = "layer"
    seed: int = 0
    jobs: int = -1
    backend: str | None = None
    scheduler: str | None = None
    layers: tuple[str, ...] | None = None
    norm: Literal["l1", "l2"] = "l1"
    preset: Literal["default", "filan2021"] = "default"
    trust_pickle: bool = False
    tracking_uri: str | None = None
    max_memory: int | None = None
    arch: str | None = None
    input_shape: tuple[int, ...] | None = None
    allow_long_run: bool = False

    def check(self) -> None:
        """Validate the settings before any source is read.

        Raises:
            ConfigError: a value is out of range or settings contradict each other.
        """
        from cluster_tracking.config import check_method

        if self.k != "auto" and (isinstance(self.k, bool) or not isinstance(self.k, int)):
            raise ConfigError(f"--k must be a whole number >= 2 or 'auto', got {self.k!r}.")
        if isinstance(self.k, int) and self.k < 2:
            raise ConfigError(f"--k {self.k}: a partition needs at least 2 clusters.")
        if self.shuffles < 0 or self.shuffles == 1:
            raise ConfigError(
                f"--shuffles {self.shuffles}: a null model needs at least 2 networks to have a "
                "spread (the paper uses 50-100); pass --shuffles 0 to skip it."
            )
        if self.shuffles > MAX_SHUFFLES:
            raise ConfigError(
                f"--shuffles {self.shuffles} is above the limit of {MAX_SHUFFLES} (the paper uses "
                f"50-100; {MAX_SHUFFLES} already resolves p to 1e-4)."
            )
        if self.jobs == 0 or self.jobs < -1:
            raise ConfigError(
                f"--jobs {self.jobs}: give a number of workers >= 1, or -1 for all cores."
            )
        if self.scheduler is not None and not re.fullmatch(
            r"(tcp|tls|ws|wss|ucx)://[^\s/:]+:\d{1,5}/?", self.scheduler
        ):
            raise ConfigError(
                f"--scheduler {self.scheduler!r} is not a Dask scheduler address; write "
                "tcp://HOST:PORT, e.g. tcp://127.0.0.1:8786."
            )
        if self.tracking_uri is not None:
            _check_tracking_uri_form(self.tracking_uri)
        if self.max_memory is not None and self.max_memory <= 0:
            raise ConfigError(f"--max-memory must be positive, got {self.max_memory}.")
        try:
            check_method(self.method)
        except ConfigError as error:
            raise ConfigError(str(error).replace("null model", "--method", 1)) from None
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}.")
        if self.backend is not None and self.backend not in _BACKENDS:
            raise ConfigError(f"--backend {self.backend!r} is not one of {', '.join(_BACKENDS)}.")
        if self.scheduler is not None and self.backend != "dask":
            raise ConfigError("--scheduler is the address of a Dask scheduler: add --backend dask.")
        if self.norm not in ("l1", "l2"):
            raise ConfigError(f"--norm must be l1 or l2, got {self.norm!r}.")
        if self.preset not in ("default", "filan2021"):
            raise ConfigError(f"--preset must be default or filan2021, got {self.preset!r}.")
        if self.preset == "filan2021" and self.norm != "l1":
            raise ConfigError("--preset filan2021 fixes the kernel norm; drop --norm l2.")


def capped_jobs(settings: AuditSettings) -> tuple[AuditSettings, str | None]:
    """``settings`` with ``--jobs`` capped to the CPUs this process may use, and a note saying
    so (``None`` when nothing changed). A Dask cluster's workers are not local: left as given."""
    cpus = cpu_count()
    if settings.backend == "dask" or settings.jobs <= cpus:
        return settings, None
    note = MAX_JOBS_NOTE.format(asked=settings.jobs, cpus=cpus)
    return replace(settings, jobs=cpus), note


def _check_tracking_uri_form(uri: str) -> None:
    """The form of ``--tracking-uri``, checked by the platform that reads tracking URIs."""
    mlflow = platform("mlflow")
    if mlflow is not None and mlflow.check_uri_form is not None:
        mlflow.check_uri_form(uri)


def check_scheduler(address: str, timeout: float = 8.0) -> None:
    """Check that a Dask scheduler answers at ``address`` (its handshake) within ``timeout``
    seconds: a port that accepts but never answers would otherwise hang the client.

    Raises:
        PlatformError: nothing answers, or distributed is not installed.
    """
    import asyncio

    try:
        from distributed.comm import connect
    except ImportError as error:
        raise PlatformError(
            "--backend dask needs Dask's distributed scheduler: "
            "pip install 'cluster-tracking[dask]'"
        ) from error

    async def handshake() -> None:
        comm = await connect(address, timeout=timeout / 2)
        await comm.close()

    try:
        asyncio.run(asyncio.wait_for(handshake(), timeout))
    except (asyncio.TimeoutError, TimeoutError) as error:
        raise PlatformError(
            f"the Dask scheduler at {address} did not answer within {timeout:.0f} s; is it a "
            "Dask scheduler, and is it running?"
        ) from error
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error)
        raise PlatformError(
            f"cannot reach the Dask scheduler at {address} ({reason}); start one with `dask "
            "scheduler` or pass the right address."
        ) from error


_PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def check_output_paths(csv_path: str | None, plot_path: str | None) -> None:
    """``--csv`` must end in ``.csv``, ``--plot`` in ``.png``, ``.pdf`` or ``.svg``.

    Raises:
        ConfigError: another extension (the file would hold a format its name does not say).
    """
    if csv_path is not None and Path(csv_path).suffix.lower() != ".csv":
        raise ConfigError(f"--csv {csv_path!r}: the file name must end in .csv.")
    if plot_path is not None and Path(plot_path).suffix.lower() not in _PLOT_SUFFIXES:
        raise ConfigError(
            f"--plot {plot_path!r}: the file name must end in .png, .pdf or .svg (the format is "
            "chosen by it)."
        )


def parse_k(text: str | int) -> int | Literal["auto"]:
    """``--k``: a whole number, or ``auto``."""
    if isinstance(text, int):
        return text
    value = str(text).strip().lower()
    if value == "auto":
        return "auto"
    if not value.isdigit():
        raise ConfigError(f"--k must be a whole number >= 2 or 'auto', got {text!r}.")
    return int(value)


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape 3,224,224`` as ``(3, 224, 224)``."""
    if text is None:
        return None
    parts = [part.strip() for part in str(text).replace("x", ",").split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) > 0 for part in parts):
        raise ConfigError(
            f"--input-shape must be positive whole numbers separated by commas, e.g. 3,224,224; "
            f"got {text!r}."
        )
    return tuple(int(part) for part in parts)


def parse_layers(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """``--layers``, repeated and/or separated by commas or ``|``, as one tuple of names or glob
    patterns (:mod:`cluster_tracking.graph.selection` expands the patterns)."""
    if not values:
        return None
    names = tuple(
        name.strip()
        for value in values
        for part in str(value).split(",")
        for name in part.split("|")
    )
    names = tuple(name for name in names if name)
    if not names:
        raise ConfigError("--layers names no layer; give layer names, e.g. --layers 0,2,4.")
    return names
