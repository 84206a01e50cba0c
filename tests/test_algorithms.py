"""The local search's moves: one parameter, or one kind of width in every layer."""

import random

import numpy as np
import pytest

from prunetune.orchestrator.algorithms import ALGORITHMS, LocalSearch, parameter_groups
from prunetune.orchestrator.results import ResultLog
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.search_spaces.spaces import make_space
from standin import SMOLLM2_CONFIG

OBJECTIVES = {"perplexity": "min", "params": "min"}


def test_parameters_group_by_kind() -> None:
    groups = parameter_groups(["depth", "embed", "heads_0", "mlp_0", "heads_1", "mlp_1", "min_ratio"])
    assert groups == {"depth": ["depth"], "embed": ["embed"], "heads": ["heads_0", "heads_1"],
                      "mlp": ["mlp_0", "mlp_1"], "min_ratio": ["min_ratio"]}


def neighbours_of_one_point(seed: int, count: int) -> tuple[dict, list[dict]]:
    """`count` proposals around a single front point (each proposal fails, so the front stays)."""
    space = make_space("per_layer", SMOLLM2_CONFIG)
    search = LocalSearch(space, OBJECTIVES, seed=seed, initial_random=0)
    start = search.suggest("start")
    search.on_trial_complete("start", {"perplexity": 30.0, "params": 1e8})
    proposals = []
    for i in range(count):
        proposals.append(search.suggest(f"t{i}"))
        search.on_trial_complete(f"t{i}", None, error=True)
    return start, proposals


def test_a_neighbour_steps_one_parameter_or_one_kind_in_every_layer() -> None:
    space = make_space("per_layer", SMOLLM2_CONFIG)
    choices = space.choices()
    start, proposals = neighbours_of_one_point(seed=0, count=300)
    kinds_moved_together = set()
    single_moves = 0
    for config in proposals:
        changed = [name for name in config if config[name] != start[name]]
        groups = parameter_groups(changed)
        assert len(groups) <= 1, changed
        for name in changed:
            i, j = choices[name].index(start[name]), choices[name].index(config[name])
            assert abs(i - j) == 1, (name, start[name], config[name])
        if len(changed) == 1:
            single_moves += 1
        elif changed:
            kind = next(iter(groups))
            movable = [n for n in choices if n.startswith(kind + "_")
                       and 0 <= choices[n].index(start[n]) + (j - i) < len(choices[n])]
            assert sorted(changed) == sorted(movable)
            kinds_moved_together.add(kind)
    assert kinds_moved_together == {"heads", "mlp"} and single_moves > 50


def test_the_same_seed_proposes_the_same_neighbours() -> None:
    assert neighbours_of_one_point(3, 40) == neighbours_of_one_point(3, 40)
    assert neighbours_of_one_point(3, 40)[1] != neighbours_of_one_point(4, 40)[1]


def test_initial_configs_come_first_and_their_results_are_walked_from() -> None:
    """Warm starts (and the dense model) are the local search's own first proposals, and
    its neighbours are then taken around them."""
    space = make_space("per_layer", SMOLLM2_CONFIG)
    first, second = (space.encode(space.sample(random.Random(seed))) for seed in (1, 2))
    search = LocalSearch(space, OBJECTIVES, seed=0, initial_random=0, initial=[first, second])
    assert search.suggest("a") == first and search.suggest("b") == second
    search.on_trial_complete("a", {"perplexity": 10.0, "params": 5e7})
    search.on_trial_complete("b", {"perplexity": 20.0, "params": 4e7})
    for i in range(20):
        proposal = search.suggest(f"n{i}")
        steps = [sum(c[k] != proposal[k] for k in c) for c in (first, second)]
        nearest = (first, second)[steps.index(min(steps))]
        assert len(parameter_groups([k for k in proposal if proposal[k] != nearest[k]])) <= 1
        search.on_trial_complete(f"n{i}", None, error=True)


def test_a_used_up_neighbourhood_does_not_stall_the_search() -> None:
    """Every depth of a 16-point space is reached although the front's neighbours fill up."""
    space = make_space("layers", SMOLLM2_CONFIG)
    search = LocalSearch(space, OBJECTIVES, seed=0, initial_random=0,
                         initial=[{"depth": 30}, {"depth": 29}])
    seen = []
    for i in range(40):
        config = search.suggest(f"t{i}")
        seen.append(config["depth"])
        search.on_trial_complete(f"t{i}", {"perplexity": 100.0 - config["depth"],
                                           "params": 1e6 * config["depth"]})
    assert set(seen) == set(range(15, 31))
    assert len(set(seen[:16])) >= 12


def test_the_front_kept_as_results_arrive_is_the_front_of_every_point(tmp_path) -> None:
    """The local search keeps its front as results come in (a proposal must not cost more
    as the points grow): it is the non-dominated points in the order they arrived, ties
    included, and a restored search rebuilds the same."""
    from prunetune.orchestrator.pareto import non_dominated_ranks

    space = make_space("per_layer", SMOLLM2_CONFIG)
    search = LocalSearch(space, OBJECTIVES, seed=0, initial_random=4)
    rng = random.Random(0)
    for i in range(300):
        search.suggest(f"t{i}")
        values = {"perplexity": float(rng.randrange(50)), "params": float(rng.randrange(50))}
        search.on_trial_complete(f"t{i}", values if i % 7 else None, error=not i % 7)
    F = np.stack([f for _, f in search.points])
    expected = [i for i, rank in enumerate(non_dominated_ranks(F)) if rank == 0]
    assert [id(c) for c, _ in search.front] == [id(search.points[i][0]) for i in expected]
    assert len(search.points) < 300 and not search.proposing
    search.save(str(tmp_path / "state.pkl"))
    restored = LocalSearch(space, OBJECTIVES, seed=0, initial_random=4)
    restored.restore(str(tmp_path / "state.pkl"))
    assert [c for c, _ in restored.front] == [c for c, _ in search.front]
    assert restored.suggest("next") == search.suggest("next")


