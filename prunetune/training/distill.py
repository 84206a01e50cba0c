"""Knowledge distillation of a sub-network from its dense model, on one device.

The student is the extracted sub-network (`surgery.extract` of the importance-sorted
model), the teacher the dense model it was cut from, frozen. The student learns the
teacher's next-token distributions (`loss.distill_loss_sum`) on packed windows of training
text (`data.training_windows`), with AdamW, linear warmup then cosine decay, gradient
accumulation and clipping, and bf16 autocast on GPU (float32 on CPU); every parameter
trains, or LoRA adapters only (`lora`). With a checkpoint folder, a killed run started
again with the same arguments resumes from its last checkpoint and trains on the same
batches in the same order, so it ends where an uninterrupted run would.

A student with weight sparsity (`extract` of a sub-network whose `sparsity` is set) keeps
its pruned weights at zero: `train_step`, the step every trainer shares, holds them
(`hold_sparsity`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunetune.evaluators.perplexity import model_device
from prunetune.search_spaces.dims import adapter_for
from prunetune.training.checkpoint import Progress, load_checkpoint, run_identity, save_checkpoint
from prunetune.training.data import to_device, window_indices
from prunetune.training.loss import distill_loss_sum
from prunetune.training.lora import add_lora, merge_lora
from prunetune.training.settings import DistillSettings
from prunetune.training.teacher import TeacherTopK


WARMUP_STEPS = 3
"""Steps of a call left out of its throughput: CUDA, cuBLAS and allocator set-up."""


class StepLog:
    """Counts a run's optimizer steps: its progress, its bar, and the student tokens per
    second of the steps after the first `WARMUP_STEPS` (CUDA, cuBLAS and allocator set-up).

    A step is counted when it is queued (`push`), but its loss is read back to the host
    one step late, once the next step is queued too: the device never waits for the host
    between steps. `flush` reads the last loss (before a checkpoint, and at the end). A
    loss read means the device has finished its step, which is when the clock ticks. The
    first `WARMUP_STEPS` losses are read at once, so the clock starts with nothing queued
    (as a timer started after a synchronisation does).
    """

    def __init__(self, progress: Progress, settings: DistillSettings, bar: Any) -> None:
        self.progress = progress
        self.settings = settings
        self.bar = bar
        self.pending: torch.Tensor | float | None = None
        self.pushed = 0
        self.read = 0
        self.tokens = 0
        self.start = self.end = 0.0

    def push(self, loss: torch.Tensor | float) -> None:
        """Count one queued optimizer step of loss `loss` (a device tensor is read later)."""
        self.flush()
        self.pending = loss
        self.progress.step += 1
        self.progress.windows += self.settings.windows_per_step
        self.progress.tokens += self.step_tokens()
        self.pushed += 1
        if self.pushed <= WARMUP_STEPS:
            self.flush()

    def flush(self) -> None:
        """Read the pending step's loss to the host, and show it."""
        if self.pending is None:
            return
        loss = float(self.pending)
        self.pending = None
        self.tick()
        self.progress.losses.append(loss)
        self.bar.update(self.step_tokens())
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def step_tokens(self) -> int:
        """Student tokens of one optimizer step (all workers together)."""
        return self.settings.windows_per_step * self.settings.seq_len

    def tick(self) -> None:
        """One more step finished on the device: start the clock, or count its tokens."""
        self.read += 1
        self.end = time.perf_counter()
        if self.read == WARMUP_STEPS:
            self.start = self.end
        elif self.read > WARMUP_STEPS:
            self.tokens += self.step_tokens()

    def tokens_per_s(self) -> float | None:
        """Student tokens per second of the timed steps; None before any."""
        return self.tokens / (self.end - self.start) if self.tokens else None


@dataclass(frozen=True)
class DistillResult:
    """What a distillation did: tokens trained and optimizer steps (over the whole run,
    resumed or not), the loss per step (mean per predicted token), the step it resumed
    from (0 for a fresh start), the seconds this call took, and, on several workers, the
    DeepSpeed ZeRO stage they trained with."""

    tokens: int
    steps: int
    losses: list[float]
    resumed_from: int
    seconds: float
    tokens_per_s: float | None = None
    zero_stage: int | None = None

    @property
    def final_loss(self) -> float:
        """The loss of the last optimizer step."""
        return self.losses[-1]


