import torch

from prunetune.evaluators.surgery import apply_masks
from prunetune.search_spaces import SubnetConfig
from prunetune.evaluators.importance import (
    ImportanceScores, activation_scores, magnitude_scores, permute_model,
)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def is_descending(t: torch.Tensor) -> bool:
    return bool((t[:-1] >= t[1:]).all())


def test_permutation_keeps_logits_and_sorts_scores(tiny_model: torch.nn.Module) -> None:
    ids = torch.randint(0, tiny_model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(2))
    before = logits(tiny_model, ids)
    sorted_scores = permute_model(tiny_model, activation_scores(tiny_model, ids))
    assert (logits(tiny_model, ids) - before).abs().max() <= 1e-5
    again = activation_scores(tiny_model, ids)
    assert torch.allclose(again.embed, sorted_scores.embed, rtol=1e-4)
    assert is_descending(again.embed)
    for layer in range(tiny_model.config.num_hidden_layers):
        assert torch.allclose(again.heads[layer], sorted_scores.heads[layer], rtol=1e-4)
        assert is_descending(again.neurons[layer])
        groups = again.heads[layer].reshape(2, 3)
        assert is_descending(groups.sum(1)) and all(is_descending(g) for g in groups)


def test_importance_order_keeps_quality_better_than_reverse(smollm2: torch.nn.Module,
                                                            smollm2_tokenizer) -> None:
    text = "The cat sat on the mat. It was a sunny day and the children played outside. " * 8
    ids = smollm2_tokenizer(text, return_tensors="pt").input_ids[:, :96]
    before = logits(smollm2, ids)
    permute_model(smollm2, activation_scores(smollm2, ids))
    assert (logits(smollm2, ids) - before).abs().max() <= 1e-3
    d = smollm2.config
    subnet = SubnetConfig(tuple(range(30)), (3,) * 30, (3,) * 30, (768,) * 30, 576)

    def loss() -> float:
        with torch.no_grad(), apply_masks(smollm2, subnet):
            return smollm2(ids, labels=ids).loss.item()

    kept_important = loss()
    for layer in smollm2.model.layers:
        layer.mlp.down_proj.weight.data = layer.mlp.down_proj.weight.data.flip(1).contiguous()
        layer.mlp.gate_proj.weight.data = layer.mlp.gate_proj.weight.data.flip(0).contiguous()
        layer.mlp.up_proj.weight.data = layer.mlp.up_proj.weight.data.flip(0).contiguous()
    assert d.intermediate_size == 1536
    assert kept_important < loss()


def test_scores_save_and_load(tmp_path, tiny_model: torch.nn.Module) -> None:
    scores = activation_scores(tiny_model, torch.randint(0, tiny_model.config.vocab_size, (2, 8)))
    loaded = ImportanceScores.load(scores.save(tmp_path / "scores.safetensors"))
    assert loaded.meta["criterion"] == "activation"
    assert torch.equal(loaded.embed, scores.embed)
    assert torch.equal(loaded.block_influence, scores.block_influence)
    assert all(torch.equal(a, b) for a, b in zip(loaded.heads, scores.heads))
    assert all(torch.equal(a, b) for a, b in zip(loaded.neurons, scores.neurons))
    assert loaded.layer_order() == scores.layer_order()


def test_magnitude_scores_sort_without_changing_logits(tiny_model: torch.nn.Module) -> None:
    ids = torch.randint(0, tiny_model.config.vocab_size, (1, 12))
    before = logits(tiny_model, ids)
    permute_model(tiny_model, magnitude_scores(tiny_model))
    assert (logits(tiny_model, ids) - before).abs().max() <= 1e-5
    assert is_descending(magnitude_scores(tiny_model).embed)
