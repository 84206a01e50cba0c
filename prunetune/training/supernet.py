"""Super-network training: every step trains several sub-networks of a search space on the
same weights (the sandwich rule of the seed method), so that any sub-network the search
later picks is good without training of its own.

A step runs, on one batch of windows: the space's largest sub-network with the
language-modelling loss, and the smallest and `random_count` uniformly drawn ones
distilled in place from the largest (KL to its top-k next-token distribution, taken before
the step's update, as `teacher.TeacherTopK`). Each sub-network is the resident model under
`surgery.apply_masks`, exact and reversible, so gradients reach only the weights it keeps.
Windows, optimizer, schedule, progress and checkpoints are those of `distill`
(`train_supernet`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunetune.evaluators.perplexity import model_device, nll_sum
from prunetune.evaluators.surgery import apply_masks
from prunetune.search_spaces.spaces import SearchSpace
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.checkpoint import Progress, load_checkpoint, run_identity, save_checkpoint
from prunetune.training.data import window_indices
from prunetune.training.distill import (
    DistillResult, StepLog, checkpoint_due, cosine_schedule, progress_bar,
)
from prunetune.training.loss import distill_loss_sum
from prunetune.training.settings import DistillSettings
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
        teacher = teacher_top_k(masked, ids, top_k, batch=len(ids), store=device)
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


def train_supernet(model: nn.Module, space: SearchSpace, windows: torch.Tensor,
                   settings: DistillSettings, random_count: int = 2,
                   checkpoint_dir: str | Path | None = None) -> DistillResult:
    """Train `model` in place as a super-network of `space` on `windows` `[n, seq_len]`.

    Each optimizer step takes `settings.windows_per_step` windows in `distill`'s seeded
    order, in micro-batches, and trains the sandwich of that step (drawn from the seed and
    the step, so a resumed run draws the same) with `supernet_step`; `settings.top_k` is
    the size of the largest sub-network's distribution the others learn. AdamW, warmup
    and cosine decay, clipping, checkpoints and resume as in `distill`.
    """
    start = time.perf_counter()
    if settings.top_k is None:
        raise ValueError("distill.top_k: super-network training distils from the largest "
                         "sub-network's top-k distribution; set it (e.g. 64)")
    if windows.dim() != 2 or windows.shape[1] != settings.seq_len:
        raise ValueError(f"windows must be [n >= 1, distill.seq_len = {settings.seq_len}], "
                         f"got {tuple(windows.shape)}")
    torch.manual_seed(settings.seed)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = cosine_schedule(optimizer, settings)
    identity = {**run_identity(settings, windows), "random_count": random_count}
    progress = Progress()
    if checkpoint_dir is not None:
        progress = (load_checkpoint(checkpoint_dir, model, optimizer, scheduler, identity)
                    or progress)
    resumed_from = progress.step
    device = model_device(model)
    try:
        with progress_bar(settings, progress) as bar:
            log = StepLog(progress, settings, bar)
            while progress.step < settings.steps:
                subnets = sandwich(space, random.Random(f"{settings.seed}-{progress.step}"),
                                   random_count)
                index = window_indices(len(windows), settings.seed, progress.windows,
                                       settings.windows_per_step)
                loss = 0.0
                for micro in index.split(settings.micro_batch):
                    share = len(micro) / len(index)
                    loss += share * supernet_step(
                        model, subnets, windows[micro].to(device), settings.top_k,
                        settings.temperature, backward=lambda part: (share * part).backward())
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                log.push(loss)
                if checkpoint_dir is not None and checkpoint_due(progress, settings):
                    log.flush()
                    save_checkpoint(checkpoint_dir, model, optimizer, scheduler, progress,
                                    identity)
            log.flush()
    finally:
        model.eval()
    return DistillResult(tokens=progress.tokens, steps=progress.step, losses=progress.losses,
                         resumed_from=resumed_from, seconds=time.perf_counter() - start,
                         tokens_per_s=log.tokens_per_s())
