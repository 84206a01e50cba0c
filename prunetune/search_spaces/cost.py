"""Exact cost of a sub-network from the model config alone: no weights, no torch.

`count_params` equals `sum(p.numel())` of the extracted model, tied embeddings counted
once; `count_nonzero_params` equals its nonzero count once its weight sparsity is applied
(for weights that are not zero by themselves). FLOPs count a multiply-add as 2 and include the attention score and value products
over the full (not causally halved) sequence, the convention of the scaling-law papers.
With per-block channels (`SubnetConfig.channels`) a sub-layer's weights, biases and
input-norm weight cover the residual channels it reads and writes, the embeddings and
final norm the whole stream; the index buffers naming those channels are not parameters.
"""

from __future__ import annotations

from typing import Any, Iterator

from prunetune.search_spaces.dims import ModelDims
from prunetune.search_spaces.subnet import SubnetConfig


def _layer_matmul_params(d: ModelDims, ea: int, em: int, kv: int, q: int, m: int) -> int:
    """Weights of one decoder layer that take part in matrix products; its attention reads
    and writes `ea` residual channels, its MLP `em`."""
    return sum(rows * cols for rows, cols in linear_shapes(d, ea, em, kv, q, m))


def _layer_other_params(d: ModelDims, ea: int, em: int, kv: int, q: int, m: int) -> int:
    """Norm weights and biases of one decoder layer (each norm's weight covers the
    channels its sub-layer reads)."""
    n = ea + em
    if d.qkv_bias:
        n += kv * q * d.head_dim + 2 * kv * d.head_dim
    if d.o_bias:
        n += ea
    if d.mlp_bias:
        n += 2 * m + em
    return n


def _layers(subnet: SubnetConfig) -> Iterator[tuple[int, int, int, int, int]]:
    """Per kept layer: attention channels, MLP channels, kv heads, q per kv, neurons."""
    for (ea, em), kv, q, m in zip(subnet.sublayer_channels(), subnet.kv_heads, subnet.q_per_kv,
                                  subnet.mlp):
        yield ea, em, kv, q, m


def linear_shapes(d: ModelDims, ea: int, em: int, kv: int, q: int,
                  m: int) -> tuple[tuple[int, int], ...]:
    """(out, in) of one kept layer's linear weights: q, k, v, o, gate, up, down, in the
    extracted model's shapes (attention reading and writing `ea` residual channels, the
    MLP `em`)."""
    q_width, kv_width = kv * q * d.head_dim, kv * d.head_dim
    return ((q_width, ea), (kv_width, ea), (kv_width, ea), (ea, q_width), (m, em), (m, em),
            (em, m))


def count_pruned_weights(model_config: Any, subnet: SubnetConfig) -> int:
    """Weights the sub-network's weight sparsity sets to zero (0 without sparsity)."""
    sparsity = subnet.sparsity
    if sparsity is None:
        return 0
    d = ModelDims.of(model_config)
    return sum(rows * sparsity.zeros_per_row(level, width)
               for widths, level in zip(_layers(subnet), sparsity.levels)
               for rows, width in linear_shapes(d, *widths))


def count_nonzero_params(model_config: Any, subnet: SubnetConfig) -> int:
    """Parameters of the extracted sub-network that its weight sparsity leaves nonzero."""
    return count_params(model_config, subnet) - count_pruned_weights(model_config, subnet)


def count_params(model_config: Any, subnet: SubnetConfig) -> int:
    """Parameters of the extracted sub-network, exactly."""
    d = ModelDims.of(model_config)
    e = subnet.embed
    total = d.vocab_size * e + e  # embedding + final norm
    if not d.tie_word_embeddings:
        total += d.vocab_size * e
    for widths in _layers(subnet):
        total += _layer_matmul_params(d, *widths) + _layer_other_params(d, *widths)
    return total


def forward_flops(model_config: Any, subnet: SubnetConfig, seq_len: int) -> int:
    """FLOPs of one forward pass over one sequence of `seq_len` tokens (with the LM head)."""
    d = ModelDims.of(model_config)
    e = subnet.embed
    flops = 2 * seq_len * d.vocab_size * e  # LM head
    for ea, em, kv, q, m in _layers(subnet):
        flops += 2 * seq_len * _layer_matmul_params(d, ea, em, kv, q, m)
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
        "nonzero_params": count_nonzero_params(model_config, subnet),
        "flops": forward_flops(model_config, subnet, seq_len),
        "kv_bytes_per_token": kv_cache_bytes_per_token(model_config, subnet, dtype_bytes),
        "peak_memory_bytes": peak_memory_bytes(model_config, subnet, seq_len, batch_size,
                                               dtype_bytes),
    }
