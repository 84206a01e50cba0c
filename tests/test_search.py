"""The search on a local Ray instance, with a fast stand-in evaluator."""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import ray

from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.pareto import pareto_front
from prunetune.orchestrator.results import ResultLog
from prunetune.orchestrator.search import resume_search, run_search
from prunetune.search_spaces.spaces import make_space
from prunetune.search_spaces.subnet import SubnetConfig
from standin import SMOLLM2_CONFIG, StandInEvaluator

TESTS = Path(__file__).parent
OBJECTIVES = {"perplexity": "min", "params": "min"}


@pytest.fixture
def standin_env(tmp_path, monkeypatch) -> Path:
    """Workers import the stand-in from tests/; each evaluation is counted in a file."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("PRUNETUNE_STANDIN_CALLS", str(calls))
    yield calls
    ray.shutdown()


def spec(run_dir: Path, **changes) -> object:
    base = {"run_dir": str(run_dir), "algorithm": {"num_samples": 10, "seed": 0},
            "resources": {"evaluators": 2}}
    for key, value in changes.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return load_spec(base)


def evaluated(calls: Path) -> list[str]:
    return calls.read_text().split() if calls.exists() else []


def test_search_logs_every_trial_once_and_writes_the_front(tmp_path, standin_env) -> None:
    outcome = run_search(spec(tmp_path / "run", constraints=["params <= 0.6 * dense"]),
                         StandInEvaluator, num_cpus=4)
    log = ResultLog(outcome.run_dir).read()
    trials = log[log["trial_id"] != "dense"]
    assert len(trials) == 10 and trials["config_hash"].is_unique
    assert (trials["params"] <= 0.6 * 134_515_008).all()
    assert Counter(evaluated(standin_env)).most_common(1)[0][1] == 1
    assert len(evaluated(standin_env)) == 11
    front = pd.read_parquet(tmp_path / "run" / "front.parquet")
    expected = pareto_front(log, {"perplexity": "min", "params": "min"})
    assert sorted(front["config_hash"]) == sorted(expected["config_hash"])
    assert (tmp_path / "run" / "front.png").stat().st_size > 10_000


def test_batched_trials_evaluate_each_sub_network_once_under_its_own_id(tmp_path, standin_env) -> None:
    """Trials of 3 sub-networks on 2 evaluators, a budget of 7: batches of 3, 3 and 1, every
    sub-network logged once as `<trial>_<k>`, and the front written from them."""
    outcome = run_search(spec(tmp_path / "run", algorithm={"num_samples": 7},
                              resources={"subnets_per_trial": 3}), StandInEvaluator, num_cpus=4)
    log = ResultLog(outcome.run_dir).read()
    trials = log[log["trial_id"] != "dense"]
    assert len(trials) == 7 and trials["config_hash"].is_unique
    batches = Counter(trials["trial_id"].str.rsplit("_", n=1).str[0])
    assert sorted(batches.values()) == [1, 3, 3]
    calls = evaluated(standin_env)
    assert len(calls) == len(set(calls)) == 8
    front = pd.read_parquet(tmp_path / "run" / "front.parquet")
    assert sorted(front["config_hash"]) == sorted(pareto_front(log, OBJECTIVES)["config_hash"])
    pool_calls = outcome.summary["pool_calls"]
    assert pool_calls["lookup"] == 4, "one lookup per batch (and the dense model's)"
    assert pool_calls["borrow"] <= 8 and pool_calls["settle"] <= 8, pool_calls


def test_multi_fidelity_screens_first_windows_and_scores_no_window_twice(tmp_path, standin_env) -> None:
    """Every proposal is scored on the first 2 of 8 windows; the promoted ones get the other
    6 (never the first 2 again), the rest stop there; the front holds full rows only. (No
    surrogate: it would keep the proposals the rung drops from being made.)"""
    outcome = run_search(spec(tmp_path / "run", algorithm={"name": "local", "num_samples": 12,
                                                           "population_size": 4,
                                                           "surrogate": {"candidates": 1}},
                              evaluation={"windows": 8, "fidelity": {"rungs": [2], "margin": 0.0}},
                              resources={"evaluators": 1}),
                         StandInEvaluator, num_cpus=4)
    log = ResultLog(outcome.run_dir).read()
    assert set(log["fidelity"]) == {2, 8} and log["config_hash"].nunique() == 13
    full = log[log["fidelity"] == 8]
    assert set(full["config_hash"]) <= set(log.loc[log["fidelity"] == 2, "config_hash"])
    assert 1 < len(full) < 13, "some proposals are promoted and some are not"
    calls = evaluated(standin_env)
    assert sorted(calls) == sorted({*(f"{h}@0-2" for h in log["config_hash"].unique()),
                                    *(f"{h}@2-8" for h in full["config_hash"])})
    front = pd.read_parquet(tmp_path / "run" / "front.parquet")
    assert set(front["fidelity"]) == {8}
    assert sorted(front["config_hash"]) == sorted(pareto_front(full, OBJECTIVES)["config_hash"])


def test_a_quality_constraint_drops_the_screens_that_break_it(tmp_path, standin_env) -> None:
    """Told `perplexity <= 1 * dense`, every screen of a sub-network smaller than the dense
    model (worse, for the stand-in) is dropped at its rung: only the dense model is scored
    on every window."""
    outcome = run_search(spec(tmp_path / "run", algorithm={"name": "local", "num_samples": 6,
                                                           "population_size": 4},
                              constraints=["perplexity <= 1 * dense"],
                              evaluation={"windows": 8, "fidelity": {"rungs": [2]}},
                              resources={"evaluators": 1}),
                         StandInEvaluator, num_cpus=4)
    log = ResultLog(outcome.run_dir).read()
    assert log["config_hash"].nunique() == 7
    assert list(log.loc[log["fidelity"] == 8, "trial_id"]) == ["dense"]


@pytest.mark.slow
def test_same_seed_same_configs_other_seed_other_configs(tmp_path, standin_env) -> None:
    def configs(name: str, seed: int) -> list[str]:
        outcome = run_search(spec(tmp_path / name, algorithm={"seed": seed, "num_samples": 6}),
                             StandInEvaluator, num_cpus=4)
        log = ResultLog(outcome.run_dir).read()
        return sorted(log.loc[log["trial_id"] != "dense", "config_hash"])

    first = configs("a", seed=7)
    assert configs("b", seed=7) == first
    assert configs("c", seed=8) != first


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3", "tpe", "gp", "local"])
def test_other_algorithms_finish_without_repeats(tmp_path, standin_env, algorithm) -> None:
    run_search(spec(tmp_path / "run", algorithm={"name": algorithm, "num_samples": 12,
                                                "population_size": 4},
                    search_space={"preset": "layers"}),
               StandInEvaluator, num_cpus=4)
    log = ResultLog(str(tmp_path / "run")).read()
    assert log["config_hash"].is_unique
    # the layers preset of SmolLM2 has 16 configs (15..30 layers), dense included
    assert len(log) == 13 and len(set(evaluated(standin_env))) == 13


@pytest.mark.slow
def test_a_second_algorithm_on_the_same_run_dir_evaluates_nothing_twice(tmp_path, standin_env) -> None:
    run_search(spec(tmp_path / "run", algorithm={"name": "random", "num_samples": 6},
                    search_space={"preset": "layers"}), StandInEvaluator, num_cpus=4)
    run_search(spec(tmp_path / "run", algorithm={"name": "local", "num_samples": 10,
                                                "population_size": 2},
                    search_space={"preset": "layers"}), StandInEvaluator, num_cpus=4)
    calls = evaluated(standin_env)
    assert len(calls) == len(set(calls)) == 11


DRIVER = """
import sys
from standin import StandInEvaluator
from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.search import run_search, resume_search
if sys.argv[1] == "search":
    run_search(load_spec(sys.argv[2]), StandInEvaluator, num_cpus=4)
