"""Exact cost of a sub-network from the model config alone: no weights, no torch.

`count_params` equals `sum(p.numel())` of the extracted model, tied embeddings counted
once. FLOPs count a multiply-add as 2 and include the attention score and value products
over the full (not causally halved) sequence, the convention of the scaling-law papers.
"""

from __future__ import annotations

from typing import Any

from prunetune.search_spaces.dims import ModelDims
from prunetune.search_spaces.subnet import SubnetConfig



def _layer_matmul_params(d: ModelDims, e: int, kv: int, q: int, m: int) -> int:
    """Weights of one decoder layer that take part in matrix products."""
    q_width = kv * q * d.head_dim
    kv_width = kv * d.head_dim
    attention = e * q_width + 2 * e * kv_width + q_width * e
    return attention + 3 * e * m


def _layer_other_params(d: ModelDims, e: int, kv: int, q: int, m: int) -> int:
    """Norm weights and biases of one decoder layer."""
    n = 2 * e
    if d.qkv_bias:
        n += kv * q * d.head_dim + 2 * kv * d.head_dim
    if d.o_bias:
        n += e
    if d.mlp_bias:
        n += 2 * m + e
    return n


def _layers(subnet: SubnetConfig) -> zip:
    return zip(subnet.kv_heads, subnet.q_per_kv, subnet.mlp)


def count_params(model_config: Any, subnet: SubnetConfig) -> int:
    """Parameters of the extracted sub-network, exactly."""
    d = ModelDims.of(model_config)
    e = subnet.embed
    total = d.vocab_size * e + e  # embedding + final norm
    if not d.tie_word_embeddings:
        total += d.vocab_size * e
    for kv, q, m in _layers(subnet):
        total += _layer_matmul_params(d, e, kv, q, m) + _layer_other_params(d, e, kv, q, m)
    return total


def forward_flops(model_config: Any, subnet: SubnetConfig, seq_len: int) -> int:
    """FLOPs of one forward pass over one sequence of `seq_len` tokens (with the LM head)."""
    d = ModelDims.of(model_config)
    e = subnet.embed
    flops = 2 * seq_len * d.vocab_size * e  # LM head
    for kv, q, m in _layers(subnet):
        flops += 2 * seq_len * _layer_matmul_params(d, e, kv, q, m)
        flops += 2 * 2 * seq_len * seq_len * kv * q * d.head_dim  # scores and weighted values
    return flops


def kv_cache_bytes_per_token(model_config: Any, subnet: SubnetConfig, dtype_bytes: int = 2) -> int:
    """Bytes of key and value cache one token occupies across all kept layers."""
    d = ModelDims.of(model_config)
    return sum(2 * kv * d.head_dim * dtype_bytes for kv in subnet.kv_heads)


LOSS_BYTES_PER_LOGIT = 8
"""Bytes per logit element beyond the model's dtype: the float32 copy and the float32
log-softmax of the cross-entropy loss."""


def logits_working_bytes(model_config: Any, seq_len: int, batch_size: int, dtype_bytes: int) -> int:
    """Logits in the model's dtype, their float32 copy and float32 log-softmax at the loss."""
    return batch_size * seq_len * ModelDims.of(model_config).vocab_size * (dtype_bytes + LOSS_BYTES_PER_LOGIT)


def activation_working_bytes(model_config: Any, subnet: SubnetConfig, seq_len: int,
                             batch_size: int, dtype_bytes: int) -> int:
    """The widest point of a kept decoder layer's forward pass without gradients.

    Three MLP-wide tensors (gate activation, up projection, product) and three
    residual-wide ones (residual stream, normalised copy, layer input). Attention runs
    through fused SDPA, which never holds the seq_len x seq_len score matrix.
    """
    width = max((3 * m for m in subnet.mlp), default=0) + 3 * subnet.embed
    return batch_size * seq_len * width * dtype_bytes


def peak_memory_bytes(model_config: Any, subnet: SubnetConfig, seq_len: int, batch_size: int = 1,
                      dtype_bytes: int = 2) -> int:
    """Memory one evaluation batch needs at its peak: weights, the widest kept layer's
    activations, and the logits with their float32 copies for the loss. The same model
    `prunetune.cluster.plan` sizes evaluator groups with (checked on H100 and H200)."""
    d = ModelDims.of(model_config)
    return (count_params(d, subnet) * dtype_bytes
            + activation_working_bytes(d, subnet, seq_len, batch_size, dtype_bytes)
            + logits_working_bytes(d, seq_len, batch_size, dtype_bytes))


def subnet_cost(model_config: Any, subnet: SubnetConfig, seq_len: int = 2048, dtype_bytes: int = 2,
                batch_size: int = 1) -> dict[str, int]:
    """Every cost metric of a sub-network, keyed as the result log names them."""
    return {
        "params": count_params(model_config, subnet),
        "flops": forward_flops(model_config, subnet, seq_len),
        "kv_bytes_per_token": kv_cache_bytes_per_token(model_config, subnet, dtype_bytes),
        "peak_memory_bytes": peak_memory_bytes(model_config, subnet, seq_len, batch_size,
                                               dtype_bytes),
    }
