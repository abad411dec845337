"""Tracking platforms an audit reads models from and writes results back to, by URI scheme.

The audit core reads local files and folders itself. Every other source scheme (``runs:/`` and
``models:/`` of MLflow, ``wandb-artifact://`` of W&B) belongs to a :class:`SourcePlatform` that
an integration registers here (:func:`register`). The core never imports an integration: when a
scheme, a source kind or a platform is asked for and nothing registered it yet, the Python entry
points of the group :data:`ENTRY_POINT_GROUP` are loaded (each names a function that registers
its platform), as a plugin would be. A third-party package can add a scheme the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster_tracking.audit.run import AuditResult
    from cluster_tracking.audit.sources import LoadedModel, RunTarget, SourceRef

#: Entry point group of the functions that register a :class:`SourcePlatform`; each entry point
#: is named for a scheme (``runs``), a source kind (``mlflow-run``) or a platform (``mlflow``).
ENTRY_POINT_GROUP = "cluster_tracking.sources"

#: ``parse(uri, rest)``: a source URI (``rest`` is what follows ``scheme:``) as a ``SourceRef``.
Parse = Callable[[str, str], "SourceRef"]


@dataclass(frozen=True)
class SourcePlatform:
    """A tracking platform as the audit sees it.

    Attributes:
        name: the platform, as :attr:`~cluster_tracking.audit.sources.RunTarget.platform` names
            it (``mlflow``, ``wandb``).
        schemes: URI scheme (lower case, without ``:``) -> its parser.
        kinds: the :attr:`~cluster_tracking.audit.sources.SourceRef.kind` values it loads.
        load: ``load(ref, trust_pickle=..., tracking_uri=...)`` -> the loaded model.
        log_to_run: ``log_to_run(result, target, step)`` writes an audit into the run that
            logged the model; returns where, in words.
        experiment_sources: ``experiment_sources(names, tracking_uri=..., notes=...)`` ->
            ``([(uri, label)], skipped)``, every run of those experiments holding a model
            (``None``: the platform has no experiments).
        check_uri_form: checks the form of a tracking URI before anything is read (``None``:
            the platform takes no tracking URI).
        load_pickled_model: ``load_pickled_model(folder)`` unpickles a model the platform saved
            in a local folder, for real (``--trust-pickle``); ``None`` when the class is missing.
    """

    name: str
    schemes: dict[str, Parse] = field(default_factory=dict)
    kinds: tuple[str, ...] = ()
    load: Callable[..., LoadedModel] | None = None
    log_to_run: Callable[[AuditResult, RunTarget, int | None], str] | None = None
    experiment_sources: Callable[..., tuple[list[tuple[str, str]], list[str]]] | None = None
    check_uri_form: Callable[[str], Any] | None = None
    load_pickled_model: Callable[[Path], Any] | None = None


_PLATFORMS: dict[str, SourcePlatform] = {}
_LOADED: set[str] = set()


def register(platform: SourcePlatform) -> None:
    """Make ``platform`` the one that serves its name, schemes and kinds (a second registration
    of the same name replaces the first)."""
    _PLATFORMS[platform.name] = platform


def _lookup(match: Callable[[SourcePlatform], bool]) -> SourcePlatform | None:
    return next((p for p in _PLATFORMS.values() if match(p)), None)


def _find(key: str, match: Callable[[SourcePlatform], bool]) -> SourcePlatform | None:
    """The registered platform that ``match`` accepts; the entry point named ``key`` (then every
    entry point of the group) is loaded first when none is registered yet."""
    found = _lookup(match)
    if found is not None:
        return found
    available = list(entry_points(group=ENTRY_POINT_GROUP))
    named = [ep for ep in available if ep.name == key]
    for point in (*named, *available):
        if point.value in _LOADED:
            continue
        _LOADED.add(point.value)
        point.load()()
        found = _lookup(match)
        if found is not None:
            return found
    return None


def platform_for_scheme(scheme: str) -> SourcePlatform | None:
    """The platform whose sources start with ``scheme:`` (``None``: no platform knows it)."""
    key = scheme.lower()
    return _find(key, lambda p: key in p.schemes)


def platform_for_kind(kind: str) -> SourcePlatform | None:
    """The platform that loads sources of ``kind`` (``mlflow-run``...)."""
    return _find(kind, lambda p: kind in p.kinds)


def platform(name: str) -> SourcePlatform | None:
    """The platform named ``name`` (``mlflow``, ``wandb``)."""
    return _find(name, lambda p: p.name == name)
