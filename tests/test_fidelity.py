"""Multi-fidelity evaluation: rungs, the promotion rule, the stages of a trial, the front."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prunetune.orchestrator.algorithms import GuardedSearcher, LocalSearch
from prunetune.orchestrator.callbacks import write_front_files
from prunetune.orchestrator.fidelity import (
    Fidelity, Reference, Span, combine, evaluate_in_rungs, full_estimate, loss_ceiling, promote,
    reference,
)
from prunetune.orchestrator.pareto import full_fidelity, merge_fronts, pareto_front
from prunetune.orchestrator.results import ResultLog, make_row
from prunetune.orchestrator.search import spec_fidelity
from prunetune.orchestrator.spec import Constraint, Spec
from prunetune.search_spaces.spaces import make_space
from prunetune.search_spaces.subnet import SubnetConfig
from standin import SMOLLM2_CONFIG

OBJECTIVES = {"perplexity": "min", "params": "min"}
T0 = datetime(2025, 3, 1, tzinfo=timezone.utc)
SPACE = make_space("layers", SMOLLM2_CONFIG)


def subnet(depth: int) -> SubnetConfig:
    return SPACE.decode({"depth": depth})


def row(depth: int, nll: float, fidelity: int | None, run_id: str = "run",
        status: str = "ok") -> dict[str, Any]:
    """A result-log row of the `layers` space's sub-network of `depth` layers."""
    metrics = {"perplexity": math.exp(nll), "nll": nll, "tokens": 255.0 * (fidelity or 8)}
    return make_row(run_id, f"t{depth}-{fidelity}", subnet(depth), SMOLLM2_CONFIG,
                    metrics if status == "ok" else {}, status, None if status == "ok" else "oom",
                    "e", T0, T0 + timedelta(seconds=1), 256, fidelity)


# --- rungs and the rule -------------------------------------------------------------------

def test_spans_go_rung_by_rung_from_what_is_done() -> None:
    fidelity = Fidelity(windows=32, rungs=(4, 8))
    assert fidelity.spans() == [(0, 4), (4, 8), (8, 32)]
    assert fidelity.spans(4) == [(4, 8), (8, 32)]
    assert fidelity.spans(8) == [(8, 32)]
    assert fidelity.spans(32) == []
    assert Fidelity(windows=8).spans() == [(0, 8)]
    assert Fidelity(windows=8).windows_of({"fidelity": None}) == 8
    assert Fidelity(windows=8).windows_of({"fidelity": float("nan")}) == 8
    assert Fidelity(windows=8).windows_of({}) == 8


@pytest.mark.parametrize("rungs", [(8,), (4, 2), (0, 4), (2, 2)])
def test_rungs_must_ascend_below_full_fidelity(rungs) -> None:
    with pytest.raises(ValueError, match="must ascend"):
        Fidelity(windows=8, rungs=rungs)


def make_reference(params: list[float], rung_nll: list[float], ratio: float = 1.1) -> Reference:
    return Reference(costs=np.array(params, dtype=float)[:, None], rung_nll=np.array(rung_nll),
                     full_ratio=ratio)


@pytest.mark.parametrize("params, nll, promoted", [
    (100.0, 3.0, True),     # on the front's level: promoted
    (100.0, 3.14, True),    # worse, but within the 5% margin of the same windows
    (100.0, 3.16, False),   # worse by more than the margin, and no smaller: dropped
    (100.0, 9.0, False),
    (90.0, 9.0, True),      # smaller than every reference row: it could be the cheap end
    (200.0, 3.16, False),   # larger and worse than the 100-parameter row
])
def test_promotion_needs_a_reference_row_as_cheap_and_better_beyond_the_margin(params, nll, promoted) -> None:
    ref = make_reference([100.0, 150.0], [3.0, 2.5])
    candidate = {"status": "ok", "nll": nll, "perplexity": math.exp(nll), "params": params}
    assert promote(candidate, ref, OBJECTIVES, margin=0.05) is promoted


