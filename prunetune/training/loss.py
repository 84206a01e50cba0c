"""The distillation loss: KL divergence to the teacher's next-token distribution, chunked.

Both models' logits are `[tokens, vocab]` each (49k columns for SmolLM2, 128k for Llama 3),
so the loss runs the two LM heads on chunks of rows, as `perplexity.token_logprobs` does,
with the same bound on float32 logits per chunk. A chunk's logits are not kept for the
backward pass: each chunk is checkpointed (`torch.utils.checkpoint`), so only its hidden
states are saved and its logits are computed again when its gradient is. The loss is taken
in float32 whatever the models' dtype, as a sum over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prunetune.evaluators.perplexity import hidden_states, logit_chunks


def distill_loss_sum(teacher: nn.Module, student: nn.Module, ids: torch.Tensor,
                     temperature: float = 1.0, top_k: int | None = None,
                     lm_weight: float = 0.0, chunks: int | None = None) -> torch.Tensor:
    """The distillation loss of every next token of windows `ids` `[batch, len]`, summed.

    Per token: `temperature**2 * KL(teacher || student)` of the distributions at
    `temperature` (with `top_k`, the teacher's probabilities renormalised over its `top_k`
    most likely tokens, against the student's log-probabilities of those tokens), plus
    `lm_weight` times the student's cross-entropy of the actual next token. The teacher
    runs without gradient; `chunks` row chunks (default: as few as `logit_chunks` allows
    for the two heads' logits together).
    """
    with torch.no_grad():
        teacher_hidden = hidden_states(teacher, ids)[:, :-1].flatten(0, 1)
    student_hidden = hidden_states(student, ids)[:, :-1].flatten(0, 1)
    targets = ids[:, 1:].reshape(-1)
    heads = (teacher.get_output_embeddings(), student.get_output_embeddings())
    count = chunks or logit_chunks(targets.numel(), 2 * heads[0].weight.shape[0])
    parts = [checkpoint(chunk_loss, *heads, t, s, y, temperature, top_k, lm_weight,
                        use_reentrant=False)
             for t, s, y in zip(teacher_hidden.tensor_split(count),
                                student_hidden.tensor_split(count), targets.tensor_split(count))]
    return torch.stack(parts).sum()


def chunk_loss(teacher_head: nn.Module, student_head: nn.Module, teacher_hidden: torch.Tensor,
               student_hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
               top_k: int | None, lm_weight: float) -> torch.Tensor:
    """`distill_loss_sum` of one chunk of rows, from the hidden states of both models."""
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden).float()
    student_logits = student_head(student_hidden).float()
    loss = kl_sum(teacher_logits, student_logits, temperature, top_k)
    if lm_weight:
        loss = loss + lm_weight * F.cross_entropy(student_logits, targets, reduction="sum")
    return loss


def kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float,
           top_k: int | None) -> torch.Tensor:
    """`temperature**2` times the KL divergence of teacher and student, summed over rows."""
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)
    if top_k is None:
        teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    else:
        top, index = teacher_logits.topk(top_k, dim=-1)
        teacher_logp = F.log_softmax(top / temperature, dim=-1)
        student_logp = student_logp.gather(-1, index)
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum")
    return temperature ** 2 * kl
