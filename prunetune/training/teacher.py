"""The teacher's top-k next-token logits over the training windows, computed once.

Distillation over the teacher's `top_k` tokens needs, of the teacher, only its `k` largest
logits at every position and their token ids. Computed once for a set of windows, they
serve every student trained on those windows (every point of a front, every recipe of a
benchmark): a student's step then runs no teacher at all, and costs what a plain training
step of the student costs plus the KL term. Held in host memory, in bfloat16 and int32:
6 bytes per value, `windows * (seq_len - 1) * k` values (2M tokens at k = 64: 0.8 GB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunetune.evaluators.perplexity import hidden_states, logit_chunks, model_device
from prunetune.training.data import to_device


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's `k` largest logits `values` and their token ids `indices`, each
    `[windows, seq_len - 1, k]`, at every predicted position of the training windows."""

    values: torch.Tensor
    indices: torch.Tensor

    @property
    def k(self) -> int:
        """Logits kept per position."""
        return self.values.shape[-1]

    def rows(self, windows: torch.Tensor,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached logits and ids of the windows at positions `windows`, on `device`."""
        return to_device(self.values[windows], device), to_device(self.indices[windows], device)


@torch.no_grad()
def teacher_top_k(teacher: nn.Module, windows: torch.Tensor, k: int, batch: int = 8,
                  store: torch.device | str = "cpu") -> TeacherTopK:
    """The teacher's top-`k` logits at every position of `windows` `[n, seq_len]`, computed
    `batch` windows at a time on the teacher's device (bf16 autocast on GPU, as training),
    its LM head in row chunks of bounded logits; kept on `store` (host memory for a cache
    of many windows, the device for one batch's)."""
    teacher.eval()
    device = model_device(teacher)
    head = teacher.get_output_embeddings()
    n, length = windows.shape
    values = torch.empty(n, length - 1, k, dtype=torch.bfloat16, device=store)
    indices = torch.empty(n, length - 1, k, dtype=torch.int32, device=store)
    for start in range(0, n, batch):
        ids = windows[start:start + batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = hidden_states(teacher, ids)[:, :-1].flatten(0, 1)
            count = logit_chunks(hidden.shape[0], teacher.config.vocab_size)
            tops = [head_top_k(head, part, k) for part in hidden.tensor_split(count)]
        shape = (len(ids), length - 1, k)
        values[start:start + batch] = torch.cat([v for v, _ in tops]).view(shape)
        indices[start:start + batch] = torch.cat([i for _, i in tops]).view(shape)
    return TeacherTopK(values, indices)


def head_top_k(head: nn.Module, hidden: torch.Tensor,
               k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `k` largest logits of LM `head` at each row of `hidden`, in float32, and their
    token ids: what the cache keeps and what a live top-k teacher computes, taken alike so
    that ties between logits resolve alike. The selection runs in the head's dtype (bf16
    under autocast), which holds every logit exactly, without a float32 copy of them all."""
    values, index = head(hidden).topk(k, dim=-1)
    return values.float(), index
