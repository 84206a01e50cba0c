"""The standard structured-pruning recipes, as sub-networks the search can be measured against.

Each baseline is a one-parameter family of sub-networks, cut by the same surgery and
measured by the same evaluators as the search's:

- `uniform-magnitude`: one width ratio for heads, neurons and embedding channels, units
  ranked by weight magnitude (classic L2 structured pruning);
- `uniform-activation`: the same shapes, units ranked by activation magnitude (Minitron);
- `mlp-only`: every layer, head and embedding channel kept, the same share of MLP neurons
  (by activation) in every layer; the MLPs hold most of a Llama's parameters and, on
  SmolLM2, are the cheapest place to take the first 10-20% from;
- `layer-drop`: whole layers removed, least block influence first (ShortGPT);
- `no-importance`: the same shapes as the uniform baselines on the checkpoint's own unit
  order, which is what the search keeps when the importance permutation is off.

Shapes alone do not say which units are kept: the evaluator's importance setting does, and
`BASELINE_IMPORTANCE` names the one each baseline must be evaluated with. For a parameter
budget (a fraction of the dense model), a baseline's sub-network is the member of its
family with the most parameters not above the budget. The same families, projected to a
search space's grid, warm-start a search (`algorithm.warm_start` in the spec).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.dims import ModelDims
from prunetune.search_spaces.spaces import SearchSpace, scaled_width
from prunetune.search_spaces.subnet import SubnetConfig

BASELINES = ("uniform-magnitude", "uniform-activation", "mlp-only", "layer-drop", "no-importance")

BASELINE_IMPORTANCE = {
    "uniform-magnitude": "magnitude",
    "uniform-activation": "activation",
    "mlp-only": "activation",
    "layer-drop": "activation",
    "no-importance": "none",
}
"""The `evaluation.importance` setting each baseline's sub-networks must be evaluated with
(layer-drop keeps dense widths, so it needs the activation pass for block influence only)."""

DEFAULT_BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
"""Parameter budgets, as fractions of the dense model, of the warm-start sub-networks."""

RATIO_STEPS = 1000
"""Width ratios tried per uniform family: 1.0 down to 0.001 in steps of 0.001."""


def check_baseline(name: str) -> str:
    """`name` if it is a known baseline; otherwise a ValueError that lists the known ones."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known baselines: {', '.join(BASELINES)}")
    return name



def uniform_subnet(model_config: Any, ratio: float, neuron_step: int = 1,
                   embed_step: int = 1) -> SubnetConfig:
    """Every layer kept, each width `ratio` of the dense one (rounded half up to its step).

    Heads are pruned in the search spaces' unit: whole query groups under grouped-query
    attention, query heads when there is a single key/value head.
    """
    d = ModelDims.of(model_config)
    n = d.num_layers
    if d.num_kv_heads > 1:
        kv, q = scaled_width(ratio, d.num_kv_heads, 1), d.q_per_kv
    else:
        kv, q = 1, scaled_width(ratio, d.q_per_kv, 1)
    mlp = scaled_width(ratio, d.intermediate_size, neuron_step)
    embed = scaled_width(ratio, d.hidden_size, embed_step)
    return SubnetConfig(tuple(range(n)), (kv,) * n, (q,) * n, (mlp,) * n, embed)


def mlp_only_subnet(model_config: Any, ratio: float, neuron_step: int = 1) -> SubnetConfig:
    """Every layer, head and channel kept; each MLP `ratio` of its neurons (rounded half up)."""
    dense = SubnetConfig.dense(ModelDims.of(model_config))
    mlp = scaled_width(ratio, dense.mlp[0], neuron_step)
    return SubnetConfig(dense.layers, dense.kv_heads, dense.q_per_kv, (mlp,) * len(dense.layers),
                        dense.embed)


