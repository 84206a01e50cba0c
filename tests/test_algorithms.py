"""The local search's moves: one parameter, or one kind of width in every layer."""

from prunetune.orchestrator.algorithms import LocalSearch, parameter_groups
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
