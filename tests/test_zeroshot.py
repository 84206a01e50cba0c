"""Multiple-choice scoring: lm-evaluation-harness tokenization, acc / acc_norm, tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.zeroshot import (
    Item,
    accuracy,
    choice_loglikelihoods,
    encode_pair,
    evaluate_tasks,
    load_task,
    loglikelihoods,
    task_files, token_loglikelihoods,
)
from char_tokenizer import CharTokenizer

TASKS = Path(__file__).parent / "fixtures" / "tasks"


TOK = CharTokenizer()


@pytest.fixture(scope="module")
def tiny():
    return random_model(tiny_config("llama"), seed=0)


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def reference_loglikelihood(model, context_ids: list[int], continuation_ids: list[int]) -> float:
    tokens = torch.tensor([context_ids + continuation_ids])
    with torch.inference_mode():
        logprobs = model(tokens).logits[0, :-1].float().log_softmax(-1)
    n = len(continuation_ids)
    targets = tokens[0, -n:]
    return logprobs[-n:].gather(-1, targets[:, None]).sum().item()


REQUESTS = [
    ("The cat sat on the", " mat"),
    ("Question: what is 2 + 2?\nAnswer:", " four, of course"),
    ("short ", "tail"),
    ("", "no context at all"),
    ("x", "y"),
]


def test_encode_pair_moves_trailing_whitespace_onto_the_continuation():
    assert encode_pair(TOK, "ab  ", "c") == (ids("ab"), ids("  c"))
    assert encode_pair(TOK, "ab", " c") == (ids("ab"), ids(" c"))


def test_encode_pair_scores_an_empty_context_after_bos():
    assert encode_pair(TOK, "", "abc") == ([TOK.bos_token_id], ids("abc"))


@pytest.mark.parametrize("batch_size", [1, 2, 16])
def test_loglikelihoods_match_one_request_at_a_time(tiny, batch_size):
    expected = [reference_loglikelihood(tiny, *encode_pair(TOK, c, x)) for c, x in REQUESTS]
    got = loglikelihoods(tiny, TOK, REQUESTS, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-5)


def test_loglikelihoods_match_the_reference_for_every_family(tiny_model):
    expected = [reference_loglikelihood(tiny_model, *encode_pair(TOK, c, x)) for c, x in REQUESTS]
    got = loglikelihoods(tiny_model, TOK, REQUESTS, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-5)


def greedy_continuation(model, context_ids: list[int], length: int) -> list[int]:
    tokens = list(context_ids)
    with torch.inference_mode():
        for _ in range(length):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(context_ids):]


def test_token_loglikelihoods_flag_the_continuations_greedy_decoding_produces(tiny):
    pairs = []
    for context, _ in REQUESTS[:3]:
        greedy = greedy_continuation(tiny, ids(context), 3)
        other = greedy[:-1] + [(greedy[-1] + 1) % tiny.config.vocab_size]
        pairs += [(ids(context), greedy), (ids(context), other)]
    scored = token_loglikelihoods(tiny, pairs, batch_size=4, greedy=True)
    assert [flag for _, flag in scored] == [True, False] * 3
    expected = [reference_loglikelihood(tiny, c, x) for c, x in pairs]
    assert [ll for ll, _ in scored] == pytest.approx(expected, rel=1e-5)
    assert {flag for _, flag in token_loglikelihoods(tiny, pairs)} == {None}


def test_repeated_evaluations_tokenize_each_request_once(tiny):
    class CountingTokenizer(CharTokenizer):
        calls = 0

        def __call__(self, text: str, add_special_tokens: bool = True, **kw: object) -> dict:
            CountingTokenizer.calls += 1
            return super().__call__(text, add_special_tokens, **kw)

    tokenizer = CountingTokenizer()
    first = loglikelihoods(tiny, tokenizer, REQUESTS)
    calls = CountingTokenizer.calls
    assert calls > 0
    assert loglikelihoods(tiny, tokenizer, REQUESTS) == first
    assert CountingTokenizer.calls == calls


def test_a_context_longer_than_the_window_is_cut_from_the_left(tiny):
    window = tiny.config.max_position_embeddings
    context = "".join(chr(33 + i % 90) for i in range(window + 40))
    kept = context[-(window + 1 - 3):]
    long_ll, = loglikelihoods(tiny, TOK, [(context, "abc")])
    expected = reference_loglikelihood(tiny, ids(kept), ids("abc"))
    assert long_ll == pytest.approx(expected, rel=1e-5)


def candidate_items() -> list[Item]:
    """Choices of different lengths, so that length normalisation can change the pick."""
    def choices(i: int) -> tuple[str, str, str]:
        return " " + "ab"[i % 2] * (1 + i % 3), " " + "xyzw"[: 1 + i % 4], " " + "q" * (2 + i % 5)

    return [Item(f"Item {i}: the answer is", choices(i), 0) for i in range(24)]


def test_acc_and_acc_norm_follow_the_per_choice_loglikelihoods(tiny):
    candidates = candidate_items()
    lls = choice_loglikelihoods(tiny, TOK, candidates)
    picks = []
    for item, scores in zip(candidates, lls):
        by_ll = max(range(3), key=lambda i: scores[i])
        by_norm = max(range(3), key=lambda i: scores[i] / len(item.choices[i]))
        if by_ll != by_norm:
            picks.append((item, by_ll, by_norm))
    assert len(picks) >= 3, "need items where normalising by length changes the pick"
    # label the first item by its raw pick, the others by their normalised pick
    items = [Item(it.context, it.choices, raw) for it, raw, _ in picks[:1]]
    items += [Item(it.context, it.choices, norm) for it, _, norm in picks[1:3]]
    metrics = evaluate_tasks(tiny, TOK, {"mix": items})
    assert metrics == {"acc_mix": pytest.approx(1 / 3), "acc_norm_mix": pytest.approx(2 / 3),
                       "acc_avg": pytest.approx(1 / 3)}


def test_acc_norm_divides_by_the_choice_without_its_delimiter():
    item = Item("ctx", ("a", "bbb"), label=1, target_delimiter=" ")
    # by choice length: -2/1 < -5/3, so choice 1; by continuation length it would be 0
    assert accuracy([item], [[-2.0, -5.0]]) == {"acc": 0.0, "acc_norm": 1.0}
    assert item.continuations() == [" a", " bbb"]


def test_batch_size_does_not_change_the_result(tiny):
    tasks = {"easy": load_task(str(TASKS / "easy.jsonl")), "mixed": candidate_items()[:10]}
    lls = [choice_loglikelihoods(tiny, TOK, tasks["mixed"], batch_size=b) for b in (1, 4, 64)]
    for other in lls[1:]:
        for a, b in zip(lls[0], other):
            assert a == pytest.approx(b, rel=1e-5)
    results = [evaluate_tasks(tiny, TOK, tasks, batch_size=b) for b in (1, 3, 16)]
    assert results[0] == results[1] == results[2]
    assert set(results[0]) == {"acc_easy", "acc_norm_easy", "acc_mixed", "acc_norm_mixed",
                               "acc_avg"}
    assert results[0]["acc_avg"] == pytest.approx(
        (results[0]["acc_easy"] + results[0]["acc_mixed"]) / 2)


def test_piqa_loads_the_validation_split_in_the_harness_prompt():
    items = load_task("piqa")
    assert len(items) == 1838
    assert {item.label for item in items} == {0, 1}
    assert all(len(item.choices) == 2 for item in items)
    first = items[0]
    goal = "How do I ready a guinea pig cage for it's new occupants?"
    assert first.context == f"Question: {goal}\nAnswer:"
    assert first.continuations()[0].startswith(" Provide the guinea pig")
    assert load_task("piqa", limit=100) == items[:100]


def test_a_jsonl_file_is_a_task(tmp_path):
    items = load_task(str(TASKS / "easy.jsonl"))
    assert items[0] == Item("The capital of France is", (" Paris", " potato banana"), 0)
    assert len(load_task(str(TASKS / "easy.jsonl"), limit=2)) == 2


def test_a_task_file_error_names_the_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    rows = [{"context": "a", "choices": [" b", " c"], "label": 0}, {"context": "a", "label": 0}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field\(s\) choices"):
        load_task(str(path))
    path.write_text(json.dumps({"context": "a", "choices": [" b", " c"], "label": 2}))
    with pytest.raises(ValueError, match="bad.jsonl:1: label 2"):
        load_task(str(path))


def test_an_unknown_task_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown task 'hellaswag'.*piqa.*jsonl"):
        load_task("hellaswag")


def test_smollm2_answers_unambiguous_questions(smollm2_loaded):
    model, tokenizer = smollm2_loaded
    items = load_task(str(TASKS / "easy.jsonl"))
    assert evaluate_tasks(model, tokenizer, {"easy": items}, batch_size=4) == {
        "acc_easy": 1.0, "acc_norm_easy": 1.0, "acc_avg": 1.0}


def test_smollm2_continuation_tokens_are_the_tail_of_the_joint_encoding(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    context, continuation = encode_pair(tokenizer, "Question: is it?\nAnswer: ", "yes")
    assert tokenizer.decode(context) == "Question: is it?\nAnswer:"
    assert tokenizer.decode(continuation) == " yes"


def test_piqa_reads_the_prunetune_data_folder_when_set(tmp_path, monkeypatch):
    (tmp_path / "piqa").mkdir()
    rows = [{"goal": "g1", "sol1": "a", "sol2": "b"}, {"goal": "g2", "sol1": "c", "sol2": "d"}]
    (tmp_path / "piqa" / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "piqa" / "valid-labels.lst").write_text("1\n0\n")
    monkeypatch.setenv("PRUNETUNE_DATA", str(tmp_path))
    assert [(item.context, item.label) for item in load_task("piqa")] == [
        ("Question: g1\nAnswer:", 1), ("Question: g2\nAnswer:", 0)]


def test_task_files_finds_without_reading_and_names_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.delenv("PRUNETUNE_DATA", raising=False)
    assert [path.name for path in task_files("piqa")] == ["valid.jsonl.gz", "valid-labels.lst"]
    with pytest.raises(FileNotFoundError, match="^task file not found: /nowhere/t.jsonl$"):
        task_files("/nowhere/t.jsonl")
