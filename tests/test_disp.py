"""Per-block residual channels (the `disp` preset): channel choice, masked == extracted,
exact cost, export and reload, and a search over the preset."""

import json
import random
from typing import Any, Iterator

import pytest
import ray
import torch
from safetensors import safe_open

from prunetune.evaluators.importance import activation_scores, permute_model, top_channels
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.surgery import (
    ScatterLinear, SelectedRMSNorm, apply_masks, extract, layer_channels, load_pruned,
    random_subnet_model, save_pruned,
)
from prunetune.orchestrator.cli import main
from prunetune.orchestrator.results import ResultLog
from prunetune.orchestrator.spec import load_spec
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import (
    count_nonzero_params, count_params, forward_flops, kv_cache_bytes_per_token,
)
from prunetune.search_spaces.spaces import make_space
from prunetune.search_spaces.subnet import Channels, Sparsity
from test_surgery import random_subnet


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def random_disp_subnet(config, rng: random.Random) -> SubnetConfig:
    """A random sub-network of `test_surgery.random_subnet`'s layers, heads and neurons,
    with the full residual stream and random channel counts per sub-layer."""
    subnet = random_subnet(config, rng)
    hidden = config.hidden_size
    channels = Channels([rng.randint(1, hidden) for _ in subnet.layers],
                        [rng.randint(1, hidden) for _ in subnet.layers])
    return SubnetConfig(**{**subnet.to_dict(), "embed": hidden, "channels": channels})


def sorted_norms(model: torch.nn.Module, seed: int = 3):
    """Sort `model` by activation importance; its calibration norms in the new order."""
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))
    return permute_model(model, activation_scores(model, ids)).input_norms


def masked_equals_extracted(model: torch.nn.Module, ids: torch.Tensor, norms: Any,
                            rng: random.Random, count: int) -> Iterator[tuple[SubnetConfig, torch.nn.Module]]:
    """For `count` random disp sub-networks, check that the masked logits equal the
    extracted model's to 1e-4 and that the config's parameter count is the extracted
    model's; yields each sub-network with its extracted model for further checks."""
    for _ in range(count):
        subnet = random_disp_subnet(model.config, rng)
        with apply_masks(model, subnet, input_norms=norms):
            masked = logits(model, ids)
        small = extract(model, subnet, norms)
        assert (masked - logits(small, ids)).abs().max() <= 1e-4, subnet
        assert count_params(model.config, subnet) == sum(p.numel() for p in small.parameters())
        yield subnet, small


def test_masked_equals_extracted_and_cost_is_exact(tiny_model: torch.nn.Module) -> None:
    norms = sorted_norms(tiny_model)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    dense = logits(tiny_model, ids)
    for subnet, small in masked_equals_extracted(tiny_model, ids, norms, random.Random(0), 10):
        linear = sum(m.weight.numel() for m in small.modules() if isinstance(m, torch.nn.Linear))
        attention = sum(2 * 2 * 7 * 7 * kv * q * 8 for kv, q in zip(subnet.kv_heads, subnet.q_per_kv))
        assert forward_flops(tiny_model.config, subnet, 7) == 2 * 7 * linear + attention
    assert torch.equal(logits(tiny_model, ids), dense), "masks must be removed on exit"


def test_each_block_keeps_its_own_highest_norm_channels() -> None:
    model = random_model(tiny_config("llama"), seed=4)
    norms = sorted_norms(model)
    subnet = SubnetConfig((0, 1, 2), (2,) * 3, (3,) * 3, (64,) * 3, 48,
                          channels=Channels((20, 20, 20), (12, 30, 48)))
    reads = []
    for j, layer in enumerate(subnet.layers):
        c = layer_channels(subnet, j, norms)
        attn, mlp = subnet.sublayer_channels()[j]
        for index, scores, keep in ((c.attn_read, norms.attn[layer], attn),
                                    (c.attn_write, norms.attn_out[layer], attn),
                                    (c.mlp_read, norms.mlp[layer], mlp),
                                    (c.mlp_write, norms.mlp_out[layer], mlp)):
            assert len(index) == keep and index.tolist() == sorted(index.tolist())
            dropped = torch.ones(48, dtype=torch.bool)
            dropped[index] = False
            if dropped.any():
                assert scores[index].min() >= scores[dropped].max()
        reads.append(set(c.attn_read.tolist()))
    assert len({frozenset(r) for r in reads}) > 1, "blocks choose their own channels"
    assert set(top_channels(norms.mlp[1], 12).tolist()) <= set(top_channels(norms.mlp[1], 30).tolist())


