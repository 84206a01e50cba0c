"""The search: a Ray Tune experiment whose trials hand sub-networks to resident evaluators.

Evaluators (Ray actors that hold the model) are created once per run and lent out by an
`EvaluatorPool`; a trial is a light CPU task that borrows a free evaluator, evaluates one
SubnetConfig, writes its row to the result log itself, and reports the metrics to Tune.
Writing the row before reporting is what makes a stop at any moment safe: a trial that
finished is in the log, and a trial that is re-run after a resume finds its row there and
reports it without evaluating again.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow.fs as pafs
import ray
import yaml
from ray import tune

from prunetune.cluster.connect import code_runtime_env, connect, storage_uri
from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.settings import EvaluatorSettings, LatencySettings
from prunetune.orchestrator.algorithms import DENSE_TRIAL, GuardedSearcher, make_algorithm
from prunetune.orchestrator.spec import Constraint, Spec, load_spec
from prunetune.orchestrator.pareto import hypervolume, objective_matrix, pareto_front, plot_front, write_front
from prunetune.orchestrator.results import (
    FIXED_COLUMNS, ResultLog, make_row, open_filesystem, read_run_file, write_run_file,
)
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.spaces import SearchSpace, make_space
from prunetune.search_spaces.subnet import SubnetConfig

SPEC_FILE = "spec.yaml"
RUN_FILE = "run.json"
TUNE_NAME = "tune"
FRONT_EVERY = 5
TRIAL_CPUS = 0.01
HEAD = {"node:__internal_head__": 0.001}
"""Trials and the pool live on the head node, beside the driver: losing a worker node
then loses evaluators only, which the pool replaces, never the bookkeeping of a trial."""


def evaluator_settings(spec: Spec) -> EvaluatorSettings:
    """What each evaluator of this spec loads and measures."""
    e = spec.evaluation
    device = "cpu" if spec.resources.gpus_per_evaluator == 0 else "auto"
    return EvaluatorSettings(
        model=spec.model, dtype=spec.dtype, device=device, data=e.data, seq_len=e.seq_len,
        windows=e.windows, batch_size=e.batch_size, tasks=tuple(e.tasks),
        task_limit=e.task_limit, mode=e.mode, importance=e.importance,
        calibration=e.calibration, calibration_samples=e.calibration_samples,
        latency=LatencySettings(**e.latency.model_dump(exclude={"enabled"})),
    )


def _node_of(evaluator: Any) -> str:
    return ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=0)
class EvaluatorPool:
    """Lends the run's evaluators to trials, one trial per evaluator at a time.

    Evaluators are spread over the nodes; a dead evaluator (its node was lost) is replaced
    by a new one on any node that has room.
    """

    def __init__(self, evaluator_class: type, settings: EvaluatorSettings, count: int,
                 options: dict[str, Any], run_dir: str) -> None:
        self.log = ResultLog(run_dir)
        self.rows = {row["config_hash"]: row for row in self.log.table().to_pylist()}
        self.evaluator_class = evaluator_class
        self.settings = settings
        self.options = options
        self.handles = [self._start(i) for i in range(count)]
        self.nodes = [h.__ray_call__.remote(_node_of) for h in self.handles]
        self.free: asyncio.Queue[int] = asyncio.Queue()
        for i in range(count):
            self.free.put_nowait(i)
        self.replaced = 0

    def _start(self, index: int) -> Any:
        actor = ray.remote(self.evaluator_class).options(max_restarts=0,
                                                         scheduling_strategy="SPREAD",
                                                         **self.options)
        return actor.remote(self.settings, f"evaluator-{index}")

    async def infos(self) -> list[dict[str, Any]]:
        """Wait until every evaluator has loaded its model; what each one holds."""
        return list(await asyncio.gather(*(h.info.remote() for h in self.handles)))

    async def acquire(self) -> tuple[int, Any, str]:
        """A free evaluator: its index, its handle, and the id of its node (for the log)."""
        index = await self.free.get()
        try:
            node = await self.nodes[index]
        except ray.exceptions.RayActorError:
            node = "lost"
        return index, self.handles[index], node

    def release(self, index: int) -> None:
        self.free.put_nowait(index)

    def replace(self, index: int, dead: Any) -> None:
        """Start a new evaluator in place of one that died or broke (once per death)."""
        if self.handles[index] == dead:
            ray.kill(dead, no_restart=True)
            self.handles[index] = self._start(index + len(self.handles) * (self.replaced + 1))
            self.nodes[index] = self.handles[index].__ray_call__.remote(_node_of)
            self.replaced += 1

    def replacements(self) -> int:
        return self.replaced

    def lookup(self, config_hash: str) -> dict[str, Any] | None:
        """The logged row of a config: the cache that makes every evaluation happen once."""
        return self.rows.get(config_hash)

    def record(self, row: dict[str, Any]) -> None:
        """Append a finished trial's row to the log (atomically) and to the cache."""
        self.log.append([row])
        self.rows.setdefault(row["config_hash"], row)


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


