"""A search over a sharded evaluator group that loses a rank: the group is replaced."""

import os
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")
import ray

from prunetune.evaluators.model import tiny_config
from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.results import ResultLog
from prunetune.orchestrator.search import run_search

TESTS = Path(__file__).parent


@pytest.mark.slow
def test_a_group_that_loses_a_rank_is_replaced_and_the_search_finishes(tmp_path, monkeypatch) -> None:
    from flaky_group import FlakyGroup

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("PRUNETUNE_CACHE", str(tmp_path / "cache"))
    config_file = tmp_path / "config.json"
    tiny_config("llama", intermediate_size=128).to_json_file(config_file)
    spec = load_spec({
        "model": str(config_file), "run_dir": str(tmp_path / "run"),
        "search_space": {"preset": "uniform"},
        "algorithm": {"name": "random", "num_samples": 6, "seed": 1},
        "evaluation": {"seq_len": 16, "windows": 2, "batch_size": 2, "mode": "masked",
                       "importance": "none"},
    })
    try:
        outcome = run_search(spec, FlakyGroup, num_cpus=6)
    finally:
        ray.shutdown()
    log = ResultLog(outcome.run_dir).read()
    assert len(log) == 7 and log["config_hash"].is_unique
    assert (log["status"] == "ok").all(), log["error"].tolist()
    assert outcome.summary["evaluator_replacements"] == 1
    evaluators = {e.split("@")[0] for e in log["evaluator_id"]}
    assert evaluators == {"evaluator-0", "evaluator-1"}
