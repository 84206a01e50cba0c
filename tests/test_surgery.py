import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.surgery import (
    apply_masks, extract, load_pruned, random_subnet_model, save_pruned,
)
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import count_params


def random_subnet(config, rng: random.Random) -> SubnetConfig:
    n = config.num_hidden_layers
    layers = sorted(rng.sample(range(n), rng.randint(1, n)))
    kv, q = config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    return SubnetConfig(
        layers=layers,
        kv_heads=[rng.randint(1, kv) for _ in layers],
        q_per_kv=[rng.randint(1, q) for _ in layers],
        mlp=[rng.randint(1, config.intermediate_size) for _ in layers],
        embed=rng.randint(1, config.hidden_size),
    )


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_masked_equals_extracted_and_params_are_counted(tiny_model: torch.nn.Module) -> None:
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    dense = logits(tiny_model, ids)
    rng = random.Random(0)
    for _ in range(25):
        subnet = random_subnet(tiny_model.config, rng)
        with apply_masks(tiny_model, subnet):
            masked = logits(tiny_model, ids)
        small = extract(tiny_model, subnet)
        assert (masked - logits(small, ids)).abs().max() <= 1e-4, subnet
        assert count_params(tiny_model.config, subnet) == sum(p.numel() for p in small.parameters())
    assert torch.equal(logits(tiny_model, ids), dense), "masks must be removed on exit"


def test_masks_change_the_function_and_dense_masks_do_not(tiny_model: torch.nn.Module) -> None:
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 11))
    dense = logits(tiny_model, ids)
    with apply_masks(tiny_model, SubnetConfig.dense(tiny_model.config)):
        assert torch.equal(logits(tiny_model, ids), dense)
    for change in (dict(embed=40), dict(mlp=(64, 10, 64)), dict(kv_heads=(2, 1, 2)),
                   dict(q_per_kv=(3, 3, 2)), dict(layers=(0, 2), kv_heads=(2, 2), q_per_kv=(3, 3),
                                                 mlp=(64, 64))):
        subnet = SubnetConfig(**{**SubnetConfig.dense(tiny_model.config).to_dict(), **change})
        with apply_masks(tiny_model, subnet):
            assert (logits(tiny_model, ids) - dense).abs().max() > 1e-3, change


def test_masks_are_restored_after_an_exception() -> None:
    model = random_model(tiny_config("llama"))
    ids = torch.randint(0, 96, (1, 9))
    dense = logits(model, ids)
    subnet = SubnetConfig(layers=(1,), kv_heads=(1,), q_per_kv=(2,), mlp=(5,), embed=30)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_masks(model, subnet):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, ids), dense)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any("forward" in vars(m) for m in model.modules())


def test_apply_masks_rejects_an_invalid_subnet_before_touching_the_model() -> None:
    model = random_model(tiny_config("llama"))
    with pytest.raises(ValueError, match="embed = 99"):
        with apply_masks(model, SubnetConfig((0,), (1,), (1,), (1,), 99)):
            pass
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_extract_does_not_share_or_change_weights() -> None:
    model = random_model(tiny_config("qwen2"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = extract(model, SubnetConfig((0, 2), (1, 2), (2, 3), (7, 9), 20))
    with torch.no_grad():
        for p in small.parameters():
            p.zero_()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_uniform_subnet_loads_with_plain_from_pretrained(tmp_path, tiny_model) -> None:
    subnet = SubnetConfig((0, 2), (1, 1), (2, 2), (30, 30), 32)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 13))
    with apply_masks(tiny_model, subnet):
        expected = logits(tiny_model, ids)
    save_pruned(tiny_model, subnet, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-4
    assert sum(p.numel() for p in loaded.parameters()) == count_params(tiny_model.config, subnet)
    assert (logits(load_pruned(tmp_path / "pruned"), ids) - expected).abs().max() <= 1e-4


def test_llama_with_embed_not_a_multiple_of_heads_loads_as_plain_checkpoint(tmp_path) -> None:
    model = random_model(tiny_config("llama"))
    subnet = SubnetConfig((0, 1), (1, 1), (3, 3), (30, 30), 31)
    ids = torch.randint(0, 96, (2, 13))
    with apply_masks(model, subnet):
        expected = logits(model, ids)
    save_pruned(model, subnet, tmp_path / "pruned")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert type(loaded).__name__ == "MistralForCausalLM"
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("embed", [24, 31])
def test_per_layer_subnet_round_trips_through_load_pruned(tmp_path, tiny_model, embed) -> None:
    subnet = SubnetConfig((0, 1, 2), (1, 2, 2), (3, 1, 2), (5, 64, 17), embed)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 13))
    with apply_masks(tiny_model, subnet):
        expected = logits(tiny_model, ids)
    save_pruned(tiny_model, subnet, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-4


def test_load_pruned_names_a_directory_that_is_not_a_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="prunetune_subnet.json"):
        load_pruned(tmp_path)


def test_random_subnet_model_has_the_subnets_shapes() -> None:
    config = tiny_config("mistral")
    subnet = SubnetConfig((0, 1), (2, 1), (1, 3), (8, 16), 24)
    model = random_subnet_model(config, subnet, torch.float32, "cpu")
    assert sum(p.numel() for p in model.parameters()) == count_params(config, subnet)
    out = logits(model, torch.randint(0, 96, (1, 5)))
    assert out.shape == (1, 5, 96) and torch.isfinite(out).all()


def test_smollm2_masked_equals_extracted(smollm2: torch.nn.Module) -> None:
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    rng = random.Random(1)
    for _ in range(3):
        subnet = random_subnet(smollm2.config, rng)
        with apply_masks(smollm2, subnet):
            masked = logits(smollm2, ids)
        small = extract(smollm2, subnet)
        assert (masked - logits(small, ids)).abs().max() <= 1e-4
        assert count_params(smollm2.config, subnet) == sum(p.numel() for p in small.parameters())
