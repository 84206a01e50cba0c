"""Find and read the evaluation data: the shared data folder, corpora for perplexity.

The data is never copied into the repository or the package: evaluators read it from
`$PRUNETUNE_DATA`, or from a `shared/data` folder next to the checkout, so every machine
that mounts the shared folder scores the same bytes.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DATA_ENV = "PRUNETUNE_DATA"

WIKITEXT2_FILES = {
    "wikitext2": "wikitext-2/test.txt",
    "wikitext2:test": "wikitext-2/test.txt",
    "wikitext2:valid": "wikitext-2/valid.txt",
}


def data_dir() -> Path:
    """The folder that holds the shared evaluation data.

    `$PRUNETUNE_DATA` if set; otherwise the first `shared/data` folder found walking up
    from the current directory, then from this package's location.
    """
    configured = os.environ.get(DATA_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{DATA_ENV}={configured!r} is not a directory")
        return path
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    raise FileNotFoundError(
        "no evaluation data found: no shared/data folder above the current directory or "
        f"the prunetune package; set {DATA_ENV} to the folder that holds wikitext-2/ and "
        "piqa/, or give the evaluation data as a file path in the spec"
    )


def load_text(source: str) -> str:
    """The text of a corpus for perplexity.

    `source` is a path to a text file; `wikitext2` (the test split), `wikitext2:test` or
    `wikitext2:valid` in `data_dir()`; or, when the `datasets` package is installed, a
    Hugging Face dataset `name/config:split` whose `text` column is joined by blank lines.
    """
    if source in WIKITEXT2_FILES:
        return _read(data_dir() / WIKITEXT2_FILES[source])
    path = Path(source).expanduser()
    if path.is_file():
        return _read(path)
    if importlib.util.find_spec("datasets") is not None and ":" in source and "/" in source:
        return _hf_dataset_text(source)
    raise FileNotFoundError(
        f"unknown text source {source!r}: give a path to a text file, one of "
        f"{', '.join(WIKITEXT2_FILES)}, or a Hugging Face dataset 'name/config:split' "
        "(that needs `pip install datasets`)"
    )


def _read(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"evaluation text file not found: {path}")
    return path.read_text(encoding="utf-8")


def _hf_dataset_text(source: str) -> str:
    """The `text` column of a Hugging Face dataset split, joined by blank lines."""
    import datasets

    name_config, split = source.rsplit(":", 1)
    name, config = name_config.rsplit("/", 1)
    rows = datasets.load_dataset(name, config, split=split)
    if "text" not in rows.column_names:
        raise ValueError(
            f"dataset {source!r} has no 'text' column (columns: {', '.join(rows.column_names)})"
        )
    return "\n\n".join(rows["text"])


def token_windows(tokenizer: Any, source: str, seq_len: int, count: int,
                  vocab_size: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens of the text `source`; for a model with random
    weights (no tokenizer), random tokens, the same in every process."""
    from prunetune.evaluators.perplexity import random_windows, tokenize_windows

    if tokenizer is None:
        return random_windows(vocab_size, count, seq_len)
    return tokenize_windows(tokenizer, load_text(source), seq_len, count)

