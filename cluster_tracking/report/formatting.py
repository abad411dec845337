"""Numbers a person reads: one set of fixed decimals for the HTML report, the CLI tables and the
summary lines, so the same quantity reads the same everywhere (an n-cut and its null both with
3 decimals: "10.515 against 10.700 ± 0.009")."""

from __future__ import annotations

import math

from cluster_tracking.report.types import Baseline

#: Decimals of an n-cut and of everything on its scale (null mean and std, diff, cut, volume).
NCUT_DECIMALS = 3
#: Decimals of a z-score.
Z_DECIMALS = 2
#: Decimals of a p-value.
P_DECIMALS = 3

#: What a number that does not exist (no null model, a degenerate null) is written as.
MISSING = "—"


def format_number(value: float | None, decimals: int = NCUT_DECIMALS) -> str:
    """``value`` with ``decimals`` fixed decimals; :data:`MISSING` for ``None``, NaN or inf."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:.{decimals}f}"


def format_ncut(value: float | None) -> str:
    """An n-cut (or a number on its scale) with :data:`NCUT_DECIMALS` decimals."""
    return format_number(value, NCUT_DECIMALS)


def format_z(value: float | None) -> str:
    """A z-score with its sign and :data:`Z_DECIMALS` decimals (``-9.63``, ``+0.41``)."""
    if value is None or not math.isfinite(value):
        return MISSING
    return f"{value:+.{Z_DECIMALS}f}"


def format_null(baseline: Baseline | None) -> str:
    """The null model's n-cuts as ``mean ± std`` (``10.700 ± 0.009``)."""
    if baseline is None:
        return MISSING
    return f"{format_ncut(baseline.mean)} ± {format_ncut(baseline.std)}"


def format_diff(baseline: Baseline | None) -> str:
    """``diff = ncut - mean`` and ``rel_diff`` as a percentage: ``-0.185 (-1.7%)``."""
    if baseline is None:
        return MISSING
    diff = format_number(baseline.diff, NCUT_DECIMALS)
    if diff != MISSING and not diff.startswith("-"):
        diff = "+" + diff
    rel = baseline.rel_diff
    if rel is None or not math.isfinite(rel):
        return diff
    return f"{diff} ({rel * 100:+.2f}%)"


def p_at_floor(baseline: Baseline) -> bool:
    """Whether the p-value is the smallest ``n`` null networks can give, ``1 / (n + 1)``: no
    null n-cut was below the observed one, and more shuffles could give a smaller p."""
    return baseline.n > 0 and math.isclose(baseline.p_value, 1.0 / (baseline.n + 1), rel_tol=1e-9)


def format_p(baseline: Baseline | None, *, long: bool = False) -> str:
    """The p-value with :data:`P_DECIMALS` decimals, marked when it sits at its floor
    ``1 / (n + 1)``: ``0.048 (floor)``, or with ``long`` ``0.048 (the floor for 20 shuffles)``."""
    if baseline is None:
        return MISSING
    text = format_number(baseline.p_value, P_DECIMALS)
    if not p_at_floor(baseline):
        return text
    if long:
        return f"{text} (the floor for {baseline.n} shuffles)"
    return f"{text} (floor)"


#: A footnote for tables whose p column may say "(floor)".
P_FLOOR_NOTE = (
    "p (floor) = 1/(n+1): no shuffled network had a lower n-cut; more shuffles could give a "
    "smaller p."
)
