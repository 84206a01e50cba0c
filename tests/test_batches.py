"""Batched trials: the batch size, the trials alive, and the searcher that hands out batches."""

from datetime import datetime, timezone

import pytest
from ray.tune.search import Searcher

from prunetune.orchestrator.algorithms import GuardedSearcher, make_algorithm
from prunetune.orchestrator.batches import (
    BatchSearcher, concurrent_trials, running_trials, subnets_per_trial, trial_resources,
)
from prunetune.orchestrator.pool import HEAD
from prunetune.orchestrator.results import ResultLog, make_row
from prunetune.search_spaces.spaces import make_space
from prunetune.search_spaces.subnet import SubnetConfig
from standin import SMOLLM2_CONFIG

OBJECTIVES = {"perplexity": "min", "params": "min"}


def test_one_subnet_per_trial_up_to_4_evaluators_then_5_trials_alive() -> None:
    assert [subnets_per_trial(e) for e in (1, 4, 5, 8, 32, 128, 512)] == [1, 1, 2, 2, 8, 32, 128]
    assert subnets_per_trial(512, 3) == 3
    assert [running_trials(e, subnets_per_trial(e)) for e in (2, 8, 32, 128, 512)] == [3, 5, 5, 5, 5]
    assert [concurrent_trials(e, subnets_per_trial(e)) for e in (2, 8, 32, 128, 512)] == [4, 9, 9, 9, 9]


@pytest.mark.parametrize("evaluators, batch", [(1, 1), (8, 2), (512, 128), (64, 1)])
def test_the_running_trials_fit_on_the_head_beside_the_pool_and_the_staged_ones_do_not(
        evaluators: int, batch: int) -> None:
    """In Ray's steps of 1e-4, as it counts them."""
    (name, pool), = HEAD.items()
    share = round(trial_resources(evaluators, batch)[name], 4)
    running = running_trials(evaluators, batch)
    assert concurrent_trials(evaluators, batch) == (2 * running - 1 if batch > 1 else running + 1)
    assert running * share + pool <= 1 < (running + 1) * share + pool


def feasible(subnet: SubnetConfig) -> bool:
    return True


def searcher(run_dir: str, budget: int, batch: int) -> BatchSearcher:
    space = make_space("uniform", SMOLLM2_CONFIG)
    algorithm = make_algorithm("local", space, OBJECTIVES, seed=0, population_size=4)
    guard = GuardedSearcher(algorithm, space, OBJECTIVES, run_dir, feasible, budget)
    return BatchSearcher(guard, batch)


def rows_of(config: dict, trial_id: str, run_dir: str) -> list[dict]:
    """What a batched trial does: log a row per sub-network, then report them together."""
    now = datetime.now(timezone.utc)
    rows = []
    for k, text in enumerate(config["subnets"]):
        subnet = SubnetConfig.from_json(text)
        rows.append(make_row("run", f"{trial_id}_{k}", subnet, SMOLLM2_CONFIG,
                             {"perplexity": 1e9 / subnet.embed}, "ok", None, "e", now, now, 256))
    ResultLog(run_dir).append(rows)
    return rows


def test_batches_are_new_configs_and_end_with_the_budget(tmp_path) -> None:
    """Batches of 4 from a budget of 10: 4, 4, then the 2 left, then FINISHED; no config
    twice, and each sub-network's row reaches the guard under its own id."""
    run_dir = str(tmp_path)
    batches = searcher(run_dir, budget=10, batch=4)
    first, second = batches.suggest("a"), batches.suggest("b")
    assert len(first["subnets"]) == len(second["subnets"]) == 4
    assert set(batches.guard.running) == {f"{t}_{k}" for t in "ab" for k in range(4)}
    batches.on_trial_complete("a", {"rows": rows_of(first, "a", run_dir)})
    third = batches.suggest("c")
    assert len(third["subnets"]) == 2 and set(batches.guard.running) == {
        *(f"b_{k}" for k in range(4)), "c_0", "c_1"}
    assert batches.suggest("d") == Searcher.FINISHED
    every = first["subnets"] + second["subnets"] + third["subnets"]
    assert len(set(every)) == 10
    assert len(batches.guard.algorithm.points) == 4, "each of a's rows was told to the algorithm"


def test_a_failed_trial_tells_every_sub_network_as_failed(tmp_path) -> None:
    batches = searcher(str(tmp_path), budget=10, batch=3)
    batches.suggest("a")
    batches.on_trial_complete("a", None, error=True)
    assert batches.guard.running == {} and batches.guard.algorithm.points == []
    assert len(batches.suggest("b")["subnets"]) == 3, "failed configs do not count against the budget"


def test_a_restored_searcher_finishes_the_batches_it_handed_out(tmp_path) -> None:
    run_dir = str(tmp_path)
    batches = searcher(run_dir, budget=8, batch=4)
    config = batches.suggest("a")
    batches.save(str(tmp_path / "state.pkl"))
    restored = searcher(run_dir, budget=8, batch=4)
    restored.restore(str(tmp_path / "state.pkl"))
    restored.on_trial_complete("a", {"rows": rows_of(config, "a", run_dir)})
    assert restored.guard.running == {} and len(restored.guard.algorithm.points) == 4
    assert len(restored.suggest("b")["subnets"]) == 4
    assert restored.suggest("c") == Searcher.FINISHED