def test_promotion_reads_maximised_objectives_and_an_empty_reference() -> None:
    objectives = {"nll": "min", "acc_proxy": "max"}
    ref = Reference(costs=np.array([[-0.8]]), rung_nll=np.array([3.0]))
    worse = {"status": "ok", "nll": 4.0, "acc_proxy": 0.7}
    better_at_other = {"status": "ok", "nll": 4.0, "acc_proxy": 0.9}
    assert not promote(worse, ref, objectives, 0.05)
    assert promote(better_at_other, ref, objectives, 0.05)
    empty = Reference(costs=np.zeros((0, 1)), rung_nll=np.zeros(0))
    assert promote(worse, empty, objectives, 0.05)
    assert not promote({"status": "failed", "nll": None}, empty, objectives, 0.05)


@pytest.mark.parametrize("rung_nll, promoted", [
    (4.0, True),     # 4.0 * 1.1 = 4.4 at full fidelity: under the ceiling of ln 100 = 4.61
    (4.3, True),     # 4.73: above the ceiling, but within the 5% margin of it
    (4.5, False),    # 4.95: above the ceiling by more than the margin
])
def test_a_screen_whose_full_fidelity_estimate_breaks_a_quality_constraint_is_dropped(
        rung_nll: float, promoted: bool) -> None:
    """The smallest sub-network so far is never beaten by a no-larger one, so only the
    constraint's ceiling can drop it."""
    ref = make_reference([100.0], [3.0], ratio=1.1)
    tiny = {"status": "ok", "nll": rung_nll, "perplexity": math.exp(rung_nll), "params": 10.0}
    ceiling = loss_ceiling([Constraint.parse("perplexity <= 100")], {})
    assert promote(tiny, ref, OBJECTIVES, 0.05) is True
    assert promote(tiny, ref, OBJECTIVES, 0.05, ceiling) is promoted


def test_the_loss_ceiling_is_the_tightest_upper_bound_on_perplexity_or_loss() -> None:
    dense = {"perplexity": 20.0, "nll": math.log(20.0), "params": 1e6}
    parse = Constraint.parse
    assert loss_ceiling([], dense) == math.inf
    assert loss_ceiling([parse("params <= 0.5 * dense"), parse("perplexity >= 2")], dense) == math.inf
    assert loss_ceiling([parse("perplexity <= 40 * dense")], dense) == pytest.approx(math.log(800.0))
    assert loss_ceiling([parse("perplexity <= 40 * dense"), parse("nll < 5")], dense) == 5.0


def test_a_search_screens_against_the_ceiling_of_its_spec_once_the_dense_model_is_scored() -> None:
    spec = Spec.model_validate({"model": "m", "constraints": ["perplexity <= 10 * dense"],
                                "evaluation": {"windows": 8, "fidelity": {"rungs": [2]}}})
    assert spec_fidelity(spec).ceiling == math.inf
    assert spec_fidelity(spec, {"perplexity": 30.0}).ceiling == pytest.approx(math.log(300.0))


def test_the_reference_holds_every_row_at_the_rung_and_the_full_to_rung_ratio() -> None:
    rows = pd.DataFrame([row(30, 3.0, 2), row(30, 3.3, 8), row(28, 3.5, 2), row(28, 3.9, 8),
                         row(26, 4.0, 2),                      # dropped there: compared with too
                         row(24, 5.0, 4), row(24, 5.2, 8),      # no row at rung 2
                         row(22, 1.0, 2, status="failed")])
    ref = reference(rows, 2, OBJECTIVES)
    assert sorted(ref.rung_nll) == [3.0, 3.5, 4.0] and ref.costs.shape == (3, 1)
    assert ref.full_ratio == pytest.approx(np.median([3.3 / 3.0, 3.9 / 3.5]))
    assert reference(rows, 4, OBJECTIVES).full_ratio == pytest.approx(5.2 / 5.0)
    old_log = pd.DataFrame([row(30, 3.0, 8)]).drop(columns="fidelity")
    empty = reference(old_log, 2, OBJECTIVES)
    assert len(empty.rung_nll) == 0 and empty.full_ratio == 1.0


def test_a_dropped_proposal_is_told_with_its_loss_scaled_to_full_fidelity() -> None:
    ref = make_reference([100.0, 150.0], [3.0, 2.0], ratio=1.1)
    told = full_estimate({"status": "ok", "nll": 5.0, "perplexity": math.exp(5.0)}, ref)
    assert told["nll"] == pytest.approx(5.5) and told["perplexity"] == pytest.approx(math.exp(5.5))


