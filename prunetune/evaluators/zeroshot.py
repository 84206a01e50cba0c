"""Zero-shot multiple-choice accuracy, scored by log-likelihood as lm-evaluation-harness does.

Each choice is scored by the summed log-probability of its continuation tokens given the
context, with the harness's tokenization (trailing whitespace of the context moves onto
the continuation; the continuation tokens are the tail of the joint encoding), so the
numbers compare with `lm_eval --tasks piqa` at zero shots. `acc` picks the most likely
choice; `acc_norm` divides each log-likelihood by the choice's length in characters.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from prunetune.evaluators.data import data_file, read_text
from prunetune.evaluators.perplexity import (
    hidden_states, logit_chunks, model_device, token_logprobs,
)

BUILTIN_TASKS = ("piqa",)

PIQA_FILES = ("piqa/valid.jsonl", "piqa/valid-labels.lst")
"""The PIQA validation split in the data folder: questions, and the labels aligned with them."""


@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    The continuation of choice i is `target_delimiter + choices[i]`; `acc_norm` counts
    the characters of `choices[i]` alone, as the harness does.
    """

    context: str
    choices: tuple[str, ...]
    label: int
    target_delimiter: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2:
            raise ValueError(f"an item needs at least 2 choices, got {len(self.choices)}")
        if not all(self.choices):
            raise ValueError("choices must be non-empty strings (acc_norm divides by their length)")
        if not 0 <= self.label < len(self.choices):
            raise ValueError(f"label {self.label} is not a choice index of {len(self.choices)}")

    def continuations(self) -> list[str]:
        """The strings scored after the context, one per choice."""
        return [self.target_delimiter + choice for choice in self.choices]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as the harness splits them.

    An empty context becomes the BOS token (EOS when there is none), so that the first
    continuation token is scored too.
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context) if context else []
    continuation_ids = whole[len(context_ids):]
    if not continuation_ids:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    if not context_ids:
        bos = tokenizer.bos_token_id
        context_ids = [bos if bos is not None else tokenizer.eos_token_id]
    return context_ids, continuation_ids


@functools.lru_cache(maxsize=2**18)
def _encoded_pair(
    tokenizer: Any, context: str, continuation: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`encode_pair`, remembered: every evaluation of a search scores the same items."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    return tuple(context_ids), tuple(continuation_ids)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def loglikelihoods(
    model: nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]], batch_size: int = 16
) -> list[float]:
    """log P(continuation | context) for each (context, continuation) request, split into
    tokens as the harness does (`encode_pair`) and scored by `token_loglikelihoods`."""
    pairs = [_encoded_pair(tokenizer, c, x) for c, x in requests]
    return [ll for ll, _ in token_loglikelihoods(model, pairs, batch_size)]


def token_loglikelihoods(
    model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16, greedy: bool = False,
) -> list[tuple[float, bool | None]]:
    """(log P(continuation | context), is_greedy) for each (context, continuation) pair of
    token ids.

    `is_greedy` says whether greedy decoding from the context produces the whole
    continuation, the flag lm-eval's `loglikelihood` returns beside the score. It costs a
    second pass of the LM head over the continuation, so it is computed only with `greedy`
    (None otherwise). Requests are sorted by length and scored in right-padded batches; a
    request longer than the model's context window loses tokens from the left of its context.
    """
    max_len = getattr(model.config, "max_position_embeddings", None)
    encoded = [_truncate(tuple(c), tuple(x), max_len) for c, x in pairs]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    scores: list[tuple[float, bool | None]] = [(0.0, None)] * len(encoded)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            for i, score in zip(batch, _score_batch(model, [encoded[i] for i in batch], greedy)):
                scores[i] = score
    return scores


def _truncate(
    context: tuple[int, ...], continuation: tuple[int, ...], max_len: int | None
) -> tuple[tuple[int, ...], int]:
    """The tokens to feed plus the last one, and how many of them are the continuation."""
    tokens = context + continuation
    if max_len is not None:
        if len(continuation) > max_len:
            raise ValueError(
                f"a continuation of {len(continuation)} tokens exceeds the model's "
                f"context window of {max_len}"
            )
        tokens = tokens[-(max_len + 1):]
    return tokens, len(continuation)


def _score_batch(
    model: nn.Module, requests: list[tuple[tuple[int, ...], int]], greedy: bool
) -> list[tuple[float, bool | None]]:
    """Summed continuation log-probabilities of one right-padded batch, and with `greedy`
    whether every continuation token is the model's most likely one."""
    width = max(len(tokens) for tokens, _ in requests) - 1
    ids = torch.zeros(len(requests), width, dtype=torch.long)
    mask = torch.zeros(len(requests), width, dtype=torch.long)
    rows, cols, targets = [], [], []
    for r, (tokens, n_cont) in enumerate(requests):
        length = len(tokens) - 1
        ids[r, :length] = torch.tensor(tokens[:-1])
        mask[r, :length] = 1
        rows += [r] * n_cont
        cols += range(length - n_cont, length)
        targets += tokens[-n_cont:]
    device = model_device(model)
    hidden = hidden_states(model, ids.to(device), mask.to(device))
    rows_t = torch.tensor(rows, device=device)
    targets_t = torch.tensor(targets, device=device)
    cont_hidden = hidden[rows_t, torch.tensor(cols, device=device)]
    logprobs = token_logprobs(model, cont_hidden, targets_t)
    sums = torch.zeros(len(requests), dtype=torch.float64, device=device)
    sums = sums.index_add_(0, rows_t, logprobs.double()).tolist()
    if not greedy:
        return [(s, None) for s in sums]
    misses = torch.zeros(len(requests), dtype=torch.long, device=device)
    misses.index_add_(0, rows_t, (_most_likely_tokens(model, cont_hidden) != targets_t).long())
    return list(zip(sums, (misses == 0).tolist()))


