"""Recovery by distillation: the chunked loss, the training loop, LoRA, checkpoint and resume,
and the training text."""

from __future__ import annotations

import gzip
from dataclasses import replace
import importlib.machinery
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from char_tokenizer import CharTokenizer
from prunetune.evaluators.importance import activation_scores, permute_model
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.perplexity import nll_sum, perplexity, random_windows
from prunetune.evaluators.surgery import extract
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.checkpoint import CHECKPOINT_FILE
from prunetune.training.data import (
    CORPUS_DIR, epoch_order, training_documents, training_windows, window_indices,
)
from prunetune.training import distill as distill_module
from prunetune.training.distill import distill
from prunetune.training import loss as loss_module
from prunetune.training.loss import distill_loss_sum
from prunetune.training.lora import add_lora, merge_lora
from prunetune.training.settings import DistillSettings
from prunetune.training.teacher import teacher_top_k

TESTS = Path(__file__).resolve().parent
SEQ = 32
SUBNET = SubnetConfig(layers=(0, 2), kv_heads=(1, 1), q_per_kv=(3, 3), mlp=(32, 32), embed=40)
QUICK = DistillSettings(tokens=SEQ * 8 * 12, seq_len=SEQ, micro_batch=4, accumulation=2,
                        lr=1e-2, warmup=0.1, checkpoint_every=2)
