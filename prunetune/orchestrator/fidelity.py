"""Multi-fidelity evaluation: the number of evaluation windows as the fidelity.

With `evaluation.fidelity.rungs: [2]` and `windows: 32`, a proposal is first scored on
the first 2 windows (a rung). It gets the other 30 only if it could still reach the front
at full fidelity; otherwise its rung row is its answer. Losses are sums over windows, so
a promotion scores only the windows not scored yet and adds them up (`combine`): no window
is scored twice. Every stage is a row of the result log, with the windows it covers in
`fidelity`; the front is computed from full-fidelity rows only (`pareto.full_fidelity`).

The promotion rule compares like with like: every sub-network that reached a rung has a
row there, scored on the same first windows. A proposal is dropped at a rung when some
sub-network no worse in every other objective (parameters, FLOPs, latency: what does not
depend on the windows) has a loss on those windows lower by more than the relative
`margin`. Text windows differ from each other far more than two sub-networks differ on
one window, so pairing on the same windows removes most of the noise of a few windows:
on SmolLM2-135M the first 2 of 32 windows of 512 tokens rank 256 sub-networks with a
Spearman correlation of 0.94 (uniform space) and 0.98 (per-layer space), and with every
other sub-network known the rule at the default margin of 0.02 drops 62% of the uniform
space and 1 of its 54 front points (0.05: 45%, none; `benchmarks/search_efficiency.py`).
This is successive halving with Pareto
dominance in place of a single metric: Ray Tune's ASHA ranks trials by one metric, and in
a perplexity-against-size search it would stop exactly the small sub-networks that make
the cheap end of the front.

The algorithm is told a dropped proposal's loss scaled to full fidelity (by the median
ratio of full to rung loss of the sub-networks scored both ways), so a proposal scored on
easy first windows does not look better than the front that dominates it.

A quality constraint (`perplexity <= 40 * dense`, `nll < 5`) drops a screen too: one whose
loss, scaled to full fidelity, is above the constraint's bound by more than the margin
(`loss_ceiling`). Without it every sub-network smaller than all scored so far is promoted
(nothing no larger beats it), and a search spends full evaluations on tiny sub-networks
with perplexities in the thousands, which the user has already ruled out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol

import numpy as np
import pandas as pd

from prunetune.evaluators.perplexity import perplexity_metrics
from prunetune.metrics import SCREENED_METRICS
from prunetune.orchestrator.pareto import full_fidelity, objective_matrix
from prunetune.orchestrator.spec import Constraint

Span = tuple[int, int]


@dataclass(frozen=True)
class Fidelity:
    """Full fidelity (`windows`), the rungs a proposal is screened at, the margin, and the
    highest full-fidelity loss the constraints allow (`ceiling`, `loss_ceiling`).

    No rungs: every proposal is scored on every window at once, as without multi-fidelity.
    """

    windows: int
    rungs: tuple[int, ...] = ()
    margin: float = 0.02
    ceiling: float = math.inf

    def __post_init__(self) -> None:
        if list(self.rungs) != sorted(set(self.rungs)) or any(not 0 < r < self.windows for r in self.rungs):
            raise ValueError(f"fidelity rungs {list(self.rungs)} must ascend, each in [1, "
                             f"windows = {self.windows})")
        if self.margin < 0:
            raise ValueError(f"fidelity margin must be >= 0, got {self.margin}")

    def spans(self, done: int = 0) -> list[Span]:
        """The window spans still to score once the first `done` are: up to each rung
        above `done`, then to full fidelity."""
        stops = [r for r in self.rungs if r > done] + ([self.windows] if done < self.windows else [])
        return list(zip([done, *stops[:-1]], stops))

    def windows_of(self, row: Mapping[str, Any]) -> int:
        """The windows a logged row covers; a row without `fidelity` (an older log) is full."""
        value = row.get("fidelity")
        return self.windows if value is None or value != value else int(value)


@dataclass(frozen=True)
class Reference:
    """Every sub-network scored at one rung so far: its other objectives (minimised) and
    its mean loss on the rung's windows; and the median ratio of full-fidelity to rung loss
    over those also scored in full (1 before any is)."""

    costs: np.ndarray
    rung_nll: np.ndarray
    full_ratio: float = 1.0


def other_objectives(objectives: Mapping[str, str]) -> dict[str, str]:
    """The objectives that do not depend on the windows scored."""
    return {name: d for name, d in objectives.items() if name not in SCREENED_METRICS}


def reference(rows: pd.DataFrame, rung: int, objectives: Mapping[str, str]) -> Reference:
    """The reference at `rung` from result-log rows: the ok rows at that rung, and the
    full-fidelity rows of the same sub-networks for the ratio."""
    others = other_objectives(objectives)
    if not len(rows) or "fidelity" not in rows.columns:
        return Reference(np.zeros((0, len(others))), np.zeros(0))
    ok = rows[rows["status"] == "ok"]
    at_rung = ok[ok["fidelity"] == rung].drop_duplicates("config_hash", keep="last")
    full = ok[full_fidelity(ok)].drop_duplicates("config_hash", keep="last")
    both = full.merge(at_rung[["config_hash", "nll"]], on="config_hash", suffixes=("", "_rung"))
    ratios = both["nll"].to_numpy(float) / both["nll_rung"].to_numpy(float)
    return Reference(
        costs=objective_matrix(at_rung, others) if others else np.zeros((len(at_rung), 0)),
        rung_nll=at_rung["nll"].to_numpy(float),
        full_ratio=float(np.median(ratios)) if len(ratios) else 1.0)


def promote(row: Mapping[str, Any], ref: Reference, objectives: Mapping[str, str],
            margin: float, ceiling: float = math.inf) -> bool:
    """Whether a rung row could still reach the front at full fidelity: its loss scaled to
    full fidelity is within `margin` (relative) of the `ceiling` the constraints allow, and
    no sub-network scored at the rung is at least as good in every other objective and
    lower in loss on the same windows by more than `margin`. A sub-network it compares with
    need not be scored in full: the first windows rank sub-networks as all of them do, so
    one that beats it there would dominate it at full fidelity too."""
    if row.get("status") != "ok" or row.get("nll") is None:
        return False
    if row["nll"] * ref.full_ratio > ceiling * (1 + margin):
        return False
    others = other_objectives(objectives)
    costs = objective_matrix(pd.DataFrame([dict(row)]), others)[0] if others else np.zeros(0)
    beaten = (ref.costs <= costs).all(axis=1) & (ref.rung_nll * (1 + margin) < row["nll"])
    return not beaten.any()


def loss_ceiling(constraints: Iterable[Constraint], dense: Mapping[str, float]) -> float:
    """The highest full-fidelity loss (mean negative log-likelihood) that the upper bounds on
    perplexity or loss among `constraints` allow (`dense`: the dense model's metrics, for
    bounds relative to it); infinity without one."""
    upper = [c for c in constraints if c.metric in SCREENED_METRICS and c.op in ("<=", "<")]
    return min((math.log(c.threshold(dense)) if c.metric == "perplexity" else c.threshold(dense)
                for c in upper), default=math.inf)


def full_estimate(row: Mapping[str, Any], ref: Reference) -> dict[str, Any]:
    """A rung row as the algorithm is told it: its loss scaled to full fidelity."""
    nll = row["nll"] * ref.full_ratio
    return {**row, "nll": nll, "perplexity": math.exp(min(nll, 700.0))}


def combine(first: Mapping[str, Any], rest: Mapping[str, Any]) -> dict[str, float]:
    """Perplexity metrics over the windows of two results together (losses are sums)."""
    total = first["nll"] * first["tokens"] + rest["nll"] * rest["tokens"]
    return perplexity_metrics(total, int(first["tokens"] + rest["tokens"]))


class RungHost(Protocol):
    """Where a trial's stages run: the evaluator, the log, and the rows to compare with."""

    def measure(self, span: Span) -> dict[str, Any]:
        """An evaluation result on the windows of `span`, with `started_at` and `finished_at`."""

    def reference(self, rung: int) -> Reference:
        """The reference at `rung`, from the rows logged so far."""

    def record(self, result: dict[str, Any], windows: int) -> dict[str, Any]:
        """Log the row of a result that covers the first `windows` windows; the row."""


def evaluate_in_rungs(fidelity: Fidelity, objectives: Mapping[str, str], host: RungHost,
                      stored: dict[str, Any] | None, always_promote: bool = False) -> dict[str, Any] | None:
    """Score a sub-network rung by rung, from what the log already holds of it (`stored`,
    its row of the most windows): each stage is logged before the next is decided on, so a
    stopped search picks up where it was. Returns its last row (full fidelity, a rung row
    it was dropped at, or a failure). `always_promote` scores every window (the dense model)."""
    row = stored
    for start, stop in fidelity.spans(0 if row is None else fidelity.windows_of(row)):
        if row is not None and not (row.get("status") == "ok" and (
                always_promote or promote(row, host.reference(start), objectives,
                                              fidelity.margin, fidelity.ceiling))):
            return row
        result = host.measure((start, stop))
        if row is not None and result.get("status") == "ok":
            result = {**result, **combine(row, result)}
        row = host.record(result, stop)
    return row
