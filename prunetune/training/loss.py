"""The distillation loss: KL divergence to the teacher's next-token distribution, chunked.

Both models' logits are `[tokens, vocab]` each (49k columns for SmolLM2, 128k for Llama 3),
so the loss runs the LM heads on chunks of rows, each chunk's float32 logits within
`LOSS_CHUNK_ELEMENTS`. A chunk's loss and its gradient with respect to the student's
logits are computed together, in float32, in one pass over the logits (`LogitsLoss`): the
gradient is `T * (softmax(z / T) - p)` for the KL term and `softmax(z) - onehot` for the
language-modelling term, so the backward pass only scales it, and neither the logits nor
a log-softmax are kept for autograd. The gradients of a micro-batch are kept (float32,
as a plain cross-entropy keeps its log-softmax) up to `KEPT_GRADIENT_ELEMENTS`; past that
each chunk is checkpointed (`torch.utils.checkpoint`): only its hidden states are saved,
and its head runs again in the backward pass. The teacher's side can also come from a
cache of its top-k logits (`teacher.TeacherTopK`), so that students trained on the same
windows share one teacher pass. The loss is a sum over tokens. Nothing in it reads a
value back to the host, so the host can queue a whole step ahead of the device.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunetune.evaluators.perplexity import hidden_states, logit_chunks
from prunetune.training.teacher import head_top_k

LOSS_CHUNK_ELEMENTS = 2**27
"""Float32 logits of one chunk of the loss (512 MiB). Larger than evaluation's chunks:
every chunk costs the LM head a pass over its weight gradient and a few kernel launches."""

KEPT_GRADIENT_ELEMENTS = 2**30
"""Float32 logit gradients a micro-batch keeps for its backward pass (4 GiB); past that,
each chunk's head runs again in the backward pass instead."""


