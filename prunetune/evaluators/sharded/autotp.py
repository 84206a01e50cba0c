"""AutoTP tensor parallelism: every rank holds a slice of every block, runs every window.

Each rank loads the whole model into host memory, sorts it by importance, and keeps its
slice of every attention and MLP block on its device (DeepSpeed AutoTP). Head and neuron
masks are cut to the slice of the full widths that this rank's `o_proj` and `down_proj`
read.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from prunetune.evaluators.contract import compute_scores, sorting_scores
from prunetune.evaluators.importance import ImportanceScores, local_input_slices, permute_model
from prunetune.evaluators.model import load_model
from prunetune.evaluators.perplexity import WindowLoss, logit_chunks
from prunetune.evaluators.sharded.holding import RankContext, SlicedHolding


class AutoTPHolding(SlicedHolding):
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
        self.slices = local_input_slices(self.model, ctx.rank, ctx.world)
        rows = ctx.settings.batch_size * (ctx.settings.seq_len - 1)
        self.loss = WindowLoss(self.model, logit_chunks(rows, self.model.config.vocab_size)).eval()
        return tokenizer

    def _scores(self, full: nn.Module, tokenizer: Any) -> ImportanceScores | None:
        """Scores of the unsharded model, computed by rank 0 only."""
        return compute_scores(full, tokenizer, self.ctx.settings) if self.ctx.rank == 0 else None
