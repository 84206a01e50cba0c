"""Baseline pruning recipes: valid sub-networks within budget, warm starts every space encodes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prunetune.orchestrator.baselines import (
    BASELINE_IMPORTANCE,
    BASELINES,
    DEFAULT_BUDGETS,
    baseline_family,
    baseline_subnets,
    warm_start_subnets,
)
from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.search import warm_start_configs
from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.dims import ModelDims
from prunetune.search_spaces.spaces import SPACES, make_space
from prunetune.search_spaces.subnet import SubnetConfig
from standin import SMOLLM2_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def _tiny(**overrides):
    fields = dict(model_type="llama", vocab_size=96, hidden_size=48, intermediate_size=64,
                  num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2, head_dim=8)
    fields.update(overrides)
    return fields


CONFIGS = {
    "smollm2": SMOLLM2_CONFIG,
    "gqa": _tiny(),
    "mqa": _tiny(num_key_value_heads=1),
    "qwen2-mha": _tiny(model_type="qwen2", num_key_value_heads=6, tie_word_embeddings=True),
}
BUDGETS = (0.9, 0.8, 0.7, 0.6)
SMOLLM2_ORDER = [0, 29, 24, 1, 23, 20, 28, 22, 21, 19, 27, 18, 8, 10, 5, 11, 2, 6, 4, 7, 9,
                 16, 3, 26, 15, 12, 17, 13, 25, 14]


def _reversed_order(config) -> list[int]:
    return list(range(ModelDims.from_config(config).num_layers))[::-1]


def _dense_params(config) -> int:
    return count_params(config, SubnetConfig.dense(config))


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("name", BASELINES)
def test_each_budget_gets_the_largest_valid_member_within_it(name, config_name) -> None:
    config = CONFIGS[config_name]
    order = _reversed_order(config)
    family = baseline_family(name, config, order)
    dense = _dense_params(config)
    subnets = baseline_subnets(name, config, order, BUDGETS)
    assert len(subnets) == len(BUDGETS)
    for budget, subnet in zip(BUDGETS, subnets):
        assert subnet.validate(config) is subnet
        params = count_params(config, subnet)
        assert params <= budget * dense
        assert all(count_params(config, s) <= params for s in family
                   if count_params(config, s) <= budget * dense)
    sizes = [count_params(config, s) for s in subnets]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] < dense


def test_smollm2_baselines_land_near_each_budget() -> None:
    dense = _dense_params(SMOLLM2_CONFIG)
    for name in ("uniform-activation", "layer-drop"):
        for budget, subnet in zip(DEFAULT_BUDGETS, baseline_subnets(
                name, SMOLLM2_CONFIG, SMOLLM2_ORDER, DEFAULT_BUDGETS)):
            gap = budget - count_params(SMOLLM2_CONFIG, subnet) / dense
            one_layer = 0.027
            assert 0 <= gap < (0.005 if name == "uniform-activation" else one_layer)


@pytest.mark.parametrize("name", ["uniform-magnitude", "uniform-activation", "no-importance"])
def test_uniform_baselines_keep_every_layer_with_one_ratio(name) -> None:
    for subnet in baseline_subnets(name, SMOLLM2_CONFIG, SMOLLM2_ORDER, DEFAULT_BUDGETS):
        assert subnet.layers == tuple(range(30))
        assert len(set(subnet.mlp)) == len(set(subnet.kv_heads)) == 1
        assert subnet.q_per_kv == (3,) * 30
        ratios = (subnet.mlp[0] / 1536, subnet.embed / 576)
        assert abs(ratios[0] - ratios[1]) < 0.01


def test_mlp_only_thins_every_mlp_alike_and_keeps_the_rest() -> None:
    dense = SubnetConfig.dense(SMOLLM2_CONFIG)
    subnets = baseline_subnets("mlp-only", SMOLLM2_CONFIG, SMOLLM2_ORDER, DEFAULT_BUDGETS)
    for subnet in subnets:
        assert (subnet.layers, subnet.kv_heads, subnet.q_per_kv, subnet.embed) == (
            dense.layers, dense.kv_heads, dense.q_per_kv, dense.embed)
        assert len(set(subnet.mlp)) == 1 and subnet.mlp[0] < 1536
    assert [s.mlp[0] for s in subnets] == sorted((s.mlp[0] for s in subnets), reverse=True)


def test_layer_drop_keeps_the_most_influential_layers() -> None:
    for budget, subnet in zip(DEFAULT_BUDGETS, baseline_subnets(
            "layer-drop", SMOLLM2_CONFIG, SMOLLM2_ORDER, DEFAULT_BUDGETS)):
        k = subnet.num_layers
        assert subnet.layers == tuple(sorted(SMOLLM2_ORDER[:k]))
        assert subnet == SubnetConfig(subnet.layers, (3,) * k, (3,) * k, (1536,) * k, 576)
    config = _tiny(num_hidden_layers=4)
    dense = _dense_params(config)
    two_layers = count_params(config, SubnetConfig((0, 1), (2, 2), (3, 3), (64, 64), 48))
    [subnet] = baseline_subnets("layer-drop", config, [2, 0, 3, 1], [two_layers / dense])
    assert subnet.layers == (0, 2)


def test_baselines_name_the_importance_they_need() -> None:
    assert set(BASELINE_IMPORTANCE) == set(BASELINES)
    assert set(BASELINE_IMPORTANCE.values()) <= {"activation", "magnitude", "none"}


@pytest.mark.parametrize("preset", sorted(SPACES))
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_warm_starts_are_encodable_in_every_space(preset, config_name) -> None:
    config = CONFIGS[config_name]
    order = _reversed_order(config)
    space = make_space(preset, config, layer_order=order)
    subnets = warm_start_subnets(BASELINES, space)
    dense = _dense_params(config)
    assert len(set(subnets)) == len(subnets)
    for subnet in subnets:
        assert space.decode(space.encode(subnet)) == subnet
        assert count_params(config, subnet) <= max(DEFAULT_BUDGETS) * dense
    if preset == "layers":
        assert all(s.mlp == (ModelDims.from_config(config).intermediate_size,) * s.num_layers
                   for s in subnets)
    dropped = [s for s in subnets if s.num_layers < ModelDims.from_config(config).num_layers]
    assert all(s.layers == tuple(sorted(order[:s.num_layers])) for s in dropped)
    assert subnets, f"no warm start for {preset} on {config_name}"


def test_smollm2_warm_starts_cover_both_families() -> None:
    space = make_space("per_layer", SMOLLM2_CONFIG, layer_order=SMOLLM2_ORDER)
    subnets = warm_start_subnets(["uniform-activation", "layer-drop"], space)
    assert any(s.num_layers == 30 and s.embed < 576 for s in subnets)
    assert any(s.num_layers < 30 and s.embed == 576 for s in subnets)
    assert warm_start_subnets(["layer-drop"], space, budgets=[0.3]) == []


def test_search_warm_start_configs_decode_to_the_baselines() -> None:
    spec = load_spec({"search_space": {"preset": "uniform"},
                      "algorithm": {"warm_start": ["uniform-activation", "layer-drop"]}})
    space = make_space("uniform", SMOLLM2_CONFIG, layer_order=SMOLLM2_ORDER)
    configs = warm_start_configs(spec, space)
    assert [space.decode(c) for c in configs] == warm_start_subnets(
        ["uniform-activation", "layer-drop"], space)


def test_unknown_baseline_and_unfittable_budget_are_named() -> None:
    space = make_space("uniform", SMOLLM2_CONFIG)
    with pytest.raises(ValueError, match=r"unknown baseline 'random-prune'.*layer-drop"):
        baseline_subnets("random-prune", SMOLLM2_CONFIG, None, [0.5])
    with pytest.raises(ValueError, match="unknown baseline 'shortgpt'"):
        warm_start_subnets(["layer-drop", "shortgpt"], space)
    with pytest.raises(ValueError, match=r"layer-drop: no sub-network fits budget 0.1"):
        baseline_subnets("layer-drop", SMOLLM2_CONFIG, SMOLLM2_ORDER, [0.1])
    with pytest.raises(ValueError, match=r"budget 1.5 must be"):
        baseline_subnets("uniform-activation", SMOLLM2_CONFIG, None, [1.5])


@pytest.mark.slow
def test_quality_benchmark_quick_run_prints_the_table(tmp_path) -> None:
    out = subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--out",
                          str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| budget |" in out.stdout
    for name in ("search", *BASELINES):
        assert name in out.stdout
    assert (tmp_path / "quality.png").stat().st_size > 0