def distill(teacher: nn.Module | TeacherTopK, student: nn.Module, windows: torch.Tensor,
            settings: DistillSettings = DistillSettings(),
            checkpoint_dir: str | Path | None = None) -> DistillResult:
    """Train `student` in place to match `teacher` on `windows` `[n, settings.seq_len]`.

    The teacher is put in eval mode with gradients off and is never changed; it can also
    be its cached top-k logits over `windows` (`teacher.teacher_top_k`, with
    `settings.top_k` equal to its k), which students sharing the windows share. Both models
    must be on one device; the student's parameters should be float32 (on GPU, autocast
    runs the matmuls in bf16). With LoRA (`settings.lora_rank > 0`) the adapters are
    merged into the student's weights before returning. With `checkpoint_dir`, progress is
    saved there every `settings.checkpoint_every` steps and at the end, and a run that
    finds a checkpoint there resumes from it. The student is left in eval mode.
    """
    start = time.perf_counter()
    check_inputs(teacher, student, windows, settings)
    torch.manual_seed(settings.seed)
    freeze(teacher)
    peft_model = None
    if settings.lora_rank:
        peft_model = add_lora(student, settings.lora_rank, settings.lora_alpha)
    result = run_steps(student, lambda progress: train_step(
        teacher, student, windows, settings, progress.windows, backward=torch.Tensor.backward),
        settings, run_identity(settings, windows), checkpoint_dir, start)
    if peft_model is not None:
        merge_lora(peft_model)
    return result


Step = Callable[[Progress], torch.Tensor]
"""The forward and backward passes of one optimizer step, the run being at `progress`;
returns the step's loss (mean per predicted token), detached."""


def run_steps(model: nn.Module, step: Step, settings: DistillSettings,
              identity: dict[str, Any], checkpoint_dir: str | Path | None,
              start: float, desc: str = "distil") -> DistillResult:
    """The optimizer loop of one device: `step`, clipping, AdamW over the model's trainable
    parameters, warmup and cosine decay, until `settings.steps`; a checkpoint every
    `settings.checkpoint_every` steps in `checkpoint_dir` (when given), and a resume from
    the one found there. The model trains in train mode and is left in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = cosine_schedule(optimizer, settings)
    progress = Progress()
    if checkpoint_dir is not None:
        progress = (load_checkpoint(checkpoint_dir, model, optimizer, scheduler, identity)
                    or progress)
    resumed_from = progress.step
    model.train()
    try:
        with progress_bar(settings, progress, desc=desc) as bar:
            log = StepLog(progress, settings, bar)
            while progress.step < settings.steps:
                loss = step(progress)
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                log.push(loss)
                if checkpoint_dir is not None and checkpoint_due(progress, settings):
                    log.flush()
                    save_checkpoint(checkpoint_dir, model, optimizer, scheduler, progress,
                                    identity)
            log.flush()
    finally:
        model.eval()
    return DistillResult(tokens=progress.tokens, steps=progress.step, losses=progress.losses,
                         resumed_from=resumed_from, seconds=time.perf_counter() - start,
                         tokens_per_s=log.tokens_per_s())


def freeze(teacher: nn.Module | TeacherTopK) -> None:
    """A teacher model runs in eval mode without gradients (a cache has neither)."""
    if isinstance(teacher, nn.Module):
        teacher.eval().requires_grad_(False)


def check_inputs(teacher: nn.Module | TeacherTopK, student: nn.Module, windows: torch.Tensor,
                 settings: DistillSettings) -> None:
    """Raise, naming what is wrong, for models or windows distillation cannot use."""
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] != settings.seq_len:
        raise ValueError(f"windows must be [n >= 1, distill.seq_len = {settings.seq_len}], "
                         f"got {tuple(windows.shape)}")
    if isinstance(teacher, TeacherTopK):
        check_cache(teacher, windows, settings)
        return
    if settings.lora_rank and student_sparsity_levels(student):
        raise ValueError(f"lora_rank = {settings.lora_rank}: a student with weight sparsity "
                         "trains without LoRA (merged adapters would fill its zeros); set "
                         "lora_rank: 0")
    if settings.lora_rank and student_has_block_channels(student):
        raise ValueError(f"lora_rank = {settings.lora_rank}: a student with per-block "
                         "channels trains without LoRA (its writers scatter into the "
                         "residual stream, which an adapter's output does not); set "
                         "lora_rank: 0")
    vocab = (teacher.config.vocab_size, student.config.vocab_size)
    if vocab[0] != vocab[1]:
        raise ValueError(f"teacher and student have other vocabularies: vocab_size "
                         f"{vocab[0]} and {vocab[1]}")
    devices = (model_device(teacher), model_device(student))
    if devices[0] != devices[1]:
        raise ValueError(f"teacher on {devices[0]} and student on {devices[1]}: "
                         "put both on one device")


def check_cache(cache: TeacherTopK, windows: torch.Tensor, settings: DistillSettings) -> None:
    """A teacher cache must hold the windows' positions, at `distill.top_k` logits each."""
    if settings.top_k != cache.k:
        raise ValueError(f"distill.top_k = {settings.top_k}: the teacher cache holds the top "
                         f"{cache.k} logits; set distill.top_k to {cache.k}")
    if tuple(cache.values.shape[:2]) != (windows.shape[0], windows.shape[1] - 1):
        raise ValueError(f"the teacher cache is of {tuple(cache.values.shape[:2])} windows x "
                         f"positions, the windows {tuple(windows.shape)}: build it from them")


