"""Recovery of a run's front: every one-shot front point distilled from the dense model,
measured again by the run's own evaluation, and logged as a `recovered` row.

`plan_recovery` reads the run's one-shot front and leaves out the dense model (it is the
teacher) and the points already recovered on the same token budget; `run_recovery` runs
one Ray task per remaining point with the resources of one of the run's evaluators,
as many at a time as the run has evaluators. A task (`recover_point`) loads the dense
model as the run's evaluator does, cuts the sub-network out, distils it with its
checkpoint in `<run_dir>/recovered/<config_hash>/checkpoint` (a killed recovery started
again resumes there), saves it to `<run_dir>/recovered/<config_hash>/` and measures it
with the run's metrics. The driver, the only writer of the log, appends each finished
point's row, then removes its checkpoint; at the end it redraws front.png with both fronts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from functools import partial
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
from torch import nn

from tqdm import tqdm

from prunetune.evaluators.contract import DTYPES
from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.model import load_tokenizer
from prunetune.evaluators.settings import EvaluatorSettings
from prunetune.evaluators.surgery import extract, save_extracted
from prunetune.metrics import COST_METRICS, MEMORY_METRIC
from prunetune.orchestrator.callbacks import write_front_files
from prunetune.orchestrator.console import console, say
from prunetune.orchestrator.pareto import merge_fronts
from prunetune.orchestrator.pool import evaluator_resources
from prunetune.orchestrator.results import ONESHOT, RECOVERED, ResultLog, make_row
from prunetune.orchestrator.run_record import read_run_record, run_spec
from prunetune.orchestrator.search import connect_for, plan_resources
from prunetune.orchestrator.spec import Spec
from prunetune.orchestrator.trial import metric_columns
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.data import refuse_evaluation_data, training_windows
from prunetune.training.distill import DistillResult, distill
from prunetune.training.settings import DistillSettings

RECOVERED_DIR = "recovered"
"""The run directory's folder of recovered sub-networks, one folder per config hash."""
CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class PointRecovery:
    """What a recovery task sends back: the recovered sub-network's metrics, the tokens it
    trained on, when the task ran, and what ran it."""

    metrics: dict[str, Any]
    trained_tokens: int
    started_at: datetime
    finished_at: datetime
    evaluator_id: str


@dataclass(frozen=True)
class RecoveryPlan:
    """What `recover --front` will do in a run: its spec, record and objectives, its
    one-shot front (the dense model left out; indexed by the row of `prunetune front`),
    the points not yet recovered on this token budget, and how to distil them."""

    run_dir: str
    spec: Spec
    record: dict[str, Any]
    points: pd.DataFrame
    todo: list[SubnetConfig]
    settings: DistillSettings
    data: str


@dataclass
class RecoveryOutcome:
    """What `recover --front` did: one-shot and recovered metrics per front point (indexed
    by the row of `prunetune front`), the points recovered now and before, and the error
    of every point that failed, by config hash."""

    table: pd.DataFrame
    recovered: int
    skipped: int
    failed: dict[str, str] = field(default_factory=dict)


def point_folder(run_dir: str, config_hash: str) -> Path:
    """Where a recovered front point is saved (its checkpoint in `checkpoint/` inside)."""
    return Path(run_dir) / RECOVERED_DIR / config_hash


def distil_subnet(evaluator: Evaluator, student: nn.Module, settings: DistillSettings,
                  data: str, checkpoint_dir: str | Path) -> DistillResult:
    """Distil `student` (`extract` of the evaluator's dense model) in place from that dense
    model on the training text `data`; a checkpoint in `checkpoint_dir` is resumed. The
    student trains in float32 and is put back in the model's dtype after."""
    windows = training_windows(evaluator.tokenizer, data, settings.seq_len)
    result = distill(evaluator.model, student.float(), windows, settings, checkpoint_dir)
    student.to(evaluator.dtype)
    return result


def save_recovered(student: nn.Module, subnet: SubnetConfig, tokenizer: Any,
                   out: str | Path) -> Path:
    """Write a distilled sub-network and its tokenizer as `prunetune export` does."""
    path = save_extracted(student, subnet, out)
    tokenizer.save_pretrained(path)
    return path


def dense_and_student(evaluator_settings: EvaluatorSettings, subnet: SubnetConfig,
                      device: Any, placement: str) -> tuple[nn.Module, nn.Module]:
    """A distillation worker's teacher (the dense model, loaded and sorted as the run's
    evaluator does, on the worker's current device) and its float32 student; the teacher
    whole, or partitioned over the workers (`placement`)."""
    if placement == "partitioned":
        return partitioned_dense_and_student(evaluator_settings, subnet, device)
    evaluator = Evaluator(replace(evaluator_settings, tasks=()), f"distil-{subnet.config_hash()[:8]}")
    return evaluator.model, extract(evaluator.model, subnet, evaluator.input_norms).float()


