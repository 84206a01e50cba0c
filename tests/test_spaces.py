"""Search-space presets: valid samples, decode/encode round trips, Tune domains, bounds."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataclasses import replace

from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.dims import ModelDims
from prunetune.search_spaces.spaces import (
    SPACES,
    default_step,
    fill_step,
    make_space,
    preset_bounds,
    ratio_grid,
    width_grid,
)
from prunetune.search_spaces.subnet import SubnetConfig


def _config(**overrides):
    fields = dict(
        model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2, head_dim=8,
    )
    fields.update(overrides)
    return fields


GQA = _config()
MQA = _config(num_key_value_heads=1)
MHA = _config(num_key_value_heads=6, model_type="qwen2")
SMOLLM2 = _config(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
)
CONFIGS = {"gqa": GQA, "mqa": MQA, "mha": MHA}
PRESETS = sorted(SPACES)


def _cases():
    return [(p, c) for p in PRESETS for c in CONFIGS]


@pytest.mark.parametrize("preset,config_name", _cases())
def test_random_samples_are_valid_and_round_trip(preset, config_name):
    config = CONFIGS[config_name]
    dims = ModelDims.from_config(config)
    space = make_space(preset, config, min_layers=2)
    seen = set()
    for rng in (random.Random(0), np.random.default_rng(0)):
        for _ in range(100):
            subnet = space.sample(rng)
            assert subnet.validate(dims) is subnet
            assert 2 <= subnet.num_layers <= dims.num_layers
            assert space.decode(space.encode(subnet)) == subnet
            seen.add(subnet)
    assert len(seen) > 1


@pytest.mark.parametrize("preset", PRESETS)
def test_dense_is_reachable(preset):
    space = make_space(preset, GQA)
    dense = SubnetConfig.dense(GQA)
    encoded = space.encode(dense)
    assert encoded["depth"] == 4
    assert space.decode(encoded) == dense


@pytest.mark.parametrize("preset", PRESETS)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_every_grid_point_decodes(preset, data):
    space = make_space(preset, GQA, min_layers=1)
    trial = {name: data.draw(st.sampled_from(values), label=name)
             for name, values in space.choices().items()}
    subnet = space.decode(trial)
    assert subnet.validate(ModelDims.from_config(GQA)) is subnet
    assert space.decode(space.encode(subnet)) == subnet


@pytest.mark.parametrize("preset", PRESETS)
def test_tune_domains_cover_exactly_the_grid(preset):
    from ray.tune.search.sample import Categorical, Integer

    space = make_space(preset, SMOLLM2)
    choices = space.choices()
    domains = space.param_space()
    assert list(domains) == list(choices)
    for name, domain in domains.items():
        if isinstance(domain, Integer):
            assert list(range(domain.lower, domain.upper)) == choices[name]
        else:
            assert isinstance(domain, Categorical)
            assert domain.categories == choices[name]


@pytest.mark.parametrize("preset", PRESETS)
def test_tune_samples_decode_and_are_seed_deterministic(preset):
    space = make_space(preset, SMOLLM2)
    domains = space.param_space()

    def draw(seed):
        rng = np.random.default_rng(seed)
        return [space.decode({k: d.sample(random_state=rng) for k, d in domains.items()})
                for _ in range(20)]

    first = draw(7)
    assert first == draw(7)
    assert all(s.validate(ModelDims.from_config(SMOLLM2)) for s in first)


def test_decode_accepts_numpy_scalars_and_integral_floats():
    space = make_space("per_layer", GQA, min_layers=1)
    plain = {"depth": 2, "embed": 24, "heads_0": 1, "mlp_0": 32, "heads_1": 2, "mlp_1": 64,
             "heads_2": 2, "mlp_2": 64, "heads_3": 2, "mlp_3": 64}
    numpy_typed = {k: np.int64(v) for k, v in plain.items()}
    numpy_typed["mlp_0"] = np.float64(32.0)
    numpy_typed["embed"] = 24.0
    assert space.decode(numpy_typed) == space.decode(plain)
    assert type(space.decode(numpy_typed).embed) is int
    uniform = make_space("uniform", GQA)
    assert uniform.decode({"depth": np.int32(3), "ratio": np.float64(0.5)}) == uniform.decode(
        {"depth": 3, "ratio": 0.5}
    )


def test_layers_keeps_widths_dense_and_follows_layer_order():
    space = make_space("layers", GQA, min_layers=1, layer_order=[3, 0, 2, 1])
    subnet = space.decode({"depth": 2})
    assert subnet == SubnetConfig((0, 3), (2, 2), (3, 3), (64, 64), 48)
    assert space.choices() == {"depth": [1, 2, 3, 4]}
    with pytest.raises(ValueError, match="layer_order"):
        space.encode(SubnetConfig((0, 1), (2, 2), (3, 3), (64, 64), 48))
    with pytest.raises(ValueError, match="widths dense"):
        space.encode(SubnetConfig((0, 3), (2, 2), (3, 3), (32, 64), 48))


def test_default_order_drops_the_last_layers_and_min_layers_defaults_to_half():
    space = make_space("layers", SMOLLM2)
    assert space.min_layers == 15
    assert space.decode({"depth": 16}).layers == tuple(range(16))


def test_uniform_widths_on_smollm2():
    space = make_space("uniform", SMOLLM2)
    assert (space.neuron_step, space.embed_step) == (64, 64)
    half = space.decode({"depth": 20, "ratio": 0.5})
    # 3 query groups * 0.5 rounds half up to 2; 768 neurons; 288 channels round to 320.
    assert half == SubnetConfig(tuple(range(20)), (2,) * 20, (3,) * 20, (768,) * 20, 320)
    assert space.encode(half) == {"depth": 20, "ratio": 0.5}


def test_uniform_prunes_query_heads_with_a_single_kv_head():
    space = make_space("uniform", MQA)
    subnet = space.decode({"depth": 4, "ratio": 0.5})
    assert subnet.kv_heads == (1,) * 4 and subnet.q_per_kv == (3,) * 4
    with pytest.raises(ValueError, match="uniform space: cannot encode"):
        space.encode(SubnetConfig(subnet.layers, subnet.kv_heads, (3, 3, 3, 2), subnet.mlp, subnet.embed))


def test_per_layer_reads_only_the_kept_layers():
    space = make_space("per_layer", GQA, min_layers=1, layer_order=[1, 3, 0, 2])
    trial = {name: values[0] for name, values in space.choices().items()}
    trial.update(depth=2, heads_1=2, mlp_1=40, heads_3=1, mlp_3=64)
    subnet = space.decode(trial)
    assert subnet == SubnetConfig((1, 3), (2, 1), (3, 3), (40, 64), trial["embed"])
    assert space.decode({**trial, "heads_0": 2, "mlp_2": 64}) == subnet
    encoded = space.encode(subnet)
    assert (encoded["heads_0"], encoded["mlp_0"]) == (2, 64)


def test_per_layer_rejects_pruned_query_heads_under_gqa():
    space = make_space("per_layer", GQA)
    dense = SubnetConfig.dense(GQA)
    with pytest.raises(ValueError, match=r"q_per_kv\[1\] = 2"):
        space.encode(SubnetConfig(dense.layers, dense.kv_heads, (3, 2, 3, 3), dense.mlp, dense.embed))


def test_bounds_are_respected():
    space = make_space("per_layer", SMOLLM2, min_layers=25, min_ratio=0.5, neuron_step=128, embed_step=32)
    rng = random.Random(1)
    for _ in range(200):
        s = space.sample(rng)
        assert s.num_layers >= 25
        assert all(2 <= kv <= 3 for kv in s.kv_heads)
        assert all(m >= 768 and (m % 128 == 0 or m == 1536) for m in s.mlp)
        assert s.embed >= 288 and s.embed % 32 == 0
    uniform = make_space("uniform", SMOLLM2, min_ratio=0.6, ratio_step=0.2)
    assert uniform.choices()["ratio"] == [0.6, 0.8, 1.0]


def test_grids_and_default_steps():
    assert [default_step(n) for n in (1536, 576, 64, 48, 5, 1)] == [64, 64, 8, 4, 1, 1]
    assert width_grid(100, 32, 0.25) == [32, 64, 96, 100]
    assert width_grid(64, 8, 0.5) == [32, 40, 48, 56, 64]
    assert ratio_grid(0.3, 0.25) == [0.3, 0.5, 0.75, 1.0]


def test_preset_bounds():
    assert preset_bounds("layers") == ("min_layers", "layer_order", "sparsity")
    assert "ratio_step" in preset_bounds("uniform") and "ratio_step" not in preset_bounds("per_layer")


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: make_space("dispp", GQA),
         r"unknown search-space preset 'dispp'; known presets: disp, layers, per_layer, uniform"),
        (lambda: make_space("layers", GQA, min_layers=5),
         r"layers space: min_layers = 5 must be in \[1, num_layers = 4\]"),
        (lambda: make_space("uniform", GQA, min_ratio=0.0),
         r"uniform space: min_ratio = 0.0 must be in \(0, 1\]"),
        (lambda: make_space("per_layer", GQA, neuron_step=65),
         r"per_layer space: neuron_step = 65 must be in \[1, intermediate_size = 64\]"),
        (lambda: make_space("uniform", GQA, embed_step=0), r"embed_step = 0"),
        (lambda: make_space("layers", GQA, neuron_step=8),
         r"layers space: unknown bound\(s\) neuron_step; it accepts min_layers, layer_order"),
        (lambda: make_space("layers", GQA, layer_order=[0, 1, 1, 2]),
         r"layer_order must be a permutation"),
        (lambda: make_space("uniform", GQA).decode({"depth": 3}), r"trial config has no 'ratio'"),
        (lambda: make_space("uniform", GQA).decode({"depth": 3, "ratio": 0.33}),
         r"ratio = 0.33 is not one of the allowed values"),
        (lambda: make_space("layers", GQA).decode({"depth": 1}),
         r"depth = 1 is not one of the allowed values \[2, 3, 4\]"),
        (lambda: make_space("layers", GQA).decode({"depth": True}), r"depth = True"),
        (lambda: make_space("layers", GQA).sample(7),
         r"rng must be a random.Random or numpy.random.Generator"),
    ],
)
def test_errors_name_the_problem(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


def test_spaces_accept_a_hugging_face_config():
    from prunetune.evaluators.model import tiny_config

    for model_type in ("llama", "mistral", "qwen2"):
        config = tiny_config(model_type)
        for preset in PRESETS:
            space = make_space(preset, config)
            subnet = space.sample(random.Random(3))
            assert space.decode(space.encode(subnet)) == subnet


def test_module_imports_neither_torch_nor_ray():
    code = (
        "import sys, prunetune.search_spaces.spaces; "
        "bad = [m for m in ('torch', 'ray', 'transformers') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("preset", ["layers", "uniform", "per_layer"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsity_grid_round_trips_in_every_preset(preset: str, pattern: str) -> None:
    space = make_space(preset, GQA, sparsity={"method": "magnitude", "pattern": pattern})
    names = [n for n in space.choices() if n.startswith("sparsity")]
    assert names == ([f"sparsity_{i}" for i in range(space.dims.num_layers)]
                     if preset == "per_layer" else ["sparsity"])
    assert space.choices()[names[0]] == ([0.0, 0.25, 0.5] if pattern == "unstructured"
                                         else [0.0, 0.5])
    rng = random.Random(0)
    sparse = 0
    for _ in range(30):
        subnet = space.sample(rng)
        assert space.decode(space.encode(subnet)) == subnet
        if subnet.sparsity is not None:
            sparse += 1
            assert (subnet.sparsity.method, subnet.sparsity.pattern) == ("magnitude", pattern)
            assert len(subnet.sparsity.levels) == subnet.num_layers
    assert sparse > 0
    assert space.decode(space.encode(SubnetConfig.dense(GQA))) == SubnetConfig.dense(GQA)


def test_sparsity_grid_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"sparsity.levels: 0.25: pattern 2:4 allows 0 or 0.5"):
        make_space("uniform", GQA, sparsity={"pattern": "2:4", "levels": [0.25]})
    with pytest.raises(ValueError, match="sparsity.method"):
        make_space("uniform", GQA, sparsity={"method": "sparsegpt"})
    uniform = make_space("uniform", GQA, sparsity={"pattern": "unstructured"})
    subnet = SubnetConfig.dense(GQA)
    mixed = SubnetConfig(**{**subnet.to_dict(), "sparsity": {
        "method": "wanda", "pattern": "unstructured", "levels": [0.5] + [0.0] * (len(subnet.layers) - 1)}})
    with pytest.raises(ValueError, match="the same level"):
        uniform.encode(mixed)
    with pytest.raises(ValueError, match="this space has none"):
        make_space("uniform", GQA).encode(mixed)


BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
WIDTH_PRESETS = ("uniform", "per_layer", "disp")
TIED_SMOLLM2 = {**SMOLLM2, "tie_word_embeddings": True}


def _step_costs(subnet, step):
    """What one fill step of each kept layer's MLP adds to the parameters."""
    base = count_params(SMOLLM2, subnet)
    return [count_params(SMOLLM2, replace(subnet, mlp=tuple(
        w + step if j == i else w for j, w in enumerate(subnet.mlp)))) - base
        for i in range(subnet.num_layers)]