def _metric_columns(result: dict[str, Any]) -> dict[str, float | None]:
    skip = set(FIXED_COLUMNS) | {"load_seconds"}
    return {k: v for k, v in result.items()
            if k not in skip and (v is None or isinstance(v, (int, float)))}


def _report_row(row: dict[str, Any]) -> dict[str, Any]:
    """The row as Tune metrics: numbers and short strings only."""
    out = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
    out.pop("versions", None)
    return out


class EvaluatorBroken(RuntimeError):
    """An evaluator group lost a rank: the trial fails (Tune retries it on another
    evaluator) instead of logging a result that says nothing about the sub-network."""


def evaluate_subnet(context: TrialContext, subnet: SubnetConfig, trial_id: str) -> dict[str, Any]:
    """Evaluate one sub-network on a borrowed evaluator and append its row to the log."""
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
    row = make_row(context.run_id, trial_id, subnet, context.model_config, _metric_columns(result),
                   result["status"], result.get("error"), f"{result.get('evaluator_id')}@{node[:12]}",
                   started, finished, context.seq_len)
    ray.get(pool.record.remote(row))
    return row


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune trainable: one sub-network, one evaluation, one row."""
    subnet = SubnetConfig.from_json(config["subnet"])
    row = evaluate_subnet(context, subnet, tune.get_context().get_trial_id())
    tune.report(_report_row(row))


class FrontCallback(tune.Callback):
    """Progress bar, and front.parquet / front.png rewritten every few trials."""

    def __init__(self, run_dir: str, objectives: dict[str, str], budget: int, dense_hash: str) -> None:
        self.run_dir = run_dir
        self.objectives = objectives
        self.budget = budget
        self.dense_hash = dense_hash
        self.since_front = 0
        self.log: ResultLog | None = None
        self.bar: Any = None
        self.stats = {"failed": 0, "front": 0, "hv": 0.0}

    def setup(self, **info: Any) -> None:
        from tqdm import tqdm

        self.log = ResultLog(self.run_dir)
        done = max(len(self.log.evaluated_hashes()) - 1, 0)
        self.bar = tqdm(total=self.budget, initial=min(done, self.budget), desc="trials",
                        unit="trial", file=sys.stderr, dynamic_ncols=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        self.stats["failed"] += result.get("status") != "ok"
        self.since_front += 1
        if self.since_front >= FRONT_EVERY:
            self.write()
        running = sum(t.status == "RUNNING" for t in trials)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(running=running, failed=self.stats["failed"],
                                 front=self.stats["front"], hv=f"{self.stats['hv']:.4g}")

    def write(self) -> dict[str, Any]:
        """Recompute the front from the log and write it; its size and hypervolume."""
        self.since_front = 0
        summary = write_front_files(self.run_dir, self.objectives, self.dense_hash, self.log)
        self.stats.update(front=summary["front_size"], hv=summary["hypervolume"])
        return summary

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.write()
        if self.bar is not None:
            self.bar.close()


def reference_point(df: Any, objectives: dict[str, str]) -> list[float]:
    """The hypervolume reference: 10% beyond the worst value of each (minimised) objective."""
    F = objective_matrix(df, objectives)
    worst, best = F.max(0), F.min(0)
    return list(worst + 0.1 * (worst - best) + 1e-12)


def write_front_files(run_dir: str, objectives: dict[str, str], dense_hash: str | None,
                      log: ResultLog | None = None) -> dict[str, Any]:
    """front.parquet and front.png of a run, from its result log."""
    df = (log or ResultLog(run_dir)).read()
    ok = df[df["status"] == "ok"] if len(df) else df
    if len(ok) == 0:
        return {"front_size": 0, "hypervolume": 0.0, "rows": len(df)}
    front = pareto_front(df, objectives)
    write_front(front, f"{run_dir}/front.parquet")
    dense = ok[ok["config_hash"] == dense_hash].to_dict("records")
    plot_front(df, front, objectives, f"{run_dir}/front.png", dense=dense[0] if dense else None)
    F = objective_matrix(front, objectives)
    hv = hypervolume(F, reference_point(ok, objectives)) if len(F) else 0.0
    return {"front_size": len(front), "hypervolume": hv, "rows": len(df)}


@dataclass
class SearchOutcome:
    """Where a finished search wrote its results, and what it found."""

    run_dir: str
    front: Any
    rows: int
    summary: dict[str, Any] = field(default_factory=dict)


def _run_record(run_dir: str) -> dict[str, Any]:
    text = read_run_file(run_dir, RUN_FILE)
    return json.loads(text) if text else {}


def _write_run_record(run_dir: str, record: dict[str, Any]) -> None:
    write_run_file(run_dir, RUN_FILE, json.dumps(record, indent=2, sort_keys=True, default=str))


def run_spec(run_dir: str) -> Spec:
    """The spec a run was started with (saved in its run directory)."""
    text = read_run_file(run_dir, SPEC_FILE)
    if text is None:
        raise FileNotFoundError(f"{run_dir}/{SPEC_FILE}: not a prunetune run directory "
                                f"(no {SPEC_FILE})")
    return load_spec(yaml.safe_load(text))


def local_cpus(spec: Spec) -> int:
    """CPUs of a local Ray instance: the machine's, but at least the evaluators' plus one,
    so that the light trial tasks always find room beside the evaluators."""
    needed = math.ceil(spec.resources.evaluators * spec.resources.cpus_per_evaluator) + 1
    return max(os.cpu_count() or 1, needed)


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


def plan_resources(spec: Spec) -> Spec:
    """The spec with `gpus_per_evaluator: auto` replaced by the planner's group size and
    evaluator count for the connected cluster (ZeRO-3 sharding where a group needs several
    GPUs and the spec names no mode); other specs are returned unchanged."""
    r = spec.resources
    if r.gpus_per_evaluator != "auto":
        return spec
    from prunetune.cluster.plan import cluster_gpus, load_config_file, model_config_path, plan_evaluators

    nodes, gpus_per_node, memory_gib = cluster_gpus()
    plan = plan_evaluators(load_config_file(model_config_path(spec.model)), memory_gib, nodes,
                           gpus_per_node, spec.dtype, spec.evaluation.seq_len,
                           spec.evaluation.batch_size)
    print(plan.describe(), file=sys.stderr)
    sharding = r.sharding
    if plan.gpus_per_evaluator > 1 and sharding == "none":
        sharding = "zero3"
    resources = r.model_copy(update={"gpus_per_evaluator": plan.gpus_per_evaluator,
                                     "evaluators": plan.evaluators, "sharding": sharding})
    return spec.model_copy(update={"resources": resources})


def _pool_options(spec: Spec) -> dict[str, Any]:
    """Resources of one evaluator actor; a sharded group's GPUs are held by its ranks."""
    r = spec.resources
    return {"num_cpus": r.cpus_per_evaluator,
            "num_gpus": 0 if r.sharding != "none" else r.gpus_per_evaluator}