def partitioned_dense_and_student(evaluator_settings: EvaluatorSettings, subnet: SubnetConfig,
                                  device: torch.device) -> tuple[nn.Module, nn.Module]:
    """The dense model partitioned over the workers (ZeRO-3), sorted by the run's cached
    importance scores, and the float32 student cut out of it one gathered layer at a time,
    whole on every worker."""
    from prunetune.evaluators.sharded.rank import from_rank0
    from prunetune.evaluators.sharded.zero3 import extract_partitioned, load_sorted_partitioned

    teacher, scores = load_sorted_partitioned(
        evaluator_settings, DTYPES[evaluator_settings.dtype], device,
        partial(from_rank0, device=device), writer=torch.distributed.get_rank() == 0)
    input_norms = None if scores is None else scores.input_norms
    return teacher, extract_partitioned(teacher, subnet, input_norms).float()


def recover_on_workers(run_dir: str, subnet: SubnetConfig, settings: DistillSettings,
                       data: str, out: str | Path, workers: int,
                       zero_stage: int | None = None, teacher: str = "whole") -> DistillResult:
    """Distil one sub-network of a run on `workers` Ray Train workers (one GPU each when
    the cluster has GPUs) with DeepSpeed ZeRO `zero_stage` (None: the workers choose), the
    teacher whole on every worker or partitioned over them (`teacher`), and write it with
    its tokenizer to `out`; its checkpoints go to `out/checkpoint`, where a run started
    again resumes."""
    from prunetune.training.distributed import WorkerSettings, distill_on_workers

    spec = run_spec(run_dir)
    evaluator_settings = spec.evaluator_settings()
    out = Path(out).resolve()
    tokenizer = load_tokenizer(evaluator_settings.model)
    if tokenizer is None:
        raise ValueError(f"model {evaluator_settings.model}: random weights have no tokenizer "
                         "to read training text with")
    windows = training_windows(tokenizer, data, settings.seq_len)
    connect_for(spec)
    placement = WorkerSettings(workers=workers, storage=str(out / CHECKPOINT_DIR),
                               name="distill", use_gpu=ray.cluster_resources().get("GPU", 0) > 0,
                               zero_stage=zero_stage, teacher=teacher)
    result = distill_on_workers(partial(dense_and_student, evaluator_settings, subnet), windows,
                                settings, placement,
                                finish=partial(save_extracted, subnet=subnet, out_dir=out))
    tokenizer.save_pretrained(out)
    return result


def recover_point(evaluator_settings: EvaluatorSettings, subnet: SubnetConfig,
                  settings: DistillSettings, data: str, folder: str,
                  metrics: list[str]) -> PointRecovery:
    """One front point (a Ray task): the dense model loaded as the run's evaluator loads
    it, the sub-network distilled from it, saved to `folder`, and measured."""
    started = datetime.now(timezone.utc)
    evaluator = Evaluator(evaluator_settings, f"recover-{subnet.config_hash()[:8]}")
    student = extract(evaluator.model, subnet, evaluator.input_norms)
    result = distil_subnet(evaluator, student, settings, data, Path(folder) / CHECKPOINT_DIR)
    save_recovered(student, subnet, evaluator.tokenizer, folder)
    measured = evaluator.measure(subnet, set(metrics), trained=student)
    node = ray.get_runtime_context().get_node_id()
    return PointRecovery(measured, result.tokens, started, datetime.now(timezone.utc),
                         f"{evaluator.evaluator_id}@{node[:12]}")


def single_device(spec: Spec) -> Spec:
    """The spec, if its evaluators each hold the model on one device; distillation trains
    on one device, so a run with sharded evaluators is refused."""
    if spec.resources.sharding != "none":
        raise ValueError(f"resources.sharding: {spec.resources.sharding}: recover --front "
                         "distils each point on one device, and this run's evaluators shard "
                         "the model over several")
    return spec


def local_run_dir(run_dir: str) -> str:
    """The run directory, which must be a path (a local or shared filesystem): the
    distillation's checkpoints and the recovered models are written there as files."""
    if "://" in run_dir:
        raise ValueError(f"{run_dir}: recover --front writes checkpoints and models as files; "
                         "give a local or shared-filesystem run directory")
    return str(Path(run_dir).resolve())


def front_points(log: ResultLog, objectives: dict[str, str], dense_hash: str | None) -> pd.DataFrame:
    """The rows of the run's one-shot front, numbered as `prunetune front` numbers them,
    the dense model left out."""
    oneshot = log.read(stage=ONESHOT)
    if not (oneshot["status"] == "ok").any():
        raise ValueError(f"{log.run_dir}: no one-shot result in the log yet, nothing to recover")
    front = merge_fronts([oneshot], objectives)
    return front[front["config_hash"] != dense_hash].drop_duplicates("config_hash")


def recovered_rows(log: ResultLog, trained_tokens: int) -> pd.DataFrame:
    """The latest ok recovered row of every config recovered on `trained_tokens`, by hash."""
    rows = log.read(stage=RECOVERED)
    rows = rows[(rows["status"] == "ok") & (rows["trained_tokens"] == trained_tokens)]
    return rows.sort_values("finished_at").drop_duplicates("config_hash", keep="last") \
        .set_index("config_hash")