@pytest.mark.parametrize("preset", WIDTH_PRESETS)
def test_filling_reaches_the_budget_within_one_fine_step_and_keeps_the_grid(preset):
    """A proposal is widened toward the smallest budget at or above it: to within one fine
    step of it unless every MLP is at the top of its grid step; `coarse` gives the proposal
    back, and the searcher's grid is that of the space without budgets."""
    space = make_space(preset, SMOLLM2, fill_to=BUDGETS, layer_order=range(29, -1, -1))
    assert space.choices() == make_space(preset, SMOLLM2, layer_order=range(29, -1, -1)).choices()
    dense = count_params(SMOLLM2, SubnetConfig.dense(SMOLLM2))
    step = fill_step(space.neuron_step)
    rng = random.Random(0)
    for _ in range(60):
        proposal = space.sample(rng)
        filled = space.filled(proposal)
        params, before = count_params(SMOLLM2, filled), count_params(SMOLLM2, proposal)
        assert space.coarse(filled) == proposal
        assert filled.validate(SMOLLM2) is filled and all(w % 8 == 0 for w in filled.mlp)
        budget = next((b * dense for b in sorted(BUDGETS) if b * dense >= before), None)
        if budget is None:
            assert filled == proposal
            continue
        assert before <= params <= budget
        grid = space.neuron_step
        room = [c for c, w in zip(_step_costs(filled, step), filled.mlp)
                if w < 1536 and w + step < min(1536, (w // grid + 1) * grid)]
        assert not room or budget - params < min(room)


def test_a_proposal_with_room_lands_on_the_budget_and_the_important_layers_fill_first():
    space = make_space("per_layer", TIED_SMOLLM2, fill_to=[0.9], layer_order=range(29, -1, -1))
    dense = SubnetConfig.dense(TIED_SMOLLM2)
    budget = 0.9 * count_params(TIED_SMOLLM2, dense)
    proposal = replace(dense, mlp=(1216,) * 2 + (1280,) * 28)
    filled = space.filled(proposal)
    assert 0 <= budget - count_params(TIED_SMOLLM2, filled) < 3 * 576 * 8
    assert filled.mlp[28:] == (1288, 1288) and filled.mlp[:2] == (1216, 1216)
    everywhere_low = space.filled(replace(dense, mlp=(1216,) * 30))
    assert everywhere_low.mlp == (1272,) * 30
    assert space.encode(space.coarse(everywhere_low)) == space.encode(replace(dense, mlp=(1216,) * 30))


def test_filling_leaves_dense_mlps_and_budget_less_spaces_alone():
    dense = SubnetConfig.dense(SMOLLM2)
    shallow = replace(dense, layers=dense.layers[:20], kv_heads=dense.kv_heads[:20],
                      q_per_kv=dense.q_per_kv[:20], mlp=dense.mlp[:20])
    assert make_space("per_layer", SMOLLM2, fill_to=[0.9]).filled(shallow) == shallow
    narrow = replace(dense, mlp=(1216,) * 30)
    assert make_space("per_layer", SMOLLM2).filled(narrow) == narrow
    layers = make_space("layers", SMOLLM2)
    assert layers.filled(shallow) == layers.coarse(shallow) == shallow
    with pytest.raises(ValueError, match=r"per_layer space: fill_to: budget 0.0 must be a "
                                         r"fraction of the dense parameters in \(0, 1\]"):
        make_space("per_layer", SMOLLM2, fill_to=[0.9, 0.0])
    with pytest.raises(ValueError, match=r"layers space: unknown bound\(s\) fill_to"):
        make_space("layers", SMOLLM2, fill_to=[0.9])