def layer_drop_subnet(model_config: Any, layer_order: Sequence[int], depth: int) -> SubnetConfig:
    """The `depth` layers first in `layer_order` (most influential first), dense widths."""
    d = ModelDims.of(model_config)
    if not 1 <= depth <= d.num_layers:
        raise ValueError(f"depth = {depth} must be in [1, num_layers = {d.num_layers}]")
    if sorted(layer_order) != list(range(d.num_layers)):
        raise ValueError(f"layer_order must be a permutation of 0..{d.num_layers - 1}, "
                         f"got {list(layer_order)}")
    dense = SubnetConfig.dense(d)
    return SubnetConfig(tuple(sorted(int(i) for i in layer_order[:depth])), dense.kv_heads[:depth],
                        dense.q_per_kv[:depth], dense.mlp[:depth], dense.embed)


def baseline_family(name: str, model_config: Any, layer_order: Sequence[int] | None = None,
                    neuron_step: int = 1, embed_step: int = 1) -> list[SubnetConfig]:
    """Every sub-network of a baseline, largest first, without repeats.

    `layer_order` (most influential first) matters to layer-drop only; None is the
    model's own order. Steps round the uniform widths as a search space does.
    """
    check_baseline(name)
    d = ModelDims.of(model_config)
    if name == "layer-drop":
        order = list(range(d.num_layers)) if layer_order is None else list(layer_order)
        members = [layer_drop_subnet(d, order, k) for k in range(d.num_layers, 0, -1)]
    elif name == "mlp-only":
        members = [mlp_only_subnet(d, r, neuron_step) for r in _ratios()]
    else:
        members = [uniform_subnet(d, r, neuron_step, embed_step) for r in _ratios()]
    return list(dict.fromkeys(members))


def _ratios() -> list[float]:
    return [round(1.0 - i / RATIO_STEPS, 6) for i in range(RATIO_STEPS)]


def closest_within(candidates: Iterable[SubnetConfig], model_config: Any,
                   max_params: float) -> SubnetConfig | None:
    """The candidate with the most parameters not above `max_params` (None if none fits)."""
    sized = [(count_params(model_config, s), s) for s in candidates]
    fitting = [(p, s) for p, s in sized if p <= max_params]
    return max(fitting, key=lambda ps: ps[0])[1] if fitting else None


def _check_budget(budget: float) -> float:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget} must be a fraction of the dense parameters in (0, 1]")
    return float(budget)


def baseline_subnets(name: str, model_config: Any, layer_order: Sequence[int] | None,
                     budgets: Sequence[float]) -> list[SubnetConfig]:
    """For each budget (fraction of the dense parameters), the baseline's sub-network with
    the most parameters not above it; an error names a budget no member fits."""
    family = baseline_family(name, model_config, layer_order)
    dense_params = count_params(model_config, SubnetConfig.dense(model_config))
    out = []
    for budget in budgets:
        subnet = closest_within(family, model_config, _check_budget(budget) * dense_params)
        if subnet is None:
            smallest = min(count_params(model_config, s) for s in family)
            raise ValueError(
                f"{name}: no sub-network fits budget {budget} ({budget * dense_params:.0f} "
                f"params); its smallest has {smallest} ({smallest / dense_params:.3f} of dense)"
            )
        out.append(subnet)
    return out


def _encodable(space: SearchSpace, subnet: SubnetConfig) -> bool:
    try:
        space.encode(subnet)
    except ValueError:
        return False
    return True


def warm_start_subnets(names: Sequence[str], space: SearchSpace,
                       budgets: Sequence[float] = DEFAULT_BUDGETS) -> list[SubnetConfig]:
    """Baseline sub-networks that `space` can encode, one per name and budget where one fits.

    Each family is built with the space's width steps and its layer order, and only the
    members the space can encode are candidates; a budget that no candidate fits is
    skipped. Repeats (two baselines with the same shapes) appear once.
    """
    for name in names:
        check_baseline(name)
    d = space.dims
    neuron_step = space.neuron_step or 1
    embed_step = getattr(space, "embed_step", 1)
    dense_params = count_params(d, SubnetConfig.dense(d))
    out: list[SubnetConfig] = []
    for name in names:
        family = baseline_family(name, d, space.layer_order, neuron_step, embed_step)
        candidates = [s for s in family if _encodable(space, s)]
        for budget in budgets:
            subnet = closest_within(candidates, d, _check_budget(budget) * dense_params)
            if subnet is not None and subnet not in out:
                out.append(subnet)
    return out