def start_pool(spec: Spec, run_id: str, evaluator_class: type) -> tuple[Any, str, list[dict[str, Any]]]:
    """Create the run's evaluators (they load the model now) and wait until they are ready."""
    pool_name = f"prunetune-pool-{run_id}-{os.getpid()}"
    pool = EvaluatorPool.options(name=pool_name, namespace="prunetune", resources=HEAD).remote(
        evaluator_class, evaluator_settings(spec), spec.resources.evaluators, _pool_options(spec),
        spec.run_dir if "://" in spec.run_dir else os.path.abspath(spec.run_dir))
    infos = ray.get(pool.infos.remote())
    return pool, pool_name, infos


def build_space(spec: Spec, model_config: dict[str, Any], layer_order: list[int] | None) -> SearchSpace:
    """The spec's search space over this model, dropping the least influential layers first."""
    return make_space(spec.search_space.preset, model_config, layer_order=layer_order,
                      **spec.search_space.bounds())


def _dense_row(context: TrialContext) -> dict[str, Any]:
    dense = SubnetConfig.dense(context.model_config)
    return evaluate_subnet(context, dense, DENSE_TRIAL)


def run_search(spec: Spec, evaluator_class: type | None = None, resume: bool = False,
               num_cpus: int | None = None) -> SearchOutcome:
    """Run (or, with `resume`, finish) the search of a spec; returns its front.

    `evaluator_class` None starts what the spec's resources ask for (`evaluator_class_for`).
    """
    spec = spec.with_run_dir()
    run_dir = os.path.abspath(spec.run_dir) if "://" not in spec.run_dir else spec.run_dir
    write_run_file(run_dir, SPEC_FILE, spec.to_yaml())
    record = _run_record(run_dir)
    run_id = record.get("run_id") or f"{spec.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    connect(spec.address, code_runtime_env(spec.ship_code),
            num_cpus=num_cpus or (None if spec.address else local_cpus(spec)))
    spec = plan_resources(spec)
    pool, pool_name, infos = start_pool(spec, run_id, evaluator_class or evaluator_class_for(spec))
    model_config = infos[0]["model_config"]
    context = TrialContext(run_id, run_dir, pool_name, "prunetune", model_config,
                           spec.metrics_needed(), spec.evaluation.seq_len)
    dense = _dense_row(context)
    layer_order = infos[0].get("layer_order")
    _write_run_record(run_dir, {"run_id": run_id, "model_config": model_config,
                                "layer_order": layer_order, "dense_hash": dense["config_hash"],
                                "evaluators": infos})
    space = build_space(spec, model_config, layer_order)
    objectives = dict(spec.objectives)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                   {"cpu": TRIAL_CPUS, **HEAD})
    callback = FrontCallback(run_dir, objectives, spec.algorithm.num_samples, dense["config_hash"])
    tune_path = os.path.join(storage_uri(run_dir), TUNE_NAME)
    if resume and tune.Tuner.can_restore(tune_path):
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = _new_tuner(spec, space, objectives, run_dir, trainable, callback, model_config,
                           dense)
    start = time.perf_counter()
    tuner.fit()
    summary = write_front_files(run_dir, objectives, dense["config_hash"])
    summary.update(seconds=time.perf_counter() - start,
                   evaluator_replacements=ray.get(pool.replacements.remote()))
    front = _read_front(run_dir)
    ray.kill(pool)
    return SearchOutcome(run_dir=run_dir, front=front, rows=summary["rows"], summary=summary)