def _always(subnet) -> bool:
    return True


def _guarded(name: str, run_dir: str):
    from prunetune.orchestrator.algorithms import GuardedSearcher, make_algorithm

    space = make_space("uniform", SMOLLM2_CONFIG)
    algorithm = make_algorithm(name, space, OBJECTIVES, seed=0, population_size=4)
    return GuardedSearcher(algorithm, space, OBJECTIVES, run_dir, _always, budget=40)


def _finish(searcher, trial_id: str, config: dict, run_dir: str) -> None:
    """What a trial does: log its row, then report it."""
    from datetime import datetime, timezone

    from prunetune.orchestrator.results import ResultLog, make_row
    from prunetune.search_spaces.subnet import SubnetConfig

    subnet = SubnetConfig.from_json(config["subnet"])
    metrics = {"perplexity": 100.0 / config["ratio"] + 30 - config["depth"]}
    now = datetime.now(timezone.utc)
    row = make_row("run", trial_id, subnet, SMOLLM2_CONFIG, metrics, "ok", None, "e", now, now, 256)
    ResultLog(run_dir).append([row])
    searcher.on_trial_complete(trial_id, row)


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_proposer_hands_out_distinct_configs_and_resumes_after_a_kill(name, tmp_path) -> None:
    """Four trials in flight at once never get the same config. A searcher killed some
    trials after its last checkpoint (its saved state lags behind the log) and restored
    from that checkpoint hands out no config that is logged or still running."""
    run_dir = str(tmp_path)
    searcher = _guarded(name, run_dir)
    handed = {}
    for i in range(14):
        handed[f"t{i}"] = searcher.suggest(f"t{i}")
        if i >= 4:
            _finish(searcher, f"t{i - 4}", handed[f"t{i - 4}"], run_dir)
        if i == 9:
            searcher.save(str(tmp_path / "state.pkl"))
    subnets = [c["subnet"] for c in handed.values()]
    assert len(set(subnets)) == len(subnets)
    restored = _guarded(name, run_dir)
    restored.restore(str(tmp_path / "state.pkl"))
    logged = set(ResultLog(run_dir).evaluated_hashes())
    running_at_checkpoint = {handed[f"t{i}"]["subnet"] for i in range(6, 10)}
    later = [restored.suggest(f"r{i}")["subnet"] for i in range(6)]
    assert len(set(later)) == 6 and not set(later) & running_at_checkpoint
    assert not {SubnetConfig.from_json(c).config_hash() for c in later} & logged


def test_a_filled_search_evaluates_logs_and_resumes_the_filled_sub_networks(tmp_path) -> None:
    """With budgets to fill to, the guard hands out (and the log keeps) each proposal's
    filled sub-network, checks feasibility on it, and a searcher started again on the
    same log with the same seed repeats none of them: its proposals are known."""
    from prunetune.orchestrator.algorithms import GuardedSearcher, make_algorithm
    from prunetune.search_spaces.cost import count_params

    run_dir = str(tmp_path)
    dense = count_params(SMOLLM2_CONFIG, SubnetConfig.dense(SMOLLM2_CONFIG))

    def guarded():
        space = make_space("uniform", SMOLLM2_CONFIG, fill_to=[0.9, 0.7])
        algorithm = make_algorithm("random", space, OBJECTIVES, seed=0, population_size=4)
        under = lambda s: count_params(SMOLLM2_CONFIG, s) <= 0.9 * dense
        return space, GuardedSearcher(algorithm, space, OBJECTIVES, run_dir, under, budget=40)

    space, searcher = guarded()
    handed = [searcher.suggest(f"t{i}") for i in range(8)]
    for i, config in enumerate(handed):
        subnet = SubnetConfig.from_json(config["subnet"])
        assert subnet == space.filled(space.decode(config))
        assert count_params(SMOLLM2_CONFIG, subnet) <= 0.9 * dense
        _finish(searcher, f"t{i}", config, run_dir)
    assert any(SubnetConfig.from_json(c["subnet"]) != space.decode(c) for c in handed)
    assert len(ResultLog(run_dir).evaluated_hashes()) == 8
    _, again = guarded()
    later = [again.suggest(f"r{i}")["subnet"] for i in range(4)]
    assert again.skipped["known"] >= 8
    assert not set(later) & {c["subnet"] for c in handed}


def test_an_algorithm_stuck_on_a_running_config_waits_for_its_result(tmp_path) -> None:
    """An algorithm that ignores failures (Optuna's GP) may propose only the config that is
    running: the guard answers "nothing now" (None), which Tune asks again later, not
    FINISHED, which would end the search short; once that config is logged, FINISHED."""
    from ray.tune.search import Searcher

    from prunetune.orchestrator.algorithms import GuardedSearcher, make_algorithm

    space = make_space("uniform", SMOLLM2_CONFIG)
    favourite = make_algorithm("random", space, OBJECTIVES, seed=0, population_size=4).suggest("a")

    class Stuck(Searcher):
        def suggest(self, trial_id: str) -> dict:
            return dict(favourite)

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass

    run_dir = str(tmp_path)
    searcher = GuardedSearcher(Stuck(), space, OBJECTIVES, run_dir, _always, budget=40)
    running = searcher.suggest("t0")
    assert searcher.suggest("t1") is None
    _finish(searcher, "t0", running, run_dir)
    assert searcher.suggest("t2") == Searcher.FINISHED
