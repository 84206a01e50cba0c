"""The evaluator contract: what the orchestrator may ask of every evaluator, and the parts
every evaluator shares.

An evaluator holds one model (on one device, or sharded over a group) and answers two
calls: `info()`, what it holds, and `evaluate(subnet, metrics, span)`, every requested
metric of one sub-network, with perplexity on the evaluation windows `[start, stop)` of
`span` (all of them for None; a multi-fidelity search scores the first few, then the rest). `evaluate` never raises: a bad sub-network or an out-of-memory error is a
failed result and the evaluator stays usable; an evaluator that can never evaluate again
(a sharded group that lost a rank) says so with `evaluator_broken: True`, and the
orchestrator replaces it. `EvaluatorBase` implements that wrapper once; an evaluator
supplies `model_config()` and `measure()`.

Every result has `evaluator_id`, `load_seconds`, `status` ("ok" or "failed"), `error`
(None when ok) and `eval_seconds`, plus the metrics.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, TypeVar

import torch

from prunetune.evaluators.data import token_windows
from prunetune.evaluators.importance import (
    ImportanceScores, InputSlices, activation_scores, magnitude_scores, saved_order,
)
from prunetune.evaluators.model import cache_dir, resolve_source
from prunetune.evaluators.settings import EvaluatorSettings
from prunetune.search_spaces.subnet import SubnetConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

T = TypeVar("T")


class EvaluatorBroken(RuntimeError):
    """The evaluator cannot evaluate again (a rank of its group died, hung or failed in a
    collective): its results say `evaluator_broken: True` and the orchestrator replaces it."""


class EvaluatorBase(ABC):
    """The never-raising `evaluate` of every evaluator, around its own `measure`."""

    evaluator_id: str = "evaluator-0"
    load_seconds: float = 0.0
    calls: int = 0

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """What this evaluator holds: at least `evaluator_id`, `model_config` (a dict),
        `layer_order` (None without importance scores) and `load_seconds`."""

    @abstractmethod
    def model_config(self) -> Any:
        """The dense model's config, which every sub-network is validated against."""

    @abstractmethod
    def measure(self, subnet: SubnetConfig, metrics: set[str],
                span: tuple[int, int] | None = None) -> dict[str, Any]:
        """The metrics of a valid sub-network, perplexity on the windows of `span`; may
        raise. A result with its own `status` and `error` (a measurement that failed in
        part) is passed on as it is."""

    def release_memory(self) -> None:
        """Free what an evaluation left behind (called after every evaluation)."""
        release_memory()

    def evaluate(self, subnet: SubnetConfig | str, metrics: list[str],
                 span: tuple[int, int] | None = None) -> dict[str, Any]:
        """Every requested metric of `subnet`, perplexity on the windows `[start, stop)` of
        `span` (all for None), plus status, error and timings; never raises."""
        self.calls += 1
        start = time.perf_counter()
        result: dict[str, Any] = {"evaluator_id": self.evaluator_id,
                                  "load_seconds": self.load_seconds}
        try:
            if isinstance(subnet, str):
                subnet = SubnetConfig.from_json(subnet)
            subnet.validate(self.model_config())
            result.update({"status": "ok", "error": None, **self.measure(subnet, set(metrics), span)})
        except EvaluatorBroken as exc:
            result.update(status="failed", error=f"evaluator group broken: {exc}",
                          evaluator_broken=True)
        except torch.OutOfMemoryError as exc:
            result.update(status="failed", error=f"out of memory: {exc}".splitlines()[0])
        except Exception as exc:  # a failed evaluation must not end the search
            result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.release_memory()
        result["eval_seconds"] = time.perf_counter() - start
        return result

    def call_count(self) -> int:
        """How many evaluations this evaluator has run (tests count repeats with it)."""
        return self.calls


def compute_scores(model: torch.nn.Module, tokenizer: Any, settings: EvaluatorSettings,
                   slices: InputSlices | None = None) -> ImportanceScores:
    """Importance scores of an unsorted model by `settings.importance`: weight magnitudes,
    or activations over `settings.calibration_samples` calibration windows (on a
    tensor-parallel rank, of its `slices` only: `activation_scores`)."""
    if settings.importance == "magnitude":
        return magnitude_scores(model)
    ids = token_windows(tokenizer, settings.calibration, settings.seq_len,
                        settings.calibration_samples, model.config.vocab_size)
    return activation_scores(model, ids, settings.batch_size, slices)


def release_memory(device: torch.device | None = None) -> None:
    """Collect garbage and hand cached device memory back (on CUDA)."""
    gc.collect()
    if torch.cuda.is_available() and (device is None or device.type == "cuda"):
        torch.cuda.empty_cache()


def evaluator_device(settings: EvaluatorSettings) -> torch.device:
    """The device `settings.device` names; `auto` is the GPU when there is one."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(settings.device)


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


def _same(value: T) -> T:
    return value


def lacks_input_norms(scores: ImportanceScores) -> bool:
    """Activation scores cached before they carried Wanda's input norms: computed again."""
    return scores.meta.get("criterion") == "activation" and scores.input_norms is None


def sorting_scores(settings: EvaluatorSettings, compute: Callable[[], ImportanceScores | None],
                   share: Callable[[Any], Any] = _same, writer: bool = True) -> ImportanceScores | None:
    """The scores to sort the weights by: the cached ones, or `compute()`, then cached.

    None when `settings.importance` is "none"; the scores a checkpoint folder was saved
    sorted by (a trained super-network's, `importance.saved_order`) when it has them. In a group, `share` hands the writer's
    value to every rank: only the writer reads and writes the cache, while `compute` runs
    on every rank (it may be collective) and the writer's result is the one used.
    """
    if settings.importance == "none":
        return None
    saved = saved_order(resolve_source(settings.model))
    if saved is not None:
        return saved
    path = importance_cache_path(settings)
    cached = share(ImportanceScores.load(path) if writer and os.path.isfile(path) else None)
    if cached is not None and not lacks_input_norms(cached):
        return cached
    scores = share(compute())
    if writer:
        scores.save(path)
    return scores