else:
    resume_search(sys.argv[2], StandInEvaluator, num_cpus=4)
"""


def driver(command: str, target: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, command, str(target)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def one_second() -> dict[str, str]:
    """The environment of a driver whose stand-in evaluations take one second (read when
    called: the `standin_env` fixture sets the rest)."""
    return {**os.environ, "PRUNETUNE_STANDIN_SECONDS": "1"}


def killed_when(spec_file: Path, ready: Callable[[], bool]) -> None:
    """A search driver started on `spec_file` and SIGKILLed, with everything it started in
    its session, as soon as `ready()` holds (or after 240 s); the search must still run."""
    process = driver("search", spec_file, one_second())
    deadline = time.time() + 240
    while not ready() and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the search ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def resumed_rows(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The log of the run after `prunetune resume` finished it: every row, and the trials'."""
    resumed = driver("resume", run_dir, one_second())
    assert resumed.wait(timeout=300) == 0
    rows = ResultLog(str(run_dir)).read()
    return rows, rows[rows["trial_id"] != "dense"]


FILLED = {"preset": "uniform", "fill_to": [0.9, 0.7, 0.5]}


@pytest.mark.slow
@pytest.mark.parametrize("space", [{}, FILLED], ids=["grid", "filled"])
def test_kill_9_of_the_driver_then_resume_loses_and_repeats_nothing(tmp_path, standin_env,
                                                                    space) -> None:
    """Also with budgets to fill to: the log holds the filled sub-networks, and the
    resumed search, whose proposals are filled again, evaluates none of them twice."""
    run_dir = tmp_path / "run"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec(run_dir, algorithm={"num_samples": 14}, search_space=space).to_yaml())
    log = ResultLog(str(run_dir))
    killed_when(spec_file, lambda: len(log.evaluated_hashes()) >= 6)
    killed_at = len(ResultLog(str(run_dir)).read())
    assert 6 <= killed_at < 15

    rows, trials = resumed_rows(run_dir)
    assert len(trials) == 14 and rows["config_hash"].is_unique
    calls = evaluated(standin_env)
    assert len(calls) == len(set(calls)) == 15, Counter(calls).most_common(3)
    if space:
        grid = make_space("uniform", SMOLLM2_CONFIG, fill_to=space["fill_to"])
        subnets = [SubnetConfig.from_json(c) for c in trials["config_json"]]
        assert all(grid.filled(grid.coarse(s)) == s for s in subnets)
        assert any(grid.coarse(s) != s for s in subnets)


