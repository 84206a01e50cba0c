"""How much of the evaluators' time a search spends evaluating.

Two evaluators whose evaluation takes a fixed 1 s (a stand-in: the model is not the
point), a 100-trial random search on the SmolLM2 config, local Ray on this machine.
Prints the fraction of evaluator time spent evaluating between the first trial's start
and the last trial's end, and the per-trial overhead of Tune plus the result log.

    python benchmarks/orchestration.py [--trials 100] [--evaluators 2] [--seconds 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

from prunetune.evaluators.contract import EvaluatorBase
from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.results import DENSE_TRIAL, ResultLog
from prunetune.orchestrator.search import run_search
from prunetune.search_spaces.subnet import SubnetConfig

SMOLLM2 = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
               tie_word_embeddings=True)


class FixedTimeEvaluator(EvaluatorBase):
    """Takes exactly `seconds` per evaluation; perplexity falls with the kept parameters."""

    seconds = 1.0

    def __init__(self, settings: Any, evaluator_id: str) -> None:
        self.evaluator_id = evaluator_id

    def info(self) -> dict[str, Any]:
        return {"evaluator_id": self.evaluator_id, "model_config": SMOLLM2, "layer_order": None,
                "load_seconds": 0.0}

    def model_config(self) -> Any:
        return SMOLLM2

    def measure(self, subnet: SubnetConfig, metrics: set[str],
                span: tuple[int, int] | None = None) -> dict[str, Any]:
        time.sleep(self.seconds)
        size = subnet.num_layers * subnet.embed * sum(subnet.mlp)
        return {"perplexity": 1e12 / size}

    def release_memory(self) -> None:
        """Holds no model."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--evaluators", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    FixedTimeEvaluator.seconds = args.seconds
    with tempfile.TemporaryDirectory() as run_dir:
        spec = load_spec({"run_dir": run_dir, "search_space": {"preset": "per_layer"},
                          "algorithm": {"name": "random", "num_samples": args.trials},
                          "resources": {"evaluators": args.evaluators}})
        start = time.perf_counter()
        run_search(spec, FixedTimeEvaluator)
        total = time.perf_counter() - start
        rows = ResultLog(run_dir).read()
    trials = rows[rows["trial_id"] != DENSE_TRIAL]
    span = (trials["finished_at"].max() - trials["started_at"].min()).total_seconds()
    busy = trials["eval_seconds"].sum()
    capacity = span * args.evaluators
    utilisation = len(trials) * args.seconds / capacity
    overhead = (capacity - len(trials) * args.seconds) / len(trials)
    print(f"{len(trials)} trials, {args.evaluators} evaluators, {args.seconds:.2f} s per evaluation")
    print(f"search span (first trial start .. last trial end): {span:.1f} s "
          f"(whole command incl. Ray start and evaluator creation: {total:.1f} s)")
    print(f"evaluator time spent evaluating: {utilisation:.1%}")
    print(f"time per trial as the evaluator sees it (borrow, evaluate, log, report): "
          f"{busy / len(trials):.3f} s")
    print(f"per-trial overhead of Tune plus the result log: {overhead * 1e3:.0f} ms "
          f"of evaluator time per trial")


if __name__ == "__main__":
    main()
