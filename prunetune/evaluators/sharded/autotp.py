"""AutoTP tensor parallelism: every rank holds a slice of every block, runs every window.

Each rank loads the whole model into host memory, sorts it by importance, and keeps its
slice of every attention and MLP block on its device (DeepSpeed AutoTP). Head and neuron
masks are cut to the slice of the full widths that this rank's `o_proj` and `down_proj`
read.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from prunetune.evaluators.contract import compute_scores, sorting_scores
from prunetune.evaluators.importance import ImportanceScores, permute_model
from prunetune.evaluators.model import load_model
from prunetune.evaluators.perplexity import WindowLoss, logit_chunks
from prunetune.evaluators.sharded.holding import Holding, RankContext
from prunetune.evaluators.surgery import InputSlices, apply_masks
from prunetune.search_spaces.dims import adapter_for
from prunetune.search_spaces.subnet import SubnetConfig


class AutoTPHolding(Holding):
    """The rank's tensor-parallel slice of the model."""

    def load(self, ctx: RankContext) -> Any:
        import deepspeed

        self.ctx = ctx
        if ctx.device.type == "cpu" and ctx.local_size != ctx.world:
            raise RuntimeError("autotp on CPU needs every rank on one node: DeepSpeed's CPU "
                               "all-reduce runs through shared memory")
        full, tokenizer = load_model(ctx.settings.model, ctx.dtype, "cpu")
        self.scores = sorting_scores(ctx.settings, lambda: self._scores(full, tokenizer),
                                     ctx.from_rank0, ctx.rank == 0)
        if self.scores is not None:
            permute_model(full, self.scores)
        engine = deepspeed.init_inference(full, tensor_parallel={"tp_size": ctx.world},
                                          dtype=ctx.dtype, replace_with_kernel_inject=False)
        self.model = engine.module.to(ctx.device).eval()
        self.slices = self._local_slices()
        rows = ctx.settings.batch_size * (ctx.settings.seq_len - 1)
        self.loss = WindowLoss(self.model, logit_chunks(rows, self.model.config.vocab_size)).eval()
        return tokenizer

    def _scores(self, full: nn.Module, tokenizer: Any) -> ImportanceScores | None:
        """Scores of the unsharded model, computed by rank 0 only."""
        return compute_scores(full, tokenizer, self.ctx.settings) if self.ctx.rank == 0 else None

    def _local_slices(self) -> InputSlices:
        """Where this rank's `o_proj` and `down_proj` inputs sit in the full widths."""
        a = adapter_for(self.model)
        layer = self.model.get_submodule(a.layers)[0]
        widths = (layer.get_submodule(a.attn).get_submodule(a.o).weight.shape[1],
                  layer.get_submodule(a.mlp).get_submodule(a.down).weight.shape[1])
        every: list[Any] = [None] * self.ctx.world
        torch.distributed.all_gather_object(every, widths)
        heads_start = sum(w[0] for w in every[:self.ctx.rank])
        neurons_start = sum(w[1] for w in every[:self.ctx.rank])
        return InputSlices(slice(heads_start, heads_start + widths[0]),
                           slice(neurons_start, neurons_start + widths[1]))

    def masked(self, subnet: SubnetConfig) -> AbstractContextManager[nn.Module]:
        return apply_masks(self.model, subnet, self.slices)

    def share(self, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        """Every window, joined across ranks by the all-reduces inside the layers."""
        return windows, math.ceil(len(windows) / batch_size)
