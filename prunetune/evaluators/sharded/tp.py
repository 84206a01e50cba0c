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
    ImportanceScores, InputSlices, local_input_slices, local_part, permute_model, striped,
)
from prunetune.evaluators.model import is_config_file
from prunetune.evaluators.perplexity import WindowLoss, logit_chunks
from prunetune.evaluators.sharded.holding import RankContext, SlicedHolding
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
    """Fail with the field's name when the model's heads do not split over `world` ranks."""
    d = ModelDims.from_config(config)
    for name, size in (("num_key_value_heads", d.num_kv_heads),
                       ("num_attention_heads", d.num_heads),
                       ("intermediate_size", d.intermediate_size)):
        if size % world:
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
        self.slices = local_input_slices(model, ctx.rank, ctx.world)
        self.scores = sorting_scores(ctx.settings, lambda: self._scores(tokenizer),
                                     ctx.from_rank0, ctx.rank == 0)
        permute_model(model, self.scores or model_order(self.dims), stripes=ctx.world)
        self.slices = striped_slices(self.dims, ctx.rank, ctx.world)
        rows = ctx.settings.batch_size * (ctx.settings.seq_len - 1)
        self.loss = WindowLoss(model, logit_chunks(rows, model.config.vocab_size)).eval()
        return tokenizer

    def _scores(self, tokenizer: Any) -> ImportanceScores:
        """Activation scores of the sliced model, every rank running the same batches."""
        if self.ctx.settings.importance != "activation":
            raise ValueError(f"importance {self.ctx.settings.importance!r} reads whole weights, "
                             "which no rank holds in tp mode: use 'activation' or 'none', or "
                             "cache the scores with a single-device evaluator first")
        return sum_over_ranks(compute_scores(self.model, tokenizer, self.ctx.settings,
                                             self.slices))

    def masked(self, subnet: SubnetConfig) -> AbstractContextManager[nn.Module]:
        """The rank's model computing its part of `subnet`: each kept layer with its kept
        heads and neurons only (`sliced_layers`), removed layers and channels masked."""
        return sliced_evaluation(self.model, subnet, self.slices, self.dims)


def model_order(d: ModelDims) -> ImportanceScores:
    """Scores that rank every head and neuron in the model's own order (first is most
    important): what the ranks stripe by when the search uses no importance."""
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
    """The rank's model computing `subnet`: kept layers run with their kept heads and
    neurons only; removed layers, removed embedding channels, and a layer of which this
    rank keeps no heads (or no neurons) are masks."""
    a = adapter_for(model)
    layers = model.get_submodule(a.layers)
    group_positions = slices.heads[::d.q_per_kv * d.head_dim] // (d.q_per_kv * d.head_dim)
    masked_widths = (list(subnet.kv_heads), list(subnet.q_per_kv), list(subnet.mlp))
    with ExitStack() as stack:
        for j, i in enumerate(subnet.layers):
            kv, q, m = subnet.kv_heads[j], subnet.q_per_kv[j], subnet.mlp[j]
            groups = kept_locally(group_positions, kv)
            neurons = kept_locally(slices.neurons, m)
            sliced = _LayerSlices(groups if groups else None, q, neurons if neurons else None)
            if groups:
                masked_widths[0][j], masked_widths[1][j] = d.num_kv_heads, d.q_per_kv
            if neurons:
                masked_widths[2][j] = d.intermediate_size
            stack.enter_context(_sliced_layer(layers[i], a, d, sliced))
        masks = replace(subnet, kv_heads=tuple(masked_widths[0]),
                        q_per_kv=tuple(masked_widths[1]), mlp=tuple(masked_widths[2]))
        stack.enter_context(apply_masks(model, masks, slices))
        yield model


@dataclass(frozen=True)
class _LayerSlices:
    """What one rank computes of one kept layer: its first `groups` key-value groups with
    `q` query heads each (None: its heads are masked), its first `neurons` (None: masked)."""

    groups: int | None
    q: int
    neurons: int | None


def _kept_query_rows(d: ModelDims, groups: int, q: int) -> torch.Tensor | slice:
    """The rank's query rows of its first `groups` groups, `q` heads each: a prefix when
    every head of a group is kept."""
    if q == d.q_per_kv:
        return slice(0, groups * q * d.head_dim)
    heads = (torch.arange(groups)[:, None] * d.q_per_kv + torch.arange(q)).reshape(-1)
    return (heads[:, None] * d.head_dim + torch.arange(d.head_dim)).reshape(-1)


def _layer_parts(layer: nn.Module, a: Adapter, d: ModelDims,
                 kept: _LayerSlices) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """The kept part of each of the layer's split weights (and biases), as views where the
    kept part is a prefix: (module, parameter name, tensor)."""
    attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
    parts: list[tuple[nn.Module, str, torch.Tensor]] = []

    def rows(module: nn.Module, index: torch.Tensor | slice) -> None:
        for name in ("weight", "bias"):
            param = module._parameters.get(name)
            if param is not None:
                local = local_part(param)
                parts.append((module, name, local[index.to(local.device)
                                                  if isinstance(index, torch.Tensor) else index]))

    def columns(module: nn.Module, index: torch.Tensor | slice) -> None:
        local = local_part(module.weight)
        part = local[:, index.to(local.device) if isinstance(index, torch.Tensor) else index]
        parts.append((module, "weight", part))

    if kept.groups is not None:
        query = _kept_query_rows(d, kept.groups, kept.q)
        rows(attn.get_submodule(a.q), query)
        for name in (a.k, a.v):
            rows(attn.get_submodule(name), slice(0, kept.groups * d.head_dim))
        columns(attn.get_submodule(a.o), query)
    if kept.neurons is not None:
        for name in (a.gate, a.up):
            rows(mlp.get_submodule(name), slice(0, kept.neurons))
        columns(mlp.get_submodule(a.down), slice(0, kept.neurons))
    return parts


@contextmanager
def _sliced_layer(layer: nn.Module, a: Adapter, d: ModelDims,
                  kept: _LayerSlices) -> Iterator[None]:
    """While `layer` runs, its split projections hold only their kept rows or columns
    (made when it starts, dropped when it ends, so at most one layer's gathered copies
    exist), and its attention repeats each key-value head for `q` query heads."""
    attn = layer.get_submodule(a.attn)
    originals: list[tuple[nn.Module, str, Any]] = []

    def restore() -> None:
        while originals:
            module, name, value = originals.pop()
            if name == "num_key_value_groups":
                setattr(module, name, value)
            else:
                module._parameters[name] = value

    def install(module: nn.Module, args: Any) -> None:
        for owner, name, part in _layer_parts(layer, a, d, kept):
            originals.append((owner, name, owner._parameters[name]))
            owner._parameters[name] = part
        if kept.groups is not None:
            originals.append((attn, "num_key_value_groups", attn.num_key_value_groups))
            attn.num_key_value_groups = kept.q

    def finish(module: nn.Module, args: Any, output: Any) -> None:
        restore()

    handles = [layer.register_forward_pre_hook(install), layer.register_forward_hook(finish)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        restore()
