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


WINDOWS = 8


def window_nll(base_nll: float, index: int) -> float:
    """The stand-in's loss on window `index`: the sub-network's level plus the window's own
    difficulty, shared by every sub-network (as real text windows are)."""
    return base_nll + 0.3 * math.sin(1.7 * index)


class StandInEvaluator(EvaluatorBase):
    """Sleeps `PRUNETUNE_STANDIN_SECONDS` per evaluation; perplexity falls with parameters
    and rises with every layer dropped, so that a shallow sub-network is dominated by a
    deeper one of its size.

    Its loss is a mean over the windows of a span, each window adding its own difficulty,
    so a multi-fidelity search sees first windows that rank like the whole set. Every
    evaluation appends a line to `PRUNETUNE_STANDIN_CALLS`: the config hash, and
    `@<start>-<stop>` when it scored only some of the windows.
    """

    def __init__(self, settings: Any, evaluator_id: str = "standin") -> None:
        self.evaluator_id = evaluator_id
        self.windows = settings.windows if settings is not None else WINDOWS
        self.seconds = float(os.environ.get("PRUNETUNE_STANDIN_SECONDS", "0"))
        self.calls_file = os.environ.get("PRUNETUNE_STANDIN_CALLS")

    def info(self) -> dict[str, Any]:
        return {"evaluator_id": self.evaluator_id, "model_config": SMOLLM2_CONFIG,
                "layer_order": None, "load_seconds": 0.0}

    def model_config(self) -> Any:
        return SMOLLM2_CONFIG

    def measure(self, subnet: SubnetConfig, metrics: set[str],
                span: tuple[int, int] | None = None) -> dict[str, Any]:
        time.sleep(self.seconds)
        start, stop = span or (0, self.windows)
        if self.calls_file:
            part = "" if (start, stop) == (0, self.windows) else f"@{start}-{stop}"
            with open(self.calls_file, "a") as f:
                f.write(f"{subnet.config_hash()}{part}\n")
        params = subnet_cost(SMOLLM2_CONFIG, subnet)["params"]
        depth_penalty = 30 - subnet.num_layers
        base = 1.5e8 / params - 1.1 + math.log(10) + 0.1 * depth_penalty
        nll = sum(window_nll(base, i) for i in range(start, stop)) / (stop - start)
        return {"perplexity": math.exp(nll), "nll": nll, "tokens": (stop - start) * 255}

    def release_memory(self) -> None:
        """Holds no model."""