def partial_batches(run_dir: Path, batch: int) -> list[str]:
    """Trials of which the log holds some sub-networks but not all `batch` of them."""
    rows = ResultLog(str(run_dir)).read()
    members = rows.loc[rows["trial_id"] != "dense", "trial_id"].str.rsplit("_", n=1).str[0]
    return [trial for trial, count in Counter(members).items() if count < batch]


@pytest.mark.slow
def test_kill_9_in_the_middle_of_a_batch_then_resume_loses_and_repeats_nothing(tmp_path, standin_env) -> None:
    """Trials of 4 sub-networks on 2 evaluators: the driver is killed once a trial has
    logged some of its sub-networks but not all; the resumed search evaluates the rest of
    that batch and every other proposal once. Nothing logged is evaluated again; only an
    evaluation that was running when the driver died (its row unwritten) may be, once."""
    run_dir = tmp_path / "run"
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec(run_dir, algorithm={"num_samples": 16},
                              resources={"subnets_per_trial": 4}).to_yaml())
    killed_when(spec_file, lambda: bool(partial_batches(run_dir, 4)))
    assert partial_batches(run_dir, 4), "no batch was half done when the driver was killed"
    time.sleep(2)  # the run's actors outlive their driver briefly, and may finish work
    logged = set(ResultLog(str(run_dir)).read()["config_hash"])
    assert len(logged) < 17
    before = len(evaluated(standin_env))

    rows, trials = resumed_rows(run_dir)
    assert len(trials) == 16 and rows["config_hash"].is_unique
    calls = evaluated(standin_env)
    after = calls[before:]
    assert not logged & set(after), "a logged sub-network was evaluated again"
    assert len(after) == len(set(after)) == 17 - len(logged)
    assert len(calls) - len(set(calls)) <= 2, Counter(calls).most_common(3)


def test_resume_names_a_directory_that_is_not_a_run(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not a prunetune run directory"):
        resume_search(str(tmp_path))


def test_standin_config_is_smollm2() -> None:
    assert SMOLLM2_CONFIG["num_hidden_layers"] == 30


def test_run_dir_may_be_a_uri_for_log_and_tune_storage(tmp_path, standin_env) -> None:
    uri = f"file://{tmp_path}/remote-run"
    outcome = run_search(spec(uri, algorithm={"num_samples": 3}),
                         StandInEvaluator, num_cpus=4)
    assert outcome.run_dir == uri
    assert len(ResultLog(uri).read()) == 4
    assert (tmp_path / "remote-run" / "spec.yaml").is_file()
    assert (tmp_path / "remote-run" / "front.parquet").is_file()
    assert (tmp_path / "remote-run" / "tune").is_dir()


@pytest.mark.slow
def test_recovered_rows_leave_the_cache_the_budget_and_the_front_alone(tmp_path, standin_env) -> None:
    """A recovered row (however good) neither makes its config evaluated, nor counts against
    the budget, nor enters the search's front."""
    from datetime import datetime, timezone

    from prunetune.orchestrator.results import RECOVERED, make_row
    from prunetune.search_spaces.spaces import make_space

    run_dir = tmp_path / "run"
    layers = {"preset": "layers"}
    run_search(spec(run_dir, algorithm={"num_samples": 2}, search_space=layers),
               StandInEvaluator, num_cpus=4)
    now = datetime.now(timezone.utc)
    space = make_space("layers", SMOLLM2_CONFIG)
    every = [space.decode({"depth": depth}) for depth in space.choices()["depth"]]
    ResultLog(str(run_dir)).append([
        make_row("run", f"recovered-{i}", subnet, SMOLLM2_CONFIG, {"perplexity": 1.0}, "ok", None,
                 "e", now, now, 256, stage=RECOVERED, trained_tokens=64)
        for i, subnet in enumerate(every)])
    run_search(spec(run_dir, algorithm={"num_samples": 6}, search_space=layers),
               StandInEvaluator, num_cpus=4)
    rows = ResultLog(str(run_dir)).read()
    oneshot = rows[rows["stage"] == "oneshot"]
    assert len(oneshot[oneshot["trial_id"] != "dense"]) == 6 and oneshot["config_hash"].is_unique
    calls = evaluated(standin_env)
    assert len(calls) == len(set(calls)) == 7
    front = pd.read_parquet(run_dir / "front.parquet")
    assert (front["stage"] == "oneshot").all() and (front["perplexity"] > 1.0).all()
