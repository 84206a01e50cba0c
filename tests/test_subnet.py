import json

import pytest
from hypothesis import given, strategies as st

from prunetune.evaluators.model import tiny_config
from prunetune.search_spaces import SubnetConfig

CFG = tiny_config("llama")  # 3 layers, 2 kv heads, 3 q per kv, 64 neurons, 48 channels


def _good() -> SubnetConfig:
    return SubnetConfig(layers=(0, 2), kv_heads=(1, 2), q_per_kv=(3, 1), mlp=(10, 64), embed=40)


@st.composite
def subnets(draw: st.DrawFn) -> SubnetConfig:
    layers = sorted(draw(st.sets(st.integers(0, 2), min_size=1)))
    n = len(layers)
    ints = lambda hi: st.lists(st.integers(1, hi), min_size=n, max_size=n)  # noqa: E731
    return SubnetConfig(layers, draw(ints(2)), draw(ints(3)), draw(ints(64)),
                        draw(st.integers(1, 48)))


@given(subnets())
def test_json_round_trip_is_canonical(subnet: SubnetConfig) -> None:
    text = subnet.to_json()
    assert SubnetConfig.from_json(text) == subnet
    assert " " not in text and list(json.loads(text)) == sorted(json.loads(text))
    assert SubnetConfig.from_json(text).config_hash() == subnet.config_hash()
    subnet.validate(CFG)


def test_lists_become_tuples_and_hash() -> None:
    a = SubnetConfig([0, 2], [1, 2], [3, 1], [10, 64], 40)
    assert a == _good() and hash(a) == hash(_good())
    assert len({a, _good()}) == 1


def test_dense_is_whole_model() -> None:
    dense = SubnetConfig.dense(CFG)
    assert dense.layers == (0, 1, 2) and dense.kv_heads == (2, 2, 2)
    assert dense.q_per_kv == (3, 3, 3) and dense.mlp == (64, 64, 64) and dense.embed == 48
    assert dense.is_uniform and not _good().is_uniform


def test_json_of_todays_configs_is_stable() -> None:
    assert _good().to_json() == '{"embed":40,"kv_heads":[1,2],"layers":[0,2],"mlp":[10,64],"q_per_kv":[3,1]}'


@pytest.mark.parametrize("change, message", [
    (dict(layers=(0, 3)), r"layers\[1\] = 3: layer index must be in \[0, 2\]"),
    (dict(layers=(2, 0)), "layers: must be strictly ascending"),
    (dict(layers=(), kv_heads=(), q_per_kv=(), mlp=()), "layers: at least 1"),
    (dict(kv_heads=(0, 1)), r"kv_heads\[0\] = 0: must be in \[1, 2\]"),
    (dict(q_per_kv=(4, 1)), r"q_per_kv\[0\] = 4: must be in \[1, 3\]"),
    (dict(mlp=(10, 65)), r"mlp\[1\] = 65: must be in \[1, 64\]"),
    (dict(mlp=(10,)), r"mlp: needs one entry per kept layer \(2\), got 1"),
    (dict(embed=49), r"embed = 49: must be in \[1, 48\]"),
])
def test_validate_names_field_and_bound(change: dict, message: str) -> None:
    bad = SubnetConfig(**{**_good().to_dict(), **change})
    with pytest.raises(ValueError, match=message):
        bad.validate(CFG)


def test_from_json_rejects_unknown_and_missing_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown fields \['heads'\].*missing fields \['embed'\]"):
        SubnetConfig.from_dict({"layers": [0], "kv_heads": [1], "q_per_kv": [1], "mlp": [1],
                                "heads": 3})


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*llama, mistral, qwen2"):
        SubnetConfig.dense({"model_type": "gpt2", "hidden_size": 8})
