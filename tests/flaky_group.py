"""A sharded evaluator group that loses a rank on purpose, for the orchestrator's tests."""

from __future__ import annotations

from typing import Any

import ray

from prunetune.evaluators.settings import EvaluatorSettings, ShardingSettings
from prunetune.evaluators.sharded.group import ShardedEvaluatorGroup

BREAK_AT_CALL = 3


class FlakyGroup(ShardedEvaluatorGroup):
    """Two ZeRO-3 ranks on CPU; the first group's rank 1 is killed at its third evaluation,
    and groups started later (the replacements) stay whole."""

    def __init__(self, settings: EvaluatorSettings, evaluator_id: str = "evaluator-0") -> None:
        super().__init__(settings, evaluator_id, ShardingSettings(2, "zero3", timeout_s=60))

    def evaluate(self, subnet: Any, metrics: list[str],
                 span: tuple[int, int] | None = None) -> dict[str, Any]:
        if self.evaluator_id == "evaluator-0" and self.calls == BREAK_AT_CALL - 1:
            ray.kill(self.ranks[1])
        return super().evaluate(subnet, metrics, span)
