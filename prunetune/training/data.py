"""The training text of a distillation, packed into windows, and the order they are seen in.

A student trains on text that no evaluation scores: the public-domain novels shipped in
`corpus/` (`gutenberg`, the default), a text file, a folder of text files, or a Hugging
Face dataset split. Every document is tokenized and followed by the end-of-sequence token,
and the concatenation is cut into windows of `seq_len` tokens (packing: no padding, every
token trains). Windows are visited in an order fixed by the seed, a fresh permutation each
epoch, so the batch at a position is a function of the seed alone and a resumed run sees
the batches an uninterrupted one would.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunetune.evaluators.data import TEXT_SOURCES, dataset_texts, is_dataset_name, read_text
from prunetune.evaluators.perplexity import cut_windows
from prunetune.training.settings import DEFAULT_TRAINING_TEXT

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
"""The shipped training corpus: six public-domain novels (see its README.md)."""

TEXT_SUFFIXES = (".txt", ".txt.gz")
"""The files of a folder source that are read, each one document."""

EVALUATION_SPLITS = ("test", "valid", "validation")
"""Dataset splits that evaluations score, which training refuses."""


def training_windows(tokenizer: Any, source: str, seq_len: int) -> torch.LongTensor:
    """Every packed window `[n, seq_len]` of the training text `source`."""
    return pack_documents(tokenizer, training_documents(source), seq_len)


def training_documents(source: str) -> list[str]:
    """The documents of a training text source.

    `source` is `gutenberg` (the shipped corpus), a text file (one document; `.gz` is
    decompressed), a folder (each `.txt` or `.txt.gz` file one document, in name order), or,
    when the `datasets` package is installed, a Hugging Face dataset `name/config:split`
    (each row's `text` one document). An evaluation split is refused.
    """
    refuse_evaluation_data(source)
    if source == DEFAULT_TRAINING_TEXT:
        return folder_documents(CORPUS_DIR)
    path = Path(source).expanduser()
    if path.is_dir():
        return folder_documents(path)
    if path.is_file():
        return [read_text(path)]
    if is_dataset_name(source) and importlib.util.find_spec("datasets") is not None:
        return dataset_documents(source)
    raise FileNotFoundError(
        f"unknown training data {source!r}: give {DEFAULT_TRAINING_TEXT!r} (the shipped corpus), a "
        "text file, a folder of .txt files, or a Hugging Face dataset 'name/config:split' "
        "(that needs `pip install datasets`)"
    )


def refuse_evaluation_data(source: str) -> None:
    """Raise for the evaluation corpora and for a dataset's test or validation split: a
    student distilled on them would be scored on its own training text."""
    split = source.rsplit(":", 1)[1].partition("[")[0] if is_dataset_name(source) else None
    if source in TEXT_SOURCES or split in EVALUATION_SPLITS:
        raise ValueError(
            f"training data {source!r} is evaluation data: train on {DEFAULT_TRAINING_TEXT!r}, "
            "your own text files, or a dataset's train split"
        )


def folder_documents(folder: Path) -> list[str]:
    """Every `.txt` and `.txt.gz` file of `folder`, in name order, one document each."""
    files = sorted(p for p in folder.iterdir() if p.name.endswith(TEXT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"training data folder {folder} has no .txt or .txt.gz files")
    return [read_text(path) for path in files]


def dataset_documents(source: str) -> list[str]:
    """The non-empty `text` rows of a Hugging Face dataset split `name/config:split`."""
    return [text for text in dataset_texts(source) if text]


def pack_documents(tokenizer: Any, documents: list[str], seq_len: int) -> torch.LongTensor:
    """The documents tokenized, each followed by the end-of-sequence token, concatenated
    and cut into windows `[n, seq_len]` (the last partial window is dropped)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id to end each training document with")
    ids: list[int] = []
    for document in documents:
        ids += tokenizer(document, add_special_tokens=False, return_attention_mask=False,
                         verbose=False)["input_ids"]
        ids.append(eos)
    return cut_windows(ids, seq_len)


def window_indices(count: int, seed: int, start: int, size: int) -> torch.LongTensor:
    """Which of `count` windows positions `start .. start + size - 1` of the visiting order
    hold: position p is in epoch `p // count`, whose order is a permutation drawn from
    (seed, epoch)."""
    positions = np.arange(start, start + size)
    epochs = positions // count
    out = np.empty(size, dtype=np.int64)
    for epoch in np.unique(epochs):
        here = epochs == epoch
        out[here] = epoch_order(count, seed, int(epoch))[positions[here] % count]
    return torch.from_numpy(out)


def epoch_order(count: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` visits `count` windows."""
    return np.random.default_rng([seed, epoch]).permutation(count)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`. From host memory to a GPU it goes through pinned memory
    without the host waiting for the copy, so that the copy overlaps the device's work."""
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