"""Twelve optimizer steps of eight windows."""


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run a hundred times faster on one thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pair(seed: int = 1) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A random dense teacher whose distributions are far from uniform, and a sub-network."""
    teacher = random_model(tiny_config(initializer_range=0.2), seed=seed)
    return teacher, extract(teacher, SUBNET)


def windows(count: int = 64) -> torch.Tensor:
    return random_windows(96, count, SEQ)


def states(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


LOSS_CASES = [(1.0, None, 0.0), (2.0, 5, 0.5), (1.0, 5, 0.3), (0.5, None, 1.0)]
"""Temperature, top-k and LM weight; a cache holds top-k logits only."""


@pytest.mark.parametrize("temperature, top_k, lm_weight, cached",
                         [(*case, False) for case in LOSS_CASES]
                         + [(*case, True) for case in LOSS_CASES if case[1] is not None])
@pytest.mark.parametrize("recomputed", [False, True])
def test_chunked_loss_equals_an_unchunked_reference(
        temperature: float, top_k: int | None, lm_weight: float, cached: bool,
        recomputed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if recomputed:
        monkeypatch.setattr(loss_module, "KEPT_GRADIENT_ELEMENTS", 0)
    teacher, student = pair()
    ids = windows(3)
    cache = teacher_top_k(teacher, ids, top_k) if cached else None
    loss = distill_loss_sum(None if cached else teacher, student, ids, temperature, top_k,
                            lm_weight, chunks=4,
                            teacher_top=cache and (cache.values, cache.indices))
    loss.backward()
    chunked = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    s_logits = student(ids).logits[:, :-1].flatten(0, 1) / temperature
    if cached:
        top, index = cache.values.flatten(0, 1).float() / temperature, cache.indices.flatten(0, 1)
    else:
        t_logits = teacher(ids).logits[:, :-1].flatten(0, 1).detach() / temperature
    if top_k is None:
        p = t_logits.softmax(-1)
        kl = (p * (p.log() - s_logits.log_softmax(-1))).sum()
    else:
        if not cached:
            top, index = t_logits.topk(top_k, -1)
        p = top.softmax(-1)
        kl = (p * (p.log() - s_logits.log_softmax(-1).gather(-1, index.long()))).sum()
    ce = F.cross_entropy(s_logits * temperature, ids[:, 1:].reshape(-1), reduction="sum")
    reference = temperature ** 2 * kl + lm_weight * ce
    reference.backward()

    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    for name, param in student.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, rtol=1e-4, atol=1e-5)


def test_kd_loss_falls_and_only_the_student_trains() -> None:
    teacher, student = pair()
    teacher_before, student_before = states(teacher), states(student)
    result = distill(teacher, student, windows(), QUICK)
    assert result.steps == QUICK.steps == 12 and result.tokens == 12 * 8 * SEQ
    assert sum(result.losses[-3:]) / 3 < 0.75 * result.losses[0]
    assert not any(p.requires_grad or p.grad is not None for p in teacher.parameters())
    for name, tensor in states(teacher).items():
        assert torch.equal(tensor, teacher_before[name]), name
    changed = [n for n, t in states(student).items() if not torch.equal(t, student_before[n])]
    assert changed == [n for n, p in student.named_parameters()]
    assert not student.training


def test_micro_batches_follow_the_seeded_window_order(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []

    def recording(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor,
                  *args: object) -> torch.Tensor:
        seen.append(ids.clone())
        return distill_loss_sum(teacher, student, ids, *args)

    monkeypatch.setattr(distill_module, "distill_loss_sum", recording)
    data = windows(20)
    settings = DistillSettings(**{**vars(QUICK), "tokens": SEQ * 8 * 3})
    distill(*pair(), data, settings)
    expected = data[window_indices(20, settings.seed, 0, 24)].split(settings.micro_batch)
    assert len(seen) == 6 and all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_a_recovered_subnetwork_beats_its_one_shot_perplexity() -> None:
    text = training_windows(CharTokenizer(), str(CORPUS_DIR / "alice-in-wonderland.txt.gz"), SEQ)
    train, held_out = text[:-64], text[-64:]
    teacher = trained_teacher(train)
    permute_model(teacher, activation_scores(teacher, train[:16]))
    student = extract(teacher, SubnetConfig(layers=(0, 1), kv_heads=(1, 1), q_per_kv=(3, 3),
                                            mlp=(32, 32), embed=32))
    dense = perplexity(teacher, held_out)["perplexity"]
    one_shot = perplexity(student, held_out)["perplexity"]
    settings = DistillSettings(tokens=SEQ * 16 * 30, seq_len=SEQ, micro_batch=8,
                               accumulation=2, lr=1e-2, warmup=0.1)
    distill(teacher, student, train, settings)
    recovered = perplexity(student, held_out)["perplexity"]
    assert dense < recovered < one_shot - 0.5 * (one_shot - dense)


def trained_teacher(train: torch.Tensor, steps: int = 80,
                    config: object | None = None) -> torch.nn.Module:
    """A tiny dense model (of `config`, default `tiny_config()`) trained on text, so that
    its sub-networks lose something real."""
    model = random_model(config or tiny_config(), seed=1).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = train[torch.randint(0, len(train), (16,), generator=generator)]
        (nll_sum(model, ids) / ids[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_lora_trains_low_rank_updates_of_the_linear_layers_only() -> None:
    teacher, student = pair()
    before = states(student)
    distill(teacher, student, windows(), DistillSettings(**{**vars(QUICK), "lora_rank": 2}))
    assert not any("lora" in name for name in student.state_dict())
    linear = {n for n, m in student.named_modules() if isinstance(m, torch.nn.Linear)
              and m is not student.get_output_embeddings()}
    for name, tensor in states(student).items():
        delta = (tensor - before[name]).double()
        if name.removesuffix(".weight") in linear:
            assert 0 < torch.linalg.matrix_rank(delta, rtol=1e-4) <= 2, name
        else:
            assert not delta.any(), name


def test_merged_lora_computes_what_the_adapted_model_did() -> None:
    _, student = pair()
    peft_model = add_lora(student, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, param in student.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    ids = windows(2)
    with torch.no_grad():
        adapted = student(ids).logits
        merged = merge_lora(peft_model)(ids).logits
    assert not torch.allclose(adapted, pair()[1](ids).logits, atol=1e-3)
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)


KILLED_RUN = """
import os, signal, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[2])
import test_distill as t
from prunetune.training import distill as d

save = d.save_checkpoint

