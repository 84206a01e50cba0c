"""lm-evaluation-harness on the resident model: lm-eval's own numbers, and the built-in scorer's."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pytest
import torch

pytest.importorskip("lm_eval")

import lm_eval.tasks
from lm_eval.api.instance import Instance
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from prunetune.evaluators.harness import (
    LOCAL_TASKS_DIR, ResidentLM, harness_scores, load_harness_tasks,
)
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.surgery import apply_masks, extract
from prunetune.evaluators.zeroshot import (
    choice_loglikelihoods, evaluate_tasks, load_task,
)
from prunetune.search_spaces import SubnetConfig

LIMIT = 40
BATCH = 16

SUBNETS = {
    "dense": None,
    # SmolLM2-135M has 30 layers of 3 query groups of 3 heads and 1536 neurons, 576 channels
    "masked": SubnetConfig(layers=range(30), kv_heads=[3] * 30, q_per_kv=[2] * 30,
                           mlp=[1024] * 30, embed=576),
    "extracted": SubnetConfig(layers=[i for i in range(30) if i % 5 != 4], kv_heads=[2] * 24,
                              q_per_kv=[3] * 24, mlp=[1536] * 24, embed=512),
}


@pytest.fixture(scope="module")
def piqa_tasks():
    return load_harness_tasks(["piqa"])


@contextlib.contextmanager
def subnet_model(model: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    subnet = SUBNETS[name]
    if subnet is None:
        yield model
    elif name == "masked":
        with apply_masks(model, subnet.validate(model.config)) as masked:
            yield masked
    else:
        yield extract(model, subnet.validate(model.config))


def lm_eval_piqa_items(model, tokenizer, tasks) -> list[dict]:
    """lm-eval's per-document record of PIQA: the requests, their scores, acc and acc_norm."""
    results = evaluate(lm=ResidentLM(model, tokenizer, BATCH), task_dict=tasks, limit=LIMIT,
                       bootstrap_iters=0, log_samples=True)
    return sorted(results["samples"]["piqa"], key=lambda sample: sample["doc_id"])


def picks(scores: list[float], choices: tuple[str, ...]) -> tuple[int, int]:
    """The choice by log-likelihood, and by log-likelihood per character."""
    normed = [s / len(c) for s, c in zip(scores, choices)]
    return int(torch.tensor(scores).argmax()), int(torch.tensor(normed).argmax())


@pytest.mark.slow
@pytest.mark.parametrize("subnet", list(SUBNETS))
def test_lm_eval_piqa_decides_every_item_as_the_builtin_scorer(smollm2_loaded, piqa_tasks, subnet):
    model, tokenizer = smollm2_loaded
    items = load_task("piqa", LIMIT)
    with subnet_model(model, subnet) as scored:
        builtin = choice_loglikelihoods(scored, tokenizer, items, BATCH)
        harness = lm_eval_piqa_items(scored, tokenizer, piqa_tasks)
    assert [s["doc_id"] for s in harness] == list(range(LIMIT))
    for item, ours, theirs in zip(items, builtin, harness):
        assert theirs["arguments"] == [(item.context, c) for c in item.continuations()]
        assert [ll for ll, _ in theirs["filtered_resps"]] == pytest.approx(ours, rel=1e-6)
        pick, pick_norm = picks(ours, item.choices)
        assert (theirs["acc"], theirs["acc_norm"]) == (pick == item.label, pick_norm == item.label)


def test_harness_scores_equal_the_builtin_scores(smollm2_loaded, piqa_tasks):
    model, tokenizer = smollm2_loaded
    builtin = evaluate_tasks(model, tokenizer, {"piqa": load_task("piqa", 12)}, BATCH)
    assert harness_scores(model, tokenizer, piqa_tasks, 12, BATCH) == {
        "acc_piqa": builtin["acc_piqa"], "acc_norm_piqa": builtin["acc_norm_piqa"]}


