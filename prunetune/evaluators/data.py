"""The evaluation data: the corpora and tasks shipped with prunetune, or the user's own.

The default data — WikiText-2 test and validation text (tokenized and raw) and the PIQA
validation split — ships inside the package, in `prunetune/data/` beside its licences,
so a search runs on any machine with nothing but the installed package. `$PRUNETUNE_DATA`
names another folder of the same layout to read instead (a shared mount, say), and a
spec may name any text file or Hugging Face dataset.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

DATA_ENV = "PRUNETUNE_DATA"

PACKAGE_DATA = Path(__file__).resolve().parent.parent / "data"
"""The data shipped with the package (`prunetune/data/`), read when `$PRUNETUNE_DATA` is unset."""

TEXT_SOURCES = {
    "wikitext2": "wikitext-2/test.txt",
    "wikitext2:test": "wikitext-2/test.txt",
    "wikitext2:valid": "wikitext-2/valid.txt",
    "wikitext2-raw": "wikitext-2-raw/test.txt",
    "wikitext2-raw:test": "wikitext-2-raw/test.txt",
    "wikitext2-raw:valid": "wikitext-2-raw/valid.txt",
}
"""Named corpora, and their files in the data folder."""


def data_dir() -> Path:
    """The folder named data is read from: `$PRUNETUNE_DATA` if set, else the package's own."""
    configured = os.environ.get(DATA_ENV)
    if not configured:
        return PACKAGE_DATA
    path = Path(configured).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{DATA_ENV}={configured!r} is not a directory: point it at a folder that holds "
            "wikitext-2/ and piqa/, or unset it to read the data shipped with prunetune"
        )
    return path


def data_file(name: str, relative: str) -> Path:
    """The file that holds `relative` (`wikitext-2/test.txt`, say) in the data folder, as it
    is or gzip-compressed (`.gz`). `name` is the data a spec asked for, for the error."""
    try:
        folder = data_dir()
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name!r} reads {relative}, and {err}") from None
    for path in (folder / relative, folder / f"{relative}.gz"):
        if path.is_file():
            return path
    configured = os.environ.get(DATA_ENV)
    where = f"{DATA_ENV}={configured!r}" if configured else f"the prunetune package ({folder})"
    raise FileNotFoundError(f"{name!r} reads {relative}, and {where} has no such file "
                            f"(nor {relative}.gz)")


def read_text(path: Path) -> str:
    """The UTF-8 text of a file, decompressed when its name ends in `.gz`."""
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.read()
    return path.read_text(encoding="utf-8")


def text_file(source: str) -> Path | None:
    """The file a text source names, or None for a Hugging Face dataset.

    `source` is one of `TEXT_SOURCES` (a file of `data_dir()`), a path to a text file, or,
    when the `datasets` package is installed, a dataset `name/config:split`. Raises
    FileNotFoundError, naming the options, for anything else; nothing is read.
    """
    if source in TEXT_SOURCES:
        return data_file(source, TEXT_SOURCES[source])
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if importlib.util.find_spec("datasets") is not None and is_dataset_name(source):
        return None
    raise FileNotFoundError(
        f"unknown text source {source!r}: give a path to a text file, one of "
        f"{', '.join(TEXT_SOURCES)}, or a Hugging Face dataset 'name/config:split' "
        "(that needs `pip install datasets`)"
    )


def load_text(source: str) -> str:
    """The text of a corpus for perplexity (see `text_file` for the sources).

    A Hugging Face dataset's `text` column is joined by blank lines.
    """
    path = text_file(source)
    return "\n\n".join(dataset_texts(source)) if path is None else read_text(path)


def is_dataset_name(source: str) -> bool:
    """Whether `source` has the form of a Hugging Face dataset `name/config:split` (and is
    not a path that exists)."""
    return "/" in source and ":" in source and not Path(source).expanduser().exists()


def dataset_texts(source: str) -> list[str]:
    """The `text` column of a Hugging Face dataset split `name/config:split`, row by row."""
    import datasets

    name_config, split = source.rsplit(":", 1)
    name, config = name_config.rsplit("/", 1)
    rows = datasets.load_dataset(name, config, split=split)
    if "text" not in rows.column_names:
        raise ValueError(
            f"dataset {source!r} has no 'text' column (columns: {', '.join(rows.column_names)})"
        )
    return list(rows["text"])


def token_windows(tokenizer: Any, source: str, seq_len: int, count: int,
                  vocab_size: int) -> torch.Tensor:
    """`count` windows of `seq_len` tokens of the text `source`; for a model with random
    weights (no tokenizer), random tokens, the same in every process."""
    from prunetune.evaluators.perplexity import random_windows, tokenize_windows

    if tokenizer is None:
        return random_windows(vocab_size, count, seq_len)
    return tokenize_windows(tokenizer, load_text(source), seq_len, count)