def test_combine_adds_loss_sums() -> None:
    merged = combine({"nll": 2.0, "tokens": 100}, {"nll": 4.0, "tokens": 300})
    assert merged == {"nll": 3.5, "perplexity": pytest.approx(math.exp(3.5)), "tokens": 400}


# --- the stages of one trial -------------------------------------------------------------

class TableHost:
    """A `RungHost` whose sub-network has a fixed loss on each window; records every call."""

    def __init__(self, window_nll: list[float], ref: Reference, fail_at: int | None = None) -> None:
        self.window_nll = window_nll
        self.ref = ref
        self.fail_at = fail_at
        self.measured: list[Span] = []
        self.rows: list[dict[str, Any]] = []

    def measure(self, span: Span) -> dict[str, Any]:
        self.measured.append(span)
        if span[0] == self.fail_at:
            return {"status": "failed", "error": "oom"}
        nll = float(np.mean(self.window_nll[span[0]:span[1]]))
        return {"status": "ok", "nll": nll, "perplexity": math.exp(nll),
                "tokens": 10 * (span[1] - span[0])}

    def reference(self, rung: int) -> Reference:
        return self.ref

    def record(self, result: dict[str, Any], windows: int) -> dict[str, Any]:
        self.rows.append({**result, "params": 100.0, "fidelity": windows})
        return self.rows[-1]


FIDELITY = Fidelity(windows=8, rungs=(2,), margin=0.05)
FRONT = make_reference([100.0], [3.0])


def test_a_dominated_proposal_stops_at_the_rung() -> None:
    host = TableHost([4.0] * 8, FRONT)
    last = evaluate_in_rungs(FIDELITY, OBJECTIVES, host, None)
    assert host.measured == [(0, 2)] and last["fidelity"] == 2 and last["nll"] == 4.0


def test_a_promoted_proposal_scores_each_window_once_and_logs_every_stage() -> None:
    losses = [3.0, 3.02, 3.5, 3.5, 3.6, 3.1, 3.2, 3.3]
    host = TableHost(losses, FRONT)
    last = evaluate_in_rungs(FIDELITY, OBJECTIVES, host, None)
    assert host.measured == [(0, 2), (2, 8)]
    assert [r["fidelity"] for r in host.rows] == [2, 8]
    assert last["nll"] == pytest.approx(np.mean(losses)) and last["tokens"] == 80


def test_a_stored_stage_is_gone_on_from_and_a_full_row_is_not_evaluated_again() -> None:
    host = TableHost([3.0] * 8, FRONT)
    screen = {"status": "ok", "nll": 3.0, "perplexity": math.exp(3.0), "tokens": 20,
              "params": 100.0, "fidelity": 2}
    last = evaluate_in_rungs(FIDELITY, OBJECTIVES, host, screen)
    assert host.measured == [(2, 8)] and last["fidelity"] == 8
    full = evaluate_in_rungs(FIDELITY, OBJECTIVES, TableHost([3.0] * 8, FRONT), last)
    assert full is last
    older = {**screen, "fidelity": None}
    assert evaluate_in_rungs(FIDELITY, OBJECTIVES, host, older) is older


def test_the_dense_model_and_a_failed_stage() -> None:
    host = TableHost([9.0] * 8, FRONT)
    assert evaluate_in_rungs(FIDELITY, OBJECTIVES, host, None, always_promote=True)["fidelity"] == 8
    failing = TableHost([3.0] * 8, FRONT, fail_at=2)
    last = evaluate_in_rungs(FIDELITY, OBJECTIVES, failing, None)
    assert last["status"] == "failed" and failing.measured == [(0, 2), (2, 8)]
    assert evaluate_in_rungs(FIDELITY, OBJECTIVES, failing, last) is last


def test_without_rungs_a_proposal_is_scored_on_every_window_at_once() -> None:
    host = TableHost([4.0] * 8, FRONT)
    assert evaluate_in_rungs(Fidelity(windows=8), OBJECTIVES, host, None)["fidelity"] == 8
    assert host.measured == [(0, 8)]


