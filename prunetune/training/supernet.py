"""Super-network training: every step trains several sub-networks of a search space on the
same weights (the sandwich rule of the seed method), so that any sub-network the search
later picks is good without training of its own.

A step runs, on one batch of windows: the space's largest sub-network with the
language-modelling loss, and the smallest and `random_count` uniformly drawn ones
distilled in place from the largest (KL to its top-k next-token distribution, taken before
the step's update, as `teacher.TeacherTopK`). Each sub-network is the resident model under
`surgery.apply_masks`, exact and reversible, so gradients reach only the weights it keeps.
Loss, windows, optimizer and schedule are those of `distill`.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import torch
from torch import nn

from prunetune.evaluators.perplexity import model_device, nll_sum
from prunetune.evaluators.surgery import apply_masks
from prunetune.search_spaces.spaces import SearchSpace
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.loss import distill_loss_sum
from prunetune.training.teacher import teacher_top_k


def largest_and_smallest(space: SearchSpace) -> tuple[SubnetConfig, SubnetConfig]:
    """The space's largest and smallest sub-networks (every parameter at its last and first
    allowed value; the values are ascending)."""
    choices = space.choices()
    return (space.decode({name: values[-1] for name, values in choices.items()}),
            space.decode({name: values[0] for name, values in choices.items()}))


def sandwich(space: SearchSpace, rng: random.Random, random_count: int) -> list[SubnetConfig]:
    """The sub-networks one step trains: the largest, the smallest, and `random_count`
    drawn uniformly per parameter."""
    return [*largest_and_smallest(space), *(space.sample(rng) for _ in range(random_count))]


def supernet_step(model: nn.Module, subnets: list[SubnetConfig], ids: torch.Tensor,
                  top_k: int, temperature: float = 1.0,
                  backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward) -> float:
    """Forward and backward passes of one sandwich step on windows `ids`: `subnets[0]` (the
    largest) learns the text, every other one its top-`top_k` distribution. Each loss is a
    mean per predicted token and goes to `backward` at once (one sub-network's activations
    at a time); returns their sum. The caller steps the optimizer."""
    device = model_device(model)
    predicted = ids[:, 1:].numel()
    largest, *others = subnets
    with apply_masks(model, largest) as masked:
        teacher = teacher_top_k(masked, ids, top_k, batch=len(ids))
        model.train()
        with autocast(device):
            loss = nll_sum(masked, ids).float() / predicted
        backward(loss)
    total = loss.item()
    rows = teacher.rows(torch.arange(len(ids)), device)
    for subnet in others:
        with apply_masks(model, subnet) as masked, autocast(device):
            loss = distill_loss_sum(None, masked, ids, temperature, top_k,
                                    teacher_top=rows) / predicted
        backward(loss)
        total += loss.item()
    return total


def autocast(device: torch.device) -> Any:
    """bf16 autocast on GPU, as `distill` trains; float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
