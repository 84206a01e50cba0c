"""How the ranks of a group hold one model: the interface each sharding mode implements.

A mode decides how the model is loaded and sorted by importance, how a sub-network's masks
are applied to the rank's part, and which windows each rank scores. Everything else (joining
the group, tokenizing, latency, the evaluation loop) is the same for every mode and lives
in `rank.py`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from prunetune.evaluators.importance import ImportanceScores, InputSlices
from prunetune.evaluators.settings import EvaluatorSettings, ShardingSettings
from prunetune.evaluators.surgery import apply_masks
from prunetune.search_spaces.subnet import SubnetConfig


@dataclass
class RankContext:
    """What a holding needs to know of the rank it lives on."""

    rank: int
    world: int
    local_size: int
    device: torch.device
    dtype: torch.dtype
    settings: EvaluatorSettings
    sharding: ShardingSettings
    from_rank0: Callable[[Any], Any]
    """Rank 0's value of its argument, on every rank (a collective)."""


class Holding(ABC):
    """One rank's part of the model, in one sharding mode.

    After `load`, `model` is the rank's model, `scores` the importance scores it was sorted
    by (None without importance), and `loss(ids)` the summed loss of a batch of windows.
    """

    model: nn.Module
    scores: ImportanceScores | None
    loss: Callable[[torch.Tensor], torch.Tensor]

    @abstractmethod
    def load(self, ctx: RankContext) -> Any:
        """Load the model sorted by importance (collective); returns the tokenizer, or None
        for random weights."""

    @abstractmethod
    def masked(self, subnet: SubnetConfig) -> AbstractContextManager[nn.Module]:
        """The rank's model computing its part of `subnet`, restored on exit."""

    @abstractmethod
    def share(self, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        """The windows this rank scores, and the batches every rank runs (the same number
        on every rank, since each forward pass is collective)."""

    def combine(self, total: torch.Tensor) -> None:
        """Turn this rank's loss sum into the group's, in place (default: it already is)."""


def require_activation_importance(settings: EvaluatorSettings, mode: str) -> None:
    """Refuse an importance criterion that reads whole weights, which no rank of a `mode`
    group holds; activation scores are computed by every rank on its part."""
    if settings.importance != "activation":
        raise ValueError(f"importance {settings.importance!r} reads whole weights, which no "
                         f"rank holds in {mode} mode: use 'activation' or 'none', or cache the "
                         "scores with a single-device evaluator first")


class SlicedHolding(Holding):
    """A tensor-parallel holding: every rank holds a slice of every block (`slices` says
    which heads and neurons) and runs every window; the layers' all-reduces join them."""

    model: nn.Module
    slices: InputSlices

    def masked(self, subnet: SubnetConfig) -> AbstractContextManager[nn.Module]:
        """Head and neuron masks cut to this rank's slice; the rest masks as unsharded."""
        return apply_masks(self.model, subnet, self.slices)

    def share(self, windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
        """Every window."""
        return windows, math.ceil(len(windows) / batch_size)
