"""Perplexity of a causal language model on fixed windows of a corpus.

A search scores thousands of sub-networks on the same windows, so the corpus is
tokenized once into a tensor of windows, and scoring keeps memory flat: the decoder
runs on a batch, and the vocabulary projection runs on bounded chunks of its hidden
states, so float32 logits of a whole batch never exist at once. The loss is taken in
float32 whatever the model's dtype, as a sum over tokens, so every token weighs the same.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.evaluators.norms import fused_norms

LOGIT_CHUNK_ELEMENTS = 2**25
"""Float32 logits computed at once (128 MiB), which bounds the memory of the loss."""


def tokenize_windows(
    tokenizer: Any, text: str, seq_len: int, max_windows: int | None = None
) -> torch.LongTensor:
    """Non-overlapping windows `[n, seq_len]` of the tokenized corpus.

    The corpus is tokenized once, without special tokens, and cut into consecutive
    windows; the last partial window is dropped, and at most `max_windows` are kept.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False,
                    verbose=False)["input_ids"]
    return cut_windows(ids, seq_len, max_windows)


def cut_windows(ids: list[int], seq_len: int, max_windows: int | None = None) -> torch.LongTensor:
    """Consecutive windows `[n, seq_len]` of the token ids; the last partial window is
    dropped, and at most `max_windows` are kept."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 to score a token, got {seq_len}")
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(
            f"the text has {len(ids)} tokens, fewer than one window of {seq_len}"
        )
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def random_windows(vocab_size: int, count: int, seq_len: int, seed: int = 0) -> torch.LongTensor:
    """Windows of random tokens `[count, seq_len]`, the same for a seed on every process:
    the data of a model with random weights, whose numbers only time the evaluation."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, seq_len), generator=generator)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter, where its inputs go."""
    return next(model.parameters()).device


def hidden_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
    use_cache: bool = False,
) -> torch.Tensor:
    """The decoder's final hidden states `[batch, len, hidden]`, before the LM head.

    With `use_cache`, the forward pass fills a throw-away key-value cache (tensors that
    training saves for its backward pass anyway). Without a cache and a mask, transformers
    checks the positions for packed sequences, which reads a value back to the host: a
    host-device synchronisation in every forward pass, which a training step avoids.
    The norms run fused (`norms.fused_norms`).
    """
    with fused_norms(model):
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                               use_cache=use_cache)
    return out.last_hidden_state


def logit_chunks(rows: int, vocab_size: int, elements: int = LOGIT_CHUNK_ELEMENTS) -> int:
    """Chunks of `rows` LM-head rows that keep each chunk's float32 logits within
    `elements` (at least one)."""
    return max(1, math.ceil(rows / max(1, elements // vocab_size)))


def token_logprobs(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   chunks: int | None = None) -> torch.Tensor:
    """Float32 log-probability of each target `[n]` given its hidden state `[n, hidden]`.

    The LM head runs on `chunks` row chunks (default: as few as `logit_chunks` allows),
    so at most `LOGIT_CHUNK_ELEMENTS` float32 logits exist at a time. A fixed `chunks`
    makes every call run the head the same number of times whatever `n` is, which
    ZeRO-3 needs (it gathers a module's weights collectively on every call). Chunks stay
    3-D (`[1, rows, hidden]`), because AutoTP's split LM head slices its input that way.
    """
    head = model.get_output_embeddings()
    count = chunks or logit_chunks(hidden.shape[0], model.config.vocab_size)
    parts = [-F.cross_entropy(head(h.unsqueeze(0)).squeeze(0).float(), t, reduction="none")
             for h, t in zip(hidden.tensor_split(count), targets.tensor_split(count))]
    return torch.cat(parts)


def window_nll_sums(model: nn.Module, ids: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """The negative log-likelihood (float64) of every next token of windows `ids`, summed
    per window: `[batch]`."""
    hidden = hidden_states(model, ids)[:, :-1].flatten(0, 1)
    logprobs = token_logprobs(model, hidden, ids[:, 1:].reshape(-1), chunks)
    return -logprobs.view(ids.shape[0], -1).sum(1, dtype=torch.float64)


def nll_sum(model: nn.Module, ids: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """The summed negative log-likelihood (float64) of every next token of windows `ids`."""
    return window_nll_sums(model, ids, chunks).sum()


class WindowLoss(nn.Module):
    """`nll_sum` of a batch of windows as one module call, with a fixed number of chunks.

    Under ZeRO-3 it is the DeepSpeed engine's top module, so every call is one step, and
    the fixed chunk count makes every rank run the same module calls in the same order.
    """

    def __init__(self, model: nn.Module, chunks: int) -> None:
        super().__init__()
        self.model = model
        self.chunks = chunks

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nll_sum(self.model, ids, self.chunks)


def window_tokens(windows: torch.Tensor) -> int:
    """Tokens scored in windows `[n, seq_len]`: every one but the first of each window."""
    return windows.shape[0] * (windows.shape[1] - 1)


def perplexity_metrics(nll_total: float, tokens: int) -> dict[str, float]:
    """`perplexity`, `nll` (mean per token) and `tokens` from a loss sum over `tokens`."""
    nll = nll_total / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}


def window_span(windows: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    """The windows `[start, stop)` of `span` (all of them for None): the fidelity a
    multi-fidelity search scores a sub-network at."""
    if span is None:
        return windows
    start, stop = span
    if not 0 <= start < stop <= windows.shape[0]:
        raise ValueError(f"window span {list(span)} is not within the {windows.shape[0]} "
                         "evaluation windows")
    return windows[start:stop]


def nll_per_window(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """The summed negative log-likelihood of each window's tokens `[n]` (float64, on the CPU).

    Windows are scored in batches of `batch_size`; each loss is a sum over its own window,
    so the losses of any windows add up to the loss of all of them: a multi-fidelity
    search scores the first windows, then only the rest.
    """
    if windows.dim() != 2 or windows.shape[1] < 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be [n >= 1, seq_len >= 2], got {tuple(windows.shape)}")
    device = model_device(model)
    with torch.inference_mode():
        sums = [window_nll_sums(model, batch.to(device, non_blocking=True))
                for batch in windows.split(batch_size)]
    return torch.cat(sums).cpu()


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
    """Perplexity of `model` on `windows` `[n, seq_len]`, each token predicted from its window.

    Returns `perplexity`, `nll` (mean negative log-likelihood per token) and `tokens`
    (tokens scored: `n * (seq_len - 1)`).
    """
    total = nll_per_window(model, windows, batch_size).sum().item()
    return perplexity_metrics(total, window_tokens(windows))
