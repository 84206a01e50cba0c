"""Weight sparsity: masks, Wanda scores, nonzero_params, masked == extracted, export."""

import json
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunetune.evaluators.importance import (
    BlockChannels, activation_scores, permute_model, wanda_scores,
)
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.surgery import (
    SPARSITY_CONFIG_KEY, SUBNET_FILE, apply_masks, extract, kept_blocks, load_pruned, n_m_keep,
    save_pruned, unstructured_keep,
)
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import count_nonzero_params, count_params, subnet_cost
from prunetune.search_spaces.dims import ModelDims, adapter_for
from prunetune.search_spaces.subnet import Sparsity
from test_surgery import random_subnet

LEVELS = {"unstructured": (0.0, 0.25, 0.5, 0.7), "2:4": (0.0, 0.5)}


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def random_sparse_subnet(config, rng: random.Random, method: str, pattern: str) -> SubnetConfig:
    """A random structural sub-network (`test_surgery.random_subnet`) with a random
    sparsity level per kept layer."""
    subnet = random_subnet(config, rng)
    levels = [rng.choice(LEVELS[pattern]) for _ in subnet.layers]
    return SubnetConfig(**{**subnet.to_dict(), "sparsity": Sparsity(method, pattern, levels)})


def nonzero(model: torch.nn.Module) -> int:
    return sum(int(p.count_nonzero()) for p in model.parameters())


def sorted_with_norms(model: torch.nn.Module):
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    return permute_model(model, activation_scores(model, ids)).input_norms


def test_n_m_mask_keeps_exactly_n_of_every_m_highest() -> None:
    scores = torch.rand(5, 18, generator=torch.Generator().manual_seed(0))
    keep = n_m_keep(scores, 2, 4)
    groups = keep[:, :16].reshape(5, 4, 4)
    assert (groups.sum(-1) == 2).all()
    assert keep[:, 16:].all(), "a trailing group of fewer than M stays whole"
    kept_scores = torch.where(groups, scores[:, :16].reshape(5, 4, 4), math.inf)
    dropped_scores = torch.where(~groups, scores[:, :16].reshape(5, 4, 4), -math.inf)
    assert (kept_scores.amin(-1) >= dropped_scores.amax(-1)).all()


def test_unstructured_mask_drops_the_exact_count_lowest_per_row() -> None:
    scores = torch.rand(7, 33, generator=torch.Generator().manual_seed(1))
    keep = unstructured_keep(scores, 16)
    assert (keep.sum(1) == 33 - 16).all()
    for row, mask in zip(scores, keep):
        assert row[mask].min() >= row[~mask].max()


def test_zeros_per_row_is_the_rule_of_both_patterns() -> None:
    assert Sparsity("wanda", "unstructured", [0.5]).zeros_per_row(0.5, 33) == 16
    assert Sparsity("wanda", "unstructured", [0.3]).zeros_per_row(0.3, 10) == 3
    assert Sparsity("wanda", "2:4", [0.5]).zeros_per_row(0.5, 18) == 8
    assert Sparsity("wanda", "2:4", [0.5]).zeros_per_row(0.0, 18) == 0


def test_wanda_scores_on_a_hand_checked_case() -> None:
    weight = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])  # two tokens, two input channels
    norms = x.norm(dim=0)  # sqrt(10), 2
    expected = torch.tensor([[math.sqrt(10), 4.0], [3 * math.sqrt(10), 1.0]])
    assert torch.allclose(wanda_scores(weight, norms), expected)
    keep = unstructured_keep(wanda_scores(weight, norms), 1)
    assert keep.tolist() == [[False, True], [True, False]]


def test_calibration_collects_input_norms_of_every_projection() -> None:
    model = random_model(tiny_config("llama"), seed=2)
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(4))
    seen: dict[str, list[torch.Tensor]] = {}
    layer = model.model.layers[1]

    def keep(name: str):
        return lambda module, args: seen.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [layer.self_attn.q_proj.register_forward_pre_hook(keep("q")),
               layer.self_attn.o_proj.register_forward_pre_hook(keep("o")),
               layer.mlp.up_proj.register_forward_pre_hook(keep("up")),
               layer.mlp.down_proj.register_forward_pre_hook(keep("down"))]
    norms = activation_scores(model, ids, batch_size=2).input_norms
    for h in handles:
        h.remove()
    a = adapter_for(model)
    for name, proj in (("q", a.q), ("o", a.o), ("up", a.up), ("down", a.down)):
        expected = torch.cat(seen[name]).norm(dim=0)
        assert torch.allclose(norms.of(a, 1, proj), expected, rtol=1e-5), name