def _most_likely_tokens(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's argmax for each hidden state `[n, hidden]`, on the row chunks
    `token_logprobs` uses (`logit_chunks`)."""
    head = model.get_output_embeddings()
    chunks = logit_chunks(hidden.shape[0], head.weight.shape[0])
    return torch.cat([head(h).argmax(-1) for h in hidden.tensor_split(chunks)])


def choice_loglikelihoods(
    model: nn.Module, tokenizer: Any, items: Sequence[Item], batch_size: int = 16
) -> list[list[float]]:
    """The log-likelihood of every choice of every item."""
    requests = [(item.context, cont) for item in items for cont in item.continuations()]
    flat = loglikelihoods(model, tokenizer, requests, batch_size)
    out, start = [], 0
    for item in items:
        out.append(flat[start:start + len(item.choices)])
        start += len(item.choices)
    return out


def accuracy(items: Sequence[Item], lls: Sequence[Sequence[float]]) -> dict[str, float]:
    """`acc` and `acc_norm` of per-choice log-likelihoods (ties go to the first choice)."""
    if not items:
        raise ValueError("no items to score")
    acc = acc_norm = 0
    for item, scores in zip(items, lls, strict=True):
        normed = [s / len(choice) for s, choice in zip(scores, item.choices)]
        acc += _argmax(scores) == item.label
        acc_norm += _argmax(normed) == item.label
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items)}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def evaluate_tasks(
    model: nn.Module, tokenizer: Any, tasks: dict[str, Sequence[Item]], batch_size: int = 16
) -> dict[str, float]:
    """`acc_<task>` and `acc_norm_<task>` for each task, and `acc_avg`, the mean of the accs."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    metrics: dict[str, float] = {}
    for name, items in tasks.items():
        scores = accuracy(items, choice_loglikelihoods(model, tokenizer, items, batch_size))
        metrics[f"acc_{name}"] = scores["acc"]
        metrics[f"acc_norm_{name}"] = scores["acc_norm"]
    metrics["acc_avg"] = sum(metrics[f"acc_{name}"] for name in tasks) / len(tasks)
    return metrics


def task_files(name: str) -> tuple[Path, ...]:
    """The files a task reads, found but not read: PIQA's in the data folder, or the
    task's own `.jsonl` file. An unknown task or a missing file raises, naming it."""
    if name == "piqa":
        return tuple(data_file(name, relative) for relative in PIQA_FILES)
    if name.endswith(".jsonl"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task file not found: {name}")
        return (path,)
    raise ValueError(
        f"unknown task {name!r}: available tasks are {', '.join(BUILTIN_TASKS)}, or a "
        'path to an existing .jsonl file of {"context", "choices", "label"} lines'
    )


def load_task(name: str, limit: int | None = None) -> list[Item]:
    """The items of a task: `piqa` (validation split, shipped with prunetune), or a `.jsonl` file.

    A task file holds one item per line: {"context", "choices", "label"} and optionally
    "target_delimiter". `limit` keeps the first items, as the harness's `--limit` does.
    """
    if name == "piqa":
        items = [_piqa_item(doc) for doc in piqa_documents()]
    else:
        items = _load_jsonl(task_files(name)[0])
    return items if limit is None else items[:limit]


def piqa_documents() -> list[dict[str, Any]]:
    """PIQA's validation split (shipped, or from `$PRUNETUNE_DATA`): {"goal", "sol1",
    "sol2", "label"}.

    These are the documents of lm-eval's `piqa` task; the labels, a separate file aligned
    line by line with the questions, become each document's int `label`.
    """
    questions, labels = task_files("piqa")
    docs = _read_jsonl(questions)
    answers = read_text(labels).split()
    if len(answers) != len(docs):
        raise ValueError(f"{labels}: {len(answers)} labels for the {len(docs)} questions "
                         f"of {questions}")
    return [{**doc, "label": int(label)} for doc, label in zip(docs, answers)]


def _piqa_item(doc: dict[str, Any]) -> Item:
    """A PIQA document in the harness's prompt: "Question: {goal}\nAnswer:" then " " + solution."""
    context = f"Question: {doc['goal']}\nAnswer:"
    return Item(context, (doc["sol1"], doc["sol2"]), doc["label"], target_delimiter=" ")


def _load_jsonl(path: Path) -> list[Item]:
    items = []
    for line_no, row in enumerate(_read_jsonl(path), start=1):
        missing = {"context", "choices", "label"} - row.keys()
        if missing:
            raise ValueError(f"{path}:{line_no}: missing field(s) {', '.join(sorted(missing))}")
        try:
            items.append(Item(row["context"], row["choices"], int(row["label"]),
                              row.get("target_delimiter", "")))
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: {err}") from err
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]
