"""Recovery by distillation: the training text and the settings."""

from __future__ import annotations

import gzip
import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

from char_tokenizer import CharTokenizer
from prunetune.training.data import epoch_order, training_documents, training_windows, window_indices
from prunetune.training.settings import DistillSettings

def test_documents_are_packed_with_an_end_of_sequence_token(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abcdef")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("ghij")
    (tmp_path / "notes.md").write_text("not training text")
    packed = training_windows(CharTokenizer(), str(tmp_path), seq_len=4)
    eos = CharTokenizer.eos_token_id
    expected = [ord(c) - 32 for c in "abcdef"] + [eos] + [ord(c) - 32 for c in "ghij"] + [eos]
    assert packed.tolist() == [expected[0:4], expected[4:8], expected[8:12]]


@pytest.mark.parametrize("source", ["wikitext2", "wikitext2:test", "wikitext2:valid",
                                    "allenai/c4/en:validation", "wikitext/wikitext-2-raw-v1:test"])
def test_evaluation_data_is_refused_for_training(source: str) -> None:
    with pytest.raises(ValueError, match="is evaluation data"):
        training_documents(source)


def test_a_dataset_split_gives_one_document_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def load_dataset(name: str, config: str, split: str) -> Rows:
        calls.append((name, config, split))
        return Rows(text=["first", "", "second"])

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert training_documents("org/corpus/en:train") == ["first", "second"]
    assert calls == [("org/corpus", "en", "train")]


class Rows(dict):
    """What `datasets.load_dataset` returns, as far as training reads it."""

    @property
    def column_names(self) -> list[str]:
        return list(self)


def test_the_shipped_corpus_is_six_public_domain_novels() -> None:
    books = training_documents("gutenberg")
    assert len(books) == 6 and all(len(book) > 100_000 for book in books)
    assert any(book.startswith("It is a truth universally acknowledged") for book in books)
    assert not any("Project Gutenberg" in book for book in books)


def test_windows_are_visited_in_a_seeded_order_each_epoch_a_permutation() -> None:
    order = window_indices(10, seed=3, start=0, size=25)
    assert sorted(order[:10].tolist()) == list(range(10)) == sorted(order[10:20].tolist())
    assert order.tolist() == window_indices(10, seed=3, start=0, size=25).tolist()
    assert order[7:19].tolist() == window_indices(10, seed=3, start=7, size=12).tolist()
    assert order[:10].tolist() != order[10:20].tolist()
    assert epoch_order(10, 3, 0).tolist() != epoch_order(10, 4, 0).tolist()


@pytest.mark.parametrize("field, value, message", [
    ("tokens", 0, "distill.tokens must be at least 1"),
    ("lr", 0.0, "distill.lr must be positive"),
    ("warmup", 1.0, "distill.warmup is a fraction"),
    ("top_k", 0, "distill.top_k must be at least 1"),
    ("lm_weight", -1.0, "distill.lm_weight must not be negative"),
])
def test_bad_settings_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillSettings(**{field: value})
