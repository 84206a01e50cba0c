"""The search: a Ray Tune experiment whose trials hand sub-networks to resident evaluators.

`run_search` connects to Ray, starts the evaluator pool (`pool.py`), evaluates the dense
model, and runs a Tuner whose searcher (`algorithms.py`, in batches: `batches.py`)
proposes sub-networks and whose trials (`trial.py`) evaluate them; the front callback (`callbacks.py`) keeps the front
files current, and the run record (`run_record.py`) keeps what a resume needs.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Mapping

import ray
from ray import tune

from prunetune.cluster.connect import code_runtime_env, connect, storage_uri
from prunetune.orchestrator.algorithms import GuardedSearcher, make_algorithm
from prunetune.orchestrator.batches import (
    BatchSearcher, concurrent_trials, subnets_per_trial, trial_resources,
)
from prunetune.orchestrator.callbacks import FrontCallback, write_front_files
from prunetune.orchestrator.console import say
from prunetune.orchestrator.fidelity import Fidelity, loss_ceiling
from prunetune.orchestrator.surrogate import spec_surrogate
from prunetune.orchestrator.pool import NAMESPACE, evaluator_class_for, start_pool
from prunetune.orchestrator.results import DENSE_TRIAL
from prunetune.orchestrator.run_record import (
    read_front, read_run_record, resolve_run_dir, run_spec, write_run_record, write_run_spec,
)
from prunetune.orchestrator.spec import Spec
from prunetune.orchestrator.trial import Feasibility, TrialContext, evaluate_batch, run_trial
from prunetune.search_spaces.dims import ModelDims
from prunetune.search_spaces.spaces import SearchSpace, make_space
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.supernet import supernet_record

TUNE_NAME = "tune"


@dataclass
class SearchOutcome:
    """Where a finished search wrote its results, and what it found."""

    run_dir: str
    front: Any
    rows: int
    summary: dict[str, Any] = field(default_factory=dict)


def local_cpus(spec: Spec) -> int:
    """CPUs of a local Ray instance: the machine's, but at least the evaluators' plus one,
    so that the light trial tasks always find room beside the evaluators."""
    needed = math.ceil(spec.resources.evaluators * spec.resources.cpus_per_evaluator) + 1
    return max(os.cpu_count() or 1, needed)


def connect_for(spec: Spec, num_cpus: int | None = None) -> None:
    """Join the spec's Ray cluster with its code, or start a local instance sized for its
    evaluators (`num_cpus`, when given, instead)."""
    connect(spec.address, code_runtime_env(spec.ship_code),
            num_cpus=num_cpus or (None if spec.address else local_cpus(spec)))


def plan_resources(spec: Spec) -> Spec:
    """The spec with `gpus_per_evaluator: auto` replaced by the planner's group size and
    evaluator count for the connected cluster (where a group needs several GPUs and the
    spec names no mode: tensor parallelism when the group is inside a node and the model's
    widths split over it, else ZeRO-3), and `evaluation.batch_size: auto` by the largest
    batch the group's memory holds (at most the windows); other specs are returned
    unchanged."""
    r, e = spec.resources, spec.evaluation
    if r.gpus_per_evaluator != "auto":
        return spec
    from prunetune.cluster.plan import (
        MAX_BATCH, cluster_gpus, load_config_file, model_config_path, plan_evaluators,
    )

    nodes, gpus_per_node, memory_gib = cluster_gpus()
    config = load_config_file(model_config_path(spec.model))
    plan = plan_evaluators(config, memory_gib, nodes,
                           gpus_per_node, spec.dtype, e.seq_len,
                           None if e.batch_size == "auto" else e.batch_size,
                           max_batch=min(MAX_BATCH, e.windows))
    say(plan.describe())
    sharding = r.sharding
    if plan.gpus_per_evaluator > 1 and sharding == "none":
        in_node = plan.gpus_per_evaluator <= gpus_per_node
        splits = ModelDims.from_config(config).unsplit_width(plan.gpus_per_evaluator) is None
        sharding = "tp" if in_node and splits else "zero3"
    resources = r.model_copy(update={"gpus_per_evaluator": plan.gpus_per_evaluator,
                                     "evaluators": plan.evaluators, "sharding": sharding})
    evaluation = e.model_copy(update={"batch_size": plan.batch_size})
    return spec.model_copy(update={"resources": resources, "evaluation": evaluation})


def build_space(spec: Spec, model_config: dict[str, Any], layer_order: list[int] | None) -> SearchSpace:
    """The spec's search space over this model, dropping the least influential layers first."""
    return make_space(spec.search_space.preset, model_config, layer_order=layer_order,
                      **spec.search_space.bounds())


def _dense_row(context: TrialContext) -> dict[str, Any]:
    """The dense model's row, scored on every window (and logged at every rung, which the
    screens of the first proposals compare with)."""
    dense = SubnetConfig.dense(context.model_config)
    return evaluate_batch(context, [dense], [DENSE_TRIAL], always_promote=True)[0]


def spec_fidelity(spec: Spec, dense: Mapping[str, Any] | None = None) -> Fidelity:
    """The fidelities the spec's evaluation scores sub-networks at; with the dense model's
    row, the loss ceiling of its quality constraints too (the dense model is scored in
    full before any screen)."""
    e = spec.evaluation
    ceiling = math.inf if dense is None else loss_ceiling(spec.parsed_constraints(), dense)
    return Fidelity(windows=e.windows, rungs=tuple(e.fidelity.rungs), margin=e.fidelity.margin,
                    ceiling=ceiling)


