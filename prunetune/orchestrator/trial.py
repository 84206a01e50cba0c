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

import threading
from concurrent.futures import Future, ThreadPoolExecutor
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

Lent = tuple[int, Any, str]
"""An evaluator lent by the pool: its index in the pool, its handle, its node id."""


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


class PoolCalls:
    """A trial's calls to the pool, grouped: its evaluations that are waiting for an evaluator
    at one moment borrow them in one call, and those that finish at one moment return their
    evaluators and log their rows in one call. Shared by the threads of a batch.

    A group's call is sent by the first of its threads, and the calls that return
    evaluators do not wait for each other's rows to be written, so grouping holds no
    evaluator back; each thread waits for its own rows only."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.lock = threading.Condition()
        self.waiting = 0
        self.borrowing = False
        self.lent: list[Lent] = []
        self.unsent: list[tuple[list[int], list[dict[str, Any]], Future]] = []
        self.sending = False

    def acquire(self) -> Lent:
        """A borrowed evaluator, once the pool has one free for this trial."""
        with self.lock:
            self.waiting += 1
            try:
                while not self.lent:
                    if self.borrowing:
                        self.lock.wait()
                    else:
                        self._borrow()
                return self.lent.pop()
            finally:
                self.waiting -= 1

    def _borrow(self) -> None:
        """Borrow, with the lock held, as many evaluators as threads wait (outside the lock)."""
        self.borrowing = True
        count = self.waiting
        self.lock.release()
        try:
            lent = ray.get(self.pool.borrow.remote(count))
        finally:
            self.lock.acquire()
            self.borrowing = False
            self.lock.notify_all()
        self.lent.extend(lent)

    def settle(self, returned: list[int], rows: list[dict[str, Any]]) -> None:
        """Return evaluators to the pool and log rows, with whatever the trial's other threads
        settle at the same moment; returns once the rows are written."""
        sent: Future = Future()
        with self.lock:
            self.unsent.append((returned, rows, sent))
            send = not self.sending
            self.sending = True
        if send:
            self._send()
        ray.get(sent.result())

    def _send(self) -> None:
        """Send the settles queued, one call for all, until none are left."""
        while True:
            with self.lock:
                queued, self.unsent = self.unsent, []
                if not queued:
                    self.sending = False
                    return
            try:
                call = self.pool.settle.remote([i for returned, _, _ in queued for i in returned],
                                               [row for _, rows, _ in queued for row in rows])
            except Exception as error:
                for _, _, sent in queued:
                    sent.set_exception(error)
            else:
                for _, _, sent in queued:
                    sent.set_result(call)


@dataclass
class EvaluatorHost:
    """A trial's stages on the run's evaluators (`fidelity.RungHost`): each stage borrows
    a free evaluator, which goes back to the pool with the stage's row; the pool answers
    with the rows to compare with."""

    context: TrialContext
    subnet: SubnetConfig
    trial_id: str
    calls: PoolCalls
    held: int | None = None

    def measure(self, span: Span) -> dict[str, Any]:
        """The metrics of the sub-network on the windows of `span`, from a borrowed evaluator
        (held until its row is recorded, or `evaluate_subnet` ends).

        An evaluator that died, or a group that lost a rank, is replaced and the trial
        fails (Tune retries it on another evaluator) instead of logging a result that says
        nothing about the sub-network.
        """
        index, handle, node = self.calls.acquire()
        self.held = index
        started = datetime.now(timezone.utc)
        full = span == (0, self.context.fidelity.windows)
        try:
            result = ray.get(handle.evaluate.remote(self.subnet.to_json(), self.context.metrics,
                                                    None if full else span))
            if result.get("evaluator_broken"):
                raise EvaluatorBroken(f"{result.get('evaluator_id')}: {result['error']}")
        except (ray.exceptions.RayActorError, EvaluatorBroken):
            ray.get(self.calls.pool.replace.remote(index, handle))
            raise
        return {**result, "evaluator_id": f"{result.get('evaluator_id')}@{node[:12]}",
                "started_at": started, "finished_at": datetime.now(timezone.utc)}

    def reference(self, rung: int) -> Reference:
        return ray.get(self.calls.pool.reference.remote(rung, self.context.objectives))

    def record(self, result: dict[str, Any], windows: int) -> dict[str, Any]:
        c = self.context
        row = make_row(c.run_id, self.trial_id, self.subnet, c.model_config, metric_columns(result),
                       result["status"], result.get("error"), result["evaluator_id"],
                       result["started_at"], result["finished_at"], c.seq_len, windows)
        self.settle([row])
        return row

    def settle(self, rows: list[dict[str, Any]]) -> None:
        """Log `rows`, returning the evaluator held, if any, in the same call."""
        held, self.held = self.held, None
        if held is not None or rows:
            self.calls.settle([] if held is None else [held], rows)


def evaluate_subnet(context: TrialContext, subnet: SubnetConfig, trial_id: str, calls: PoolCalls,
                    stored: dict[str, Any] | None, always_promote: bool = False) -> dict[str, Any]:
    """Evaluate one sub-network, rung by rung (`fidelity.evaluate_in_rungs`), appending a
    row to the log at every stage; its last row. A sub-network the log already holds in
    full (`stored`, its logged row) is not evaluated again; one it holds at a rung goes on
    from there."""
    host = EvaluatorHost(context, subnet, trial_id, calls)
    try:
        return evaluate_in_rungs(context.fidelity, context.objectives, host, stored, always_promote)
    finally:
        host.settle([])


def evaluate_batch(context: TrialContext, subnets: list[SubnetConfig], trial_ids: list[str],
                   always_promote: bool = False) -> list[dict[str, Any]]:
    """The last rows of sub-networks (logged under `trial_ids`), evaluated in parallel, each
    waiting for an evaluator in the pool; one lookup in the log for them all. Every
    evaluation runs to its end and is logged before an error of another (a lost evaluator)
    fails the trial, so a retry repeats only the lost ones."""
    pool = ray.get_actor(context.pool_name, namespace=context.namespace)
    stored = ray.get(pool.lookup.remote([subnet.config_hash() for subnet in subnets]))
    calls = PoolCalls(pool)
    with ThreadPoolExecutor(max_workers=len(subnets)) as threads:
        futures = [threads.submit(evaluate_subnet, context, subnet, trial_id, calls,
                                  stored.get(subnet.config_hash()), always_promote)
                   for subnet, trial_id in zip(subnets, trial_ids)]
    return [future.result() for future in futures]


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable: a batch of sub-networks, their evaluations, their rows."""
    subnets = [SubnetConfig.from_json(text) for text in config["subnets"]]
    trial_id = tune.get_context().get_trial_id()
    rows = evaluate_batch(context, subnets, [member_id(trial_id, k) for k in range(len(subnets))])
    tune.report({"rows": [_report_row(row) for row in rows]})