# --- the front and the cache ---------------------------------------------------------------

def test_screens_never_enter_the_front() -> None:
    """A screen on easy first windows looks better than every full row; it is no front point."""
    rows = pd.DataFrame([row(30, 3.3, 8), row(30, 3.0, 2), row(28, 2.0, 2), row(26, 1.0, 2),
                         row(24, 4.5, 8), row(24, 4.0, 2)])
    front = pareto_front(rows, OBJECTIVES)
    assert sorted(front["fidelity"]) == [8, 8]
    assert set(merge_fronts([rows], OBJECTIVES)["fidelity"]) == {8}
    assert full_fidelity(rows).tolist() == [True, False, False, False, True, False]


def test_rows_of_older_logs_count_as_full_and_each_run_has_its_own_full_fidelity() -> None:
    older = pd.DataFrame([row(30, 3.3, None), row(28, 3.6, None)]).drop(columns="fidelity")
    assert full_fidelity(older).all() and len(pareto_front(older, OBJECTIVES)) == 2
    mixed = pd.DataFrame([row(30, 3.3, 8, "a"), row(28, 3.0, 2, "a"),
                          row(30, 3.4, 32, "b"), row(26, 3.0, 8, "b"), row(24, 3.9, None, "b")])
    assert full_fidelity(mixed).tolist() == [True, False, True, False, True]


def test_front_files_and_lookups_see_full_rows_only(tmp_path) -> None:
    log = ResultLog(str(tmp_path))
    log.append([row(30, 3.3, 8), row(30, 3.0, 2), row(20, 2.0, 2), row(24, 4.5, 8), row(24, 4.0, 2)])
    summary = write_front_files(str(tmp_path), OBJECTIVES, subnet(30).config_hash())
    front = pd.read_parquet(tmp_path / "front.parquet")
    assert summary["front_size"] == 2 and set(front["fidelity"]) == {8}
    assert log.lookup(subnet(24).config_hash())["fidelity"] == 8
    assert log.lookup(subnet(20).config_hash())["fidelity"] == 2


def test_a_log_written_before_the_fidelity_column_reads_as_full(tmp_path) -> None:
    rows = [row(30, 3.3, None), row(26, 4.0, None)]
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "fidelity"} for r in rows])
    (tmp_path / "results").mkdir()
    pq.write_table(table, tmp_path / "results" / "part-0-old.parquet")
    log = ResultLog(str(tmp_path))
    assert log.read()["fidelity"].isna().all()
    assert len(pareto_front(log.read(), OBJECTIVES)) == 2
    assert Fidelity(windows=8).windows_of(log.lookup(subnet(26).config_hash())) == 8


# --- the searcher ---------------------------------------------------------------------------

class Recorder(LocalSearch):
    """A local search over depths that keeps what it is told."""

    def __init__(self) -> None:
        super().__init__(SPACE, OBJECTIVES, seed=0, initial_random=100)
        self.told: list[dict | None] = []

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.told.append(result)
        super().on_trial_complete(trial_id, result, error)


def test_the_searcher_retries_an_interrupted_promotion_and_tells_screens_scaled(tmp_path) -> None:
    """A screen that the rule promotes (the search stopped before the rest of its windows)
    becomes a trial again; one it drops is answered from the log, scaled to full fidelity."""
    log = ResultLog(str(tmp_path))
    log.append([row(28, 3.0, 2), row(28, 3.3, 8),          # a full row and its screen
                row(24, 3.1, 2),                            # the fewest parameters: promotable
                row(29, 3.4, 2)])                           # beaten by both on the same windows
    searcher = GuardedSearcher(Recorder(), SPACE, OBJECTIVES, str(tmp_path), lambda s: True,
                               budget=10, fidelity=FIDELITY)
    searcher.algorithm.initial = [{"depth": 29}, {"depth": 24}]
    config = searcher.suggest("trial-1")
    assert config["depth"] == 24
    assert searcher.skipped["known"] == 1
    told = searcher.algorithm.told[0]
    assert told["fidelity"] == 2 and told["nll"] == pytest.approx(3.4 * 3.3 / 3.0)