def distill_loss_sum(teacher: nn.Module | None, student: nn.Module, ids: torch.Tensor,
                     temperature: float = 1.0, top_k: int | None = None,
                     lm_weight: float = 0.0, chunks: int | None = None,
                     teacher_top: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> torch.Tensor:
    """The distillation loss of every next token of windows `ids` `[batch, len]`, summed.

    Per token: `temperature**2 * KL(teacher || student)` of the distributions at
    `temperature` (with `top_k`, the teacher's probabilities renormalised over its `top_k`
    most likely tokens, against the student's log-probabilities of those tokens), plus
    `lm_weight` times the student's cross-entropy of the actual next token. The teacher
    runs without gradient; given `teacher_top` (its top-k logits and their token ids at
    these windows' positions, `[batch, len - 1, k]` each, from `teacher.TeacherTopK`) it
    does not run at all. `chunks` row chunks (default: as few as `LOSS_CHUNK_ELEMENTS`
    allows); past `KEPT_GRADIENT_ELEMENTS` logits, each is recomputed in the backward pass.
    """
    student_hidden = hidden_states(student, ids, use_cache=True)[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].reshape(-1)
    student_head = student.get_output_embeddings()
    vocab = student.config.vocab_size
    count = chunks or logit_chunks(targets.numel(), vocab, LOSS_CHUNK_ELEMENTS)
    run = direct if targets.numel() * vocab <= KEPT_GRADIENT_ELEMENTS else checkpointed
    if teacher_top is not None:
        values, index = teacher_top[0].flatten(0, 1), teacher_top[1].flatten(0, 1).long()
        parts = [run(cached_chunk_loss, student_head, s, v, i, y, temperature, lm_weight)
                 for s, v, i, y in zip(*(t.tensor_split(count) for t in
                                         (student_hidden, values, index, targets)))]
        return torch.stack(parts).sum()
    with torch.no_grad():
        teacher_hidden = hidden_states(teacher, ids, use_cache=True)[:, :-1].flatten(0, 1)
    teacher_head = teacher.get_output_embeddings()
    parts = [run(live_chunk_loss, teacher_head, student_head, t, s, y, temperature, top_k,
                 lm_weight)
             for t, s, y in zip(teacher_hidden.tensor_split(count),
                                student_hidden.tensor_split(count), targets.tensor_split(count))]
    return torch.stack(parts).sum()


def checkpointed(function: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """`function(*args)`, its intermediates (a chunk's logits) recomputed for backward."""
    return checkpoint(function, *args, use_reentrant=False)


def direct(function: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """`function(*args)`, its intermediates kept for backward (they fit)."""
    return function(*args)


def live_chunk_loss(teacher_head: nn.Module, student_head: nn.Module,
                    teacher_hidden: torch.Tensor, student_hidden: torch.Tensor,
                    targets: torch.Tensor, temperature: float, top_k: int | None,
                    lm_weight: float) -> torch.Tensor:
    """`distill_loss_sum` of one chunk of rows, from the hidden states of both models."""
    with torch.no_grad():
        if top_k is not None:
            values, index = head_top_k(teacher_head, teacher_hidden, top_k)
            teacher_logp = F.log_softmax(at_temperature(values, temperature), dim=-1)
        else:
            index = None
            teacher_logp = F.log_softmax(at_temperature(teacher_head(teacher_hidden),
                                                        temperature), dim=-1)
    return LogitsLoss.apply(student_head(student_hidden), teacher_logp, index, targets,
                            temperature, lm_weight)


def cached_chunk_loss(student_head: nn.Module, student_hidden: torch.Tensor,
                      teacher_values: torch.Tensor, teacher_index: torch.Tensor,
                      targets: torch.Tensor, temperature: float,
                      lm_weight: float) -> torch.Tensor:
    """`distill_loss_sum` of one chunk of rows against the teacher's cached top-k logits."""
    teacher_logp = F.log_softmax(at_temperature(teacher_values, temperature), dim=-1)
    return LogitsLoss.apply(student_head(student_hidden), teacher_logp, teacher_index, targets,
                            temperature, lm_weight)


class LogitsLoss(torch.autograd.Function):
    """The summed loss of a chunk of student logits `[rows, vocab]` (any float dtype),
    its gradient computed with it (`logits_loss_and_gradient`) and kept, in float32, for
    the backward pass, which scales it and returns it in the logits' dtype."""

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, teacher_logp: torch.Tensor,
                index: torch.Tensor | None, targets: torch.Tensor, temperature: float,
                lm_weight: float) -> torch.Tensor:
        loss, gradient = logits_loss_and_gradient(logits, teacher_logp, index, targets,
                                                  temperature, lm_weight)
        ctx.save_for_backward(gradient)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (gradient,) = ctx.saved_tensors
        scaled = torch.empty_like(gradient, dtype=ctx.logits_dtype)
        torch.mul(gradient, grad_loss, out=scaled)
        return scaled, None, None, None, None, None


def logits_loss_and_gradient(logits: torch.Tensor, teacher_logp: torch.Tensor,
                             index: torch.Tensor | None, targets: torch.Tensor,
                             temperature: float,
                             lm_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed loss of student `logits` `[rows, vocab]` and its float32 gradient.

    `teacher_logp` is the teacher's log-probabilities at `temperature`: over the whole
    vocabulary (`index` None), or over its top-k tokens at token ids `index` `[rows, k]`
    (renormalised over them). The loss is `temperature**2 * KL(teacher || student)`
    summed over rows, plus `lm_weight` times the cross-entropy of `targets`.
    """
    loss, gradient = kl_and_gradient(logits, teacher_logp, index, temperature)
    if lm_weight:
        cross_entropy, lm_gradient = cross_entropy_and_gradient(logits, targets)
        loss = loss + lm_weight * cross_entropy
        gradient.add_(lm_gradient, alpha=lm_weight)
    return loss, gradient


def kl_and_gradient(logits: torch.Tensor, teacher_logp: torch.Tensor,
                    index: torch.Tensor | None,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`temperature**2 * KL(teacher || student)` summed over rows, and its gradient with
    respect to `logits`: `temperature * (softmax(logits / T) * sum(p) - p)`, `p` the
    teacher's probabilities on their tokens (see `logits_loss_and_gradient`)."""
    student_logp = F.log_softmax(at_temperature(logits, temperature), dim=-1)
    teacher_p = teacher_logp.exp()
    picked = student_logp if index is None else student_logp.gather(-1, index)
    loss = (teacher_p * (teacher_logp - picked)).sum()
    if temperature != 1.0:
        loss = temperature ** 2 * loss
    gradient = student_logp.exp_().mul_(temperature * teacher_p.sum(-1, keepdim=True))
    if index is None:
        gradient.sub_(teacher_p, alpha=temperature)
    else:
        gradient.scatter_add_(-1, index, teacher_p.mul_(-temperature))
    return loss, gradient


def at_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`logits` in float32, divided by `temperature` (no division at 1)."""
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature


def cross_entropy_and_gradient(logits: torch.Tensor,
                               targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-entropy of `targets` `[rows]` under `logits`, summed over rows, and its
    gradient with respect to `logits`: `softmax(logits) - onehot(targets)`."""
    logp = F.log_softmax(logits.float(), dim=-1)
    column = targets.unsqueeze(-1)
    loss = -logp.gather(-1, column).sum()
    gradient = logp.exp_()
    gradient.scatter_add_(-1, column, torch.full_like(column, -1.0, dtype=gradient.dtype))
    return loss, gradient
