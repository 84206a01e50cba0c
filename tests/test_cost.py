import pytest

from prunetune.evaluators.model import tiny_config
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import (
    count_params, forward_flops, kv_cache_bytes_per_token, peak_memory_bytes, subnet_cost,
)

LLAMA3_70B = dict(model_type="llama", hidden_size=8192, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672,
                  vocab_size=128256, tie_word_embeddings=False)


def test_dense_70b_params_without_weights() -> None:
    assert count_params(LLAMA3_70B, SubnetConfig.dense(LLAMA3_70B)) == 70_553_706_496


def test_dense_smollm2_params_match_the_published_count() -> None:
    smol = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                tie_word_embeddings=True)
    assert count_params(smol, SubnetConfig.dense(smol)) == 134_515_008


def test_flops_follow_the_matmul_parameters() -> None:
    cfg = tiny_config("llama")
    dense = SubnetConfig.dense(cfg)
    layer_matmul = 48 * 48 + 2 * 48 * 16 + 48 * 48 + 3 * 48 * 64
    attention = 4 * 10 * 10 * 6 * 8
    assert forward_flops(cfg, dense, 10) == 2 * 10 * 96 * 48 + 3 * (2 * 10 * layer_matmul + attention)


def test_kv_cache_bytes_count_kept_groups() -> None:
    cfg = tiny_config("llama")
    subnet = SubnetConfig((0, 2), (1, 2), (3, 3), (64, 64), 48)
    assert kv_cache_bytes_per_token(cfg, subnet, dtype_bytes=2) == 2 * 8 * 2 * (1 + 2)
    assert subnet_cost(cfg, subnet)["kv_bytes_per_token"] == 96


def test_cost_rejects_unsupported_architecture() -> None:
    with pytest.raises(ValueError, match="unsupported architecture 'falcon'"):
        count_params({"model_type": "falcon"}, SubnetConfig((0,), (1,), (1,), (1,), 1))


def test_peak_memory_of_the_dense_model_is_the_planners_memory_model() -> None:
    """One memory model: an evaluation batch's peak is what `plan` sizes groups with."""
    from prunetune.cluster.plan import plan_evaluators

    config = tiny_config("llama", vocab_size=1000)
    plan = plan_evaluators(config, gpu_memory_gib=80, nodes=1, gpus_per_node=1,
                           dtype="bfloat16", seq_len=64, batch_size=2)
    peak = peak_memory_bytes(config, SubnetConfig.dense(config), 64, 2, 2)
    assert peak == plan.weight_bytes + plan.working_bytes
