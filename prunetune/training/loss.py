"""The distillation loss: KL divergence to the teacher's next-token distribution, chunked.

Both models' logits are `[tokens, vocab]` each (49k columns for SmolLM2, 128k for Llama 3),
so the loss runs the two LM heads on chunks of rows, as `perplexity.token_logprobs` does,
with the same bound on float32 logits per chunk. When there are several chunks, a chunk's
logits are not kept for the backward pass: each is checkpointed (`torch.utils.checkpoint`),
so only its hidden states are saved and its logits are computed again when its gradient
is; a single chunk (within the bound) is kept, which saves the head's second pass. The
teacher's side can also come from a cache of its top-k logits (`teacher.TeacherTopK`),
so that students trained on the same windows share one teacher pass. The loss is taken
in float32 whatever the models' dtype, as a sum over tokens.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunetune.evaluators.perplexity import hidden_states, logit_chunks


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
    does not run at all. `chunks` row chunks (default: as few as `logit_chunks` allows for
    the heads' logits together); with more than one, each is recomputed in the backward
    pass instead of kept.
    """
    student_hidden = hidden_states(student, ids)[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].reshape(-1)
    student_head = student.get_output_embeddings()
    if teacher_top is not None:
        values, index = (t.flatten(0, 1) for t in teacher_top)
        count = chunks or logit_chunks(targets.numel(), student.config.vocab_size)
        run = checkpointed if count > 1 else direct
        parts = [run(cached_chunk_loss, student_head, s, v, i, y, temperature, lm_weight)
                 for s, v, i, y in zip(*(t.tensor_split(count) for t in
                                         (student_hidden, values, index, targets)))]
        return torch.stack(parts).sum()
    with torch.no_grad():
        teacher_hidden = hidden_states(teacher, ids)[:, :-1].flatten(0, 1)
    heads = (teacher.get_output_embeddings(), student_head)
    count = chunks or logit_chunks(targets.numel(), 2 * student.config.vocab_size)
    run = checkpointed if count > 1 else direct
    parts = [run(chunk_loss, *heads, t, s, y, temperature, top_k, lm_weight)
             for t, s, y in zip(teacher_hidden.tensor_split(count),
                                student_hidden.tensor_split(count), targets.tensor_split(count))]
    return torch.stack(parts).sum()


def checkpointed(function: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """`function(*args)`, its intermediates (a chunk's logits) recomputed for backward."""
    return checkpoint(function, *args, use_reentrant=False)


def direct(function: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """`function(*args)`, its intermediates kept for backward (one chunk: it fits)."""
    return function(*args)


def chunk_loss(teacher_head: nn.Module, student_head: nn.Module, teacher_hidden: torch.Tensor,
               student_hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
               top_k: int | None, lm_weight: float) -> torch.Tensor:
    """`distill_loss_sum` of one chunk of rows, from the hidden states of both models."""
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden).float()
    student_logits = student_head(student_hidden).float()
    loss = kl_sum(teacher_logits, student_logits, temperature, top_k)
    return loss + lm_term(student_logits, targets, lm_weight)


def cached_chunk_loss(student_head: nn.Module, student_hidden: torch.Tensor,
                      teacher_values: torch.Tensor, teacher_index: torch.Tensor,
                      targets: torch.Tensor, temperature: float,
                      lm_weight: float) -> torch.Tensor:
    """`distill_loss_sum` of one chunk of rows against the teacher's cached top-k logits."""
    student_logits = student_head(student_hidden).float()
    loss = top_k_kl_sum(teacher_values, teacher_index, student_logits, temperature)
    return loss + lm_term(student_logits, targets, lm_weight)


def lm_term(student_logits: torch.Tensor, targets: torch.Tensor,
            lm_weight: float) -> torch.Tensor | float:
    """`lm_weight` times the student's cross-entropy of the text, summed (0 when unweighted)."""
    if not lm_weight:
        return 0.0
    return lm_weight * F.cross_entropy(student_logits, targets, reduction="sum")


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
           top_k: int | None) -> torch.Tensor:
    """`temperature**2` times the KL divergence of teacher and student, summed over rows."""
    if top_k is not None:
        return top_k_kl_sum(*teacher_logits.topk(top_k, dim=-1), student_logits, temperature)
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
    return temperature ** 2 * kl


def top_k_kl_sum(teacher_top: torch.Tensor, index: torch.Tensor,
                 student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`kl_sum` over the teacher's top-k tokens only: its probabilities renormalised over
    them (`teacher_top`, their logits, at token ids `index`), against the student's
    log-probabilities of those tokens."""
    teacher_logp = F.log_softmax(teacher_top.float() / temperature, dim=-1)
    student_logp = F.log_softmax(student_logits / temperature, dim=-1).gather(-1, index.long())
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
    return temperature ** 2 * kl
