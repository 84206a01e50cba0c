"""Apply a SubnetConfig to a model: as reversible masks, or as a physically smaller copy.

Both ways compute the same function. Masks zero a removed head's output before `o_proj`,
a removed neuron before `down_proj`, skip removed layers, and keep removed embedding
channels at zero with every RMSNorm taken over the kept channels only. Extraction slices
the same weights into a new model, so a half-size sub-network runs at half the cost.
Weights must already be importance-sorted: keeping k means keeping the first k.

With per-block channels (`SubnetConfig.channels`, the DISP space) the residual stream
keeps its width and each sub-layer reads and writes its own channels, chosen by the
calibration norms (`InputNorms.block_channels`). Masks zero the input norm's output
outside the channels a sub-layer reads and its writer's output outside those it writes;
extraction gives the sub-layer an RMSNorm over the whole stream that returns the read
channels only (`SelectedRMSNorm`) and a writer that scatters its outputs into the write
channels (`ScatterLinear`), both naming their channels in an index buffer.

A sub-network's weight sparsity (`SubnetConfig.sparsity`) is decided on the kept block of
every linear weight, in the extracted model's shapes, so both ways zero the same weights:
extraction writes the zeros into its copy, masks multiply the weight by a boolean mask in
the module's forward and never change it.
"""

from __future__ import annotations

import copy
import json
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any, Callable, Iterator

import torch
from torch import nn

from prunetune.evaluators.importance import (
    BlockChannels, InputNorms, InputSlices, magnitude_weight_scores, wanda_scores,
)
from prunetune.evaluators.norms import rms_norm
from prunetune.search_spaces.dims import Adapter, ModelDims, adapter_for
from prunetune.search_spaces.subnet import Sparsity, SubnetConfig

SUBNET_FILE = "prunetune_subnet.json"
SPARSITY_CONFIG_KEY = "prunetune_sparsity"
"""The field of an exported sparse sub-network's config.json that records its sparsity."""


