"""How a sub-network is distilled: the one home of every recovery default.

Nothing here imports torch, so a spec or a command line can be checked before any model
library is loaded. The defaults run as they are: a few million tokens of the shipped
corpus, full-parameter training, plain KL divergence to the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass


DEFAULT_TRAINING_TEXT = "gutenberg"
"""The training text when none is named: the shipped corpus of public-domain novels."""


@dataclass(frozen=True)
class DistillSettings:
    """One distillation run.

    `tokens` is the budget (input tokens the student trains on, rounded up to whole
    optimizer steps of `micro_batch * accumulation` windows of `seq_len` tokens). The
    learning rate warms up linearly over the first `warmup` fraction of the steps, then
    decays to zero on a cosine. The loss per token is `temperature**2` times the KL
    divergence of the teacher's and student's next-token distributions at `temperature`
    (over the teacher's `top_k` most likely tokens only, when set), plus `lm_weight`
    times the student's cross-entropy on the text. `lora_rank` 0 trains every parameter;
    above 0, LoRA adapters of that rank (scaled by `lora_alpha / lora_rank`) on the
    student's linear layers train instead, and are merged into them at the end. A
    checkpoint is written every `checkpoint_every` optimizer steps.
    """

    tokens: int = 2_000_000
    seq_len: int = 512
    micro_batch: int = 8
    accumulation: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    top_k: int | None = None
    lm_weight: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 32.0
    seed: int = 0
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        at_least = {"tokens": 1, "seq_len": 2, "micro_batch": 1, "accumulation": 1,
                    "lora_rank": 0, "checkpoint_every": 1}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"distill.{name} must be at least {low}, "
                                 f"got {getattr(self, name)}")
        for name in ("lr", "max_grad_norm", "temperature", "lora_alpha"):
            if not getattr(self, name) > 0:
                raise ValueError(f"distill.{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "lm_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"distill.{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"distill.warmup is a fraction of the steps in [0, 1), "
                             f"got {self.warmup}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"distill.top_k must be at least 1 (or None for the whole "
                             f"vocabulary), got {self.top_k}")

    @property
    def windows_per_step(self) -> int:
        """Windows one optimizer step trains on."""
        return self.micro_batch * self.accumulation

    @property
    def steps(self) -> int:
        """Optimizer steps the token budget buys (at least one)."""
        per_step = self.windows_per_step * self.seq_len
        return max(1, -(-self.tokens // per_step))

    @property
    def trained_tokens(self) -> int:
        """Tokens a run trains on: the budget rounded up to whole optimizer steps."""
        return self.steps * self.windows_per_step * self.seq_len


ZERO_STAGES = (0, 1, 2, 3)
"""The DeepSpeed ZeRO stages training on several workers can run with."""

TEACHER_PLACEMENTS = ("whole", "partitioned")
"""Where distillation on several workers holds the teacher: whole on every worker, or
partitioned over them (ZeRO-3 inference)."""


STRATEGIES = ("sandwich", "random", "random_linear", "ats", "standard")
"""Super-network training strategies (the seed method's library offers the same five)."""


@dataclass(frozen=True)
class SupernetSettings:
    """Which sub-networks each step of super-network training trains.

    - `sandwich` (the default): the largest learns the text; the smallest and
      `random_count` random ones learn the largest's distribution.
    - `random`: `random_count` random ones learn the largest's distribution.
    - `ats`: `random` on even steps, the largest alone on odd steps.
    - `random_linear`: `random` with a probability that rises linearly from 0 at the first
      step to 1 at the last, else the largest alone.
    - `standard`: the largest alone (plain fine-tuning, the baseline).
    """

    strategy: str = "sandwich"
    random_count: int = 2

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"supernet.strategy must be one of {', '.join(STRATEGIES)}, "
                             f"got {self.strategy!r}")
        least = 1 if self.strategy in ("random", "random_linear", "ats") else 0
        if self.random_count < least:
            raise ValueError(f"supernet.random_count must be at least {least} for the "
                             f"{self.strategy} strategy, got {self.random_count}")
