"""A trial: a batch of sub-networks (`batches.py`), each evaluated on a borrowed evaluator
and logged as a row, then reported together.

A trial is a light CPU task. It evaluates its sub-networks in parallel, each on an
evaluator the pool lends it for that one evaluation, and writes each row to the result log
as soon as it is measured, before the trial reports to Tune: that is what makes a stop at
any moment safe. Every finished evaluation is in the log, and a trial that is run again
after a resume (or after losing an evaluator with its node) finds the rows of its batch
there and evaluates only the rest. With multi-fidelity evaluation a sub-network has a row
per stage (the first windows, then all of them if it is promoted); run again, it goes on
from its last.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import ray
from ray import tune

from prunetune.evaluators.contract import EvaluatorBroken
from prunetune.orchestrator.batches import member_id
from prunetune.orchestrator.fidelity import Fidelity, Reference, Span, evaluate_in_rungs
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
    """What every trial needs besides its config: where to log, what to measure, and the
    fidelities to measure it at."""

    run_id: str
    run_dir: str
    pool_name: str
    namespace: str
    model_config: dict[str, Any]
    metrics: list[str]
    seq_len: int
    objectives: dict[str, str]
    fidelity: Fidelity


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


@dataclass
class EvaluatorHost:
    """A trial's stages on the run's evaluators (`fidelity.RungHost`): each stage borrows
    a free evaluator, and the pool logs its row and answers with the rows to compare with."""

    context: TrialContext
    subnet: SubnetConfig
    trial_id: str
    pool: Any

    def measure(self, span: Span) -> dict[str, Any]:
        """The metrics of the sub-network on the windows of `span`, from a borrowed evaluator.

        An evaluator that died, or a group that lost a rank, is replaced and the trial
        fails (Tune retries it on another evaluator) instead of logging a result that says
        nothing about the sub-network.
        """
        index, handle, node = ray.get(self.pool.acquire.remote())
        started = datetime.now(timezone.utc)
        full = span == (0, self.context.fidelity.windows)
        try:
            result = ray.get(handle.evaluate.remote(self.subnet.to_json(), self.context.metrics,
                                                    None if full else span))
            if result.get("evaluator_broken"):
                raise EvaluatorBroken(f"{result.get('evaluator_id')}: {result['error']}")
        except (ray.exceptions.RayActorError, EvaluatorBroken):
            ray.get(self.pool.replace.remote(index, handle))
            raise
        finally:
            self.pool.release.remote(index)
        return {**result, "evaluator_id": f"{result.get('evaluator_id')}@{node[:12]}",
                "started_at": started, "finished_at": datetime.now(timezone.utc)}

    def reference(self, rung: int) -> Reference:
        return ray.get(self.pool.reference.remote(rung, self.context.objectives))

    def record(self, result: dict[str, Any], windows: int) -> dict[str, Any]:
        c = self.context
        row = make_row(c.run_id, self.trial_id, self.subnet, c.model_config, metric_columns(result),
                       result["status"], result.get("error"), result["evaluator_id"],
                       result["started_at"], result["finished_at"], c.seq_len, windows)
        ray.get(self.pool.record.remote(row))
        return row


def evaluate_subnet(context: TrialContext, subnet: SubnetConfig, trial_id: str,
                    always_promote: bool = False, pool: Any = None) -> dict[str, Any]:
    """Evaluate one sub-network, rung by rung (`fidelity.evaluate_in_rungs`), appending a
    row to the log at every stage; its last row. A sub-network the log already holds in
    full is not evaluated again; one it holds at a rung goes on from there. `pool` is the
    pool's handle (looked up by name when None)."""
    pool = pool or ray.get_actor(context.pool_name, namespace=context.namespace)
    stored = ray.get(pool.lookup.remote(subnet.config_hash()))
    host = EvaluatorHost(context, subnet, trial_id, pool)
    return evaluate_in_rungs(context.fidelity, context.objectives, host, stored, always_promote)


def evaluate_batch(context: TrialContext, subnets: list[SubnetConfig], trial_id: str) -> list[dict[str, Any]]:
    """The last rows of a batch's sub-networks, evaluated in parallel (each waits for an
    evaluator in the pool). Every evaluation runs to its end and is logged before an error
    of another (a lost evaluator) fails the trial, so a retry repeats only the lost ones."""
    pool = ray.get_actor(context.pool_name, namespace=context.namespace)
    with ThreadPoolExecutor(max_workers=len(subnets)) as threads:
        futures = [threads.submit(evaluate_subnet, context, subnet, member_id(trial_id, k),
                                  False, pool) for k, subnet in enumerate(subnets)]
    return [future.result() for future in futures]


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable: a batch of sub-networks, their evaluations, their rows."""
    subnets = [SubnetConfig.from_json(text) for text in config["subnets"]]
    rows = evaluate_batch(context, subnets, tune.get_context().get_trial_id())
    tune.report({"rows": [_report_row(row) for row in rows]})