def _identity_layer(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden_states


def _head_rows(d: ModelDims, kv: int, q: int, device: torch.device | None = None) -> torch.Tensor:
    """Indices of the q_proj rows (= o_proj columns) of the kept query heads."""
    heads = torch.arange(kv, device=device)[:, None] * d.q_per_kv + torch.arange(q, device=device)
    rows = heads.reshape(-1, 1) * d.head_dim + torch.arange(d.head_dim, device=device)
    return rows.reshape(-1)


def _head_mask(d: ModelDims, kv: int, q: int, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(d.num_heads * d.head_dim, dtype=like.dtype, device=like.device)
    mask[_head_rows(d, kv, q, like.device)] = 1
    return mask


def _prefix_mask(size: int, keep: int, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(size, dtype=like.dtype, device=like.device)
    mask[:keep] = 1
    return mask


def _scale_input(mask: torch.Tensor) -> Any:
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (args[0] * mask, *args[1:])
    return hook


def _scale_output(mask: torch.Tensor) -> Any:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * mask
    return hook


def _zero_channels_from(keep: int) -> Any:
    def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        output = output.clone() if output.requires_grad else output
        output[..., keep:] = 0
        return output
    return hook


def _kept_channel_rmsnorm(keep: int) -> Any:
    """RMSNorm over the kept channels (`rms_norm`); the others are zero."""
    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        out[..., :keep] = rms_norm(self, hidden_states, keep)
        return out
    return forward


@contextmanager
def _patched_forward(module: nn.Module, forward: Any) -> Iterator[None]:
    module.forward = MethodType(forward, module)
    try:
        yield
    finally:
        del module.forward


@contextmanager
def _hook(handle: Any) -> Iterator[None]:
    try:
        yield
    finally:
        handle.remove()


def _norms(model: nn.Module, a: Adapter, layers: nn.ModuleList) -> list[nn.Module]:
    norms = [model.get_submodule(a.final_norm)]
    for layer in layers:
        norms += [layer.get_submodule(a.input_norm), layer.get_submodule(a.post_attn_norm)]
    return norms


@contextmanager
def apply_masks(model: nn.Module, subnet: SubnetConfig, slices: InputSlices | None = None,
                input_norms: InputNorms | None = None) -> Iterator[nn.Module]:
    """Make the resident model compute `subnet` exactly; restore it on exit.

    No weight is copied: hooks scale the inputs of `o_proj`/`down_proj`, removed layers get
    an identity forward, and the norms average over the kept embedding channels. On a
    tensor-parallel rank, `slices` cuts the head and neuron masks to what its `o_proj` and
    `down_proj` read; layers and embedding channels are not split and mask the same way.
    Weight sparsity multiplies each kept linear weight by a boolean mask in its forward
    (Wanda's scores need `input_norms`, those of the permuted model); it is refused under
    tensor parallelism, where no rank holds a whole row. Per-block channels scale each
    sub-layer's normalised input and output by its channels' 0/1 mask (chosen by
    `input_norms`); they are refused under tensor parallelism too.
    """
    d = ModelDims.from_config(model.config)
    subnet.validate(d)
    if subnet.sparsity is not None and slices is not None:
        raise ValueError("sparsity: weight sparsity needs whole weights; it is not applied "
                         "on tensor-parallel slices")
    if subnet.channels is not None and slices is not None:
        raise ValueError("channels: per-block channels are not applied on tensor-parallel "
                         "slices")
    a = adapter_for(model)
    layers = model.get_submodule(a.layers)
    kept = dict(zip(subnet.layers, zip(subnet.kv_heads, subnet.q_per_kv, subnet.mlp)))
    position = {layer: j for j, layer in enumerate(subnet.layers)}
    levels = dict(zip(subnet.layers, subnet.sparsity.levels if subnet.sparsity else ()))
    like = next(model.parameters())
    slices = slices or InputSlices()
    with ExitStack() as stack:
        for i, layer in enumerate(layers):
            if i not in kept:
                stack.enter_context(_patched_forward(layer, _identity_layer))
                continue
            _mask_layer(stack, layer, a, d, kept[i], like, slices)
            if subnet.channels is None and levels.get(i, 0) == 0:
                continue
            channels = layer_channels(subnet, position[i], input_norms, like.device)
            if subnet.channels is not None:
                _mask_block_channels(stack, layer, a, d, channels, like)
            if levels.get(i, 0) > 0:
                _mask_weights(stack, layer, a, d, channels, kept[i], subnet.sparsity,
                              levels[i], input_norms, i)
        if subnet.embed < d.hidden_size:
            _mask_channels(stack, model, a, layers, subnet.embed)
        yield model


def _mask_layer(stack: ExitStack, layer: nn.Module, a: Adapter, d: ModelDims,
                widths: tuple[int, int, int], like: torch.Tensor, slices: InputSlices) -> None:
    kv, q, m = widths
    attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
    if (kv, q) != (d.num_kv_heads, d.q_per_kv):
        mask = _head_mask(d, kv, q, like)[slices.heads]
        o_proj = attn.get_submodule(a.o)
        stack.enter_context(_hook(o_proj.register_forward_pre_hook(_scale_input(mask))))
    if m != d.intermediate_size:
        mask = _prefix_mask(d.intermediate_size, m, like)[slices.neurons]
        down = mlp.get_submodule(a.down)
        stack.enter_context(_hook(down.register_forward_pre_hook(_scale_input(mask))))


def layer_channels(subnet: SubnetConfig, kept: int, input_norms: InputNorms | None,
                   device: torch.device | None = None) -> BlockChannels:
    """The residual channels that kept layer `kept` (its position in `subnet.layers`)
    reads and writes: the first `embed` for all, or with per-block channels its own, chosen
    by the calibration norms `input_norms` (those of the permuted model)."""
    if subnet.channels is None:
        return BlockChannels.prefix(subnet.embed, device)
    if input_norms is None:
        raise ValueError("channels: per-block channels are chosen by the norms of the "
                         "activation calibration pass (evaluation.importance: activation); "
                         "none were given")
    attn, mlp = subnet.sublayer_channels()[kept]
    return input_norms.block_channels(subnet.layers[kept], attn, mlp).to(device)


def _channel_mask(d: ModelDims, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(d.hidden_size, dtype=like.dtype, device=like.device)
    mask[index] = 1
    return mask


def _mask_block_channels(stack: ExitStack, layer: nn.Module, a: Adapter, d: ModelDims,
                         channels: BlockChannels, like: torch.Tensor) -> None:
    """Make a layer's attention and MLP read and write their own residual channels only:
    each input norm's output and each writer's output is zero outside them (the norms
    still run over the whole stream)."""
    attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
    for module, index in ((layer.get_submodule(a.input_norm), channels.attn_read),
                          (attn.get_submodule(a.o), channels.attn_write),
                          (layer.get_submodule(a.post_attn_norm), channels.mlp_read),
                          (mlp.get_submodule(a.down), channels.mlp_write)):
        mask = _channel_mask(d, index, like)
        stack.enter_context(_hook(module.register_forward_hook(_scale_output(mask))))


def _mask_channels(stack: ExitStack, model: nn.Module, a: Adapter, layers: nn.ModuleList,
                   keep: int) -> None:
    writers = [model.get_submodule(a.embed)]
    for layer in layers:
        writers += [layer.get_submodule(a.attn).get_submodule(a.o),
                    layer.get_submodule(a.mlp).get_submodule(a.down)]
    for module in writers:
        stack.enter_context(_hook(module.register_forward_hook(_zero_channels_from(keep))))
    for norm in _norms(model, a, layers):
        stack.enter_context(_patched_forward(norm, _kept_channel_rmsnorm(keep)))


def unstructured_keep(scores: torch.Tensor, zeros_per_row: int) -> torch.Tensor:
    """A boolean mask of `scores` [out, in] that drops the `zeros_per_row` lowest of every
    row (ties drop the earlier input)."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if zeros_per_row:
        lowest = torch.argsort(scores, dim=1, stable=True)[:, :zeros_per_row]
        keep.scatter_(1, lowest, False)
    return keep


def n_m_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A boolean mask of `scores` [out, in] that keeps the `n` highest of every `m`
    consecutive inputs of a row; a trailing group of fewer than `m` stays whole."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    rows, width = scores.shape
    full = width // m * m
    groups = scores[:, :full].reshape(rows, -1, m)
    top = torch.argsort(groups, dim=-1, descending=True, stable=True)[..., :n]
    kept = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    keep[:, :full] = kept.reshape(rows, full)
    return keep


def sparsity_keep(scores: torch.Tensor, sparsity: Sparsity, level: float) -> torch.Tensor:
    """The weights of one kept block that `sparsity` keeps at `level`, by their scores."""
    n_m = sparsity.n_m
    if n_m is not None and level > 0:
        return n_m_keep(scores, *n_m)
    return unstructured_keep(scores, sparsity.zeros_per_row(level, scores.shape[1]))


@dataclass(frozen=True)
class KeptBlock:
    """The kept part of one linear of a layer: the module, its path in the layer, and the
    rows and columns it keeps (in the extracted model's order)."""

    linear: nn.Linear
    path: str
    rows: torch.Tensor
    cols: torch.Tensor

    def weight(self) -> torch.Tensor:
        """The kept block of the weight, as the extracted model holds it."""
        return self.linear.weight.index_select(0, self.rows).index_select(1, self.cols)


def kept_blocks(layer: nn.Module, a: Adapter, d: ModelDims, channels: BlockChannels, kv: int,
                q: int, m: int) -> dict[str, KeptBlock]:
    """The kept blocks of a layer's q, k, v, o, gate, up and down projections, by the
    adapter's projection name; `channels` are the residual channels the layer reads and
    writes (`layer_channels`)."""
    attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
    device = attn.get_submodule(a.q).weight.device
    heads = _head_rows(d, kv, q, device)
    kv_rows, neurons = torch.arange(kv * d.head_dim, device=device), torch.arange(m, device=device)
    c = channels.to(device)
    spans = ((attn, a.attn, a.q, heads, c.attn_read), (attn, a.attn, a.k, kv_rows, c.attn_read),
             (attn, a.attn, a.v, kv_rows, c.attn_read), (attn, a.attn, a.o, c.attn_write, heads),
             (mlp, a.mlp, a.gate, neurons, c.mlp_read), (mlp, a.mlp, a.up, neurons, c.mlp_read),
             (mlp, a.mlp, a.down, c.mlp_write, neurons))
    return {name: KeptBlock(parent.get_submodule(name), f"{where}.{name}", rows, cols)
            for parent, where, name, rows, cols in spans}


def block_keep(block: KeptBlock, name: str, sparsity: Sparsity, level: float,
               norms: InputNorms | None, a: Adapter, layer: int) -> torch.Tensor:
    """The sparsity mask of one kept block (of projection `name` of model layer `layer`)."""
    weight = block.weight()
    if sparsity.method == "magnitude":
        return sparsity_keep(magnitude_weight_scores(weight), sparsity, level)
    if norms is None:
        raise ValueError("sparsity.method wanda needs the input norms of the activation "
                         "criterion (evaluation.importance: activation)")
    inputs = norms.of(a, layer, name).to(block.cols.device).index_select(0, block.cols)
    return sparsity_keep(wanda_scores(weight, inputs), sparsity, level)


def _masked_weight_forward(mask: torch.Tensor) -> Any:
    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * mask, self.bias)
    return forward


def _mask_weights(stack: ExitStack, layer: nn.Module, a: Adapter, d: ModelDims,
                  channels: BlockChannels, widths: tuple[int, int, int], sparsity: Sparsity,
                  level: float, norms: InputNorms | None, index: int) -> None:
    """Make every kept block of a layer compute with its sparsity mask applied."""
    for name, block in kept_blocks(layer, a, d, channels, *widths).items():
        keep = block_keep(block, name, sparsity, level, norms, a, index)
        mask = torch.zeros_like(block.linear.weight, dtype=torch.bool)
        mask[block.rows[:, None], block.cols[None, :]] = keep
        stack.enter_context(_patched_forward(block.linear, _masked_weight_forward(mask)))


def subnet_model_config(model_config: Any, subnet: SubnetConfig) -> Any:
    """The HF config of the extracted model; per-layer widths take the first kept layer's."""
    d = ModelDims.from_config(model_config)
    config = copy.deepcopy(model_config)
    config.hidden_size = subnet.embed
    config.num_hidden_layers = subnet.num_layers
    config.head_dim = d.head_dim
    config.num_key_value_heads = subnet.kv_heads[0]
    config.num_attention_heads = subnet.kv_heads[0] * subnet.q_per_kv[0]
    config.intermediate_size = subnet.mlp[0]
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [layer_types[i] for i in subnet.layers]
    return config


def _linear(old: nn.Linear, out_features: int, in_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None,
                     device="meta", dtype=old.weight.dtype)


class SelectedRMSNorm(nn.Module):
    """An RMSNorm over the whole residual stream that returns only the channels its
    sub-layer reads (the index buffer `channels`), times their weights: the input norm of
    a block with its own channels. Computes what the model's RMSNorm computes, then
    index-selects."""

    def __init__(self, channels: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.register_buffer("channels", torch.zeros(channels, dtype=torch.long))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)
        x = x.index_select(-1, self.channels) * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


class ScatterLinear(nn.Linear):
    """A linear layer whose outputs go into the channels `channels` (an index buffer) of a
    residual stream of `width` channels, zeros elsewhere: the writer (o_proj, down_proj)
    of a block with its own channels; the decoder layer's residual add makes it a
    scatter-add."""

    def __init__(self, in_features: int, out_features: int, width: int, bias: bool,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_features, out_features, bias=bias, dtype=dtype)
        self.width = width
        self.register_buffer("channels", torch.zeros(out_features, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y.new_zeros(*y.shape[:-1], self.width).index_copy(-1, self.channels, y)


def _scatter_linear(old: nn.Linear, out_features: int, in_features: int,
                    width: int) -> ScatterLinear:
    with torch.device("meta"):
        return ScatterLinear(in_features, out_features, width, old.bias is not None,
                             old.weight.dtype)


def _selected_norm(old: nn.Module, channels: int) -> SelectedRMSNorm:
    with torch.device("meta"):
        return SelectedRMSNorm(channels, old.variance_epsilon).to(old.weight.dtype)


def _resize_layer(layer: nn.Module, a: Adapter, d: ModelDims, sublayer: tuple[int, int],
                  widths: tuple[int, int, int], per_block: bool) -> None:
    """Give one skeleton layer its own head and neuron counts, and with `per_block` its
    own residual channels (`sublayer`: those of its attention and MLP)."""
    kv, q, m = widths
    ea, em = sublayer
    attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
    q_width, kv_width = kv * q * d.head_dim, kv * d.head_dim
    for name, out_f, in_f in ((a.q, q_width, ea), (a.k, kv_width, ea), (a.v, kv_width, ea)):
        setattr(attn, name, _linear(attn.get_submodule(name), out_f, in_f))
    attn.num_key_value_groups = q
    for name, out_f, in_f in ((a.gate, m, em), (a.up, m, em)):
        setattr(mlp, name, _linear(mlp.get_submodule(name), out_f, in_f))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = m
    writers = ((attn, a.o, ea, q_width), (mlp, a.down, em, m))
    if not per_block:
        for parent, name, out_f, in_f in writers:
            setattr(parent, name, _linear(parent.get_submodule(name), out_f, in_f))
        return
    for parent, name, out_f, in_f in writers:
        setattr(parent, name, _scatter_linear(parent.get_submodule(name), out_f, in_f,
                                              d.hidden_size))
    for name, channels in ((a.input_norm, ea), (a.post_attn_norm, em)):
        setattr(layer, name, _selected_norm(layer.get_submodule(name), channels))


def _skeleton(model_config: Any, subnet: SubnetConfig, dtype: torch.dtype) -> nn.Module:
    """The extracted model's modules on the meta device, no memory allocated."""
    from transformers import AutoModelForCausalLM

    d = ModelDims.from_config(model_config)
    config = subnet_model_config(model_config, subnet)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    a = adapter_for(model)
    if not subnet.is_uniform:
        layers = model.get_submodule(a.layers)
        for layer, sublayer, widths in zip(layers, subnet.sublayer_channels(),
                                           zip(subnet.kv_heads, subnet.q_per_kv, subnet.mlp)):
            _resize_layer(layer, a, d, sublayer, widths, subnet.channels is not None)
    return model


Gather = Callable[[list[nn.Parameter]], AbstractContextManager[Any]]
"""Makes parameters whole inside its block (ZeRO-3's `GatheredParameters`); for a model
held whole, `nullcontext`."""


def held_whole(params: list[nn.Parameter]) -> AbstractContextManager[Any]:
    """The `Gather` of a model held whole: its parameters already are."""
    return nullcontext()


def _sliced_state(model: nn.Module, subnet: SubnetConfig,
                  input_norms: InputNorms | None = None,
                  gather: Gather = held_whole) -> dict[str, torch.Tensor]:
    """The kept part of every weight, keyed by the extracted model's parameter names, with
    the sub-network's weight sparsity applied; each part of the model (the residual
    tables, then each kept layer) is read inside `gather` of its parameters."""
    d = ModelDims.from_config(model.config)
    a = adapter_for(model)
    e = subnet.embed
    layers = model.get_submodule(a.layers)
    tables = [model.get_submodule(a.embed).weight, model.get_submodule(a.final_norm).weight]
    if not d.tie_word_embeddings:
        tables.append(model.get_submodule(a.lm_head).weight)
    with gather(tables):
        sliced = {f"{a.embed}.weight": tables[0][:, :e], f"{a.final_norm}.weight": tables[1][:e]}
        if not d.tie_word_embeddings:
            sliced[f"{a.lm_head}.weight"] = tables[2][:, :e]
        state = _copies(sliced)
    levels = subnet.sparsity.levels if subnet.sparsity else (0.0,) * subnet.num_layers
    device = next(model.parameters()).device
    for new_i, (old_i, kv, q, m, level) in enumerate(zip(subnet.layers, subnet.kv_heads,
                                                         subnet.q_per_kv, subnet.mlp, levels)):
        layer = layers[old_i]
        with gather(list(layer.parameters())):
            state.update(_copies(_layer_state(layer, a, d, subnet, new_i, old_i, kv, q, m,
                                              level, input_norms, device)))
    return state


def _layer_state(layer: nn.Module, a: Adapter, d: ModelDims, subnet: SubnetConfig,
                 new_i: int, old_i: int, kv: int, q: int, m: int, level: float,
                 input_norms: InputNorms | None,
                 device: torch.device) -> dict[str, torch.Tensor]:
    """The kept part of layer `old_i`'s weights, named as layer `new_i` of the extracted
    model."""
    prefix = f"{a.layers}.{new_i}."
    channels = layer_channels(subnet, new_i, input_norms, device)
    state = {}
    for norm, index in ((a.input_norm, channels.attn_read),
                        (a.post_attn_norm, channels.mlp_read)):
        state[f"{prefix}{norm}.weight"] = layer.get_submodule(norm).weight[index]
    if subnet.channels is not None:
        state.update({f"{prefix}{path}.channels": index for path, index in (
            (a.input_norm, channels.attn_read), (f"{a.attn}.{a.o}", channels.attn_write),
            (a.post_attn_norm, channels.mlp_read), (f"{a.mlp}.{a.down}", channels.mlp_write))})
    for name, block in kept_blocks(layer, a, d, channels, kv, q, m).items():
        weight = block.weight()
        if level > 0:
            weight = weight * block_keep(block, name, subnet.sparsity, level, input_norms,
                                         a, old_i)
        state[f"{prefix}{block.path}.weight"] = weight
        if block.linear.bias is not None:
            state[f"{prefix}{block.path}.bias"] = block.linear.bias.index_select(0, block.rows)
    return state


def _copies(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors of their own (a slice of a gathered weight is freed with it)."""
    return {k: v.detach().clone() for k, v in state.items()}


def _materialize(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """Put real tensors into a meta skeleton: weights from `state`, fresh rotary buffers."""
    a = adapter_for(model)
    model.load_state_dict(state, strict=False, assign=True)
    if model.config.tie_word_embeddings:
        model.get_submodule(a.lm_head).weight = model.get_submodule(a.embed).weight
    backbone = model.get_submodule(a.layers.rsplit(".", 1)[0])
    with torch.device(device):
        backbone.rotary_emb = type(backbone.rotary_emb)(config=model.config)
    leftover = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"extracted model has tensors without values: {leftover[:5]}")
    return model.eval()


def extract(model: nn.Module, subnet: SubnetConfig, input_norms: InputNorms | None = None,
            gather: Gather = held_whole) -> nn.Module:
    """A new, physically smaller model computing `subnet`; the original is left untouched.

    Weight sparsity is written into the copy as zeros (Wanda's scores need `input_norms`,
    those of the permuted model). A model partitioned over several ranks is read one part
    at a time inside `gather` (`zero3.extract_partitioned`)."""
    subnet.validate(model.config)
    weight = next(model.parameters())
    skeleton = _skeleton(model.config, subnet, weight.dtype)
    extracted = _materialize(skeleton, _sliced_state(model, subnet, input_norms, gather),
                             weight.device)
    extracted.prunetune_subnet = subnet
    return extracted


def random_subnet_model(model_config: Any, subnet: SubnetConfig, dtype: torch.dtype,
                        device: str | torch.device, seed: int = 0) -> nn.Module:
    """A model of the sub-network's shapes with random weights, built on `device` directly.

    Latency depends on shapes only, so this stands in for the real extracted model.
    """
    subnet.validate(model_config)
    skeleton = _skeleton(model_config, subnet, dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, p in skeleton.named_parameters():
        tensor = torch.empty(p.shape, dtype=dtype, device=device)
        state[name] = tensor.normal_(0, 0.02, generator=generator) if p.dim() > 1 else tensor.fill_(1)
    for name, buffer in skeleton.named_buffers():
        if not buffer.is_floating_point():  # the channel indices of per-block channels
            state[name] = torch.arange(buffer.numel(), device=device)
    return _materialize(skeleton, state, torch.device(device))


def save_pruned(model: nn.Module, subnet: SubnetConfig, out_dir: str | Path,
                input_norms: InputNorms | None = None) -> Path:
    """Write `subnet` of `model` as a safetensors checkpoint with its config.

    A sub-network with the same widths in every layer is a plain HF checkpoint (a Llama
    whose kept embedding width is not a multiple of its heads is written as the equivalent
    Mistral, since transformers' Llama config refuses that shape); per-layer widths are
    recorded in `prunetune_subnet.json` and need `load_pruned`. Weight sparsity is stored
    as zeros in the weights and recorded in config.json as `prunetune_sparsity`.
    """
    return save_extracted(extract(model, subnet, input_norms), subnet, out_dir)


def save_extracted(small: nn.Module, subnet: SubnetConfig, out_dir: str | Path) -> Path:
    """Write an extracted sub-network (`extract(model, subnet)`, trained further or not)
    as `save_pruned` does."""
    out = Path(out_dir)
    as_mistral = _llama_rejects(small.config)
    if as_mistral:
        small.config = _as_mistral(small.config)
    if subnet.sparsity is not None:
        setattr(small.config, SPARSITY_CONFIG_KEY, subnet.sparsity.to_dict())
    small.save_pretrained(out)
    if as_mistral:
        small.config.architectures = ["MistralForCausalLM"]
        small.config.save_pretrained(out)
    record = {"subnet": subnet.to_dict(), "uniform": subnet.is_uniform}
    (out / SUBNET_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return out


def _llama_rejects(config: Any) -> bool:
    """Transformers' Llama config refuses a hidden size that is not a multiple of the head
    count, even with an explicit head_dim; Mistral's computes the same function and accepts it."""
    return config.model_type == "llama" and config.hidden_size % config.num_attention_heads != 0


def _as_mistral(config: Any) -> Any:
    """The Mistral config of a bias-free Llama: same modules, names and function."""
    from transformers import MistralConfig

    if config.attention_bias or config.mlp_bias:
        raise ValueError(f"embed = {config.hidden_size}: a Llama with biases needs a multiple of "
                         f"its {config.num_attention_heads} heads to be saved as a plain checkpoint")
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
              "max_position_embeddings", "initializer_range", "rms_norm_eps", "rope_parameters",
              "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
              "attention_dropout")
    mistral = MistralConfig(**{f: getattr(config, f) for f in fields}, sliding_window=None)
    mistral.dtype = config.dtype
    return mistral


def load_pruned(path: str | Path, dtype: torch.dtype | None = None,
                device: str | torch.device = "cpu") -> nn.Module:
    """Load a checkpoint written by `save_pruned`, per-layer widths and per-block
    channels (their index buffers are in the safetensors) included."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    record_file = path / SUBNET_FILE
    if not record_file.is_file():
        raise FileNotFoundError(f"{record_file}: not a prunetune checkpoint (no {SUBNET_FILE})")
    record = json.loads(record_file.read_text())
    if record["uniform"]:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    subnet = SubnetConfig.from_dict(record["subnet"])
    local = SubnetConfig(layers=tuple(range(subnet.num_layers)), kv_heads=subnet.kv_heads,
                         q_per_kv=subnet.q_per_kv, mlp=subnet.mlp, embed=subnet.embed,
                         channels=subnet.channels)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(shard, device=str(device)))
    dtype = dtype or next(v for v in state.values() if v.is_floating_point()).dtype
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    skeleton = _skeleton(_widest_view(AutoConfig.from_pretrained(path), local), local, dtype)
    return _materialize(skeleton, state, torch.device(device))


def _widest_view(config: Any, local: SubnetConfig) -> Any:
    """A config as wide as the widest layer of `local`, so that `local` validates in it."""
    view = copy.deepcopy(config)
    view.num_key_value_heads = max(local.kv_heads)
    view.num_attention_heads = max(local.kv_heads) * max(local.q_per_kv)
    view.intermediate_size = max(local.mlp)
    return view
