"""A fast stand-in evaluator for orchestration tests, where the model is not the point.

It implements the evaluator contract (`EvaluatorBase`); its metrics are a deterministic
function of the sub-network's cost; each evaluation is appended to a file when it
finishes, so tests can count evaluations across processes and restarts.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

from prunetune.evaluators.contract import EvaluatorBase
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.subnet import SubnetConfig

SMOLLM2_CONFIG = dict(model_type="llama", hidden_size=576, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


class StandInEvaluator(EvaluatorBase):
    """Sleeps `PRUNETUNE_STANDIN_SECONDS` per evaluation; perplexity falls with parameters."""

    def __init__(self, settings: Any, evaluator_id: str = "standin") -> None:
        self.evaluator_id = evaluator_id
        self.seconds = float(os.environ.get("PRUNETUNE_STANDIN_SECONDS", "0"))
        self.calls_file = os.environ.get("PRUNETUNE_STANDIN_CALLS")

    def info(self) -> dict[str, Any]:
        return {"evaluator_id": self.evaluator_id, "model_config": SMOLLM2_CONFIG,
                "layer_order": None, "load_seconds": 0.0}

    def model_config(self) -> Any:
        return SMOLLM2_CONFIG

    def measure(self, subnet: SubnetConfig, metrics: set[str]) -> dict[str, Any]:
        time.sleep(self.seconds)
        if self.calls_file:
            with open(self.calls_file, "a") as f:
                f.write(subnet.config_hash() + "\n")
        params = subnet_cost(SMOLLM2_CONFIG, subnet)["params"]
        depth_penalty = 30 - subnet.num_layers
        perplexity = 10 * math.exp(1.5e8 / params - 1.1) + 0.5 * depth_penalty
        return {"perplexity": perplexity, "nll": math.log(perplexity)}

    def release_memory(self) -> None:
        """Holds no model."""
