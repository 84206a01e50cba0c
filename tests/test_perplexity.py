"""Evaluation data lookup and perplexity: exact against a one-window-at-a-time reference."""

from __future__ import annotations

import gzip
import importlib.machinery
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import prunetune
from prunetune.evaluators import data, perplexity as ppl
from prunetune.evaluators.data import data_dir, load_text
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.perplexity import perplexity, tokenize_windows
from char_tokenizer import CharTokenizer


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_config("llama"), seed=0)


def reference_perplexity(model, windows: torch.Tensor) -> float:
    with torch.inference_mode():
        losses = [model(w[None], labels=w[None]).loss.item() for w in windows]
    return math.exp(sum(losses) / len(losses))


def random_windows(n: int, seq_len: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7, 16])
def test_perplexity_matches_reference_loop(tiny, batch_size):
    windows = random_windows(7, 33)
    result = perplexity(tiny, windows, batch_size=batch_size)
    assert result["perplexity"] == pytest.approx(reference_perplexity(tiny, windows), rel=1e-5)
    assert result["nll"] == pytest.approx(math.log(result["perplexity"]), rel=1e-12)
    assert result["tokens"] == 7 * 32


def test_perplexity_matches_reference_loop_for_every_family(tiny_model):
    windows = random_windows(5, 24)
    result = perplexity(tiny_model, windows, batch_size=2)
    expected = reference_perplexity(tiny_model, windows)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_window_losses_add_up_to_the_loss_of_all_windows(tiny):
    """A multi-fidelity promotion scores only the windows not scored yet: the per-window
    losses of any split, in any batching, sum to the loss of the whole set."""
    windows = random_windows(7, 33)
    per_window = ppl.nll_per_window(tiny, windows, batch_size=3)
    assert per_window.shape == (7,) and per_window.dtype == torch.float64
    first, rest = ppl.nll_per_window(tiny, windows[:2], 2), ppl.nll_per_window(tiny, windows[2:], 4)
    assert torch.allclose(torch.cat([first, rest]), per_window, rtol=1e-6)
    whole = perplexity(tiny, windows, batch_size=7)
    split = ppl.perplexity_metrics(float(first.sum() + rest.sum()), ppl.window_tokens(windows))
    assert split["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert whole["perplexity"] == pytest.approx(reference_perplexity(tiny, windows), rel=1e-5)


def test_a_window_span_selects_windows_and_rejects_spans_outside_them(tiny):
    windows = random_windows(5, 9)
    assert torch.equal(ppl.window_span(windows, (1, 3)), windows[1:3])
    assert ppl.window_span(windows, None) is windows
    for bad in ((0, 6), (3, 3), (-1, 2)):
        with pytest.raises(ValueError, match="not within the 5 evaluation windows"):
            ppl.window_span(windows, bad)


def test_perplexity_in_small_logit_chunks_is_unchanged(tiny, monkeypatch):
    windows = random_windows(5, 20)
    whole = perplexity(tiny, windows, batch_size=5)
    monkeypatch.setattr(ppl, "LOGIT_CHUNK_ELEMENTS", 96 * 7)
    chunked = perplexity(tiny, windows, batch_size=5)
    assert chunked["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-6)
    assert chunked["perplexity"] == pytest.approx(reference_perplexity(tiny, windows), rel=1e-5)


def test_perplexity_of_bfloat16_model_is_taken_in_float32():
    model = random_model(tiny_config("qwen2"), seed=3, dtype=torch.bfloat16)
    windows = random_windows(2, 16)
    result = perplexity(model, windows)
    with torch.inference_mode():
        logits = model(windows).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
    assert result["nll"] == pytest.approx(nll.item(), rel=1e-5)


def test_perplexity_rejects_a_bad_window_shape(tiny):
    with pytest.raises(ValueError, match="windows"):
        perplexity(tiny, torch.zeros(4, 1, dtype=torch.long))


def test_tokenize_windows_cuts_one_tokenization_into_full_windows():
    text = "".join(chr(32 + i % 90) for i in range(1000))
    windows = tokenize_windows(CharTokenizer(), text, seq_len=64)
    assert windows.dtype == torch.long
    assert windows.shape == (1000 // 64, 64)
    expected = CharTokenizer()(text, add_special_tokens=False)["input_ids"][: 15 * 64]
    assert windows.flatten().tolist() == expected


def test_tokenize_windows_limits_the_count_and_rejects_short_text():
    text = "x" * 500
    assert tokenize_windows(CharTokenizer(), text, 100, max_windows=2).shape == (2, 100)
    assert tokenize_windows(CharTokenizer(), text, 100, max_windows=50).shape == (5, 100)
    with pytest.raises(ValueError, match="fewer than one window"):
        tokenize_windows(CharTokenizer(), text, 501)


def test_the_shipped_data_resolves_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNETUNE_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert data_dir() == data.PACKAGE_DATA
    assert data.PACKAGE_DATA.parent == Path(prunetune.__file__).parent
    assert load_text("wikitext2").startswith(" \n = Robert <unk> = \n")


def test_load_text_resolves_wikitext2_splits():
    test = load_text("wikitext2")
    assert test == load_text("wikitext2:test")
    assert len(test.splitlines()) == 4358
    valid = load_text("wikitext2:valid")
    assert valid != test and len(valid) > 1_000_000


def test_load_text_resolves_the_raw_wikitext2_splits():
    test = load_text("wikitext2-raw")
    assert test == load_text("wikitext2-raw:test")
    assert test.startswith(" \n = Robert Boulter = \n \n Robert Boulter is an English film")
    assert "<unk>" not in test and "\r" not in test and len(test.splitlines()) == 4358
    valid = load_text("wikitext2-raw:valid")
    assert valid.startswith(" \n = Homarus gammarus = \n") and len(valid.splitlines()) == 3760


def test_prunetune_data_overrides_the_shipped_data(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("plain text\n", encoding="utf-8")
    with gzip.open(tmp_path / "wikitext-2" / "valid.txt.gz", "wt", encoding="utf-8") as f:
        f.write("compressed text\n")
    monkeypatch.setenv("PRUNETUNE_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    assert load_text("wikitext2") == "plain text\n"
    assert load_text("wikitext2:valid") == "compressed text\n"


def test_a_missing_override_folder_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNETUNE_DATA", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError) as error:
        load_text("wikitext2")
    assert str(error.value) == (
        f"'wikitext2' reads wikitext-2/test.txt, and PRUNETUNE_DATA="
        f"{str(tmp_path / 'missing')!r} is not a directory: point it at a folder that holds "
        "wikitext-2/ and piqa/, or unset it to read the data shipped with prunetune")


def test_a_file_missing_from_the_override_folder_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNETUNE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        load_text("wikitext2-raw:valid")
    assert str(error.value) == (
        f"'wikitext2-raw:valid' reads wikitext-2-raw/valid.txt, and PRUNETUNE_DATA="
        f"{str(tmp_path)!r} has no such file (nor wikitext-2-raw/valid.txt.gz)")


def test_load_text_reads_a_path(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some text\n", encoding="utf-8")
    assert load_text(str(path)) == "some text\n"
    packed = tmp_path / "corpus.txt.gz"
    packed.write_bytes(gzip.compress("packed text\n".encode()))
    assert load_text(str(packed)) == "packed text\n"


def test_load_text_names_the_options_for_an_unknown_source(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(FileNotFoundError, match="wikitext2:valid.*pip install datasets"):
        load_text("wikitext/wikitext-2-raw-v1:test")


def test_load_text_reads_a_hugging_face_dataset(monkeypatch):
    calls = []

    class Rows:
        column_names = ["text"]

        def __getitem__(self, column):
            return ["first", "second"]

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return Rows()

    fake = types.ModuleType("datasets")
    fake.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_text("Salesforce/wikitext/wikitext-2-raw-v1:test") == "first\n\nsecond"
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]


def test_smollm2_perplexity_on_wikitext2_is_finite_and_far_below_chance(smollm2_loaded):
    model, tokenizer = smollm2_loaded
    windows = tokenize_windows(tokenizer, load_text("wikitext2"), seq_len=128, max_windows=2)
    result = perplexity(model, windows, batch_size=2)
    assert math.isfinite(result["perplexity"])
    assert 1.0 < result["perplexity"] < 200 < model.config.vocab_size
    assert result["tokens"] == 2 * 127