def _read_front(run_dir: str) -> Any:
    import pyarrow.parquet as pq

    fs, root = open_filesystem(run_dir)
    path = f"{root}/front.parquet"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return pd.DataFrame()
    return pq.read_table(path, filesystem=fs).to_pandas()


def _new_tuner(spec: Spec, space: SearchSpace, objectives: dict[str, str], run_dir: str,
               trainable: Any, callback: FrontCallback, model_config: dict[str, Any],
               dense: dict[str, Any]) -> tune.Tuner:
    initial = [space.encode(SubnetConfig.dense(model_config)), *warm_start_configs(spec, space)]
    algorithm = make_algorithm(spec.algorithm.name, space, objectives, spec.algorithm.seed,
                               spec.algorithm.population_size, initial)
    feasible = Feasibility(spec.parsed_constraints(), model_config,
                           {k: v for k, v in dense.items() if isinstance(v, (int, float))},
                           spec.evaluation.seq_len, 2)
    searcher = GuardedSearcher(algorithm, space, objectives, run_dir, feasible,
                               spec.algorithm.num_samples)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=spec.algorithm.num_samples,
                                    max_concurrent_trials=spec.resources.evaluators,
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=TUNE_NAME, storage_path=storage_uri(run_dir), callbacks=[callback], verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
        ),
    )


def warm_start_configs(spec: Spec, space: SearchSpace) -> list[dict[str, Any]]:
    """Configs of the warm-start strategies the spec names, encoded for the space."""
    if not spec.algorithm.warm_start:
        return []
    from prunetune.orchestrator.baselines import warm_start_subnets

    return [space.encode(s) for s in warm_start_subnets(spec.algorithm.warm_start, space)]


def resume_search(run_dir: str, evaluator_class: type | None = None,
                  num_cpus: int | None = None) -> SearchOutcome:
    """Finish a stopped search: same spec, same run id, nothing evaluated twice."""
    return run_search(run_spec(run_dir), evaluator_class, resume=True, num_cpus=num_cpus)
