"""ZeRO-3 inference: parameters partitioned over the ranks, windows split between them.

Parameters are partitioned as the model is built (`deepspeed.zero.Init`), so no rank ever
holds the whole model; each rank scores its share of the evaluation windows and the loss
sums are all-reduced. With `offload: cpu` the partitions live in host memory and stream
to the device layer by layer. Weights are sorted by importance one gathered layer at a
time, so that no rank holds more than one layer beyond its share. Distillation with the
teacher partitioned over its workers (`training.distributed`) loads the dense model so too
(`load_sorted_partitioned`) and cuts its student out of it one gathered part at a time
(`extract_partitioned`).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from prunetune.evaluators.contract import (
    compute_scores, importance_cache_path, sorting_scores,
)
from prunetune.evaluators.importance import (
    ImportanceScores, InputNorms, descending, in_model_order, permute_layer, reorder_, residual_tables,
)
from prunetune.evaluators.model import is_config_file, resolve_source
from prunetune.evaluators.perplexity import WindowLoss, logit_chunks
from prunetune.evaluators.sharded.holding import Holding, RankContext, require_activation_importance
from prunetune.evaluators.settings import EvaluatorSettings
from prunetune.evaluators.surgery import apply_masks, extract
from prunetune.search_spaces.dims import ModelDims, adapter_for
from prunetune.search_spaces.subnet import SubnetConfig


def zero3_config(dtype: torch.dtype, offload: str = "none") -> dict[str, Any]:
    """The DeepSpeed config of ZeRO-3 inference: no optimizer, parameters partitioned."""
    zero: dict[str, Any] = {"stage": 3}
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    return config


@contextmanager
def _zero3_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Make transformers build and load models partitioned (zero.Init) inside the block only.

    Outside it, models built on this rank (the latency stand-ins) stay ordinary.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def build_random_sharded(config: Any, dtype: torch.dtype, device: str | torch.device,
                         offload: str = "none") -> nn.Module:
    """A model of `config` with random weights, partitioned across the distributed group.

    Every module's weights are created and initialized on `device` and partitioned at once
    (`deepspeed.zero.Init`), so no full copy ever exists, in host memory or on a device.
    Needs torch.distributed initialized (as `ShardRank` does) with a DeepSpeed accelerator
    of `device`'s type.
    """
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    accelerator = get_accelerator().device_name()
    if torch.device(device).type != accelerator:
        raise ValueError(f"device {device} is not DeepSpeed's accelerator ({accelerator}); "
                         "set DS_ACCELERATOR before deepspeed is imported")
    with _zero3_construction(zero3_config(dtype, offload)):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter_for(model)
    return model.eval()


def check_partitionable(source: str) -> None:
    """Fail early for a model source that ZeRO-3 cannot load partitioned (a GGUF file)."""
    if resolve_source(source).endswith(".gguf"):
        raise ValueError(f"model {source!r}: a .gguf file cannot be loaded partitioned; load it "
                         "once with `load_model` and give the dequantized checkpoint directory")


def load_sharded(source: str, dtype: torch.dtype, offload: str = "none") -> nn.Module:
    """A pretrained checkpoint (hub id or local directory) loaded partitioned (ZeRO-3).

    Rank 0 copies the checkpoint into one gathered module at a time, which is then
    partitioned again; the other ranks only receive their partitions.
    """
    from transformers import AutoModelForCausalLM

    check_partitionable(source)
    with _zero3_construction(zero3_config(dtype, offload)):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    adapter_for(model)
    return model.eval()


def load_partitioned(source: str, dtype: torch.dtype, device: str | torch.device,
                     offload: str = "none") -> nn.Module:
    """The model of `source` partitioned over the group as it loads: a checkpoint
    (`load_sharded`), or a config.json's random weights (`build_random_sharded`)."""
    if is_config_file(source):
        from transformers import AutoConfig

        return build_random_sharded(AutoConfig.from_pretrained(source), dtype, device, offload)
    return load_sharded(source, dtype, offload)


