"""A trial: one sub-network, one evaluation on a borrowed evaluator, one row in the log.

A trial is a light CPU task. It writes its row to the result log before it reports to
Tune: that is what makes a stop at any moment safe. A trial that finished is in the log,
and a trial that is run again after a resume finds its row there and reports it without
evaluating again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import ray
from ray import tune

from prunetune.evaluators.contract import EvaluatorBroken
from prunetune.orchestrator.results import FIXED_COLUMNS, make_row
from prunetune.orchestrator.spec import Constraint
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.subnet import SubnetConfig

@dataclass
class Feasibility:
    """The constraints checked before evaluation (cost metrics only), as a predicate."""

    constraints: list[Constraint]
    model_config: dict[str, Any]
    dense: dict[str, float]
    seq_len: int
    dtype_bytes: int

    def __call__(self, subnet: SubnetConfig) -> bool:
        precheck = [c for c in self.constraints if c.is_precheckable]
        if not precheck:
            return True
        cost = subnet_cost(self.model_config, subnet, self.seq_len, self.dtype_bytes)
        return all(c.satisfied(cost, self.dense) for c in precheck)


@dataclass
class TrialContext:
    """What every trial needs besides its config: where to log, what to measure."""

    run_id: str
    run_dir: str
    pool_name: str
    namespace: str
    model_config: dict[str, Any]
    metrics: list[str]
    seq_len: int


def metric_columns(result: dict[str, Any]) -> dict[str, float | None]:
    """The metrics of an evaluator's result, as result-log metric columns (the fixed
    columns and the evaluator's load time left out)."""
    skip = set(FIXED_COLUMNS) | {"load_seconds"}
    return {k: v for k, v in result.items()
            if k not in skip and (v is None or isinstance(v, (int, float)))}


def _report_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row as Tune metrics: numbers and short strings only."""
    out = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
    out.pop("versions", None)
    return out


def evaluate_subnet(context: TrialContext, subnet: SubnetConfig, trial_id: str) -> dict[str, Any]:
    """Evaluate one sub-network on a borrowed evaluator and append its row to the log.

    An evaluator that died, or a group that lost a rank, is replaced and the trial fails
    (Tune retries it on another evaluator) instead of logging a result that says nothing
    about the sub-network.
    """
    pool = ray.get_actor(context.pool_name, namespace=context.namespace)
    stored = ray.get(pool.lookup.remote(subnet.config_hash()))
    if stored is not None:
        return stored
    index, handle, node = ray.get(pool.acquire.remote())
    started = datetime.now(timezone.utc)
    try:
        result = ray.get(handle.evaluate.remote(subnet.to_json(), context.metrics))
        if result.get("evaluator_broken"):
            raise EvaluatorBroken(f"{result.get('evaluator_id')}: {result['error']}")
    except (ray.exceptions.RayActorError, EvaluatorBroken):
        ray.get(pool.replace.remote(index, handle))
        raise
    finally:
        pool.release.remote(index)
    finished = datetime.now(timezone.utc)
    row = make_row(context.run_id, trial_id, subnet, context.model_config, metric_columns(result),
                   result["status"], result.get("error"), f"{result.get('evaluator_id')}@{node[:12]}",
                   started, finished, context.seq_len)
    ray.get(pool.record.remote(row))
    return row


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable: one sub-network, one evaluation, one row."""
    subnet = SubnetConfig.from_json(config["subnet"])
    row = evaluate_subnet(context, subnet, tune.get_context().get_trial_id())
    tune.report(_report_row(row))