def test_input_norms_follow_the_permutation(tiny_model: torch.nn.Module) -> None:
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    permuted = permute_model(tiny_model, activation_scores(tiny_model, ids)).input_norms
    again = activation_scores(tiny_model, ids).input_norms
    for kind in ("attn", "o", "mlp", "down"):
        for got, want in zip(getattr(permuted, kind), getattr(again, kind)):
            assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), kind


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("magnitude", "unstructured"),
                                            ("wanda", "2:4"), ("magnitude", "2:4")])
def test_masked_equals_extracted_and_nonzero_params_are_exact(tiny_model, method, pattern) -> None:
    norms = sorted_with_norms(tiny_model)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    dense = logits(tiny_model, ids)
    rng = random.Random(f"{method}{pattern}")
    for _ in range(8):
        subnet = random_sparse_subnet(tiny_model.config, rng, method, pattern)
        with apply_masks(tiny_model, subnet, input_norms=norms):
            masked = logits(tiny_model, ids)
            masked_nonzero = kept_nonzero_under_masks(tiny_model, subnet)
        small = extract(tiny_model, subnet, norms)
        assert (masked - logits(small, ids)).abs().max() <= 1e-4, subnet
        assert count_nonzero_params(tiny_model.config, subnet) == nonzero(small), subnet
        assert count_params(tiny_model.config, subnet) == sum(p.numel() for p in small.parameters())
        assert masked_nonzero == linear_nonzero(small), subnet
    assert torch.equal(logits(tiny_model, ids), dense), "masks must be removed on exit"


def kept_nonzero_under_masks(model: torch.nn.Module, subnet: SubnetConfig) -> int:
    """Nonzeros of the kept blocks of the weights the masked model computes with (each
    linear's forward on the identity gives its masked weight, transposed, plus its bias)."""
    a, d = adapter_for(model), ModelDims.from_config(model.config)
    total = 0
    for old_i, kv, q, m in zip(subnet.layers, subnet.kv_heads, subnet.q_per_kv, subnet.mlp):
        layer = model.get_submodule(a.layers)[old_i]
        for block in kept_blocks(layer, a, d, BlockChannels.prefix(subnet.embed), kv, q, m).values():
            linear = block.linear
            with torch.no_grad():
                bias = 0 if linear.bias is None else linear.bias
                effective = (linear(torch.eye(linear.in_features)) - bias).t()
            total += int(effective[block.rows][:, block.cols].count_nonzero())
    return total


def linear_nonzero(small: torch.nn.Module) -> int:
    a = adapter_for(small)
    names = (a.q, a.k, a.v, a.o, a.gate, a.up, a.down)
    return sum(int(m.weight.count_nonzero()) for n, m in small.named_modules()
               if n.rsplit(".", 1)[-1] in names)


def test_2_4_extracted_weights_hit_the_pattern() -> None:
    model = random_model(tiny_config("llama"), seed=3)
    norms = sorted_with_norms(model)
    subnet = SubnetConfig((0, 2), (2, 1), (3, 2), (32, 64), 48,
                          Sparsity("wanda", "2:4", (0.5, 0.5)))
    small = extract(model, subnet, norms)
    a = adapter_for(small)
    for layer in small.get_submodule(a.layers):
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            groups = linear.weight.reshape(linear.weight.shape[0], -1, 4)
            assert (groups.count_nonzero(-1) == 2).all()


def test_dense_level_everywhere_is_no_sparsity() -> None:
    dense = SubnetConfig((0,), (1,), (1,), (4,), 8)
    assert SubnetConfig((0,), (1,), (1,), (4,), 8, Sparsity("wanda", "2:4", (0.0,))) == dense
    assert "sparsity" not in dense.to_json()


def test_sparsity_validation_names_the_field() -> None:
    config = tiny_config("llama")
    base = dict(layers=(0, 1), kv_heads=(1, 1), q_per_kv=(1, 1), mlp=(8, 8), embed=8)
    for sparsity, message in ((Sparsity("obd", "unstructured", (0.5, 0)), "sparsity.method"),
                              (Sparsity("wanda", "4:2", (0.5, 0)), "sparsity.pattern"),
                              (Sparsity("wanda", "2:4", (0.25, 0)), r"sparsity.levels\[0\]"),
                              (Sparsity("wanda", "unstructured", (1.0, 0)), r"sparsity.levels\[0\]"),
                              (Sparsity("wanda", "unstructured", (0.5,)), "sparsity.levels: needs")):
        with pytest.raises(ValueError, match=message):
            SubnetConfig(**base, sparsity=sparsity).validate(config)


