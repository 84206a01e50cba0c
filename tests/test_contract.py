"""The evaluator contract: `evaluate` never raises, and every result has the same keys."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from prunetune.evaluators.contract import EvaluatorBase, EvaluatorBroken
from prunetune.search_spaces import SubnetConfig
from standin import SMOLLM2_CONFIG, StandInEvaluator

RESULT_KEYS = {"evaluator_id", "load_seconds", "status", "error", "eval_seconds"}


class Failing(StandInEvaluator):
    """Raises what the test tells it to from `measure`."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(None, "failing")
        self.error = error

    def measure(self, subnet: SubnetConfig, metrics: set[str],
                span: tuple[int, int] | None = None) -> dict[str, Any]:
        raise self.error


def test_a_result_has_the_contract_keys_and_the_metrics() -> None:
    result = StandInEvaluator(None).evaluate(SubnetConfig.dense(SMOLLM2_CONFIG), ["perplexity"])
    assert RESULT_KEYS <= result.keys()
    assert result["status"] == "ok" and result["error"] is None and result["perplexity"] > 0


@pytest.mark.parametrize("error, message, broken", [
    (ValueError("bad width"), "ValueError: bad width", None),
    (torch.OutOfMemoryError("CUDA out of memory\nmore"), "out of memory: CUDA out of memory", None),
    (EvaluatorBroken("rank 1 died"), "evaluator group broken: rank 1 died", True),
])
def test_evaluate_turns_every_error_into_a_failed_result(error, message, broken) -> None:
    evaluator = Failing(error)
    result = evaluator.evaluate(SubnetConfig.dense(SMOLLM2_CONFIG).to_json(), ["perplexity"])
    assert RESULT_KEYS <= result.keys()
    assert (result["status"], result["error"]) == ("failed", message)
    assert result.get("evaluator_broken") is broken
    assert evaluator.call_count() == 1


def test_a_sub_network_that_does_not_fit_the_model_fails_before_measuring() -> None:
    too_wide = SubnetConfig((0,), (4,), (3,), (1536,), 576)
    result = Failing(AssertionError("measured")).evaluate(too_wide, ["perplexity"])
    assert result["status"] == "failed" and "kv_heads" in result["error"]


def test_an_evaluator_must_implement_the_contract() -> None:
    class Partial(EvaluatorBase):
        def info(self) -> dict[str, Any]:
            return {}

    with pytest.raises(TypeError, match="measure"):
        Partial()
