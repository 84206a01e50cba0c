"""Tensor parallelism through transformers' own plan: every rank loads only its slices.

Each rank builds the model on the meta device and reads from the checkpoint only its
slice of every attention and MLP block (the model's `tp_plan`: query, key, value, gate
and up projections split by output rows, `o_proj` and `down_proj` by input columns), so
no rank ever holds the whole model, in host memory or on its device. A `config.json`
source gives random weights, each rank initializing only its own slices.

The weights are then sorted by importance one gathered parameter at a time
(`importance.reorder_`), heads and neurons `striped` over the ranks: rank r holds the
r-th, (r + N)-th, ... most important, so that the k most important of any layer fall on
the ranks evenly. A sub-network's kept heads and neurons are then a prefix of every
rank's slice, and each kept layer computes with that prefix only (views of the weights;
the query and output projections are gathered for the layer when a group keeps fewer
query heads than it has): the work of a sub-network's heads and neurons, not the dense
model's. Removed layers and embedding channels are masks. Every rank runs every window.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
from torch import nn

from prunetune.evaluators.contract import compute_scores, sorting_scores
from prunetune.evaluators.importance import (
    ImportanceScores, InputSlices, in_model_order, local_input_slices, local_part, permute_model,
    striped,
)
from prunetune.evaluators.model import is_config_file
from prunetune.evaluators.perplexity import WindowLoss, logit_chunks
from prunetune.evaluators.sharded.holding import (
    RankContext, SlicedHolding, require_activation_importance,
)
from prunetune.evaluators.sharded.zero3 import check_partitionable
from prunetune.evaluators.surgery import apply_masks
from prunetune.search_spaces.dims import Adapter, ModelDims, adapter_for
from prunetune.search_spaces.subnet import SubnetConfig


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Keep transformers' loading report (every weight a random model lacks) off the log."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def check_divisible(config: Any, world: int) -> None:
    """Fail with the field's name when the model's widths do not split over `world` ranks."""
    unsplit = ModelDims.from_config(config).unsplit_width(world)
    if unsplit is not None:
        name, size = unsplit
        raise ValueError(f"sharding.mode 'tp': {name} = {size} does not split over "
                         f"{world} ranks; use a number of ranks that divides it, or zero3")


def load_tensor_parallel(source: str, dtype: torch.dtype) -> nn.Module:
    """A checkpoint (hub id or local directory) loaded in slices over the default process
    group, each rank reading only its own part of every split weight."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed.configuration_utils import DistributedConfig

    check_partitionable(source)
    check_divisible(AutoConfig.from_pretrained(source), torch.distributed.get_world_size())
    with _quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, distributed_config=DistributedConfig(tp_plan="auto"))
    adapter_for(model)
    return model.eval()