def run_search(spec: Spec, evaluator_class: type | None = None, resume: bool = False,
               num_cpus: int | None = None) -> SearchOutcome:
    """Run (or, with `resume`, finish) the search of a spec; returns its front.

    `evaluator_class` None starts what the spec's resources ask for (`evaluator_class_for`).
    """
    spec = spec.with_run_dir()
    run_dir = resolve_run_dir(spec.run_dir)
    write_run_spec(run_dir, spec)
    record = read_run_record(run_dir)
    run_id = record.get("run_id") or f"{spec.name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    connect_for(spec, num_cpus)
    spec = plan_resources(spec)
    say(f"loading {spec.model} ({spec.dtype}) on {_evaluators(spec)}...")
    pool, pool_name, infos = start_pool(spec, run_id, run_dir,
                                        evaluator_class or evaluator_class_for(spec))
    model_config = infos[0]["model_config"]
    say(f"loaded in {max(i['load_seconds'] for i in infos):.0f} s; evaluating the dense model...")
    context = TrialContext(run_id, run_dir, pool_name, NAMESPACE, model_config,
                           spec.metrics_needed(), spec.evaluation.seq_len, dict(spec.objectives),
                           spec_fidelity(spec))
    dense = _dense_row(context)
    context = replace(context, fidelity=spec_fidelity(spec, dense))
    layer_order = infos[0].get("layer_order")
    supernet = supernet_record(spec.model)
    if supernet is not None:
        say(f"{spec.model} is a super-network of {supernet['base_model']} "
            f"({supernet['strategy']['strategy']}, {supernet['trained_tokens']:,} tokens); "
            "its trained importance order is kept")
    write_run_record(run_dir, {"run_id": run_id, "model_config": model_config,
                                "layer_order": layer_order, "dense_hash": dense["config_hash"],
                                "evaluators": infos, "supernet": supernet})
    space = build_space(spec, model_config, layer_order)
    objectives = dict(spec.objectives)
    say(f"dense: {_objective_values(dense, objectives)}; searching {spec.algorithm.num_samples} "
        f"sub-networks ({spec.algorithm.name}, {spec.search_space.preset} space)")
    r = spec.resources
    batch = subnets_per_trial(r.evaluators, r.subnets_per_trial)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                   trial_resources(r.evaluators, batch))
    callback = FrontCallback(run_dir, objectives, spec.algorithm.num_samples, dense["config_hash"])
    tune_path = os.path.join(storage_uri(run_dir), TUNE_NAME)
    if resume and tune.Tuner.can_restore(tune_path):
        tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = _new_tuner(spec, space, context, trainable, callback, dense, batch)
    start = time.perf_counter()
    tuner.fit()
    summary = write_front_files(run_dir, objectives, dense["config_hash"])
    summary.update(seconds=time.perf_counter() - start,
                   evaluator_replacements=ray.get(pool.replacements.remote()),
                   pool_calls=ray.get(pool.calls.remote()))
    front = read_front(run_dir)
    ray.kill(pool)
    return SearchOutcome(run_dir=run_dir, front=front, rows=summary["rows"], summary=summary)


def _evaluators(spec: Spec) -> str:
    """`2 evaluators of 1 GPU`, `1 evaluator (CPU)`: what the spec's resources start."""
    r = spec.resources
    count = f"{r.evaluators} evaluator{'s' if r.evaluators != 1 else ''}"
    return f"{count} (CPU)" if r.gpus_per_evaluator == 0 else f"{count} of {r.gpus_per_evaluator} GPU"


def _objective_values(row: dict[str, Any], objectives: dict[str, str]) -> str:
    """`perplexity 38.82, params 134,515,008` (or the failure) for a result-log row."""
    if row.get("status") != "ok":
        return f"failed ({row.get('error')})"
    return ", ".join(f"{name} {row[name]:,.4g}" for name in objectives if row.get(name) is not None)


def _new_tuner(spec: Spec, space: SearchSpace, context: TrialContext, trainable: Any,
               callback: FrontCallback, dense: dict[str, Any], batch: int) -> tune.Tuner:
    model_config, objectives, run_dir = context.model_config, context.objectives, context.run_dir
    initial = [space.encode(SubnetConfig.dense(model_config)), *warm_start_configs(spec, space)]
    algorithm = make_algorithm(spec.algorithm.name, space, objectives, spec.algorithm.seed,
                               spec.algorithm.population_size, initial)
    feasible = Feasibility(spec.parsed_constraints(), model_config,
                           {k: v for k, v in dense.items() if isinstance(v, (int, float))},
                           spec.evaluation.seq_len, 2)
    fidelity = context.fidelity
    guard = GuardedSearcher(algorithm, space, objectives, run_dir, feasible,
                            spec.algorithm.num_samples, fidelity,
                            spec_surrogate(spec, space, model_config, dense, fidelity))
    r = spec.resources
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=BatchSearcher(guard, batch),
                                    num_samples=spec.algorithm.num_samples,
                                    max_concurrent_trials=concurrent_trials(r.evaluators, batch),
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
