"""`prunetune train-supernet`: a spec's model trained as a super-network of its search space.

The model is loaded and sorted by importance as the spec's evaluators load it, trained on
one device (`training.supernet.train_supernet`) or on Ray Train workers with DeepSpeed
(`SupernetJob`), and written to a folder that a spec's `model:` can name: the weights in
the order they were trained in, that order's importance scores (so the search cuts the
sub-networks that were trained), the tokenizer, and `supernet.json`, the record of the
training that a search's run record repeats.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch
from torch import nn

from prunetune.evaluators.contract import DTYPES
from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.importance import ImportanceScores
from prunetune.evaluators.model import load_tokenizer
from prunetune.evaluators.settings import EvaluatorSettings
from prunetune.orchestrator.search import build_space, connect_for
from prunetune.orchestrator.spec import Spec
from prunetune.search_spaces.spaces import SearchSpace
from prunetune.training.data import refuse_evaluation_data, training_windows
from prunetune.training.distill import DistillResult
from prunetune.training.settings import DistillSettings, SupernetSettings
from prunetune.training.supernet import (
    SupernetJob, save_supernet, train_supernet, write_supernet_record,
)

CHECKPOINT_DIR = "checkpoint"
"""Under the output folder: the training's checkpoints, where a run started again resumes."""


def sorted_model(settings: EvaluatorSettings, device: Any = None
                 ) -> tuple[nn.Module, ImportanceScores | None]:
    """The spec's model, loaded and sorted by importance as its evaluators do (on the
    current device; `device` is the worker's, which Ray Train has made current), in float32
    for training, and its scores in the sorted order."""
    evaluator = Evaluator(replace(settings, tasks=()), "supernet")
    return evaluator.model.float(), evaluator.scores


def spec_space(spec: Spec, model: nn.Module, scores: ImportanceScores | None) -> SearchSpace:
    """The spec's search space over a model sorted by `scores`."""
    return build_space(spec, model.config.to_dict(), scores.layer_order() if scores else None)


def train_spec_supernet(spec: Spec, out: str | Path, settings: DistillSettings,
                        strategy: SupernetSettings, data: str,
                        workers: int = 0, zero_stage: int | None = None) -> DistillResult:
    """Train the spec's model as a super-network of its space on `data` and write it to
    `out`; with `workers`, on that many Ray Train workers (one GPU each when the cluster
    has GPUs; the spec's `address:` or a local Ray) with DeepSpeed ZeRO `zero_stage` (None:
    the workers choose, `distributed.choose_zero_stage`). A run started
    again with the same arguments resumes from `out/checkpoint`."""
    refuse_evaluation_data(data)
    out = Path(out).resolve()
    evaluator_settings = replace(spec.evaluator_settings(), tasks=())
    tokenizer = load_tokenizer(evaluator_settings.model)
    if tokenizer is None:
        raise ValueError(f"model {spec.model}: random weights have no tokenizer to read "
                         "training text with")
    windows = training_windows(tokenizer, data, settings.seq_len)
    dtype = DTYPES[spec.dtype]
    if workers:
        result = train_on_cluster(spec, evaluator_settings, out, windows, settings, strategy,
                                  workers, dtype, zero_stage)
    else:
        model, scores = sorted_model(evaluator_settings)
        result = train_supernet(model, spec_space(spec, model, scores), windows, settings,
                                strategy, out / CHECKPOINT_DIR,
                                scores.input_norms if scores else None)
        save_supernet(out, model, scores, dtype)
    tokenizer.save_pretrained(out)
    write_supernet_record(out, supernet_record_of(spec, settings, strategy, data, result,
                                                  workers))
    return result


def train_on_cluster(spec: Spec, evaluator_settings: EvaluatorSettings, out: Path,
                     windows: torch.Tensor, settings: DistillSettings,
                     strategy: SupernetSettings, workers: int,
                     dtype: torch.dtype, zero_stage: int | None = None) -> DistillResult:
    """`train_spec_supernet` on Ray Train workers; the first one saves the model."""
    from prunetune.training.distributed import WorkerSettings, train_on_workers

    connect_for(spec)
    job = SupernetJob(partial(sorted_model, evaluator_settings), partial(spec_space, spec),
                      str(out), strategy, dtype)
    placement = WorkerSettings(workers=workers, storage=str(out / CHECKPOINT_DIR),
                               name="supernet",
                               use_gpu=ray.cluster_resources().get("GPU", 0) > 0,
                               zero_stage=zero_stage)
    return train_on_workers(job, windows, settings, placement)


def supernet_record_of(spec: Spec, settings: DistillSettings, strategy: SupernetSettings,
                       data: str, result: DistillResult, workers: int) -> dict[str, Any]:
    """What trained a super-network: its model, space, strategy, data and outcome."""
    return {"base_model": spec.model, "search_space": spec.search_space.model_dump(),
            "strategy": asdict(strategy), "distill": asdict(settings), "data": data,
            "trained_tokens": result.tokens, "steps": result.steps,
            "first_loss": result.losses[0] if result.losses else None,
            "final_loss": result.losses[-1] if result.losses else None,
            "workers": workers, "importance": spec.evaluation.importance,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")}
