"""The single-device evaluator: a model loaded once, measuring sub-network after sub-network.

Loading a large model takes minutes and a search runs thousands of evaluations, so an
`Evaluator` loads the model, computes (or reads the cached) importance scores, permutes the
weights so that sub-networks are prefixes, and tokenizes its evaluation data once. Then
`evaluate` (the contract of `prunetune.evaluators.contract`) returns every requested
metric of a sub-network, run as a smaller extracted copy or as masks on the resident model.
`make_actor` starts it as a Ray actor.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from prunetune.evaluators.contract import (
    DTYPES, EvaluatorBase, compute_scores, evaluator_device, release_memory, sorting_scores,
)
from prunetune.evaluators.data import token_windows
from prunetune.evaluators.importance import ImportanceScores, InputNorms, permute_model
from prunetune.evaluators.latency import LatencyCache, latency_cache_file, subnet_latency
from prunetune.evaluators.model import load_model
from prunetune.evaluators.perplexity import perplexity, window_span
from prunetune.evaluators.settings import EvaluatorSettings, split_tasks, task_name
from prunetune.evaluators.surgery import apply_masks, extract
from prunetune.evaluators.zeroshot import evaluate_tasks, load_task
from prunetune.metrics import ACCURACY_AVERAGE, wants_accuracy, wants_latency, wants_perplexity
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.subnet import SubnetConfig


class Evaluator(EvaluatorBase):
    """Holds one permuted model and its tokenized data; evaluates sub-networks on it."""

    def __init__(self, settings: EvaluatorSettings, evaluator_id: str = "evaluator-0") -> None:
        start = time.perf_counter()
        self.settings = settings
        self.evaluator_id = evaluator_id
        self.device = evaluator_device(settings)
        self.dtype = DTYPES[settings.dtype]
        self.model, self.tokenizer = load_model(settings.model, self.dtype, self.device)
        if self.tokenizer is None and settings.tasks:
            raise ValueError(f"evaluation.tasks {list(settings.tasks)}: a model with random "
                             f"weights ({settings.model}) has no tokenizer to score tasks with")
        self.scores = self._sort_by_importance()
        self.windows = token_windows(self.tokenizer, settings.data, settings.seq_len,
                                     settings.windows, self.model.config.vocab_size).to(self.device)
        builtin, harness = split_tasks(settings.tasks)
        self.tasks = {name: load_task(name, settings.task_limit) for name in builtin}
        self.harness_tasks = _load_harness_tasks(harness)
        self.latency_cache = LatencyCache(latency_cache_file())
        self.load_seconds = time.perf_counter() - start

    def _sort_by_importance(self) -> ImportanceScores | None:
        """Read or compute the importance scores, and permute the weights by them."""
        scores = sorting_scores(self.settings,
                                lambda: compute_scores(self.model, self.tokenizer, self.settings))
        return None if scores is None else permute_model(self.model, scores)

    def info(self) -> dict[str, Any]:
        """What this evaluator holds: model config, layer order, device, load time."""
        return {"evaluator_id": self.evaluator_id, "device": str(self.device),
                "model_config": self.model.config.to_dict(), "load_seconds": self.load_seconds,
                "layer_order": self.scores.layer_order() if self.scores else None,
                "windows": int(self.windows.shape[0]), "tokens": int(self.windows.numel()),
                "host": socket.gethostname(), "pid": os.getpid()}

    def model_config(self) -> Any:
        return self.model.config

    @property
    def input_norms(self) -> InputNorms | None:
        """The sorted model's input-channel norms, which Wanda sparsity scores weights by;
        None without activation scores."""
        return None if self.scores is None else self.scores.input_norms

    def measure(self, subnet: SubnetConfig, metrics: set[str],
                span: tuple[int, int] | None = None,
                trained: nn.Module | None = None) -> dict[str, Any]:
        """The metrics of `subnet`: cut from the resident model, or, given `trained`, the
        extracted sub-network's own weights trained further (a recovered student) scored on
        the same windows and tasks; perplexity on the windows of `span` only, when given.
        Cost and latency depend on the shapes alone."""
        out: dict[str, Any] = dict(subnet_cost(self.model.config, subnet, self.settings.seq_len,
                                               self.model.dtype.itemsize, self.settings.batch_size))
        if wants_perplexity(metrics) or wants_accuracy(metrics):
            with self._subnet_model(subnet, trained) as model:
                out.update(self._quality(model, metrics, span))
        if wants_latency(metrics):
            out.update(subnet_latency(self.model.config, subnet, self.settings.latency,
                                      self.device, self.dtype, self.latency_cache))
        return out

    @contextmanager
    def _subnet_model(self, subnet: SubnetConfig,
                      trained: nn.Module | None = None) -> Iterator[nn.Module]:
        """The sub-network as a model: `trained` when given, else extracted (default) or
        masks on the resident model."""
        if trained is not None:
            yield trained
        elif subnet == SubnetConfig.dense(self.model.config):
            yield self.model
        elif self.settings.mode == "masked":
            with apply_masks(self.model, subnet, input_norms=self.input_norms) as model:
                yield model
        else:
            yield extract(self.model, subnet, self.input_norms)

    def _quality(self, model: nn.Module, metrics: set[str],
                 span: tuple[int, int] | None) -> dict[str, float]:
        out: dict[str, float] = {}
        if wants_perplexity(metrics):
            out.update(perplexity(model, window_span(self.windows, span), self.settings.batch_size))
        if self.settings.tasks and wants_accuracy(metrics):
            out.update(self._accuracy(model))
        return out

    def _accuracy(self, model: nn.Module) -> dict[str, float]:
        """`acc_<task>` and `acc_norm_<task>` of every task, built in or lm-eval's, and
        `acc_avg` over all of them."""
        out: dict[str, float] = {}
        if self.tasks:
            out.update(evaluate_tasks(model, self.tokenizer, self.tasks, self.settings.batch_size))
        if self.harness_tasks is not None:
            from prunetune.evaluators.harness import harness_scores

            out.update(harness_scores(model, self.tokenizer, self.harness_tasks,
                                      self.settings.task_limit, self.settings.batch_size))
        names = [task_name(t) for t in self.settings.tasks]
        out[ACCURACY_AVERAGE] = sum(out[f"acc_{n}"] for n in names) / len(names)
        return out

    def release_memory(self) -> None:
        release_memory(self.device)


def _load_harness_tasks(names: list[str]) -> Any:
    """The lm-eval tasks, loaded once (None without any); lm-eval is imported only here."""
    if not names:
        return None
    from prunetune.evaluators.harness import load_harness_tasks

    return load_harness_tasks(names)


def make_actor(settings: EvaluatorSettings, evaluator_id: str, num_gpus: float = 0,
               num_cpus: float = 1, **options: Any) -> Any:
    """Start an evaluator as a Ray actor that holds its model for the whole run."""
    import ray

    actor_class = ray.remote(Evaluator)
    return actor_class.options(num_gpus=num_gpus, num_cpus=num_cpus,
                               **options).remote(settings, evaluator_id)
