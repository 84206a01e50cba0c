"""The evaluator pool: the run's evaluators, lent for one evaluation at a time, and the result log.

Evaluators (Ray actors that hold the model, or sharded groups) are created once per run;
the pool lends a free one for an evaluation, replaces one that died or broke, and appends
every finished evaluation's row to the result log, which is also the cache that makes
every configuration evaluated once.

The pool is one asynchronous actor, and nothing in it waits on the disk: the rows that
arrive while a Parquet part is being written (in a thread) go together into the next part
(group commit), and each `settle` returns once its rows are in a part. So lending evaluators
costs a few microseconds per call, and the log grows by one part per write, not per row,
however many evaluators finish at once.

Each call to the pool costs its one thread Ray's own handling of a call, which is most of
its work when evaluations are short (`benchmarks/README.md`, issue #18). So a trial makes
few: one `lookup` of its whole batch, one `borrow` for the evaluators its evaluations are
waiting for at that moment, one `settle` for the evaluators and rows that finished together
(`trial.PoolCalls`). `calls()` counts them.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from typing import Any

import ray

from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.settings import EvaluatorSettings
from prunetune.orchestrator.fidelity import Reference, reference
from prunetune.orchestrator.results import ResultLog
from prunetune.orchestrator.spec import Spec

HEAD = {"node:__internal_head__": 0.001}
"""Trials and the pool live on the head node, beside the driver: losing a worker node
then loses evaluators only, which the pool replaces, never the bookkeeping of a trial."""
NAMESPACE = "prunetune"


ACTOR_NODE = lambda actor: ray.get_runtime_context().get_node_id()  # noqa: E731
"""The node id of the actor it runs in (sent to each evaluator with `__ray_call__`). A
lambda, so Ray ships it by value: a function of this module would make every evaluator
import the module, and with it torch and pandas (about 180 MiB a stand-in evaluator of
`benchmarks/orchestration.py`, which imports neither otherwise)."""


@ray.remote(num_cpus=0)
class EvaluatorPool:
    """Lends the run's evaluators for one evaluation at a time, one evaluation per evaluator.

    Evaluators are spread over the nodes; a dead evaluator (its node was lost) is replaced
    by a new one on any node that has room.
    """

    def __init__(self, evaluator_class: type, settings: EvaluatorSettings, count: int,
                 options: dict[str, Any], run_dir: str) -> None:
        self.log = ResultLog(run_dir)
        self.log.known()
        self.evaluator_class = evaluator_class
        self.settings = settings
        self.options = options
        self.handles = [self._start(i) for i in range(count)]
        self.nodes = [h.__ray_call__.remote(ACTOR_NODE) for h in self.handles]
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            self.free.put_nowait(i)
        self.replaced = 0
        self.counts: Counter[str] = Counter()
        self.unwritten: list[tuple[list[dict[str, Any]], asyncio.Future]] = []
        self.writing = False

    def _start(self, index: int) -> Any:
        actor = ray.remote(self.evaluator_class).options(max_restarts=0,
                                                         scheduling_strategy="SPREAD",
                                                         **self.options)
        return actor.remote(self.settings, f"evaluator-{index}")

    async def infos(self) -> list[dict[str, Any]]:
        """Wait until every evaluator has loaded its model; what each one holds."""
        return list(await asyncio.gather(*(h.info.remote() for h in self.handles)))

    async def borrow(self, count: int) -> list[tuple[int, Any, str]]:
        """Up to `count` free evaluators, as soon as one is free: each one's index, handle and
        node id (for the log). They stay lent until `settle` returns them."""
        self.counts["borrow"] += 1
        indices = [await self.free.get()]
        while len(indices) < count and not self.free.empty():
            indices.append(self.free.get_nowait())
        return [(index, self.handles[index], await self._node(index)) for index in indices]

    async def _node(self, index: int) -> str:
        try:
            return await self.nodes[index]
        except ray.exceptions.RayActorError:
            return "lost"

    async def settle(self, returned: list[int], rows: list[dict[str, Any]]) -> None:
        """Take back the `returned` evaluators (lent again at once) and append `rows` to the
        log; returns once the rows are written (with the rows of the calls that arrived
        while the part before them was written)."""
        self.counts["settle"] += 1
        for index in returned:
            self.free.put_nowait(index)
        if not rows:
            return
        written = asyncio.get_running_loop().create_future()
        self.unwritten.append((rows, written))
        if not self.writing:
            self.writing = True
            asyncio.get_running_loop().create_task(self._write_unwritten())
        await written

    def replace(self, index: int, dead: Any) -> None:
        """Start a new evaluator in place of one that died or broke (once per death)."""
        self.counts["replace"] += 1
        if self.handles[index] == dead:
            ray.kill(dead, no_restart=True)
            self.handles[index] = self._start(index + len(self.handles) * (self.replaced + 1))
            self.nodes[index] = self.handles[index].__ray_call__.remote(ACTOR_NODE)
            self.replaced += 1

    def replacements(self) -> int:
        return self.replaced

    def calls(self) -> dict[str, int]:
        """The calls this pool has served, by method (the benchmark's calls per evaluation)."""
        return dict(self.counts)

    def lookup(self, config_hashes: list[str]) -> dict[str, dict[str, Any]]:
        """The logged rows of those configs the log holds, by config hash. The pool writes
        every row of its run, so its log knows them all without listing the folder again."""
        self.counts["lookup"] += 1
        known = (self.log.lookup(h, refresh=False) for h in config_hashes)
        return {row["config_hash"]: row for row in known if row is not None}

    async def _write_unwritten(self) -> None:
        """Write the waiting rows as one part, again until none wait; each waiter learns
        whether its part was written."""
        try:
            while self.unwritten:
                waiting, self.unwritten = self.unwritten, []
                try:
                    await asyncio.to_thread(self.log.append, [row for rows, _ in waiting for row in rows])
                except Exception as error:
                    for _, written in waiting:
                        written.set_exception(error)
                else:
                    for _, written in waiting:
                        written.set_result(None)
        finally:
            self.writing = False

    def reference(self, rung: int, objectives: dict[str, str]) -> Reference:
        """What a multi-fidelity trial compares its rung row with: the full-fidelity rows
        logged so far, with their rows at that rung."""
        self.counts["reference"] += 1
        return reference(self.log.read(), rung, objectives)


def evaluator_class_for(spec: Spec) -> type:
    """What the pool starts per evaluator: a single-device `Evaluator`, or a sharded group
    of `gpus_per_evaluator` ranks when the spec asks for sharding."""
    r = spec.resources
    if r.sharding == "none":
        return Evaluator
    from prunetune.evaluators.settings import ShardingSettings
    from prunetune.evaluators.sharded.group import sharded_evaluator_class

    return sharded_evaluator_class(ShardingSettings(ranks=r.gpus_per_evaluator, mode=r.sharding,
                                                    offload=r.offload))


def evaluator_resources(spec: Spec) -> dict[str, Any]:
    """Resources of one evaluator actor; a sharded group's GPUs are held by its ranks."""
    r = spec.resources
    return {"num_cpus": r.cpus_per_evaluator,
            "num_gpus": 0 if r.sharding != "none" else r.gpus_per_evaluator}


def pool_concurrency(evaluators: int) -> int:
    """Calls the pool serves at once: at most a settle per evaluator (its rows waiting to be
    written), the trials' waiting borrows, and room to spare (Ray's default of 1000 would
    stall the calls of more than about 400 evaluators, were each its own call)."""
    return max(1000, 4 * evaluators)


def start_pool(spec: Spec, run_id: str, run_dir: str,
               evaluator_class: type) -> tuple[Any, str, list[dict[str, Any]]]:
    """Create the run's evaluators (they load the model now) and wait until they are ready."""
    pool_name = f"prunetune-pool-{run_id}-{os.getpid()}"
    pool = EvaluatorPool.options(name=pool_name, namespace=NAMESPACE, resources=HEAD,
                                 max_concurrency=pool_concurrency(spec.resources.evaluators)).remote(
        evaluator_class, spec.evaluator_settings(), spec.resources.evaluators,
        evaluator_resources(spec), run_dir)
    infos = ray.get(pool.infos.remote())
    return pool, pool_name, infos