def test_calibration_collects_the_norms_of_what_each_block_writes() -> None:
    model = random_model(tiny_config("qwen2"), seed=2)
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(4))
    seen: dict[str, list[torch.Tensor]] = {"o": [], "down": []}
    layer = model.model.layers[2]

    def keep(name: str):
        return lambda module, args, out: seen[name].append(out.reshape(-1, out.shape[-1]))

    handles = [layer.self_attn.o_proj.register_forward_hook(keep("o")),
               layer.mlp.down_proj.register_forward_hook(keep("down"))]
    norms = activation_scores(model, ids, batch_size=2).input_norms
    for h in handles:
        h.remove()
    assert torch.allclose(norms.attn_out[2], torch.cat(seen["o"]).norm(dim=0), rtol=1e-5)
    assert torch.allclose(norms.mlp_out[2], torch.cat(seen["down"]).norm(dim=0), rtol=1e-5)


def test_channels_change_the_function_and_full_channels_do_not() -> None:
    model = random_model(tiny_config("mistral"), seed=1)
    norms = sorted_norms(model)
    ids = torch.randint(0, 96, (1, 11))
    dense = logits(model, ids)
    full = SubnetConfig.dense(model.config)
    with apply_masks(model, SubnetConfig(**{**full.to_dict(), "channels": Channels((48,) * 3, (48,) * 3)}),
                     input_norms=norms):
        assert (logits(model, ids) - dense).abs().max() <= 1e-5
    for channels in (Channels((48, 40, 48), (48,) * 3), Channels((48,) * 3, (48, 48, 30))):
        subnet = SubnetConfig(**{**full.to_dict(), "channels": channels})
        with apply_masks(model, subnet, input_norms=norms):
            assert (logits(model, ids) - dense).abs().max() > 1e-3, channels