def save_or_die(folder, student, optimizer, scheduler, progress, identity):
    if progress.step == 4:  # killed at the second checkpoint: steps 3 and 4 are lost
        os.kill(os.getpid(), signal.SIGKILL)
    return save(folder, student, optimizer, scheduler, progress, identity)

d.save_checkpoint = save_or_die
teacher, student = t.pair()
d.distill(teacher, student, t.windows(), t.QUICK, sys.argv[1])
"""


def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path), str(TESTS)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert saved["progress"]["step"] == 2

    teacher, resumed = pair()
    result = distill(teacher, resumed, windows(), QUICK, tmp_path)
    teacher, uninterrupted = pair()
    reference = distill(teacher, uninterrupted, windows(), QUICK)
    assert result.resumed_from == 2 and result.steps == reference.steps == 12
    assert result.tokens == reference.tokens
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(states(resumed), states(uninterrupted), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    settings = DistillSettings(**{**vars(QUICK), "tokens": SEQ * 8})
    distill(*pair(), windows(), settings, tmp_path)
    other = DistillSettings(**{**vars(settings), "lr": 1e-3})
    with pytest.raises(ValueError, match="distill.lr = 0.01; this run has 0.001"):
        distill(*pair(), windows(), other, tmp_path)
    with pytest.raises(ValueError, match="data_sha256"):
        distill(*pair(), windows() + 1, settings, tmp_path)


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


def test_windows_of_another_length_are_refused() -> None:
    with pytest.raises(ValueError, match="distill.seq_len = 32"):
        distill(*pair(), random_windows(96, 4, 16), QUICK)


def test_a_cached_teacher_trains_the_student_as_the_live_top_k_teacher_does() -> None:
    settings = replace(QUICK, top_k=8, tokens=SEQ * 8 * 4)
    teacher, live = pair()
    teacher.to(torch.bfloat16)  # the cache keeps bfloat16 logits: a bf16 teacher's, exactly
    reference = distill(teacher, live, windows(), settings)
    cache = teacher_top_k(teacher, windows(), k=8, batch=16)
    assert cache.values.shape == (64, SEQ - 1, 8) and cache.indices.dtype == torch.int32
    cached = pair()[1]
    result = distill(cache, cached, windows(), settings)
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(states(cached), states(live), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="distill.top_k = 4: the teacher cache holds the top 8"):
        distill(cache, cached, windows(), replace(settings, top_k=4))
    with pytest.raises(ValueError, match="teacher cache is of"):
        distill(cache, cached, windows(32), settings)


SPARSE = SubnetConfig(layers=(0, 2), kv_heads=(1, 1), q_per_kv=(3, 3), mlp=(32, 32), embed=40,
                      sparsity={"method": "wanda", "pattern": "2:4", "levels": (0.5, 0.0)})


def sparse_pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A sorted teacher and a student cut with Wanda 2:4 sparsity in its first layer."""
    teacher = random_model(tiny_config(initializer_range=0.2), seed=1)
    norms = permute_model(teacher, activation_scores(teacher, windows(4))).input_norms
    return teacher, extract(teacher, SPARSE, norms)


def test_distillation_keeps_the_pruned_weights_at_zero() -> None:
    teacher, student = sparse_pair()
    zeros = {n: p == 0 for n, p in student.named_parameters() if ".layers.0." in n and p.dim() == 2}
    assert sum(int(z.sum()) for z in zeros.values()) > 0
    result = distill(teacher, student, windows(), QUICK)
    assert result.losses[-1] < result.losses[0]
    for name, was_zero in zeros.items():
        weight = student.get_parameter(name)
        assert not weight[was_zero].any(), name
        assert (weight[~was_zero] != 0).all(), name
    assert (student.model.layers[1].mlp.up_proj.weight != 0).all(), "a dense layer stays dense"


def test_lora_is_refused_for_a_sparse_student() -> None:
    teacher, student = sparse_pair()
    with pytest.raises(ValueError, match="lora_rank = 4: a student with weight sparsity"):
        distill(teacher, student, windows(), replace(QUICK, lora_rank=4))
