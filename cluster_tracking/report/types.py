"""The result of one clusterability measurement, and its versioned JSON form.

A :class:`ClusterabilityReport` is what every sink logs and what the CLI prints. Its JSON schema is
versioned (:data:`SCHEMA_VERSION`); ``from_json`` reads every version this release knows and refuses
newer ones with a clear message. JSON is strict: no ``NaN`` or ``Infinity`` (an undefined value is
``null``), so browsers and dashboards can parse it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from cluster_tracking.errors import SourceError

#: Version of the report's JSON schema. Bump on any incompatible change.
SCHEMA_VERSION = 1


@dataclass
class ClusterSummary:
    """One cluster of the partition.

    ``cut`` is the weight of the edges leaving the cluster, ``volume`` the sum of its nodes'
    degrees and ``ncut_term = cut / volume`` its share of the n-cut. ``per_layer`` counts the
    cluster's nodes in each layer (layer name -> count).
    """

    cluster: int
    size: int
    cut: float
    volume: float
    ncut_term: float
    per_layer: dict[str, int]


@dataclass
class Partition:
    """The clusters found: ``labels`` in node order (``-1`` for removed zero-degree nodes), the
    same split by layer in ``by_layer``, and one :class:`ClusterSummary` per cluster."""

    labels: list[int]
    by_layer: dict[str, list[int]]
    clusters: list[ClusterSummary]


@dataclass
class Baseline:
    """How the observed n-cut compares with a null model (shuffled or re-initialised networks).

    Attributes:
        method: the null model (``layer``, ``layer_nonzero``, ``layer_nonzero_distribution``,
            ``layer_all_distribution`` or ``random_init``).
        n: number of null networks.
        mean, std: mean and population standard deviation of their n-cuts.
        z_score: ``(ncut - mean) / std``; ``None`` when the null has zero spread (``degenerate``).
        p_value: one-sided ``(r + 1) / (n + 1)`` with r the number of null n-cuts strictly below the
            observed one; its floor is ``1 / (n + 1)``.
        percentile: percentile rank of the observed n-cut among the null ones (0-100; ties count
            half).
        diff: ``ncut - mean``; rel_diff: ``(ncut - mean) / mean``.
        degenerate: True when every null n-cut is the same, so no z-score exists.
        ncuts: the null n-cuts, in the order of their seeds.
    """

    method: str
    n: int
    mean: float
    std: float
    z_score: float | None
    p_value: float
    percentile: float
    diff: float
    rel_diff: float | None
    degenerate: bool
    ncuts: list[float]


@dataclass
class NodeCounts:
    """Nodes of the weight graph: all of them, the zero-degree ones removed, the ones clustered."""

    total: int
    removed: int
    clustered: int


@dataclass
class LayerSummary:
    """A node layer of the weight graph: its name and number of nodes."""

    name: str
    width: int


@dataclass
class ClusterabilityReport:
    """The clusterability of one network at one moment (Filan et al. 2021).

    Attributes:
        ncut: n-cut of the partition found (lower is more clusterable; between 0 and ``k``).
        ave_in_out: ``(1 - ncut / k) / (2 ncut / k)``, the paper's average ratio of a cluster's
            internal to external edge weight (``None`` when ``ncut`` is 0).
        k: number of clusters.
        partition: the clusters (labels in node order, per layer, per-cluster statistics).
        baseline: comparison with a null model, or ``None`` when no null was measured.
        nodes: node counts (total, zero-degree removed, clustered).
        layers: the node layers, from the input.
        eigenvalues: the k smallest eigenvalues of the normalised Laplacian.
        timings: seconds spent per stage (``graph``, ``partition``, ``baseline``, ``total``; and
            ``plots``, drawing the plots, not in ``total``, when the tracker drew them).
        config: every setting that produced this report (k, seed, method, norm, preset, ...).
        versions: versions of cluster-tracking and its numeric dependencies.
        step: the training step the report belongs to (set by the tracker), else ``None``.
        schema_version: version of the JSON schema.
    """

    ncut: float
    ave_in_out: float | None
    k: int
    partition: Partition
    baseline: Baseline | None
    nodes: NodeCounts
    layers: list[LayerSummary]
    eigenvalues: list[float]
    timings: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    step: int | None = None
    schema_version: int = SCHEMA_VERSION

    def metrics(self) -> dict[str, float]:
        """The ``clusterability/*`` metrics of this report (undefined ones left out)."""
        values: dict[str, float | None] = {
            "clusterability/ncut": self.ncut,
            "clusterability/ave_in_out": self.ave_in_out,
        }
        if self.baseline is not None:
            values["clusterability/z_score"] = self.baseline.z_score
            values["clusterability/p_value"] = self.baseline.p_value
            values["clusterability/shuffle_mean"] = self.baseline.mean
            values["clusterability/shuffle_std"] = self.baseline.std
        return {
            key: float(value)
            for key, value in values.items()
            if value is not None and math.isfinite(value)
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what ``to_json`` writes)."""
        return _finite(asdict(self))

    def to_json(self, indent: int | None = None) -> str:
        """Strict JSON of the report (schema :data:`SCHEMA_VERSION`)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterabilityReport:
        """Rebuild a report from :meth:`to_dict` output."""
        version = data.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION or version < 1:
            raise SourceError(
                f"report has schema_version {version!r}; this cluster-tracking reads versions "
                f"1..{SCHEMA_VERSION}. Upgrade cluster-tracking to read newer reports."
            )
        try:
            partition = data["partition"]
            baseline = data.get("baseline")
            return cls(
                ncut=float(data["ncut"]),
                ave_in_out=data.get("ave_in_out"),
                k=int(data["k"]),
                partition=Partition(
                    labels=list(partition["labels"]),
                    by_layer={name: list(v) for name, v in partition["by_layer"].items()},
                    clusters=[ClusterSummary(**c) for c in partition["clusters"]],
                ),
                baseline=Baseline(**baseline) if baseline is not None else None,
                nodes=NodeCounts(**data["nodes"]),
                layers=[LayerSummary(**layer) for layer in data["layers"]],
                eigenvalues=list(data["eigenvalues"]),
                timings=dict(data.get("timings", {})),
                config=dict(data.get("config", {})),
                versions=dict(data.get("versions", {})),
                step=data.get("step"),
                schema_version=version,
            )
        except (KeyError, TypeError) as error:
            raise SourceError(
                f"not a cluster-tracking report: missing or malformed field ({error}). "
                "Pass the JSON written by ClusterabilityReport.to_json()."
            ) from error

    @classmethod
    def from_json(cls, text: str) -> ClusterabilityReport:
        """Parse a report from :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SourceError(f"report is not valid JSON: {error}.") from error
        if not isinstance(data, dict):
            raise SourceError("report JSON must be an object.")
        return cls.from_dict(data)


#: The procedure of a report written before ``config["procedure"]`` was recorded: its partition
#: came from the default clustering and its nulls from the old conventions, even under
#: ``preset="filan2021"`` (which then changed the graph of convolutional networks only).
UNRECORDED_PROCEDURE = "unrecorded"


def procedure_of(report: ClusterabilityReport | Mapping[str, Any]) -> str:
    """Which procedure produced a report's numbers: ``"default"`` (this package's clustering and
    nulls), ``"filan2021"`` (the published procedure of Filan et al. 2021), or
    :data:`UNRECORDED_PROCEDURE` for reports written before it was recorded. Takes a report or
    its ``config``.

    A z-score depends on the procedure (the default's restarts, chosen by n-cut, give null
    n-cuts of a smaller spread than scikit-learn's, chosen by inertia), so numbers of different
    procedures must not be set side by side as if they were one measure.
    """
    config = report.config if isinstance(report, ClusterabilityReport) else report
    return str(config.get("procedure", UNRECORDED_PROCEDURE))


def mixed_procedures(
    reports: Iterable[ClusterabilityReport | Mapping[str, Any]],
) -> str | None:
    """A warning, for a person, when ``reports`` (or their configs) come from more than one
    procedure (:func:`procedure_of`); ``None`` when they all come from one."""
    counts: dict[str, int] = {}
    for report in reports:
        name = procedure_of(report)
        counts[name] = counts.get(name, 0) + 1
    if len(counts) < 2:
        return None
    listed = ", ".join(f"{count} by {name!r}" for name, count in sorted(counts.items()))
    return (
        f"these results come from different procedures ({listed}): their n-cuts and z-scores "
        "are not comparable (the filan2021 preset clusters as scikit-learn does, with a wider "
        "null spread and so smaller |z|); measure them all with one preset."
    )


def ave_in_out(ncut: float, k: int) -> float | None:
    """The paper's ``(1 - ncut / k) / (2 ncut / k)``: mean internal-to-external weight ratio."""
    if ncut <= 0:
        return None
    return (1.0 - ncut / k) / (2.0 * ncut / k)


def _finite(value: Any) -> Any:
    """Replace NaN/inf floats by None, recursively, so the JSON stays strict."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
