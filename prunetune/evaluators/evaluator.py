"""The evaluator: a model loaded once, measuring sub-network after sub-network.

Loading a large model takes minutes and a search runs thousands of evaluations, so an
`Evaluator` loads the model, computes (or reads the cached) importance scores, permutes the
weights so that sub-networks are prefixes, and tokenizes its evaluation data once. Then
`evaluate` returns every requested metric of a sub-network and never raises: a bad
sub-network or an out-of-memory error comes back as a failed result, and the evaluator
stays usable. `EvaluatorActor` is the same class as a Ray actor.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from prunetune.evaluators.data import token_windows
from prunetune.evaluators.latency import LatencyCache, LatencySettings, subnet_latency
from prunetune.evaluators.model import cache_dir, load_model, resolve_source
from prunetune.evaluators.perplexity import perplexity
from prunetune.evaluators.surgery import apply_masks, extract
from prunetune.evaluators.zeroshot import evaluate_tasks, load_task
from prunetune.search_spaces.cost import subnet_cost
from prunetune.evaluators.importance import (
    ImportanceScores, activation_scores, magnitude_scores, permute_model,
)
from prunetune.search_spaces.subnet import SubnetConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EvaluatorSettings:
    """Everything an evaluator needs to know before its first evaluation."""

    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "auto"
    data: str = "wikitext2"
    seq_len: int = 256
    windows: int = 8
    batch_size: int = 4
    tasks: tuple[str, ...] = ()
    task_limit: int | None = 100
    mode: str = "extracted"
    importance: str = "activation"
    calibration: str = "wikitext2:valid"
    calibration_samples: int = 8
    latency: LatencySettings = field(default_factory=LatencySettings)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def importance_cache_path(settings: EvaluatorSettings) -> str:
    """Where the scores of this model and calibration setting are kept between runs."""
    source = resolve_source(settings.model)
    if os.path.exists(source):
        stat = os.stat(source)
        source = f"{os.path.abspath(source)}:{stat.st_mtime_ns}"
    key = json.dumps([source, settings.importance, settings.calibration,
                      settings.calibration_samples, settings.seq_len])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return str(cache_dir() / "importance" / f"{digest}.safetensors")


class Evaluator:
    """Holds one permuted model and its tokenized data; evaluates sub-networks on it."""

    def __init__(self, settings: EvaluatorSettings, evaluator_id: str = "evaluator-0") -> None:
        start = time.perf_counter()
        self.settings = settings
        self.evaluator_id = evaluator_id
        self.device = settings.resolved_device()
        self.dtype = DTYPES[settings.dtype]
        self.model, self.tokenizer = load_model(settings.model, self.dtype, self.device)
        if self.tokenizer is None and settings.tasks:
            raise ValueError(f"evaluation.tasks {list(settings.tasks)}: a model with random "
                             f"weights ({settings.model}) has no tokenizer to score tasks with")
        self.scores = self._sort_by_importance()
        self.windows = self._token_windows(settings.data, settings.windows).to(self.device)
        self.tasks = {name: load_task(name, settings.task_limit) for name in settings.tasks}
        self.latency_cache = LatencyCache(cache_dir() / "latency" / f"{socket.gethostname()}.json")
        self.calls = 0
        self.load_seconds = time.perf_counter() - start

    def _sort_by_importance(self) -> ImportanceScores | None:
        """Read or compute the importance scores, and permute the weights by them."""
        criterion = self.settings.importance
        if criterion == "none":
            return None
        path = importance_cache_path(self.settings)
        if os.path.isfile(path):
            scores = ImportanceScores.load(path)
        elif criterion == "magnitude":
            scores = magnitude_scores(self.model)
        else:
            ids = self._token_windows(self.settings.calibration, self.settings.calibration_samples)
            scores = activation_scores(self.model, ids, self.settings.batch_size)
        if not os.path.isfile(path):
            scores.save(path)
        return permute_model(self.model, scores)

    def _token_windows(self, source: str, count: int) -> torch.Tensor:
        return token_windows(self.tokenizer, source, self.settings.seq_len, count,
                             self.model.config.vocab_size)

    def info(self) -> dict[str, Any]:
        """What this evaluator holds: model config, layer order, device, load time."""
        return {"evaluator_id": self.evaluator_id, "device": str(self.device),
                "model_config": self.model.config.to_dict(), "load_seconds": self.load_seconds,
                "layer_order": self.scores.layer_order() if self.scores else None,
                "windows": int(self.windows.shape[0]), "tokens": int(self.windows.numel()),
                "host": socket.gethostname(), "pid": os.getpid()}

    def evaluate(self, subnet: SubnetConfig | str, metrics: list[str]) -> dict[str, Any]:
        """Every requested metric of `subnet`, plus status, error and timings.

        Never raises: a sub-network that does not fit the model, or a device out of memory,
        gives `status: "failed"` with the reason.
        """
        self.calls += 1
        start = time.perf_counter()
        result: dict[str, Any] = {"evaluator_id": self.evaluator_id,
                                  "load_seconds": self.load_seconds}
        try:
            if isinstance(subnet, str):
                subnet = SubnetConfig.from_json(subnet)
            subnet.validate(self.model.config)
            result.update(self._measure(subnet, set(metrics)))
            result.update(status="ok", error=None)
        except torch.OutOfMemoryError as exc:
            result.update(status="failed", error=f"out of memory: {exc}".splitlines()[0])
        except Exception as exc:  # a failed evaluation must not end the search
            result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self._release_memory()
        result["eval_seconds"] = time.perf_counter() - start
        return result

    def _measure(self, subnet: SubnetConfig, metrics: set[str]) -> dict[str, Any]:
        out: dict[str, Any] = dict(subnet_cost(self.model.config, subnet, self.settings.seq_len,
                                               self.model.dtype.itemsize, self.settings.batch_size))
        quality = {"perplexity", "nll", "tokens"} | {m for m in metrics if m.startswith("acc")}
        if metrics & quality:
            with self._subnet_model(subnet) as model:
                out.update(self._quality(model, metrics))
        if any(m.startswith("latency") for m in metrics):
            out.update(subnet_latency(self.model.config, subnet, self.settings.latency,
                                      self.device, self.dtype, self.latency_cache))
        return out

    @contextmanager
    def _subnet_model(self, subnet: SubnetConfig) -> Iterator[nn.Module]:
        """The sub-network as a model: extracted (default) or masks on the resident model."""
        if subnet == SubnetConfig.dense(self.model.config):
            yield self.model
        elif self.settings.mode == "masked":
            with apply_masks(self.model, subnet) as model:
                yield model
        else:
            yield extract(self.model, subnet)

    def _quality(self, model: nn.Module, metrics: set[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        if metrics & {"perplexity", "nll", "tokens"}:
            out.update(perplexity(model, self.windows, self.settings.batch_size))
        if self.tasks and any(m.startswith("acc") for m in metrics):
            out.update(evaluate_tasks(model, self.tokenizer, self.tasks, self.settings.batch_size))
        return out

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def call_count(self) -> int:
        """How many evaluations this evaluator has run (tests count repeats with it)."""
        return self.calls


def make_actor(settings: EvaluatorSettings, evaluator_id: str, num_gpus: float = 0,
               num_cpus: float = 1, **options: Any) -> Any:
    """Start an evaluator as a Ray actor that holds its model for the whole run."""
    import ray

    actor_class = ray.remote(Evaluator)
    return actor_class.options(num_gpus=num_gpus, num_cpus=num_cpus,
                               **options).remote(settings, evaluator_id)
