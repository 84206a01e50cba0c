"""What an evaluator loads and measures: the one home of every evaluation default.

The spec's `evaluation` and `evaluation.latency` sections take their defaults from these
dataclasses, so a default is written once. Nothing here imports torch: the spec is
validated before any model library is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field


LATENCY_MODES = ("graph", "compiled", "eager")
"""How decode is run: `graph` (a static KV cache, each step replayed from a CUDA graph, as a
deployment would), `compiled` (the same, the step compiled by torch.compile's inductor
first, fusing each layer's small kernels) or `eager` (a growing cache, each step launched
from Python)."""


@dataclass(frozen=True)
class LatencySettings:
    """What to time: prompt length, decoded tokens, batch, how often, and how decode runs.

    `mode` `graph` and `compiled` run only on a CUDA device (`latency.latency_mode` says
    where they fall back to `eager`); `eager` stays available everywhere, for comparison.
    """

    prompt_tokens: int = 128
    decode_tokens: int = 16
    batch_size: int = 1
    repeats: int = 5
    warmup: int = 2
    mode: str = "graph"

    def __post_init__(self) -> None:
        if self.mode not in LATENCY_MODES:
            raise ValueError(f"latency.mode must be one of {', '.join(LATENCY_MODES)}, "
                             f"got {self.mode!r}")


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


HARNESS_PREFIX = "lm_eval:"
"""A task named `lm_eval:<task>` runs through lm-evaluation-harness; others are built in."""


def task_name(task: str) -> str:
    """The name a task's metrics carry (`lm_eval:arc_easy` -> `arc_easy`)."""
    return task.removeprefix(HARNESS_PREFIX)


def split_tasks(tasks: tuple[str, ...] | list[str]) -> tuple[list[str], list[str]]:
    """The built-in tasks, and the lm-eval tasks by their lm-eval names."""
    builtin = [t for t in tasks if not t.startswith(HARNESS_PREFIX)]
    harness = [task_name(t) for t in tasks if t.startswith(HARNESS_PREFIX)]
    return builtin, harness


DEFAULTS = EvaluatorSettings()
"""The default settings, which the spec's defaults read."""


SHARDING_MODES = ("zero3", "tp", "autotp")
OFFLOADS = ("none", "cpu")


@dataclass(frozen=True)
class ShardingSettings:
    """How one evaluator group holds its model: ranks (devices), mode, offload, patience.

    `timeout_s` bounds one evaluation and every collective operation of the group.
    """

    ranks: int = 2
    mode: str = "zero3"
    offload: str = "none"
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"sharding.ranks must be at least 1, got {self.ranks}")
        if self.mode not in SHARDING_MODES:
            raise ValueError(f"sharding.mode must be one of {', '.join(SHARDING_MODES)}, "
                             f"got {self.mode!r}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"sharding.offload must be one of {', '.join(OFFLOADS)}, "
                             f"got {self.offload!r}")
        if self.offload != "none" and self.mode != "zero3":
            raise ValueError(f"sharding.offload {self.offload!r} needs mode 'zero3' "
                             f"(tensor parallelism keeps every slice on its device), got {self.mode!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"sharding.timeout_s must be positive, got {self.timeout_s}")
