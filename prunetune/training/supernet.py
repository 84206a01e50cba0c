"""Super-network training: every step trains several sub-networks of a search space on the
same weights (the sandwich rule of the seed method), so that any sub-network the search
later picks is good without training of its own.

A step runs, on one batch of windows: the space's largest sub-network with the
language-modelling loss, and the smallest and `random_count` uniformly drawn ones
distilled in place from the largest (KL to its top-k next-token distribution, taken before
the step's update, as `teacher.TeacherTopK`). Each sub-network is the resident model under
`surgery.apply_masks`, exact and reversible, so gradients reach only the weights it keeps
(weight sparsity too: a sparse sub-network's mask multiplies its weights in the forward,
so its pruned weights get no gradient from it, and its mask follows the weights as they
train).
Windows, optimizer, schedule, progress and checkpoints are those of `distill`
(`train_supernet`).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunetune.evaluators.importance import SORTED_SCORES_FILE, ImportanceScores, InputNorms
from prunetune.evaluators.perplexity import model_device, nll_sum
from prunetune.evaluators.surgery import apply_masks
from prunetune.search_spaces.spaces import SearchSpace
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.checkpoint import Progress, run_identity
from prunetune.training.data import window_indices
from prunetune.training.distill import DistillResult, run_steps
from prunetune.training.loss import distill_loss_sum
from prunetune.training.settings import DistillSettings, SupernetSettings
from prunetune.training.teacher import teacher_top_k


def largest_and_smallest(space: SearchSpace) -> tuple[SubnetConfig, SubnetConfig]:
    """The space's largest and smallest sub-networks (every parameter at its last and first
    allowed value; the values are ascending)."""
    choices = space.choices()
    return (space.decode({name: values[-1] for name, values in choices.items()}),
            space.decode({name: values[0] for name, values in choices.items()}))


@dataclass(frozen=True)
class StepPlan:
    """The sub-networks of one optimizer step: the `largest`, which learns the text when
    `learns_text`, and the `distilled` ones, which learn its top-k distribution."""

    largest: SubnetConfig
    learns_text: bool
    distilled: tuple[SubnetConfig, ...] = field(default=())


def plan_step(space: SearchSpace, strategy: SupernetSettings, step: int, steps: int,
              seed: int) -> StepPlan:
    """What optimizer step `step` of `steps` trains under `strategy` (see
    `SupernetSettings`). Random draws (uniform per parameter) come from the seed and the
    step alone, so a resumed run, and every worker of a run, draws the same."""
    rng = random.Random(f"{seed}-{step}")
    largest, smallest = largest_and_smallest(space)
    name = strategy.strategy
    if name == "standard":
        return StepPlan(largest, True)
    if name == "sandwich":
        drawn = tuple(space.sample(rng) for _ in range(strategy.random_count))
        return StepPlan(largest, True, (smallest, *drawn))
    if name == "ats":
        use_random = step % 2 == 0
    elif name == "random_linear":
        use_random = rng.random() <= (step / (steps - 1) if steps > 1 else 1.0)
    else:
        use_random = True
    if not use_random:
        return StepPlan(largest, True)
    return StepPlan(largest, False, tuple(space.sample(rng) for _ in range(strategy.random_count)))


def supernet_step(model: nn.Module, plan: StepPlan, ids: torch.Tensor, top_k: int,
                  temperature: float = 1.0,
                  backward: Callable[[torch.Tensor], Any] = torch.Tensor.backward,
                  input_norms: InputNorms | None = None) -> torch.Tensor:
    """Forward and backward passes of one step's sub-networks on windows `ids`: the largest
    learns the text (when `plan.learns_text`), every distilled one its top-`top_k`
    distribution. Each loss is a mean per predicted token and goes to `backward` at once
    (one sub-network's activations at a time); returns their sum, detached. The caller
    steps the optimizer. `input_norms` are the calibration norms of a space with Wanda
    sparsity or per-block channels."""
    device = model_device(model)
    predicted = ids[:, 1:].numel()
    total = torch.zeros((), device=device)
    with apply_masks(model, plan.largest, input_norms=input_norms) as masked:
        teacher = (teacher_top_k(masked, ids, top_k, batch=len(ids), store=device)
                   if plan.distilled else None)
        model.train()
        if plan.learns_text:
            with autocast(device):
                loss = nll_sum(masked, ids).float() / predicted
            backward(loss)
            total += loss.detach()
    if teacher is None:
        return total
    rows = teacher.rows(torch.arange(len(ids)), device)
    for subnet in plan.distilled:
        with apply_masks(model, subnet, input_norms=input_norms) as masked, autocast(device):
            loss = distill_loss_sum(None, masked, ids, temperature, top_k,
                                    teacher_top=rows) / predicted
        backward(loss)
        total += loss.detach()
    return total


def autocast(device: torch.device) -> Any:
    """bf16 autocast on GPU, as `distill` trains; float32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def supernet_train_step(model: nn.Module, space: SearchSpace, strategy: SupernetSettings,
                        windows: torch.Tensor, settings: DistillSettings, progress: Progress,
                        backward: Callable[[torch.Tensor], Any],
                        micro_done: Callable[[], Any] = lambda: None, rank: int = 0,
                        world: int = 1, input_norms: InputNorms | None = None
                        ) -> torch.Tensor:
    """Forward and backward passes over this rank's micro-batches of one optimizer step.

    The step's windows are those of `distill`'s seeded order at `progress.windows`, rank
    `rank` of `world` taking every `world`-th (as `distill.train_step`); its sub-networks
    are `plan_step`'s for `progress.step`. Each loss, scaled to a mean per token this rank
    predicts in the step, goes to `backward`; `micro_done` runs after each micro-batch.
    `input_norms` as for `supernet_step`. Returns this rank's loss, detached.
    """
    plan = plan_step(space, strategy, progress.step, settings.steps, settings.seed)
    device = model_device(model)
    index = window_indices(len(windows), settings.seed, progress.windows,
                           settings.windows_per_step)
    mine = index[rank::world]
    total = torch.zeros((), device=device)
    for micro in mine.split(settings.micro_batch):
        share = len(micro) / len(mine)
        total += share * supernet_step(model, plan, windows[micro].to(device), settings.top_k,
                                       settings.temperature,
                                       backward=lambda part: backward(share * part),
                                       input_norms=input_norms)
        micro_done()
    return total


def check_supernet_inputs(windows: torch.Tensor, settings: DistillSettings) -> None:
    """Raise, naming the setting, for what super-network training cannot run with."""
    if settings.top_k is None:
        raise ValueError("distill.top_k: super-network training distils from the largest "
                         "sub-network's top-k distribution; set it (e.g. 64)")
    if settings.lora_rank:
        raise ValueError("distill.lora_rank: a super-network trains its own weights; "
                         "LoRA adapters are for recovering one sub-network")
    if windows.dim() != 2 or windows.shape[1] != settings.seq_len:
        raise ValueError(f"windows must be [n >= 1, distill.seq_len = {settings.seq_len}], "
                         f"got {tuple(windows.shape)}")


def supernet_identity(settings: DistillSettings, windows: torch.Tensor,
                      strategy: SupernetSettings) -> dict[str, Any]:
    """What a checkpoint must have been started with to be resumed by this run."""
    return {**run_identity(settings, windows), **asdict(strategy)}


def train_supernet(model: nn.Module, space: SearchSpace, windows: torch.Tensor,
                   settings: DistillSettings,
                   strategy: SupernetSettings = SupernetSettings(),
                   checkpoint_dir: str | Path | None = None,
                   input_norms: InputNorms | None = None) -> DistillResult:
    """Train `model` in place as a super-network of `space` on `windows` `[n, seq_len]`.

    Each optimizer step trains `plan_step`'s sub-networks (`supernet_train_step`) on
    `settings.windows_per_step` windows in micro-batches; `settings.top_k` is the size of
    the largest sub-network's distribution the others learn; `input_norms` are the sorted
    model's, for a space with Wanda sparsity. AdamW, warmup and cosine decay, clipping,
    checkpoints and resume are `distill`'s (`run_steps`).
    """
    start = time.perf_counter()
    check_supernet_inputs(windows, settings)
    torch.manual_seed(settings.seed)
    return run_steps(model, lambda progress: supernet_train_step(
        model, space, strategy, windows, settings, progress, backward=torch.Tensor.backward,
        input_norms=input_norms),
        settings, supernet_identity(settings, windows, strategy), checkpoint_dir, start,
        desc="super-network")


SUPERNET_FILE = "supernet.json"
"""What a trained super-network's folder says of its training (`save_supernet`)."""


def save_supernet(out: str | Path, model: nn.Module, scores: ImportanceScores | None,
                  dtype: torch.dtype) -> None:
    """Write a trained super-network to `out` as a Hugging Face checkpoint in `dtype`, with
    the importance scores of the order its weights are in (`importance.SORTED_SCORES_FILE`),
    so that a search of it cuts the sub-networks it was trained as. The model is left as it
    was."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.to(dtype) for name, tensor in model.state_dict().items()}
    model.save_pretrained(out, state_dict=state)
    if scores is not None:
        scores.save(out / SORTED_SCORES_FILE)


def write_supernet_record(out: str | Path, record: dict[str, Any]) -> None:
    """Write what trained the super-network in `out` (read back by `supernet_record`)."""
    (Path(out) / SUPERNET_FILE).write_text(json.dumps(record, indent=2, sort_keys=True,
                                                      default=str))


def supernet_record(source: str) -> dict[str, Any] | None:
    """The training record of a super-network folder; None for any other model source."""
    path = Path(source) / SUPERNET_FILE
    return json.loads(path.read_text()) if path.is_file() else None


SortedModel = Callable[[torch.device], tuple[nn.Module, ImportanceScores | None]]
"""Makes, on a worker's device, the float32 model sorted by importance, and its scores."""

SpaceFor = Callable[[nn.Module, ImportanceScores | None], SearchSpace]
"""The search space of a model sorted by these scores."""


@dataclass
class SupernetJob:
    """Super-network training as a job of `distributed.train_on_workers`: each worker
    builds the sorted model (`make`) and its space (`space_for`) and trains its share of
    every step; the first worker saves the trained model to `out` in `dtype`."""

    make: SortedModel
    space_for: SpaceFor
    out: str
    strategy: SupernetSettings = SupernetSettings()
    dtype: torch.dtype = torch.float32
    space: SearchSpace | None = field(default=None, init=False)
    scores: ImportanceScores | None = field(default=None, init=False)

    def build(self, device: torch.device, windows: torch.Tensor,
              settings: DistillSettings) -> nn.Module:
        check_supernet_inputs(windows, settings)
        model, self.scores = self.make(device)
        self.space = self.space_for(model, self.scores)
        return model

    def step(self, model: nn.Module, windows: torch.Tensor, settings: DistillSettings,
             progress: Progress, backward: Callable[[torch.Tensor], Any],
             micro_done: Callable[[], Any], rank: int, world: int) -> torch.Tensor:
        return supernet_train_step(model, self.space, self.strategy, windows, settings,
                                   progress, backward, micro_done, rank, world,
                                   self.scores.input_norms if self.scores else None)

    def identity(self, settings: DistillSettings, windows: torch.Tensor) -> dict[str, Any]:
        return supernet_identity(settings, windows, self.strategy)

    def finish(self, model: nn.Module) -> None:
        save_supernet(self.out, model, self.scores, self.dtype)