def build_random_tensor_parallel(config: Any, dtype: torch.dtype) -> nn.Module:
    """A model of `config` with random weights in slices over the default process group:
    built on the meta device, each rank then initializing only its own slices."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    from transformers.distributed.configuration_utils import DistributedConfig

    check_divisible(config, torch.distributed.get_world_size())
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    with _quiet_loading():
        model = model_class.from_pretrained(None, config=config, state_dict={}, dtype=dtype,
                                            distributed_config=DistributedConfig(tp_plan="auto"))
    adapter_for(model)
    return model.eval()


def sum_over_ranks(scores: ImportanceScores) -> ImportanceScores:
    """The whole model's scores from every rank's scores of its own slices (the others
    zero): the sliced scores summed over the group, in place."""
    sliced = [*scores.heads, *scores.neurons]
    if scores.input_norms is not None:
        sliced += [*scores.input_norms.o, *scores.input_norms.down]
    for tensor in sliced:
        torch.distributed.all_reduce(tensor)
    return scores


class TensorParallelHolding(SlicedHolding):
    """The rank's slices of the model, loaded by transformers' tensor-parallel plan."""

    def load(self, ctx: RankContext) -> Any:
        from transformers import AutoConfig, AutoTokenizer

        self.ctx = ctx
        source = ctx.settings.model
        if is_config_file(source):
            tokenizer = None
            model = build_random_tensor_parallel(AutoConfig.from_pretrained(source), ctx.dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = load_tensor_parallel(source, ctx.dtype)
        self.model = model
        self.dims = ModelDims.from_config(model.config)
        loaded = local_input_slices(model, ctx.rank, ctx.world)
        self.scores = sorting_scores(ctx.settings, lambda: self._scores(tokenizer, loaded),
                                     ctx.from_rank0, ctx.rank == 0)
        in_order = self.scores is None or in_model_order(self.scores)
        permute_model(model, model_order(self.dims) if in_order else self.scores,
                      stripes=ctx.world)
        self.slices = striped_slices(self.dims, ctx.rank, ctx.world)
        rows = ctx.settings.batch_size * (ctx.settings.seq_len - 1)
        self.loss = WindowLoss(model, logit_chunks(rows, model.config.vocab_size)).eval()
        return tokenizer

    def _scores(self, tokenizer: Any, slices: InputSlices) -> ImportanceScores:
        """Activation scores of the model as loaded (each rank holding `slices`), every
        rank running the same batches."""
        require_activation_importance(self.ctx.settings, "tp")
        return sum_over_ranks(compute_scores(self.model, tokenizer, self.ctx.settings, slices))

    def masked(self, subnet: SubnetConfig) -> AbstractContextManager[nn.Module]:
        """The rank's model computing its part of `subnet` at its own widths
        (`sliced_evaluation`)."""
        return sliced_evaluation(self.model, subnet, self.slices, self.dims)


def model_order(d: ModelDims) -> ImportanceScores:
    """Scores that rank every head and neuron in the model's own order (first is most
    important): what the ranks stripe by when the search uses no importance, or when the
    weights are sorted already (a trained super-network's checkpoint)."""
    def falling(n: int) -> torch.Tensor:
        return -torch.arange(n, dtype=torch.float32)

    return ImportanceScores(heads=[falling(d.num_heads) for _ in range(d.num_layers)],
                            neurons=[falling(d.intermediate_size) for _ in range(d.num_layers)],
                            embed=falling(d.hidden_size),
                            block_influence=torch.zeros(d.num_layers))


def striped_slices(d: ModelDims, rank: int, world: int) -> InputSlices:
    """The query-head rows and neurons that `rank` holds once the heads and neurons are
    `striped` over `world` ranks, as positions in importance order: the rows and neurons
    of the rank's `o_proj` and `down_proj` inputs, in their order."""
    def held(count: int) -> torch.Tensor:
        return striped(torch.arange(count), world).view(world, -1)[rank]

    groups = held(d.num_kv_heads)
    heads = (groups[:, None] * d.q_per_kv + torch.arange(d.q_per_kv)).reshape(-1)
    rows = (heads[:, None] * d.head_dim + torch.arange(d.head_dim)).reshape(-1)
    return InputSlices(rows, held(d.intermediate_size))


def kept_locally(positions: torch.Tensor, keep: int) -> int:
    """How many of a rank's units, at these importance `positions` (ascending), a
    sub-network keeping the first `keep` keeps: a prefix of the rank's slice."""
    return int((positions < keep).sum())


@contextmanager
def sliced_evaluation(model: nn.Module, subnet: SubnetConfig, slices: InputSlices,
                      d: ModelDims) -> Iterator[nn.Module]:
    """The rank's model computing `subnet` with its own widths: the residual stream cut to
    the kept embedding channels, each kept layer with its kept heads and neurons only.
    Removed layers, and the heads (or neurons) of a layer of which this rank keeps none,
    are masks."""
    a = adapter_for(model)
    layers = model.get_submodule(a.layers)
    group_positions = slices.heads[::d.q_per_kv * d.head_dim] // (d.q_per_kv * d.head_dim)
    masked_widths = (list(subnet.kv_heads), list(subnet.q_per_kv), list(subnet.mlp))
    with ExitStack() as stack:
        for j, i in enumerate(subnet.layers):
            kv, q, m = subnet.kv_heads[j], subnet.q_per_kv[j], subnet.mlp[j]
            groups = kept_locally(group_positions, kv)
            neurons = kept_locally(slices.neurons, m)
            query = _kept_query_rows(d, groups or None, q, layers[i].get_submodule(a.attn)
                                     .get_submodule(a.o).weight.device)
            sliced = _LayerSlices(groups if groups else None, q, query,
                                  neurons if neurons else None, subnet.embed)
            if groups:
                masked_widths[0][j], masked_widths[1][j] = d.num_kv_heads, d.q_per_kv
            if neurons:
                masked_widths[2][j] = d.intermediate_size
            stack.enter_context(_sliced_layer(layers[i], a, d, sliced))
        if subnet.embed < d.hidden_size:
            stack.enter_context(_narrow_stream(model, a, subnet.embed))
        masks = replace(subnet, kv_heads=tuple(masked_widths[0]),
                        q_per_kv=tuple(masked_widths[1]), mlp=tuple(masked_widths[2]),
                        embed=d.hidden_size)
        stack.enter_context(apply_masks(model, masks, slices))
        yield model


@dataclass(frozen=True)
class _LayerSlices:
    """What one rank computes of one kept layer: its first `groups` key-value groups with
    `q` query heads each (None: all, its heads masked), whose rows of the query projection
    are `query`, its first `neurons` (None: all, masked), on the first `embed` residual
    channels."""

    groups: int | None
    q: int
    query: torch.Tensor | slice
    neurons: int | None
    embed: int


Part = tuple[nn.Module, str, torch.Tensor]
"""A module, the name of one of its parameters, and the part of it to compute with."""


def _part(module: nn.Module, name: str, rows: torch.Tensor | slice,
          columns: torch.Tensor | slice = slice(None)) -> list[Part]:
    """The `rows` (and, of a matrix, `columns`) of this rank's part of a parameter; a view
    unless one of them is an index; nothing for a missing bias."""
    param = module._parameters.get(name)
    if param is None:
        return []
    local = local_part(param)
    kept = local[rows]
    return [(module, name, kept[:, columns] if kept.dim() == 2 else kept)]


def _kept_query_rows(d: ModelDims, groups: int | None, q: int,
                     device: torch.device) -> torch.Tensor | slice:
    """The rank's query rows of its first `groups` groups, `q` heads each (all for None): a
    prefix when every head of a group is kept, else an index on `device`."""
    if groups is None:
        return slice(None)
    if q == d.q_per_kv:
        return slice(0, groups * q * d.head_dim)
    heads = (torch.arange(groups)[:, None] * d.q_per_kv + torch.arange(q)).reshape(-1)
    return (heads[:, None] * d.head_dim + torch.arange(d.head_dim)).reshape(-1).to(device)


def _layer_parts(layer: nn.Module, a: Adapter, d: ModelDims, kept: _LayerSlices) -> list[Part]:
    """The part of each of the layer's weights that computes its kept heads, neurons and
    residual channels."""
    attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
    channels = slice(0, kept.embed)
    query = kept.query  # an index on the weights' device, or a prefix
    kv = slice(None) if kept.groups is None else slice(0, kept.groups * d.head_dim)
    neurons = slice(None) if kept.neurons is None else slice(0, kept.neurons)
    readers = ((attn, a.q, query), (attn, a.k, kv), (attn, a.v, kv),
               (mlp, a.gate, neurons), (mlp, a.up, neurons))
    parts: list[Part] = []
    for parent, name, rows in readers:
        module = parent.get_submodule(name)
        parts += _part(module, "weight", rows, channels) + _part(module, "bias", rows)
    for parent, name, columns in ((attn, a.o, query), (mlp, a.down, neurons)):
        module = parent.get_submodule(name)
        parts += _part(module, "weight", channels, columns) + _part(module, "bias", channels)
    for name in (a.input_norm, a.post_attn_norm):
        parts += _part(layer.get_submodule(name), "weight", channels)
    return parts


@contextmanager
def _swapped(parts: list[Part]) -> Iterator[None]:
    """Each module computing with its part of the parameter instead of the whole."""
    originals = [(module, name, module._parameters[name]) for module, name, _ in parts]
    try:
        for module, name, part in parts:
            module._parameters[name] = part
        yield
    finally:
        for module, name, original in reversed(originals):
            module._parameters[name] = original


@contextmanager
def _sliced_layer(layer: nn.Module, a: Adapter, d: ModelDims,
                  kept: _LayerSlices) -> Iterator[None]:
    """While `layer` runs, its weights hold only their kept rows and columns (made when it
    starts, dropped when it ends, so at most one layer's gathered copies exist), and its
    attention repeats each key-value head for `q` query heads."""
    attn = layer.get_submodule(a.attn)
    running = ExitStack()

    def install(module: nn.Module, args: Any) -> None:
        running.enter_context(_swapped(_layer_parts(layer, a, d, kept)))
        if kept.groups is not None:
            groups = attn.num_key_value_groups
            attn.num_key_value_groups = kept.q
            running.callback(setattr, attn, "num_key_value_groups", groups)

    def finish(module: nn.Module, args: Any, output: Any) -> None:
        running.close()

    handles = [layer.register_forward_pre_hook(install), layer.register_forward_hook(finish)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        running.close()


@contextmanager
def _narrow_stream(model: nn.Module, a: Adapter, embed: int) -> Iterator[None]:
    """The residual stream cut to its first `embed` channels: the embedding's output, the
    final norm and the LM head's input (views)."""
    channels = slice(0, embed)
    head = model.get_submodule(a.lm_head)
    parts = (_part(model.get_submodule(a.final_norm), "weight", channels)
             + _part(head, "weight", slice(None), channels))

    def narrow(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output[..., :embed]

    handle = model.get_submodule(a.embed).register_forward_hook(narrow)
    try:
        with _swapped(parts):
            yield
    finally:
        handle.remove()
