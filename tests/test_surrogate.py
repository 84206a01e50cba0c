"""The surrogate: it keeps the proposal predicted to improve the front, skips a hopeless
one, resumes from the log after a kill, and never hands out a config twice."""

from __future__ import annotations

import math
import pickle
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
from ray.tune.search import Searcher

from prunetune.orchestrator.algorithms import GuardedSearcher, make_algorithm
from prunetune.orchestrator.fidelity import Fidelity
from prunetune.orchestrator.results import ResultLog, make_row
from prunetune.orchestrator.spec import Constraint, Spec, SpecError, load_spec
from prunetune.orchestrator.surrogate import (
    Surrogate, grid_features, objective_limits, refit_due, spec_surrogate,
)
from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.spaces import make_space
from prunetune.search_spaces.subnet import SubnetConfig
from standin import SMOLLM2_CONFIG

OBJECTIVES = {"perplexity": "min", "params": "min"}
SPACE = make_space("uniform", SMOLLM2_CONFIG)
NOW = datetime(2025, 3, 1, tzinfo=timezone.utc)


def costs(subnet: SubnetConfig) -> dict[str, float]:
    return {"params": count_params(SMOLLM2_CONFIG, subnet)}


def loss(config: dict[str, Any]) -> float:
    """A smooth made-up loss: narrow widths hurt far more than few layers."""
    return 3.0 + 6.0 * (1.0 - config["ratio"]) ** 2 + 0.05 * (30 - config["depth"])


def grid() -> list[dict[str, Any]]:
    choices = SPACE.choices()
    return [{"depth": d, "ratio": r} for d in choices["depth"] for r in choices["ratio"]]


def log_row(config: dict[str, Any], trial_id: str) -> dict[str, Any]:
    subnet = SPACE.decode(config)
    nll = loss(config)
    return make_row("run", trial_id, subnet, SMOLLM2_CONFIG,
                    {"perplexity": math.exp(nll), "nll": nll}, "ok", None, "e", NOW, NOW, 256)


def surrogate(candidates: int = 4, limits: dict[str, float] | None = None) -> Surrogate:
    return Surrogate(SPACE, OBJECTIVES, costs, candidates, min_rows=4, optimism=0.0,
                     limits=limits)


def true_points(configs: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[loss(c), costs(SPACE.decode(c))["params"]] for c in configs])