def load_sorted_partitioned(settings: EvaluatorSettings, dtype: torch.dtype,
                            device: torch.device, share: Callable[[Any], Any],
                            writer: bool) -> tuple[nn.Module, ImportanceScores | None]:
    """The dense model of `settings` as a zero3 evaluator holds it, partitioned and sorted
    by importance, in a group that runs no evaluator (every rank calls it; `share` hands
    the `writer` rank's value to all, as in `sorting_scores`). The scores must be cached
    (or `importance: none`): computing them runs the model, which needs DeepSpeed's ZeRO-3
    engine over it, and here the model's user makes that."""
    model = load_partitioned(settings.model, dtype, device)
    scores = sorting_scores(settings, lambda: uncached_scores(settings), share, writer)
    if scores is not None:
        permute_partitioned(model, scores)
    return model, scores


def uncached_scores(settings: EvaluatorSettings) -> ImportanceScores:
    """Raise for importance scores that a partitioned model needs cached."""
    raise ValueError(f"model {settings.model}: its importance scores are not cached "
                     f"({importance_cache_path(settings)}); the run's search caches them, or "
                     "`prunetune export` of one of its points on this machine")


def gathered(params: list[nn.Parameter]) -> AbstractContextManager[Any]:
    """ZeRO-3 parameters whole on every rank inside the block (a collective), partitioned
    again after."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def extract_partitioned(model: nn.Module, subnet: SubnetConfig,
                        input_norms: InputNorms | None = None) -> nn.Module:
    """`surgery.extract` of a ZeRO-3 model, whole on every rank (all ranks call it): the
    residual tables, then each kept layer, are gathered and sliced one at a time, so no
    rank holds more than one part of the model beyond its share and the sub-network."""
    return extract(model, subnet, input_norms, gather=gathered)


@torch.inference_mode()
def permute_partitioned(model: nn.Module, scores: ImportanceScores) -> None:
    """`permute_model` for a ZeRO-3 model: the same permutation, one gathered part at a time.

    Each residual table (embeddings, LM head, final norm), then each decoder layer, is
    gathered on every rank, permuted by rank 0, and partitioned again from rank 0's copy.
    """
    import deepspeed

    if in_model_order(scores):
        return
    a, d = adapter_for(model), ModelDims.from_config(model.config)
    first = torch.distributed.get_rank() == 0
    channels = descending(scores.embed)
    for param, dim in residual_tables(model, a):
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if first:
                reorder_(param, channels, dim)
    for i, layer in enumerate(model.get_submodule(a.layers)):
        with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
            if first:
                permute_layer(layer, a, d, scores.heads[i], scores.neurons[i], channels)


class Zero3Holding(Holding):
    """The rank's partitions of a ZeRO-3 model, behind a DeepSpeed engine of `WindowLoss`."""

    def load(self, ctx: RankContext) -> Any:
        from transformers import AutoTokenizer

        import deepspeed

        self.ctx = ctx
        source, offload = ctx.settings.model, ctx.sharding.offload
        tokenizer = None if is_config_file(source) else AutoTokenizer.from_pretrained(source)
        model = load_partitioned(source, ctx.dtype, ctx.device, offload)
        rows = ctx.settings.batch_size * (ctx.settings.seq_len - 1)
        chunks = logit_chunks(rows, model.config.vocab_size)
        self.loss = deepspeed.initialize(model=WindowLoss(model, chunks).eval(),
                                         config=zero3_config(ctx.dtype, offload))[0]
        self.model = model
        self.scores = sorting_scores(ctx.settings, lambda: self._scores(tokenizer),
                                     ctx.from_rank0, ctx.rank == 0)
        if self.scores is not None:
            permute_partitioned(model, self.scores)
        return tokenizer

    def _scores(self, tokenizer: Any) -> ImportanceScores:
        """Activation scores of the partitioned model, every rank running the same batches."""
        require_activation_importance(self.ctx.settings, "zero3")
        return compute_scores(self.model, tokenizer, self.ctx.settings)

    def masked(self, subnet: SubnetConfig) -> AbstractContextManager[nn.Module]:
        return apply_masks(self.model, subnet)

    def share(self, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        """Windows split evenly over the ranks; batches enough for the largest share."""
        world = self.ctx.world
        steps = math.ceil(math.ceil(len(windows) / world) / batch_size)
        return windows.tensor_split(world)[self.ctx.rank], steps

    def combine(self, total: torch.Tensor) -> None:
        torch.distributed.all_reduce(total)