def test_channels_need_the_calibration_norms_and_the_full_stream() -> None:
    model = random_model(tiny_config("llama"))
    subnet = SubnetConfig((0,), (1,), (1,), (8,), 48, channels=Channels((16,), (16,)))
    with pytest.raises(ValueError, match="evaluation.importance: activation"):
        extract(model, subnet)
    with pytest.raises(ValueError, match="residual stream keeps its full width"):
        SubnetConfig((0,), (1,), (1,), (8,), 40, channels=Channels((16,), (16,))).validate(model.config)
    with pytest.raises(ValueError, match=r"channels.mlp\[0\] = 49"):
        SubnetConfig((0,), (1,), (1,), (8,), 48, channels=Channels((16,), (49,))).validate(model.config)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_export_loads_back_with_load_pruned(tmp_path, model_type) -> None:
    model = random_model(tiny_config(model_type, tie_word_embeddings=True), seed=6)
    norms = sorted_norms(model)
    subnet = SubnetConfig((0, 2), (1, 2), (3, 2), (20, 64), 48, channels=Channels((24, 40), (48, 16)))
    ids = torch.randint(0, 96, (2, 9))
    with apply_masks(model, subnet, input_norms=norms):
        expected = logits(model, ids)
    save_pruned(model, subnet, tmp_path / "pruned", norms)
    assert "auto_map" not in json.loads((tmp_path / "pruned" / "config.json").read_text())
    with safe_open(str(tmp_path / "pruned" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.down_proj.channels").dtype == torch.int64
    loaded = load_pruned(tmp_path / "pruned")
    assert (logits(loaded, ids) - expected).abs().max() <= 1e-4
    assert sum(p.numel() for p in loaded.parameters()) == count_params(model.config, subnet)
    layer = loaded.model.layers[1]
    assert isinstance(layer.input_layernorm, SelectedRMSNorm) and isinstance(layer.mlp.down_proj, ScatterLinear)
    half = load_pruned(tmp_path / "pruned", dtype=torch.bfloat16)
    assert half.model.layers[0].self_attn.o_proj.channels.dtype == torch.int64
    assert (logits(half, ids).float() - expected).abs().max() < 0.1


def test_channels_combine_with_weight_sparsity(tiny_model) -> None:
    norms = sorted_norms(tiny_model)
    ids = torch.randint(0, tiny_model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    rng = random.Random(5)
    for pattern, level in (("unstructured", 0.5), ("2:4", 0.5)):
        base = random_disp_subnet(tiny_model.config, rng)
        subnet = SubnetConfig(**{**base.to_dict(), "sparsity": Sparsity("wanda", pattern, [level] * base.num_layers)})
        with apply_masks(tiny_model, subnet, input_norms=norms):
            masked = logits(tiny_model, ids)
        small = extract(tiny_model, subnet, norms)
        assert (masked - logits(small, ids)).abs().max() <= 1e-4, subnet
        assert count_nonzero_params(tiny_model.config, subnet) == sum(
            int(p.count_nonzero()) for p in small.parameters()), subnet


def test_random_subnet_model_has_the_subnets_shapes() -> None:
    config = tiny_config("llama")
    subnet = SubnetConfig((0, 1), (2, 1), (1, 3), (8, 16), 48, channels=Channels((8, 48), (32, 16)))
    model = random_subnet_model(config, subnet, torch.float32, "cpu")
    assert sum(p.numel() for p in model.parameters()) == count_params(config, subnet)
    assert torch.isfinite(logits(model, torch.randint(0, 96, (1, 5)))).all()


def test_disp_space_decodes_per_block_channels_and_keeps_the_stream_whole() -> None:
    config = tiny_config("llama", num_hidden_layers=4)
    space = make_space("disp", config, min_layers=2, min_ratio=0.5, embed_step=8)
    choices = space.choices()
    assert "embed" not in choices and choices["attn_channels_3"] == [24, 32, 40, 48]
    trial = {name: values[-1] for name, values in choices.items()}
    assert space.decode(trial) == SubnetConfig.dense(config)
    trial.update(depth=3, attn_channels_0=24, mlp_channels_2=32, attn_channels_3=24)
    subnet = space.decode(trial)
    assert subnet.embed == 48 and subnet.channels == Channels((24, 48, 48), (48, 48, 32))
    assert kv_cache_bytes_per_token(config, subnet) == kv_cache_bytes_per_token(config, SubnetConfig.dense(config)) * 3 // 4
    assert space.decode(space.encode(subnet)) == subnet
    with pytest.raises(ValueError, match="disp space: cannot encode embed = 40"):
        space.encode(SubnetConfig((0, 1, 2), (2,) * 3, (3,) * 3, (64,) * 3, 40))
    with pytest.raises(ValueError, match="per_layer space: cannot encode per-block channels"):
        make_space("per_layer", config, min_layers=2).encode(subnet)


def test_smollm2_masked_equals_extracted(smollm2: torch.nn.Module) -> None:
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    norms = activation_scores(smollm2, ids).input_norms
    for _ in masked_equals_extracted(smollm2, ids, norms, random.Random(2), 2):
        pass


def test_spec_refuses_disp_without_activation_importance() -> None:
    with pytest.raises(ValueError, match="evaluation.importance"):
        load_spec({"search_space": {"preset": "disp"}, "evaluation": {"importance": "magnitude"}})


@pytest.mark.slow
def test_a_disp_search_runs_and_exports(tmp_path, smollm2_tokenizer) -> None:
    model_dir = tmp_path / "model"
    random_model(tiny_config("llama", vocab_size=49152, num_hidden_layers=2), seed=5).save_pretrained(model_dir)
    smollm2_tokenizer.save_pretrained(model_dir)
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
model: {model_dir}
run_dir: {tmp_path / 'run'}
search_space: {{preset: disp, min_ratio: 0.5}}
algorithm: {{name: random, num_samples: 3, seed: 1}}
evaluation: {{seq_len: 32, windows: 2, batch_size: 2, calibration_samples: 2}}
""")
    try:
        assert main(["search", str(spec)]) == 0
    finally:
        ray.shutdown()
    rows = ResultLog(str(tmp_path / "run")).read()
    assert len(rows) == 4 and (rows["status"] == "ok").all() and rows["perplexity"].notna().all()
    configs = [SubnetConfig.from_json(c) for c in rows["config_json"]]
    assert sum(c.channels is not None for c in configs) == 3
    assert all(p == count_params(model_dir_config(model_dir), c) for p, c in zip(rows["params"], configs))
    assert main(["export", str(tmp_path / "run"), "--pick", "0", "--out", str(tmp_path / "out")]) == 0
    assert load_pruned(tmp_path / "out") is not None


def model_dir_config(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def test_a_student_with_block_channels_trains_but_not_with_lora() -> None:
    from prunetune.training.distill import check_inputs
    from prunetune.training.settings import DistillSettings

    teacher = random_model(tiny_config("llama"), seed=7)
    norms = sorted_norms(teacher)
    subnet = SubnetConfig((0, 1), (1, 2), (3, 3), (16, 32), 48, channels=Channels((24, 40), (32, 16)))
    student = extract(teacher, subnet, norms)
    windows = torch.randint(0, 96, (2, 8))
    with pytest.raises(ValueError, match="lora_rank = 4: a student with per-block channels"):
        check_inputs(teacher, student, windows, DistillSettings(seq_len=8, lora_rank=4))
    check_inputs(teacher, student, windows, DistillSettings(seq_len=8))
    student.train()
    loss = student(windows, labels=windows).loss
    loss.backward()
    writer = student.model.layers[1].mlp.down_proj
    assert writer.weight.grad is not None and writer.weight.grad.abs().sum() > 0


def test_a_super_network_step_trains_disp_sub_networks() -> None:
    from prunetune.training.supernet import StepPlan, largest_and_smallest, supernet_step

    model = random_model(tiny_config("llama"), seed=8)
    norms = sorted_norms(model)
    largest, smallest = largest_and_smallest(make_space("disp", model.config, min_ratio=0.5, embed_step=8))
    assert smallest.channels == Channels((24,) * 2, (24,) * 2)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    loss = supernet_step(model, StepPlan(largest, True, (smallest,)), ids, top_k=8, input_norms=norms)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.model.layers[2].parameters())