def cosine_schedule(optimizer: torch.optim.Optimizer, settings: DistillSettings) -> Any:
    """Linear warmup over the first `settings.warmup` of the steps, then cosine decay to 0."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, round(settings.warmup * settings.steps),
                                           settings.steps)


def train_step(teacher: nn.Module | TeacherTopK, student: nn.Module, windows: torch.Tensor,
               settings: DistillSettings, position: int,
               backward: Callable[[torch.Tensor], Any], rank: int = 0,
               world: int = 1) -> torch.Tensor:
    """Forward and backward passes over this rank's micro-batches of one optimizer step.

    The step trains on the windows at `position` of the visiting order; rank `rank` of
    `world` data-parallel ranks takes every `world`-th of them, so every world size trains
    on the same windows per step. Each micro-batch's loss, divided by the tokens this rank
    predicts in the step, goes to `backward` (`loss.backward` on one device; DeepSpeed's
    engine, which averages the ranks' gradients, on several). Returns this rank's loss
    (mean per predicted token), detached; the caller clips and steps.
    """
    hold_sparsity(student)
    device = model_device(student)
    index = window_indices(len(windows), settings.seed, position, settings.windows_per_step)
    mine = index[rank::world]
    predicted = len(mine) * (settings.seq_len - 1)
    ids = to_device(windows[mine], device)
    rows = teacher.rows(mine, device) if isinstance(teacher, TeacherTopK) else None
    total = torch.zeros((), device=device)
    for start in range(0, len(mine), settings.micro_batch):
        part = slice(start, start + settings.micro_batch)
        teacher_top = None if rows is None else (rows[0][part], rows[1][part])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = micro_loss(teacher, student, ids[part], teacher_top, settings) / predicted
        backward(loss)
        total += loss.detach()
    return total


HELD_ZEROS = "prunetune_held_zeros"
"""The attribute of a student whose pruned weights `hold_sparsity` holds at zero."""


def student_sparsity_levels(student: nn.Module) -> tuple[float, ...]:
    """The sparsity level of each layer of an extracted student (empty when dense)."""
    subnet = getattr(student, "prunetune_subnet", None)
    return subnet.sparsity.levels if subnet is not None and subnet.sparsity else ()


def student_has_block_channels(student: nn.Module) -> bool:
    """Whether an extracted student's blocks read and write their own residual channels."""
    subnet = getattr(student, "prunetune_subnet", None)
    return subnet is not None and subnet.channels is not None


def hold_sparsity(student: nn.Module) -> None:
    """Keep the pruned weights of a sparse student at zero while it trains.

    On the student's first step, every trainable linear weight of a sparse layer gets a
    gradient hook that zeroes the gradient where the weight is zero. AdamW then never
    moves those weights: their moments stay zero, and decoupled weight decay scales a zero.
    The hook acts before any optimizer or DeepSpeed sees the gradient; under ZeRO-3 the
    zero pattern is read from the gathered weight. Later calls do nothing.
    """
    if getattr(student, HELD_ZEROS, False):
        return
    a = adapter_for(student)
    for layer, level in zip(student.get_submodule(a.layers), student_sparsity_levels(student)):
        if level <= 0:
            continue
        for parent, names in ((a.attn, (a.q, a.k, a.v, a.o)), (a.mlp, (a.gate, a.up, a.down))):
            for name in names:
                weight = layer.get_submodule(parent).get_submodule(name).weight
                if weight.requires_grad:
                    kept = ~zero_pattern(weight)
                    weight.register_hook(lambda grad, kept=kept: grad * kept.to(grad.device))
    setattr(student, HELD_ZEROS, True)


def zero_pattern(weight: torch.Tensor) -> torch.Tensor:
    """Where `weight` is zero, read whole (gathered first when ZeRO-3 partitions it)."""
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight]):
            return weight.detach() == 0
    return weight.detach() == 0


def micro_loss(teacher: nn.Module | TeacherTopK, student: nn.Module, ids: torch.Tensor,
               teacher_top: tuple[torch.Tensor, torch.Tensor] | None,
               settings: DistillSettings) -> torch.Tensor:
    """The summed loss of the windows `ids`, against the teacher model, or against its
    cached top-k logits at these windows (`teacher_top`, with a cache)."""
    if teacher_top is not None:
        return distill_loss_sum(None, student, ids, settings.temperature, settings.top_k,
                                settings.lm_weight, teacher_top=teacher_top)
    return distill_loss_sum(teacher, student, ids, settings.temperature, settings.top_k,
                            settings.lm_weight)


def checkpoint_due(progress: Progress, settings: DistillSettings) -> bool:
    """A checkpoint is written every `checkpoint_every` steps and after the last one."""
    return progress.step % settings.checkpoint_every == 0 or progress.step == settings.steps


def progress_bar(settings: DistillSettings, progress: Progress,
                 disable: bool | None = None, desc: str = "distil") -> Any:
    """A bar over the token budget (tokens, tokens/s, time left, loss); silent when the
    output is not a terminal (`disable=None`) or when `disable`."""
    from tqdm.auto import tqdm

    total = settings.steps * settings.windows_per_step * settings.seq_len
    return tqdm(total=total, initial=progress.tokens, unit="tok", unit_scale=True,
                desc=desc, disable=disable, dynamic_ncols=True)
