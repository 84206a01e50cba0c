"""The names of every metric an evaluation produces, in one place.

Evaluators produce them, the spec checks that an objective or constraint names one that
its evaluation settings produce, and the result log stores them as columns; all three
read the names from here.
"""

from __future__ import annotations

from typing import Iterable

PERPLEXITY_METRICS = ("perplexity", "nll", "tokens")
"""Perplexity on the evaluation windows, mean negative log-likelihood, tokens scored."""

SCREENED_METRICS = ("perplexity", "nll")
"""The objectives that depend on how many evaluation windows are scored (both follow the
mean loss): what a multi-fidelity screen on the first windows compares."""

COST_METRICS = ("params", "nonzero_params", "flops", "kv_bytes_per_token")
"""Computed from the model config alone: constraints on them are checked before a
sub-network is evaluated, and the result log stores them as fixed columns."""

MEMORY_METRIC = "peak_memory_bytes"
"""The memory one evaluation batch needs at its peak, also from the config alone."""

LATENCY_METRICS = ("latency_prefill_ms", "latency_decode_ms")
"""Measured latency medians (each also with `_min_ms` and `_max_ms` variants)."""

ACCURACY_AVERAGE = "acc_avg"
ACCURACY_PREFIXES = ("acc_norm_", "acc_")
"""Zero-shot accuracy of a task: `acc_<task>` and `acc_norm_<task>`."""


def task_of(metric: str) -> str | None:
    """The task an accuracy metric names (`acc_norm_piqa` -> `piqa`), or None."""
    for prefix in ACCURACY_PREFIXES:
        if metric.startswith(prefix) and len(metric) > len(prefix):
            return metric[len(prefix):]
    return None


def wants_perplexity(metrics: Iterable[str]) -> bool:
    """Whether any of `metrics` needs the sub-network run over the evaluation windows."""
    return any(m in PERPLEXITY_METRICS for m in metrics)


def wants_accuracy(metrics: Iterable[str]) -> bool:
    """Whether any of `metrics` is a zero-shot accuracy."""
    return any(m.startswith("acc") for m in metrics)


def wants_latency(metrics: Iterable[str]) -> bool:
    """Whether any of `metrics` is a measured latency."""
    return any(m.startswith("latency") for m in metrics)
