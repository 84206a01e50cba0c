"""Tensor parallelism through transformers' own plan: every rank loads only its slices.

Each rank builds the model on the meta device and reads from the checkpoint only its
slice of every attention and MLP block (the model's `tp_plan`: query, key, value, gate
and up projections split by output rows, `o_proj` and `down_proj` by input columns), so
no rank ever holds the whole model, in host memory or on its device. A `config.json`
source gives random weights, each rank initializing only its own slices. The weights are
then sorted by importance one parameter at a time (`importance.reorder_` gathers one
parameter whole), every rank runs every window, and head and neuron masks are cut to
the rank's slice as under AutoTP.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from prunetune.evaluators.contract import compute_scores, sorting_scores
from prunetune.evaluators.importance import (
    ImportanceScores, local_input_slices, permute_model,
)
from prunetune.evaluators.model import is_config_file
from prunetune.evaluators.perplexity import WindowLoss, logit_chunks
from prunetune.evaluators.sharded.holding import RankContext, SlicedHolding
from prunetune.evaluators.sharded.zero3 import check_partitionable
from prunetune.search_spaces.dims import ModelDims, adapter_for


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
                       ("num_attention_heads", d.num_heads)):
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
        self.slices = local_input_slices(model, ctx.rank, ctx.world)
        self.scores = sorting_scores(ctx.settings, lambda: self._scores(tokenizer),
                                     ctx.from_rank0, ctx.rank == 0)
        if self.scores is not None:
            permute_model(model, self.scores)
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