def plan_recovery(run_dir: str, settings: DistillSettings, data: str) -> RecoveryPlan:
    """Check that a run can be recovered (a local run directory with a spec, evaluators on
    one device, training text that is not evaluation text) and find its points to recover;
    nothing starts."""
    run_dir = local_run_dir(run_dir)
    spec = single_device(run_spec(run_dir))
    refuse_evaluation_data(data)
    record = read_run_record(run_dir)
    points = front_points(ResultLog(run_dir), dict(spec.objectives), record.get("dense_hash"))
    done = recovered_rows(ResultLog(run_dir), settings.trained_tokens).index
    todo = [SubnetConfig.from_json(text) for text, digest
            in zip(points["config_json"], points["config_hash"]) if digest not in done]
    return RecoveryPlan(run_dir, spec, record, points, todo, settings, data)


def run_recovery(plan: RecoveryPlan) -> RecoveryOutcome:
    """Recover the plan's points (see the module's docstring), redraw front.png, and
    compare the fronts."""
    log = ResultLog(plan.run_dir)
    failed = run_tasks(plan, log) if plan.todo else {}
    objectives = dict(plan.spec.objectives)
    write_front_files(plan.run_dir, objectives, plan.record.get("dense_hash"), log)
    table = comparison_table(plan.points, recovered_rows(log, plan.settings.trained_tokens),
                             objectives)
    return RecoveryOutcome(table, len(plan.todo) - len(failed),
                           len(plan.points) - len(plan.todo), failed)


def run_tasks(plan: RecoveryPlan, log: ResultLog) -> dict[str, str]:
    """Run a recovery task per point to recover, on the run's Ray cluster (a local instance
    sized as the search's without one), at most one per evaluator of the run at a time, and
    log each finished point; returns the error of every point that failed."""
    spec = plan.spec
    connect_for(spec)
    spec = single_device(plan_resources(spec))
    task = ray.remote(recover_point).options(**evaluator_resources(spec),
                                              max_retries=spec.max_failures)
    at_once, total = spec.resources.evaluators, len(plan.points)
    say(f"recovering {len(plan.todo)} of {total} front points, each on "
        f"{plan.settings.trained_tokens:,} tokens of {plan.data}, {at_once} at a time")
    failed: dict[str, str] = {}
    pending: dict[Any, SubnetConfig] = {}
    queue = list(plan.todo)
    with tqdm(total=total, initial=total - len(queue), desc="recovered", unit="point",
              file=console(), dynamic_ncols=True) as bar:
        while queue or pending:
            while queue and len(pending) < at_once:
                subnet = queue.pop(0)
                folder = point_folder(plan.run_dir, subnet.config_hash())
                pending[task.remote(spec.evaluator_settings(), subnet, plan.settings, plan.data,
                                    str(folder), spec.metrics_needed())] = subnet
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            subnet = pending.pop(ready)
            try:
                point = ray.get(ready)
            except ray.exceptions.RayError as exc:
                failed[subnet.config_hash()] = task_error(exc)
            else:
                log.append([recovered_row(plan.record, subnet, point, spec.evaluation.seq_len)])
                shutil.rmtree(point_folder(plan.run_dir, subnet.config_hash()) / CHECKPOINT_DIR,
                              ignore_errors=True)
            bar.update(1)
            bar.set_postfix(running=len(pending), failed=len(failed))
    return failed


def task_error(exc: ray.exceptions.RayError) -> str:
    """The first line of what made a task fail: its own exception, or Ray's."""
    cause = getattr(exc, "cause", None) or exc
    return f"{type(cause).__name__}: {cause}".splitlines()[0]


def recovered_row(record: dict[str, Any], subnet: SubnetConfig, point: PointRecovery,
                  seq_len: int) -> dict[str, Any]:
    """The result-log row of a recovered point."""
    return make_row(record["run_id"], f"{RECOVERED}-{subnet.config_hash()}-{point.trained_tokens}",
                    subnet, record["model_config"], metric_columns(point.metrics), "ok", None,
                    point.evaluator_id, point.started_at, point.finished_at, seq_len,
                    stage=RECOVERED, trained_tokens=point.trained_tokens)


def comparison_table(points: pd.DataFrame, recovered: pd.DataFrame,
                     objectives: dict[str, str]) -> pd.DataFrame:
    """Per front point: its parameters, and each measured objective one-shot and recovered
    (NaN where it is not recovered)."""
    measured = [name for name in objectives if name not in (*COST_METRICS, MEMORY_METRIC)]
    table = pd.DataFrame({"config_hash": points["config_hash"], "params": points["params"]},
                         index=points.index)
    after = recovered.reindex(points["config_hash"])
    for name in measured:
        table[f"{name} one-shot"] = points[name]
        table[f"{name} recovered"] = after[name].to_numpy() if name in after else float("nan")
    table["trained_tokens"] = after["trained_tokens"].astype("Int64").to_numpy()
    return table
