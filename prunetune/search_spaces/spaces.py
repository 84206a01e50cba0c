"""Search-space presets: which sub-networks a search may visit, as Ray Tune parameters.

A preset turns a model config into a Tune `param_space` and back: `decode` maps a trial
config (what a searcher proposes) to a validated `SubnetConfig`, `encode` maps a
sub-network to the trial config that decodes to it (local search and warm starts start
from known sub-networks), `sample` draws one sub-network without Tune.

Every Tune parameter has an ordered grid of allowed values (`choices()`); contiguous
integer ranges become `tune.randint`, other grids `tune.choice` over ascending values, so
every searcher proposes exactly the values `decode` accepts.

Shared conventions of all presets:

- Depth: a number of kept layers k in [min_layers, num_layers]; the kept layers are the
  first k of `layer_order` (most important first), in ascending index order. The default
  order is 0..n-1, which drops the last layers first; pass the block-influence order
  from `prunetune.evaluators.importance` to drop the least important layers first.
- Head unit: with grouped-query attention (num_kv_heads > 1) width pruning removes whole
  query groups (a key/value head with its query heads), which shrinks the KV cache too;
  with a single key/value head it removes query heads within that group.
- Widths are counts: weights are importance-sorted elsewhere, so keeping k means keeping
  the first k. MLP neurons and embedding channels come in multiples of `neuron_step` and
  `embed_step` (the dense width is always allowed), which keeps matrix shapes friendly
  to GPU kernels.
- Per-block channels (`disp`): instead of one embedding width, every layer's attention
  and MLP read and write their own number of residual channels (`attn_channels_i`,
  `mlp_channels_i`); which channels is each block's own importance order, chosen where
  the sub-network is built (`prunetune.evaluators.surgery.layer_channels`).
- Weight sparsity (optional, any preset, `sparsity=SparsityGrid(...)`): a level of the
  grid for the kept layers' linear weights. `layers` and `uniform` have one level for
  every kept layer (parameter `sparsity`), as they have one width; `per_layer` has one
  per layer (`sparsity_i`), as it has its heads and neurons. Level 0 (dense weights) is
  always a choice, so the dense model stays in every space.
- Filling to budgets (optional, `uniform`, `per_layer` and `disp`, `fill_to=(0.9, 0.8)`):
  the grid is what a searcher sees, and the sub-network evaluated for a proposal is
  `filled(decode(config))`: its MLPs widened in fine steps (`neuron_step / 8` neurons:
  8 on SmolLM2) toward the smallest budget, a fraction of the dense model's parameters,
  at or above its own. A width never reaches the next grid width, so `coarse` maps the
  evaluated sub-network back to the proposal: each evaluated sub-network is one grid
  point, and a grid point's parameters come within one fine step of a budget whenever its
  MLPs have the room (`fill`). The number of parameters and values a searcher sees is
  that of the grid without filling.

This module imports neither torch nor Ray at import time: `param_space` imports
`ray.tune` when called.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
import numbers
import random
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.dims import ModelDims
from prunetune.search_spaces.subnet import (
    SPARSITY_METHODS, Channels, Sparsity, SubnetConfig, level_error, parse_pattern,
)

_PREFERRED_STEP = 64
_MIN_GRID_POINTS = 8
_FLOAT_TOLERANCE = 1e-9
FILL_DIVISIONS = 8
"""Fine widths per MLP grid step that filling to a budget chooses from: SmolLM2's steps of
64 neurons fill in steps of 8, which keeps 16-bit matrix shapes aligned for tensor cores."""

Rng = random.Random | np.random.Generator



def default_step(size: int) -> int:
    """The width step used when none is given: 64, halved until the grid has 8 points.

    SmolLM2's 1536 MLP neurons get steps of 64 (24 widths); a tiny test model's 64
    neurons get steps of 8, so small models still have a grid worth searching.
    """
    step = _PREFERRED_STEP
    while step > 1 and size < _MIN_GRID_POINTS * step:
        step //= 2
    return step


def _lowest_kept(full: int, min_ratio: float) -> int:
    return max(1, math.ceil(min_ratio * full - _FLOAT_TOLERANCE))


def width_grid(full: int, step: int, min_ratio: float) -> list[int]:
    """Allowed widths of one dimension: multiples of `step` from min_ratio*full, plus full."""
    lowest = _lowest_kept(full, min_ratio)
    values = [w for w in range(step, full + 1, step) if w >= lowest]
    if full not in values:
        values.append(full)
    return values


def scaled_width(ratio: float, full: int, step: int) -> int:
    """`ratio * full` rounded half up to a multiple of `step`, within [step, full]."""
    if ratio >= 1.0:
        return full
    return min(full, max(step, step * math.floor(ratio * full / step + 0.5)))


def fill_step(neuron_step: int) -> int:
    """Neurons one fill step adds to an MLP: `neuron_step / FILL_DIVISIONS`, at least 1."""
    return max(1, neuron_step // FILL_DIVISIONS)


def ratio_grid(min_ratio: float, ratio_step: float) -> list[float]:
    """Width ratios from 1.0 down in steps of `ratio_step`, and min_ratio itself."""
    count = math.floor((1.0 - min_ratio) / ratio_step + _FLOAT_TOLERANCE)
    values = {round(1.0 - i * ratio_step, 6) for i in range(count + 1)}
    values.add(round(min_ratio, 6))
    return sorted(values)


def _describe(values: Sequence[Any]) -> str:
    if len(values) <= 12:
        return str(list(values))
    return f"[{values[0]}, {values[1]}, ..., {values[-1]}] ({len(values)} values)"


def _picker(rng: Rng) -> Callable[[Sequence[Any]], Any]:
    if isinstance(rng, random.Random):
        return lambda values: values[rng.randrange(len(values))]
    if isinstance(rng, np.random.Generator):
        return lambda values: values[int(rng.integers(len(values)))]
    raise TypeError(
        f"sample: rng must be a random.Random or numpy.random.Generator, got {type(rng).__name__}"
    )


def _domain(values: list[Any]) -> Any:
    from ray import tune

    ints = all(isinstance(v, int) for v in values)
    if ints and values == list(range(values[0], values[-1] + 1)):
        return tune.randint(values[0], values[-1] + 1)
    return tune.choice(values)


DEFAULT_UNSTRUCTURED_LEVELS = (0.0, 0.25, 0.5)
"""The levels of an unstructured sparsity grid that names none."""


@dataclass(frozen=True)
class SparsityGrid:
    """The weight sparsity a space may give its kept layers: one method and pattern, and
    the levels to choose from (0 always among them; by default 0, 0.25 and 0.5 for
    unstructured, 0 and 1 - N/M for N:M)."""

    method: str = "wanda"
    pattern: str = "unstructured"
    levels: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in SPARSITY_METHODS:
            raise ValueError(f"sparsity.method: must be one of {', '.join(SPARSITY_METHODS)}, "
                             f"got {self.method!r}")
        try:
            n_m = parse_pattern(self.pattern)
        except ValueError as exc:
            raise ValueError(f"sparsity.pattern: {exc}") from None
        if self.levels is None:
            default = DEFAULT_UNSTRUCTURED_LEVELS if n_m is None else (1 - n_m[0] / n_m[1],)
            levels = default
        else:
            levels = tuple(float(v) for v in self.levels)
        for level in levels:
            reason = level_error(self.pattern, level)
            if reason:
                raise ValueError(f"sparsity.levels: {level}: {reason}")
        object.__setattr__(self, "levels", tuple(sorted({0.0, *levels})))

    @classmethod
    def of(cls, value: "SparsityGrid | Mapping[str, Any] | None") -> "SparsityGrid | None":
        """A grid from itself, from its fields as a mapping (a spec's), or None."""
        if value is None or isinstance(value, cls):
            return value
        return cls(**{k: tuple(v) if k == "levels" and v is not None else v
                      for k, v in value.items()})

    def sparsity(self, levels: Sequence[float]) -> Sparsity:
        """The sub-network sparsity of one level per kept layer."""
        return Sparsity(self.method, self.pattern, tuple(levels))


class SearchSpace(ABC):
    """A preset's shared machinery: depth, layer order, and parameter grids.

    Subclasses add their width parameters in `_build_choices` and map parameter values
    to and from sub-networks in `_subnet` and `_encode_widths`.
    """

    name: ClassVar[str]
    per_layer_sparsity: ClassVar[bool] = False
    """Whether each layer has its own sparsity level (`sparsity_i`) or all share one."""
    neuron_step: int | None = None
    """MLP widths are multiples of it (or dense); None where a preset keeps MLPs dense."""
    fill_to: tuple[float, ...] = ()
    """Parameter budgets, as fractions of the dense model, that proposals are filled toward."""

    def __init__(
        self,
        model_config: Any,
        *,
        min_layers: int | None = None,
        layer_order: Sequence[int] | None = None,
        sparsity: SparsityGrid | Mapping[str, Any] | None = None,
    ) -> None:
        self.dims = ModelDims.of(model_config)
        n = self.dims.num_layers
        self.min_layers = self._check_min_layers(min_layers, n)
        self.layer_order = self._check_layer_order(layer_order, n)
        self.sparsity = SparsityGrid.of(sparsity)
        self._choices: dict[str, list[Any]] = {
            "depth": list(range(self.min_layers, n + 1)),
            **self._build_choices(),
            **self._sparsity_choices(),
        }

    def _sparsity_names(self) -> list[str]:
        if self.sparsity is None:
            return []
        if self.per_layer_sparsity:
            return [f"sparsity_{i}" for i in range(self.dims.num_layers)]
        return ["sparsity"]

    def _sparsity_choices(self) -> dict[str, list[Any]]:
        return {name: list(self.sparsity.levels) for name in self._sparsity_names()}

    def _with_sparsity(self, subnet: SubnetConfig, values: dict[str, Any]) -> SubnetConfig:
        """`subnet` with the sparsity levels of `values` on its kept layers."""
        if self.sparsity is None:
            return subnet
        names = ([f"sparsity_{i}" for i in subnet.layers] if self.per_layer_sparsity
                 else ["sparsity"] * subnet.num_layers)
        return replace(subnet, sparsity=self.sparsity.sparsity([values[n] for n in names]))

    def _encode_sparsity(self, subnet: SubnetConfig) -> dict[str, Any]:
        """The sparsity parameters of `subnet`; an error if this space cannot reach them."""
        given = subnet.sparsity
        if self.sparsity is None:
            if given is not None:
                raise self._error("cannot encode a sub-network with weight sparsity: this "
                                  "space has none")
            return {}
        levels = given.levels if given else (0.0,) * subnet.num_layers
        if given and (given.method, given.pattern) != (self.sparsity.method, self.sparsity.pattern):
            raise self._error(f"cannot encode sparsity {given.method} {given.pattern}: this "
                              f"space prunes weights by {self.sparsity.method} "
                              f"{self.sparsity.pattern}")
        if not self.per_layer_sparsity:
            if len(set(levels)) > 1:
                raise self._error(f"cannot encode sparsity levels {list(levels)}: this space "
                                  "gives every kept layer the same level")
            return {"sparsity": self._grid_value("sparsity", levels[0], "sparsity.levels[0]")}
        encoded = {name: 0.0 for name in self._sparsity_names()}
        for i, (layer, level) in enumerate(zip(subnet.layers, levels)):
            encoded[f"sparsity_{layer}"] = self._grid_value(f"sparsity_{layer}", level,
                                                            f"sparsity.levels[{i}]")
        return encoded

    def _error(self, message: str) -> ValueError:
        return ValueError(f"{self.name} space: {message}")

    def _check_min_layers(self, min_layers: int | None, n: int) -> int:
        """Default: half the layers (rounded up); deeper cuts wreck a pretrained model."""
        if min_layers is None:
            return max(1, math.ceil(n / 2))
        if not 1 <= min_layers <= n:
            raise self._error(f"min_layers = {min_layers} must be in [1, num_layers = {n}]")
        return int(min_layers)

    def _check_layer_order(self, order: Sequence[int] | None, n: int) -> tuple[int, ...]:
        if order is None:
            return tuple(range(n))
        order = tuple(int(i) for i in order)
        if sorted(order) != list(range(n)):
            raise self._error(
                f"layer_order must be a permutation of the layer indices 0..{n - 1}, "
                f"got {list(order)}"
            )
        return order

    def _check_ratio(self, bound: str, value: float) -> float:
        if not 0.0 < value <= 1.0:
            raise self._error(f"{bound} = {value} must be in (0, 1]")
        return float(value)

    def _set_width_bounds(
        self, dims: ModelDims, min_ratio: float, neuron_step: int | None, embed_step: int | None,
        fill_to: Sequence[float],
    ) -> None:
        """Check and keep the bounds of the presets that prune widths."""
        self.min_ratio = self._check_ratio("min_ratio", min_ratio)
        for budget in fill_to:
            if not 0.0 < budget <= 1.0:
                raise self._error(f"fill_to: budget {budget} must be a fraction of the dense "
                                  "parameters in (0, 1]")
        self.fill_to = tuple(sorted({float(b) for b in fill_to}))
        self.neuron_step = self._check_step(
            "neuron_step", neuron_step, dims.intermediate_size, "intermediate_size"
        )
        self.embed_step = self._check_step(
            "embed_step", embed_step, dims.hidden_size, "hidden_size"
        )

    def _check_step(self, bound: str, step: int | None, full: int, dimension: str) -> int:
        if step is None:
            return default_step(full)
        if not 1 <= step <= full:
            raise self._error(f"{bound} = {step} must be in [1, {dimension} = {full}]")
        return int(step)

    def _build_choices(self) -> dict[str, list[Any]]:
        return {}

    @property
    def _heads_are_groups(self) -> bool:
        return self.dims.num_kv_heads > 1

    @property
    def _head_total(self) -> int:
        return self.dims.num_kv_heads if self._heads_are_groups else self.dims.q_per_kv

    def _head_shape(self, count: int) -> tuple[int, int]:
        """(kv_heads, q_per_kv) of a layer that keeps `count` head units."""
        return (count, self.dims.q_per_kv) if self._heads_are_groups else (1, count)

    def _head_count(self, subnet: SubnetConfig, i: int) -> int:
        """Head units of kept layer i; an error if the other head field is not dense."""
        kv, q = subnet.kv_heads[i], subnet.q_per_kv[i]
        count = kv if self._heads_are_groups else q
        expected = self._head_shape(count)
        if expected != (kv, q):
            unit = "kv_heads" if self._heads_are_groups else "q_per_kv"
            raise self._error(
                f"cannot encode kv_heads[{i}] = {kv}, q_per_kv[{i}] = {q}: this space "
                f"prunes {unit} only, so (kv_heads, q_per_kv) would be {expected}"
            )
        return count

    def kept_layers(self, depth: int) -> tuple[int, ...]:
        """The layer indices a depth keeps: the first `depth` of the order, ascending."""
        return tuple(sorted(self.layer_order[:depth]))

    def choices(self) -> dict[str, list[Any]]:
        """The ordered allowed values of every Tune parameter (ascending)."""
        return {name: list(values) for name, values in self._choices.items()}

    def param_space(self) -> dict[str, Any]:
        """Ray Tune domains, one per parameter, over exactly the values `decode` accepts."""
        return {name: _domain(values) for name, values in self._choices.items()}

    def sample(self, rng: Rng) -> SubnetConfig:
        """A sub-network drawn uniformly per parameter, as a random searcher would."""
        pick = _picker(rng)
        return self.decode({name: pick(values) for name, values in self._choices.items()})

    def filled(self, subnet: SubnetConfig) -> SubnetConfig:
        """The sub-network evaluated for a proposal: `fill` toward the smallest `fill_to`
        budget at or above its parameters; the proposal itself above every budget or
        without budgets."""
        if not self.fill_to:
            return subnet
        dense = count_params(self.dims, SubnetConfig.dense(self.dims))
        params = count_params(self.dims, subnet)
        budget = next((b * dense for b in self.fill_to if b * dense >= params), None)
        return subnet if budget is None else self.fill(subnet, budget)

    def fill(self, subnet: SubnetConfig, max_params: float) -> SubnetConfig:
        """`subnet` with its MLPs widened in steps of `fill_step` neurons while its
        parameters stay within `max_params`: round after round, one step to each kept
        layer (most important first, by `layer_order`) whose step fits and keeps its
        width below the next grid width (`coarse` undoes it). So the result is within one
        step of `max_params` unless every MLP has reached the top of its grid cell."""
        if self.neuron_step is None:
            return subnet
        step = fill_step(self.neuron_step)
        mlp = list(subnet.mlp)
        params = count_params(self.dims, subnet)
        costs = [count_params(self.dims, replace(subnet, mlp=tuple(
            w + step if j == i else w for j, w in enumerate(mlp)))) - params
            for i in range(len(mlp))]
        tops = [self._next_mlp_width(w) for w in mlp]
        kept = {layer: i for i, layer in enumerate(subnet.layers)}
        order = [kept[layer] for layer in self.layer_order if layer in kept]
        grown = True
        while grown:
            grown = False
            for i in order:
                if mlp[i] + step < tops[i] and params + costs[i] <= max_params:
                    mlp[i] += step
                    params += costs[i]
                    grown = True
        return replace(subnet, mlp=tuple(mlp))

    def coarse(self, subnet: SubnetConfig) -> SubnetConfig:
        """The grid sub-network that `filled` widened to `subnet`: each MLP width down to
        the grid (a grid sub-network is its own)."""
        full, step = self.dims.intermediate_size, self.neuron_step
        if step is None:
            return subnet
        return replace(subnet, mlp=tuple(w if w >= full else w // step * step
                                         for w in subnet.mlp))

    def _next_mlp_width(self, width: int) -> int:
        """The grid's next MLP width above `width` (the dense width for itself)."""
        full, step = self.dims.intermediate_size, self.neuron_step
        return full if width >= full else min(full, (width // step + 1) * step)

    def decode(self, trial_config: Mapping[str, Any]) -> SubnetConfig:
        """The validated sub-network of a trial config; keys of other parameters are ignored."""
        values = {name: self._read(trial_config, name) for name in self._choices}
        return self._with_sparsity(self._subnet(values), values).validate(self.dims)

    def encode(self, subnet: SubnetConfig) -> dict[str, Any]:
        """The trial config that decodes to `subnet`; an error if this space cannot reach it."""
        subnet.validate(self.dims)
        depth = subnet.num_layers
        if depth not in self._choices["depth"] or self.kept_layers(depth) != subnet.layers:
            raise self._error(
                f"cannot encode layers {list(subnet.layers)}: this space keeps the first k "
                f"of layer_order {list(self.layer_order)} for k in "
                f"[{self.min_layers}, {self.dims.num_layers}]"
            )
        return {"depth": depth, **self._encode_widths(replace(subnet, sparsity=None)),
                **self._encode_sparsity(subnet)}

    def _read(self, trial_config: Mapping[str, Any], name: str) -> Any:
        if name not in trial_config:
            raise self._error(
                f"trial config has no {name!r}; expected parameters {list(self._choices)}"
            )
        value = trial_config[name]
        allowed = self._choices[name]
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            for candidate in allowed:
                if abs(float(value) - candidate) <= _FLOAT_TOLERANCE:
                    return candidate
        raise self._error(
            f"{name} = {value!r} is not one of the allowed values {_describe(allowed)}"
        )

    def _grid_value(self, name: str, value: Any, field: str) -> Any:
        if value not in self._choices[name]:
            raise self._error(
                f"cannot encode {field} = {value}: allowed values are "
                f"{_describe(self._choices[name])}"
            )
        return value

    @abstractmethod
    def _subnet(self, values: dict[str, Any]) -> SubnetConfig:
        """The sub-network of validated parameter values (not yet checked against the model)."""

    @abstractmethod
    def _encode_widths(self, subnet: SubnetConfig) -> dict[str, Any]:
        """The width parameters of a sub-network whose layers this space can reach."""


class LayersSpace(SearchSpace):
    """Depth only: the number of kept layers; every kept layer stays dense.

    Parameter: `depth`.
    """

    name = "layers"

    def _subnet(self, values: dict[str, Any]) -> SubnetConfig:
        layers = self.kept_layers(values["depth"])
        dense = SubnetConfig.dense(self.dims)
        k = len(layers)
        return SubnetConfig(
            layers, dense.kv_heads[:k], dense.q_per_kv[:k], dense.mlp[:k], dense.embed
        )

    def _encode_widths(self, subnet: SubnetConfig) -> dict[str, Any]:
        if subnet != self._subnet({"depth": subnet.num_layers}):
            raise self._error(
                "cannot encode a sub-network with pruned widths: this space keeps widths dense"
            )
        return {}


class UniformSpace(SearchSpace):
    """Depth plus one width ratio r shared by heads, MLP neurons and embedding channels.

    Parameters: `depth`, `ratio` (from min_ratio to 1.0 in steps of ratio_step). Each
    width is r * full rounded half up: head units to a whole count (at least 1), neurons
    and channels to a multiple of neuron_step / embed_step; r = 1.0 is the dense width.
    """

    name = "uniform"

    def __init__(
        self,
        model_config: Any,
        *,
        min_layers: int | None = None,
        layer_order: Sequence[int] | None = None,
        min_ratio: float = 0.25,
        ratio_step: float = 0.05,
        neuron_step: int | None = None,
        embed_step: int | None = None,
        sparsity: SparsityGrid | Mapping[str, Any] | None = None,
        fill_to: Sequence[float] = (),
    ) -> None:
        dims = ModelDims.of(model_config)
        self._set_width_bounds(dims, min_ratio, neuron_step, embed_step, fill_to)
        self.ratio_step = self._check_ratio("ratio_step", ratio_step)
        super().__init__(dims, min_layers=min_layers, layer_order=layer_order, sparsity=sparsity)

    def _build_choices(self) -> dict[str, list[Any]]:
        return {"ratio": ratio_grid(self.min_ratio, self.ratio_step)}

    def _widths(self, ratio: float) -> tuple[int, int, int]:
        """(head units, neurons, embedding channels) of one ratio."""
        return (
            scaled_width(ratio, self._head_total, 1),
            scaled_width(ratio, self.dims.intermediate_size, self.neuron_step),
            scaled_width(ratio, self.dims.hidden_size, self.embed_step),
        )

    def _subnet(self, values: dict[str, Any]) -> SubnetConfig:
        layers = self.kept_layers(values["depth"])
        heads, mlp, embed = self._widths(values["ratio"])
        kv, q = self._head_shape(heads)
        k = len(layers)
        return SubnetConfig(layers, (kv,) * k, (q,) * k, (mlp,) * k, embed)

    def _encode_widths(self, subnet: SubnetConfig) -> dict[str, Any]:
        for ratio in self._choices["ratio"]:
            if self._subnet({"depth": subnet.num_layers, "ratio": ratio}) == subnet:
                return {"ratio": ratio}
        raise self._error(
            "cannot encode this sub-network: its widths are not those of one ratio in "
            f"{_describe(self._choices['ratio'])} applied to every kept layer"
        )


class PerLayerSpace(SearchSpace):
    """Depth, one embedding width, and independent head and neuron counts per layer.

    Parameters: `depth`, `embed`, and for every layer index i of the model `heads_i` and
    `mlp_i` (and `sparsity_i` with a sparsity grid); decode reads the entries of the kept
    layers only (encode sets the others to the dense width).
    """

    name = "per_layer"
    per_layer_sparsity = True

    def __init__(
        self,
        model_config: Any,
        *,
        min_layers: int | None = None,
        layer_order: Sequence[int] | None = None,
        min_ratio: float = 0.25,
        neuron_step: int | None = None,
        embed_step: int | None = None,
        sparsity: SparsityGrid | Mapping[str, Any] | None = None,
        fill_to: Sequence[float] = (),
    ) -> None:
        dims = ModelDims.of(model_config)
        self._set_width_bounds(dims, min_ratio, neuron_step, embed_step, fill_to)
        super().__init__(dims, min_layers=min_layers, layer_order=layer_order, sparsity=sparsity)

    def _build_choices(self) -> dict[str, list[Any]]:
        d = self.dims
        heads = list(range(_lowest_kept(self._head_total, self.min_ratio), self._head_total + 1))
        mlp = width_grid(d.intermediate_size, self.neuron_step, self.min_ratio)
        choices: dict[str, list[Any]] = {
            "embed": width_grid(d.hidden_size, self.embed_step, self.min_ratio)
        }
        for i in range(d.num_layers):
            choices[f"heads_{i}"] = heads
            choices[f"mlp_{i}"] = mlp
        return choices

    def _subnet(self, values: dict[str, Any]) -> SubnetConfig:
        layers = self.kept_layers(values["depth"])
        shapes = [self._head_shape(values[f"heads_{i}"]) for i in layers]
        return SubnetConfig(
            layers,
            tuple(kv for kv, _ in shapes),
            tuple(q for _, q in shapes),
            tuple(values[f"mlp_{i}"] for i in layers),
            values["embed"],
        )

    def _encode_widths(self, subnet: SubnetConfig) -> dict[str, Any]:
        if subnet.channels is not None:
            raise self._error("cannot encode per-block channels: this space has one embedding "
                              "width")
        return {"embed": self._grid_value("embed", subnet.embed, "embed"),
                **self._encode_layers(subnet)}

    def _encode_layers(self, subnet: SubnetConfig) -> dict[str, Any]:
        """The head and neuron parameters of every layer (dense for the dropped ones)."""
        encoded: dict[str, Any] = {}
        for i in range(self.dims.num_layers):
            encoded[f"heads_{i}"] = self._head_total
            encoded[f"mlp_{i}"] = self.dims.intermediate_size
        field = "kv_heads" if self._heads_are_groups else "q_per_kv"
        for i, layer in enumerate(subnet.layers):
            heads = self._head_count(subnet, i)
            encoded[f"heads_{layer}"] = self._grid_value(f"heads_{layer}", heads, f"{field}[{i}]")
            encoded[f"mlp_{layer}"] = self._grid_value(f"mlp_{layer}", subnet.mlp[i], f"mlp[{i}]")
        return encoded


class DispSpace(PerLayerSpace):
    """Depth, and per layer its heads, its neurons, and the residual channels its attention
    and its MLP each read and write (DISP-LLM, Gao et al. 2024); the residual stream and
    the embeddings keep their full width.

    Parameters: `depth`, and for every layer index i `heads_i`, `mlp_i`, `attn_channels_i`
    and `mlp_channels_i` (channel counts are multiples of embed_step from min_ratio of the
    hidden size, and the hidden size; `sparsity_i` with a sparsity grid). Which channels a
    sub-layer keeps is its own, by its calibration activations (see
    `prunetune.search_spaces.subnet.Channels`).
    """

    name = "disp"

    def _build_choices(self) -> dict[str, list[Any]]:
        choices = super()._build_choices()
        channels = choices.pop("embed")
        for i in range(self.dims.num_layers):
            choices[f"attn_channels_{i}"] = channels
            choices[f"mlp_channels_{i}"] = channels
        return choices

    def _subnet(self, values: dict[str, Any]) -> SubnetConfig:
        hidden = self.dims.hidden_size
        subnet = super()._subnet({**values, "embed": hidden})
        channels = Channels.unless_full([values[f"attn_channels_{i}"] for i in subnet.layers],
                                        [values[f"mlp_channels_{i}"] for i in subnet.layers],
                                        hidden)
        return replace(subnet, channels=channels)

    def _encode_widths(self, subnet: SubnetConfig) -> dict[str, Any]:
        hidden = self.dims.hidden_size
        if subnet.embed != hidden:
            raise self._error(f"cannot encode embed = {subnet.embed}: this space keeps the "
                              f"residual stream whole ({hidden}) and prunes each block's "
                              "channels instead")
        encoded = self._encode_layers(subnet)
        for i in range(self.dims.num_layers):
            encoded[f"attn_channels_{i}"] = encoded[f"mlp_channels_{i}"] = hidden
        for i, (layer, (attn, mlp)) in enumerate(zip(subnet.layers, subnet.sublayer_channels())):
            for name, value, field in ((f"attn_channels_{layer}", attn, f"channels.attn[{i}]"),
                                       (f"mlp_channels_{layer}", mlp, f"channels.mlp[{i}]")):
                encoded[name] = self._grid_value(name, value, field)
        return encoded


SPACES: dict[str, type[SearchSpace]] = {
    LayersSpace.name: LayersSpace,
    UniformSpace.name: UniformSpace,
    PerLayerSpace.name: PerLayerSpace,
    DispSpace.name: DispSpace,
}


def _preset(name: str) -> type[SearchSpace]:
    if name not in SPACES:
        raise ValueError(
            f"unknown search-space preset {name!r}; known presets: {', '.join(sorted(SPACES))}"
        )
    return SPACES[name]


def preset_bounds(name: str) -> tuple[str, ...]:
    """The bounds (keyword arguments) a preset accepts."""
    parameters = inspect.signature(_preset(name).__init__).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def make_space(name: str, model_config: Any, **bounds: Any) -> SearchSpace:
    """The preset `name` over `model_config`; bounds set to None take their defaults."""
    cls = _preset(name)
    accepted = preset_bounds(name)
    unknown = sorted(set(bounds) - set(accepted))
    if unknown:
        raise ValueError(
            f"{name} space: unknown bound(s) {', '.join(unknown)}; "
            f"it accepts {', '.join(accepted)}"
        )
    return cls(model_config, **{k: v for k, v in bounds.items() if v is not None})