def test_wanda_without_input_norms_is_refused() -> None:
    model = random_model(tiny_config("llama"))
    subnet = SubnetConfig((0,), (1,), (1,), (8,), 8, Sparsity("wanda", "unstructured", (0.5,)))
    with pytest.raises(ValueError, match="evaluation.importance: activation"):
        extract(model, subnet)


def test_nonzero_params_of_smollm2_at_half_sparsity() -> None:
    smol = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                tie_word_embeddings=True)
    dense = SubnetConfig.dense(smol)
    linear = 30 * (576 * 576 * 2 + 2 * 576 * 192 + 3 * 576 * 1536)
    for pattern in ("unstructured", "2:4"):
        half = SubnetConfig(**{**dense.to_dict(),
                               "sparsity": Sparsity("wanda", pattern, (0.5,) * 30)})
        assert count_nonzero_params(smol, half) == count_params(smol, dense) - linear // 2
        assert subnet_cost(smol, half)["params"] == count_params(smol, dense)


@pytest.mark.parametrize("uniform", [True, False])
def test_export_keeps_the_zeros_and_records_the_sparsity(tmp_path, uniform) -> None:
    model = random_model(tiny_config("llama"), seed=4)
    norms = sorted_with_norms(model)
    mlp = (32, 32) if uniform else (32, 16)
    subnet = SubnetConfig((0, 2), (2, 2), (3, 3), mlp, 48,
                          Sparsity("wanda", "unstructured", (0.5, 0.25)))
    ids = torch.randint(0, 96, (2, 9))
    with apply_masks(model, subnet, input_norms=norms):
        expected = logits(model, ids)
    out = save_pruned(model, subnet, tmp_path / "sparse", norms)
    loaded = load_pruned(out)
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-4
    assert nonzero(loaded) == count_nonzero_params(model.config, subnet)
    assert getattr(loaded.config, SPARSITY_CONFIG_KEY) == subnet.sparsity.to_dict()
    assert json.loads((out / "config.json").read_text())[SPARSITY_CONFIG_KEY]["levels"] == [0.5, 0.25]
    record = json.loads((out / SUBNET_FILE).read_text())
    assert SubnetConfig.from_dict(record["subnet"]) == subnet
    if uniform:
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert nonzero(plain) == count_nonzero_params(model.config, subnet)


@pytest.mark.parametrize("mode,pattern", [pytest.param("masked", "2:4", marks=pytest.mark.slow),
                                          pytest.param("extracted", "unstructured", marks=pytest.mark.slow)])
def test_a_sparse_search_runs_end_to_end_and_exports(tmp_path, smollm2_tokenizer, mode,
                                                     pattern) -> None:
    import ray

    from prunetune.orchestrator.cli import main, merged_front
    from prunetune.orchestrator.results import ResultLog

    model_dir = tmp_path / "model"
    random_model(tiny_config("llama", vocab_size=49152, num_hidden_layers=4), seed=5).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
model: {model_dir}
run_dir: {tmp_path / 'run'}
search_space: {{preset: per_layer, min_ratio: 0.5, sparsity: {{method: wanda, pattern: '{pattern}'}}}}
objectives: {{perplexity: min, nonzero_params: min}}
constraints: ["nonzero_params <= 0.9 * dense"]
algorithm: {{name: random, num_samples: 4, seed: 1}}
evaluation: {{seq_len: 32, windows: 2, batch_size: 2, calibration_samples: 2, mode: {mode}}}
""")
    try:
        assert main(["search", str(spec)]) == 0
    finally:
        ray.shutdown()
    rows = ResultLog(str(tmp_path / "run")).read()
    assert (rows["status"] != "failed").all() and rows["perplexity"].notna().any()
    dense = rows[rows["trial_id"] == "dense"].iloc[0]
    assert dense["nonzero_params"] == dense["params"]
    trials = rows[(rows["trial_id"] != "dense") & (rows["status"] == "ok")]
    assert len(trials) and (trials["nonzero_params"] <= 0.9 * dense["nonzero_params"]).all()
    _, front, _ = merged_front([str(tmp_path / "run")])
    pick = int(front["nonzero_params"].to_numpy().argmin())
    out = tmp_path / "x"
    assert main(["export", str(tmp_path / "run"), "--pick", str(pick), "--out", str(out)]) == 0
    subnet = SubnetConfig.from_json(front.iloc[pick]["config_json"])
    loaded = load_pruned(out)
    assert nonzero(loaded) == front.iloc[pick]["nonzero_params"]
    assert getattr(loaded.config, SPARSITY_CONFIG_KEY) == subnet.sparsity.to_dict()