def hopeless_and_promising(tmp_path) -> tuple[ResultLog, dict, dict]:
    """A log of every fourth grid point, and two configs it lacks: the one farthest inside
    the dominated region (truly), and a true front point."""
    configs = grid()
    logged, rest = configs[::4], [c for i, c in enumerate(configs) if i % 4]
    log = ResultLog(str(tmp_path))
    log.append([log_row(c, f"t{i}") for i, c in enumerate(logged)])
    L, R, everything = true_points(logged), true_points(rest), true_points(configs)
    dominators = (L[None, :, :] < R[:, None, :]).all(-1).sum(1)
    hopeless = rest[int(np.argmax(dominators))]
    on_front = [c for c, p in zip(rest, R)
                if not ((everything <= p).all(1) & (everything < p).any(1)).any()]
    return log, hopeless, on_front[len(on_front) // 2]


def test_a_hopeless_proposal_scores_below_a_promising_one_and_is_not_chosen(tmp_path) -> None:
    log, hopeless, promising = hopeless_and_promising(tmp_path)
    s = surrogate()
    subnets = [SPACE.decode(hopeless), SPACE.decode(promising)]
    scores = s.scores(subnets) if s.fit(log.read()) else None
    assert scores is not None and scores[0] < 0 < scores[1]
    assert s.choose(subnets, log.read()) == 1


def test_below_min_rows_the_first_proposal_is_kept(tmp_path) -> None:
    log = ResultLog(str(tmp_path))
    log.append([log_row({"depth": 30, "ratio": 1.0}, "dense")])
    s = surrogate()
    assert not s.fit(log.read())
    assert s.choose([SPACE.decode({"depth": 15, "ratio": 0.25}),
                     SPACE.decode({"depth": 30, "ratio": 0.95})], log.read()) == 0


def test_a_limit_makes_a_front_point_beyond_it_hopeless(tmp_path) -> None:
    """The smallest sub-network is on the front, but a constraint `perplexity <= 100`
    (loss 4.6) rules out its predicted loss of 9.4."""
    log, _, _ = hopeless_and_promising(tmp_path)
    smallest = [SPACE.decode({"depth": 15, "ratio": 0.25})]
    free, limited = surrogate(), surrogate(limits={"perplexity": 100.0})
    assert free.fit(log.read()) and limited.fit(log.read())
    assert free.scores(smallest)[0] > 0 > limited.scores(smallest)[0]


def test_objective_limits_come_from_constraints_on_an_objective_s_bad_side() -> None:
    constraints = [Constraint.parse(t) for t in
                   ("perplexity <= 40 * dense", "params >= 1000", "latency_decode_ms < 5")]
    assert objective_limits(constraints, OBJECTIVES, {"perplexity": 25.0}) == {"perplexity": 1000.0}


def test_the_spec_turns_the_surrogate_on_and_off() -> None:
    fidelity = Fidelity(8)
    dense = {"perplexity": 20.0}
    off = Spec.model_validate({"algorithm": {"surrogate": {"candidates": 1}}})
    on = Spec.model_validate({"algorithm": {"surrogate": {"candidates": 6}},
                              "constraints": ["perplexity <= 10 * dense"]})
    assert spec_surrogate(off, SPACE, SMOLLM2_CONFIG, dense, fidelity) is None
    s = spec_surrogate(on, SPACE, SMOLLM2_CONFIG, dense, fidelity)
    assert s.candidates == 6 and s.limits == {"perplexity": 200.0}
    assert s.costs(SPACE.decode({"depth": 15, "ratio": 0.5}))["params"] == costs(
        SPACE.decode({"depth": 15, "ratio": 0.5}))["params"]


def test_a_bad_surrogate_field_is_named() -> None:
    with pytest.raises(SpecError, match="algorithm.surrogate.candidates"):
        load_spec({"algorithm": {"surrogate": {"candidates": 0}}})
    with pytest.raises(SpecError, match="algorithm.surrogate.optimism"):
        load_spec({"algorithm": {"surrogate": {"optimism": -1}}})


class Scripted(Searcher):
    """Proposes the given configs in order, and records what it is told."""

    def __init__(self, configs: list[dict[str, Any]]) -> None:
        super().__init__(metric=list(OBJECTIVES), mode=list(OBJECTIVES.values()))
        self.configs = list(configs)
        self.told: dict[str, bool] = {}
        self.asked: dict[str, dict[str, Any]] = {}

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if not self.configs:
            return Searcher.FINISHED
        self.asked[trial_id] = self.configs.pop(0)
        return self.asked[trial_id]

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.told[trial_id] = error


def test_the_guard_evaluates_the_promising_proposal_and_tells_the_hopeless_one_failed(tmp_path) -> None:
    log, hopeless, promising = hopeless_and_promising(tmp_path)
    algorithm = Scripted([hopeless, promising, {"depth": 30, "ratio": 0.25}])
    searcher = GuardedSearcher(algorithm, SPACE, OBJECTIVES, str(tmp_path), lambda s: True,
                               budget=1000, surrogate=surrogate(candidates=2))
    handed = searcher.suggest("t0")
    assert SubnetConfig.from_json(handed["subnet"]) == SPACE.decode(promising)
    hopeless_id = next(i for i, c in algorithm.asked.items() if c == hopeless)
    assert algorithm.told == {hopeless_id: True} and searcher.skipped["surrogate"] == 1


def _always(subnet: SubnetConfig) -> bool:
    return True


def _guarded(run_dir: str, name: str) -> GuardedSearcher:
    algorithm = make_algorithm(name, SPACE, OBJECTIVES, seed=0, population_size=4)
    return GuardedSearcher(algorithm, SPACE, OBJECTIVES, run_dir, _always, budget=200,
                           surrogate=surrogate(candidates=4))


def _finish(searcher: GuardedSearcher, trial_id: str, config: dict, run_dir: str) -> None:
    """What a trial does: log its row, then report it."""
    row = log_row({k: config[k] for k in ("depth", "ratio")}, trial_id)
    ResultLog(run_dir).append([row])
    searcher.on_trial_complete(trial_id, row)


@pytest.mark.parametrize("name", ["tpe", "local"])
def test_with_a_surrogate_concurrent_trials_differ_and_a_resume_refits_without_repeating(name, tmp_path) -> None:
    """Four trials in flight never get the same config; a searcher killed after its last
    checkpoint and restored refits from the log (nothing of the fit is saved) and hands
    out no config that is logged or was running."""
    run_dir = str(tmp_path)
    searcher = _guarded(run_dir, name)
    handed = {}
    for i in range(16):
        handed[f"t{i}"] = searcher.suggest(f"t{i}")
        if i >= 4:
            _finish(searcher, f"t{i - 4}", handed[f"t{i - 4}"], run_dir)
        if i == 11:
            searcher.save(str(tmp_path / "state.pkl"))
    assert searcher.skipped["surrogate"] > 0
    subnets = [c["subnet"] for c in handed.values()]
    assert len(set(subnets)) == len(subnets)
    restored = _guarded(run_dir, name)
    restored.restore(str(tmp_path / "state.pkl"))
    assert restored.surrogate._models == {}
    logged = set(ResultLog(run_dir).evaluated_hashes())
    running_at_checkpoint = {handed[f"t{i}"]["subnet"] for i in range(8, 12)}
    later = [restored.suggest(f"r{i}")["subnet"] for i in range(6)]
    assert len(set(later)) == 6 and not set(later) & running_at_checkpoint
    assert not {SubnetConfig.from_json(c).config_hash() for c in later} & logged


def test_a_searcher_saved_before_surrogates_existed_resumes_without_one(tmp_path) -> None:
    """A pickled searcher from before the `surrogate` field (no such attribute) still
    suggests after it is unpickled, as Tune does on a resume."""
    searcher = GuardedSearcher(make_algorithm("tpe", SPACE, OBJECTIVES, seed=0, population_size=4),
                               SPACE, OBJECTIVES, str(tmp_path), _always, budget=200)
    del searcher.__dict__["surrogate"]
    old = pickle.loads(pickle.dumps(searcher))
    assert old.surrogate is None and old.suggest("t0")["subnet"]


@pytest.mark.parametrize(("fitted", "rows", "due"), [
    (None, 5, True), (5, 5, False), (5, 6, True),              # small logs: every new row
    (256, 257, False), (256, 282, True), (300, 330, True),     # large: after 10% growth
])
def test_a_large_log_is_fitted_again_only_after_it_has_grown(fitted, rows, due) -> None:
    assert refit_due(fitted, rows) is due


def test_a_filled_sub_network_has_the_features_of_the_grid_point_it_was_filled_from() -> None:
    """Rows of a search with budgets hold filled sub-networks, off the grid; the surrogate
    reads each as its proposal."""
    space = make_space("per_layer", SMOLLM2_CONFIG, fill_to=[0.9])
    proposal = space.decode({**space.encode(SubnetConfig.dense(SMOLLM2_CONFIG)),
                             **{f"mlp_{i}": 1216 for i in range(30)}})
    filled = space.filled(proposal)
    assert filled != proposal
    assert np.array_equal(grid_features(space, filled), grid_features(space, proposal))