def test_the_local_piqa_task_is_lm_evals_piqa_on_local_documents():
    def config(folder: Path) -> dict:
        return TaskManager(include_defaults=False, include_path=str(folder)).task_index["piqa"].cfg

    ours, theirs = config(LOCAL_TASKS_DIR), config(Path(lm_eval.tasks.__file__).parent / "piqa")
    dataset_keys = {"dataset_path", "dataset_name", "training_split", "custom_dataset"}
    assert {k: v for k, v in ours.items() if k not in dataset_keys} == {
        k: v for k, v in theirs.items() if k not in dataset_keys}
    assert set(ours) - set(theirs) == {"custom_dataset"}


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihoods_and_greedy_flags_equal_lm_evals_hf_model(smollm2_loaded):
    model, tokenizer = smollm2_loaded
    with torch.inference_mode():
        prompt = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=3, do_sample=False)
    greedy_text = tokenizer.decode(greedy[0, len(prompt):])
    args = [("The capital of France is", greedy_text), ("The capital of France is", " potato"),
            ("Question: what is 2 + 2?\nAnswer: ", "four"), ("", "no context at all")]
    ours = ResidentLM(model, tokenizer, batch_size=3).loglikelihood(requests("loglikelihood", args))
    theirs = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=3).loglikelihood(
        requests("loglikelihood", args))
    assert [flag for _, flag in ours] == [flag for _, flag in theirs] == [True, False, False, False]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], rel=1e-5)


def test_rolling_loglikelihoods_equal_lm_evals_hf_model_across_windows(smollm2_tokenizer):
    model = random_model(tiny_config("llama", vocab_size=49152, max_position_embeddings=16))
    texts = [("The quick brown fox jumps over the lazy dog. " * 6,), ("short text",)]
    ours = ResidentLM(model, smollm2_tokenizer, batch_size=3).loglikelihood_rolling(
        requests("loglikelihood_rolling", texts))
    hf = HFLM(pretrained=model, tokenizer=smollm2_tokenizer, batch_size=3)
    theirs = hf.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    assert len(smollm2_tokenizer(texts[0][0])["input_ids"]) > 3 * 16, "needs several windows"
    assert ours == pytest.approx(theirs, rel=1e-5)


def test_generation_is_refused_with_the_reason():
    lm = ResidentLM(random_model(tiny_config("llama")), tokenizer=None)
    with pytest.raises(NotImplementedError, match="log-likelihood only.*generate_until"):
        lm.generate_until(requests("generate_until", [("Q:", {"until": ["\n"]})]))


def test_the_evaluator_scores_lm_eval_tasks_on_the_model_it_holds(smollm2_tokenizer, tmp_path,
                                                                  monkeypatch) -> None:
    """`lm_eval:<task>` in the evaluation settings: lm-eval's metrics under the task's name,
    equal to the built-in scorer's, and `acc_avg` over the tasks."""
    from prunetune.evaluators.evaluator import Evaluator
    from prunetune.evaluators.settings import EvaluatorSettings

    monkeypatch.setenv("PRUNETUNE_CACHE", str(tmp_path / "cache"))
    random_model(tiny_config("llama", vocab_size=49152), seed=3).save_pretrained(tmp_path / "m")
    smollm2_tokenizer.save_pretrained(tmp_path / "m")
    evaluator = Evaluator(EvaluatorSettings(model=str(tmp_path / "m"), seq_len=32, windows=2,
                                            batch_size=4, calibration_samples=2, task_limit=8,
                                            tasks=("lm_eval:piqa",)))
    items = load_task("piqa", 8)
    builtin = evaluate_tasks(evaluator.model, smollm2_tokenizer, {"piqa": items}, 4)
    dense = SubnetConfig.dense(evaluator.model.config)
    result = evaluator.evaluate(dense, ["acc_piqa", "acc_avg"])
    assert result["status"] == "ok", result["error"]
    assert (result["acc_piqa"], result["acc_norm_piqa"]) == (builtin["acc_piqa"], builtin["acc_norm_piqa"])
    assert result["acc_avg"] == result["acc_piqa"]
