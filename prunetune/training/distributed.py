"""Training over several GPUs (or CPU processes): Ray Train workers, DeepSpeed ZeRO.

`train_on_workers` runs a `WorkerJob` as a Ray Train `TorchTrainer`; `distill_on_workers`
runs the same training as `distill.distill` that way: every worker builds the teacher and
the student (`build`), DeepSpeed wraps the student (with the fastest ZeRO stage whose
training state fits the workers' memory, unless one is named: stage 0 copies it on every
worker, stage 2 partitions gradients and AdamW states over the workers, stage 3 the
weights too), and each optimizer step's windows are split between the workers
(`distill.train_step`), so N workers train on the same batches as one and end, to rounding,
where one would. Checkpoints (DeepSpeed's, with the progress) go to Ray Train's storage,
a local folder or `s3://` / `gs://`, every `checkpoint_every` steps; a run started again
with the same storage and name resumes from the last one and loses at most the steps
since (and a finished run returns its result at once). The teacher is frozen, and whole on
every worker, or partitioned over them (ZeRO-3 inference, `WorkerSettings.teacher`) for a
teacher too large for one GPU.
Super-network training (`supernet.SupernetJob`) is the other job.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from prunetune.evaluators.perplexity import model_device
from prunetune.shared_memory import unlink_allreduce_buffer
from prunetune.training.checkpoint import Progress, refuse_other_run, run_identity
from prunetune.training.distill import (
    DistillResult, StepLog, check_inputs, checkpoint_due, cosine_schedule, freeze,
    progress_bar, train_step,
)
from prunetune.training.settings import TEACHER_PLACEMENTS, ZERO_STAGES, DistillSettings

Build = Callable[[torch.device, str], tuple[nn.Module, nn.Module]]
"""Makes (teacher, student) on a worker's device, the teacher placed as the second argument
says (`TEACHER_PLACEMENTS`): "whole", or "partitioned" over the workers as it is built
(ZeRO-3: `zero3.load_sharded`, `zero3.build_random_sharded`); the student's parameters in
float32."""

Finish = Callable[[nn.Module], None]
"""Runs on the first worker with the trained student, whole (e.g. to export it)."""

Backward = Callable[[torch.Tensor], Any]


class WorkerJob(Protocol):
    """What the workers train: `build` makes, on a worker's device, the model whose
    parameters train (float32), after checking the inputs; `step` runs one optimizer step's forward and backward
    passes for rank `rank` of `world` (`backward` for each loss, `micro_done` after each
    micro-batch) and returns the rank's loss, detached; `identity` is what a checkpoint
    must have been started with to be resumed; `finish` runs on the first worker with the
    trained model, whole (e.g. to save it)."""

    def build(self, device: torch.device, windows: torch.Tensor,
              settings: DistillSettings) -> nn.Module: ...

    def step(self, model: nn.Module, windows: torch.Tensor, settings: DistillSettings,
             progress: Progress, backward: Backward, micro_done: Callable[[], Any],
             rank: int, world: int) -> torch.Tensor: ...

    def identity(self, settings: DistillSettings, windows: torch.Tensor) -> dict[str, Any]: ...

    def finish(self, model: nn.Module) -> None: ...


@dataclass
class DistillJob:
    """Distillation of the student from the teacher that `make` makes (`distill`'s step),
    the teacher whole or partitioned (`placement`); `done` gets the trained student."""

    make: Build
    done: Finish | None = None
    placement: str = "whole"
    teacher: nn.Module | None = field(default=None, init=False)
    teacher_engine: Any = field(default=None, init=False)

    def build(self, device: torch.device, windows: torch.Tensor,
              settings: DistillSettings) -> nn.Module:
        teacher, student = self.make(device, self.placement)
        check_inputs(teacher, student, windows, settings)
        freeze(teacher)
        self.teacher = teacher
        if self.placement == "partitioned":
            self.teacher, self.teacher_engine = partitioned_teacher(teacher)
        return student

    def step(self, model: nn.Module, windows: torch.Tensor, settings: DistillSettings,
             progress: Progress, backward: Backward, micro_done: Callable[[], Any],
             rank: int, world: int) -> torch.Tensor:
        return train_step(self.teacher, model, windows, settings, progress.windows,
                          backward=lambda loss: (backward(loss), micro_done()),
                          rank=rank, world=world)

    def identity(self, settings: DistillSettings, windows: torch.Tensor) -> dict[str, Any]:
        return run_identity(settings, windows)

    def finish(self, model: nn.Module) -> None:
        if self.done is not None:
            self.done(model)


class PartitionedTeacher(nn.Module):
    """A ZeRO-3 partitioned teacher as the loss calls it (`hidden_states`, then its LM head
    in chunks), under a top module for DeepSpeed's engine: every decoder pass is a call of
    it, and so starts a new step of ZeRO-3's parameter fetching (DeepSpeed restarts its
    trace of module calls, which its prefetching follows, at each call of the top module).
    Every worker makes the same calls in the same order (each gathers a module's weights
    from all workers), as every worker runs as many micro-batches of as many windows."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        """The teacher's config."""
        return self.model.config

    @property
    def base_model(self) -> nn.Module:
        """The decoder, as `hidden_states` calls it: this top module."""
        return self

    def get_output_embeddings(self) -> nn.Module:
        """The teacher's LM head."""
        return self.model.get_output_embeddings()

    def forward(self, **inputs: Any) -> Any:
        return self.model.base_model(**inputs)


def partitioned_teacher(teacher: nn.Module) -> tuple[PartitionedTeacher, Any]:
    """The teacher, partitioned over the workers as it was built, under DeepSpeed's ZeRO-3
    inference engine (which gathers each module's weights for its forward pass and frees
    them after); the engine is returned to be kept alive. Raises ValueError when the
    teacher was built whole."""
    if not is_partitioned(teacher):
        raise ValueError("teacher: partitioned, but the build made the teacher whole; build "
                         "it with zero3.load_sharded or zero3.build_random_sharded")
    import deepspeed

    from prunetune.evaluators.sharded.zero3 import zero3_config

    top = PartitionedTeacher(teacher)
    dtype = next(teacher.parameters()).dtype
    engine, *_ = deepspeed.initialize(model=top, config=zero3_config(dtype),
                                      dist_init_required=False)
    return top, engine


def is_partitioned(model: nn.Module) -> bool:
    """Whether every parameter of `model` is a ZeRO-3 partition (built under zero.Init)."""
    return all(hasattr(p, "ds_tensor") for p in model.parameters())


CHECKPOINT_TAG = "state"
AUTO_STAGES = (0, 2, 3)
"""The stages an automatic choice takes, fastest first: stage 1 saves less memory than 2
for the same all-reduce traffic as 0, so it is only used when asked for."""
ACTIVATION_SHARE = 0.4
"""The share of a worker's free memory (after its models are loaded) that is kept for
activations, logits and DeepSpeed's buffers when the ZeRO stage is chosen."""

REDUCE_BUCKET_ELEMENTS = 2**25
"""Gradient elements DeepSpeed reduces at a time (ZeRO 1 to 3, on GPU): small enough that
a 100M-parameter student's reduction overlaps its backward pass in a few buckets."""
FINISHED_FILE = "result.json"


@dataclass(frozen=True)
class WorkerSettings:
    """Where and how the workers train: `workers` processes (one GPU each with `use_gpu`,
    else one CPU core each, talking over gloo), DeepSpeed ZeRO `zero_stage`, and the Ray
    Train run `name` under `storage` (local path or URI) that checkpoints go to.

    Stage 0 is plain data parallelism (every worker keeps the whole training state; the
    gradients are all-reduced once per optimizer step): the fastest for a student whose
    training state (16 bytes a parameter) fits one GPU. Stage 1 partitions the AdamW
    states over the workers, stage 2 the gradients too, stage 3 the weights too (for a
    model that does not fit one GPU). `zero_stage` None (the default) lets the workers
    choose the fastest stage whose training state fits their memory
    (`choose_zero_stage`).

    `teacher` "whole" (the default) puts the whole frozen teacher on every worker;
    "partitioned" splits its weights over the workers (ZeRO-3 inference: each worker holds
    1/N of them, and every layer is gathered from all workers for its forward pass), for a
    teacher that does not fit one GPU, at the cost of moving the teacher's weights between
    the workers in every teacher pass."""

    workers: int
    storage: str
    name: str
    use_gpu: bool = True
    zero_stage: int | None = None
    teacher: str = "whole"

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.zero_stage is not None and self.zero_stage not in ZERO_STAGES:
            raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {self.zero_stage}")
        if self.teacher not in TEACHER_PLACEMENTS:
            raise ValueError(f"teacher must be one of {TEACHER_PLACEMENTS}, got {self.teacher!r}")


def distill_on_workers(build: Build, windows: torch.Tensor, settings: DistillSettings,
                       workers: WorkerSettings, finish: Finish | None = None) -> DistillResult:
    """Distil on `workers.workers` Ray Train workers (`train_on_workers` of a
    `DistillJob`); returns what the run did. LoRA trains on one device only."""
    if settings.lora_rank:
        raise ValueError("distill.lora_rank: LoRA trains on one device; "
                         "use workers = 1 or full-parameter training")
    return train_on_workers(DistillJob(build, finish, workers.teacher), windows, settings,
                            workers)


def train_on_workers(job: WorkerJob, windows: torch.Tensor, settings: DistillSettings,
                     workers: WorkerSettings) -> DistillResult:
    """Train `job` on `workers.workers` Ray Train workers; returns what the run did.

    Raises ValueError when a step's windows do not split evenly over the workers (every
    worker must predict as many tokens, for the averaged gradient to be the one-device
    gradient), and RuntimeError, with the workers' first error line, when training fails
    (after which the same call resumes from the last checkpoint).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if settings.windows_per_step % workers.workers:
        raise ValueError(f"distill.micro_batch * distill.accumulation = "
                         f"{settings.windows_per_step} windows per step do not split evenly "
                         f"over {workers.workers} workers")
    config = {"job": job, "windows": windows, "settings": settings,
              "zero_stage": workers.zero_stage}
    trainer = TorchTrainer(
        worker_loop, train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if workers.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers.workers,
                                               use_gpu=workers.use_gpu),
        run_config=ray.train.RunConfig(
            name=workers.name, storage_path=workers.storage,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(f"training on {workers.workers} workers failed; run it again "
                           f"to resume from its last checkpoint: {first_line(exc)}") from exc
    return DistillResult(**result.metrics["result"])


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an error's message."""
    return next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)


def worker_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker's share of the run (the function `TorchTrainer` runs)."""
    import ray.train

    start = time.perf_counter()
    done = finished_result(ray.train.get_checkpoint())
    if done is not None:
        report_finished(done)
        return
    settings: DistillSettings = config["settings"]
    windows: torch.Tensor = config["windows"]
    job: WorkerJob = config["job"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = worker_device()
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    student = job.build(device, windows, settings)
    torch.manual_seed(settings.seed)
    zero_stage = config["zero_stage"]
    if zero_stage is None:
        zero_stage = agreed_zero_stage(trainable_params(student), free_bytes(device, world),
                                       world, device)
    engine = deepspeed_engine(student, settings, zero_stage, world)
    unlink_allreduce_buffer()
    identity = job.identity(settings, windows)
    progress = restore(engine, identity)
    resumed_from = progress.step
    student.train()
    micro = MicroBatch(engine)
    with progress_bar(settings, progress, disable=rank != 0) as bar:
        log = StepLog(progress, settings, bar)
        while progress.step < settings.steps:
            loss = job.step(student, windows, settings, progress, backward=micro.add,
                            micro_done=micro.done, rank=rank, world=world)
            log.push(mean_over_workers(loss, world))
            if checkpoint_due(progress, settings) and progress.step < settings.steps:
                log.flush()
                report(engine, progress, identity)
        log.flush()
    student.eval()
    finish_on_first(student, job.finish, rank, zero_stage)
    result = DistillResult(tokens=progress.tokens, steps=progress.step, losses=progress.losses,
                           resumed_from=resumed_from, seconds=time.perf_counter() - start,
                           tokens_per_s=log.tokens_per_s(), zero_stage=zero_stage)
    report_finished(result)


def worker_device() -> torch.device:
    """This worker's device (its own GPU, made the current one, or the CPU)."""
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def trainable_params(model: nn.Module) -> int:
    """Parameters of `model` that train (their gradients and AdamW states are the state
    that ZeRO partitions)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def free_bytes(device: torch.device, world: int) -> int:
    """Memory this worker may still fill: its GPU's free memory, or on CPU its share of the
    host's available memory (the workers of a host share it)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available // world


def state_bytes(params: int, stage: int, world: int) -> int:
    """The training state that `params` float32 parameters add to one of `world` workers
    at ZeRO `stage`, beyond the weights already loaded: gradients (4 bytes a parameter)
    and AdamW's two moments (8 bytes), each partitioned from the stage that partitions it;
    from stage 1, DeepSpeed's float32 copy of the worker's partition (4 bytes); and at
    stage 3 the weights themselves become a partition, freeing the rest of them."""
    grads = 4 * params / (world if stage >= 2 else 1)
    moments = 8 * params / (world if stage >= 1 else 1)
    partition = 4 * params / world if stage >= 1 else 0
    freed = 4 * params * (1 - 1 / world) if stage == 3 else 0
    return int(grads + moments + partition - freed)


def choose_zero_stage(params: int, free: int, world: int) -> int:
    """The fastest ZeRO stage (0, then 2, then 3) whose training state of `params`
    parameters leaves `ACTIVATION_SHARE` of a worker's `free` bytes; stage 3 when none
    does (the most it can partition)."""
    budget = free * (1 - ACTIVATION_SHARE)
    return next((stage for stage in AUTO_STAGES if state_bytes(params, stage, world) <= budget),
                AUTO_STAGES[-1])


def agreed_zero_stage(params: int, free: int, world: int, device: torch.device) -> int:
    """`choose_zero_stage` agreed by every worker (over the group's backend, on `device`):
    the highest any of them needs, so that a worker with less free memory than the others
    is not overrun."""
    import torch.distributed as dist

    stage = torch.tensor([choose_zero_stage(params, free, world)], device=device)
    if world > 1:
        dist.all_reduce(stage, op=dist.ReduceOp.MAX)
    return int(stage)


def deepspeed_config(settings: DistillSettings, zero_stage: int, world: int,
                     gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config of one worker: its micro-batches per step, ZeRO, clipping. On
    GPUs, ZeRO's gradient reduction runs on its own stream, overlapped with the backward
    pass, in buckets of `REDUCE_BUCKET_ELEMENTS` (reductions in float32 either way)."""
    per_worker = settings.windows_per_step // world
    zero: dict[str, Any] = {"stage": zero_stage}
    if gpu and zero_stage:
        zero.update(overlap_comm=True, contiguous_gradients=True,
                    reduce_bucket_size=REDUCE_BUCKET_ELEMENTS)
    return {"train_micro_batch_size_per_gpu": min(settings.micro_batch, per_worker),
            "gradient_accumulation_steps": -(-per_worker // settings.micro_batch),
            "gradient_clipping": settings.max_grad_norm,
            "zero_optimization": zero,
            "steps_per_print": 2 ** 62, "wall_clock_breakdown": False}


def deepspeed_engine(student: nn.Module, settings: DistillSettings, zero_stage: int,
                     world: int) -> Any:
    """DeepSpeed's engine over the student, with `distill`'s AdamW and schedule (DeepSpeed
    runs on the accelerator that `worker_loop` set, that of the worker's device)."""
    import deepspeed

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer,
                                      lr_scheduler=cosine_schedule(optimizer, settings),
                                      config=deepspeed_config(
                                          settings, zero_stage, world,
                                          gpu=model_device(student).type == "cuda"),
                                      dist_init_required=False)
    return engine


class MicroBatch:
    """A micro-batch's losses through DeepSpeed: summed, with one backward pass when the
    micro-batch is done, then `engine.step`, which steps the optimizer (and averages the
    workers' gradients) after the step's last micro-batch. ZeRO reduces each parameter's
    gradient once per backward pass at a step's boundary, so the several losses of a
    super-network step take one pass. The losses are already divided by the tokens of the
    whole step, so DeepSpeed must not scale them."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.losses: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor) -> None:
        self.losses.append(loss)

    def done(self) -> None:
        self.engine.backward(torch.stack(self.losses).sum(), scale_wrt_gas=False)
        self.engine.step()
        self.losses.clear()


def mean_over_workers(loss: torch.Tensor, world: int) -> torch.Tensor:
    """The step's loss per predicted token over all workers (each predicts as many), on
    the device (read back by `StepLog` one step later)."""
    import torch.distributed as dist

    total = loss.detach().clone()
    if world > 1:
        dist.all_reduce(total)
    return total / world


def restore(engine: Any, identity: dict[str, Any]) -> Progress:
    """Load the run's last checkpoint into the engine, if Ray Train has one; its progress."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return Progress()
    with checkpoint_folder(checkpoint) as folder:
        _, client = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
    refuse_other_run(checkpoint.path, client["identity"], identity)
    return Progress(**client["progress"])


def report(engine: Any, progress: Progress, identity: dict[str, Any]) -> None:
    """Checkpoint every worker's shard of the run with its progress, and report it."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG,
                               client_state={"progress": asdict(progress),
                                             "identity": identity})
        ray.train.report({"step": progress.step, "tokens": progress.tokens,
                          "loss": progress.losses[-1]},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


def report_finished(result: DistillResult) -> None:
    """Report a finished run with a checkpoint of the first worker's result only: the
    trained student went to `finish`, and its training state (16 bytes a parameter) is
    not written again. Started again, the run finds it and returns it without training."""
    import ray.train

    if ray.train.get_context().get_world_rank():
        ray.train.report({"result": asdict(result)}, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / FINISHED_FILE).write_text(json.dumps(asdict(result)))
        ray.train.report({"result": asdict(result)},
                         checkpoint=ray.train.Checkpoint.from_directory(folder))


def finished_result(checkpoint: Any) -> DistillResult | None:
    """The result a finished run's last checkpoint holds; None for an unfinished run."""
    import pyarrow.fs

    if checkpoint is None:
        return None
    path = f"{checkpoint.path}/{FINISHED_FILE}"
    if checkpoint.filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with checkpoint.filesystem.open_input_stream(path) as stream:
        return DistillResult(**json.loads(stream.read()))


@contextmanager
def checkpoint_folder(checkpoint: Any) -> Iterator[str]:
    """A local folder holding a Ray Train checkpoint, for every worker of the run.

    A local checkpoint is read where it is. A remote one (`s3://`, `gs://`) is downloaded
    once per node, by the node's first worker, into a folder the node's workers share and
    that is deleted when all of them have read it. (Ray's own `Checkpoint.as_directory`
    does this with file locks, and fails when one worker deletes the folder as another
    arrives: "Checkpoint directory ... does not exist".)
    """
    import pyarrow.fs
    import ray.train
    import torch.distributed as dist

    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield checkpoint.path
        return
    digest = hashlib.sha256(checkpoint.path.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"prunetune-checkpoint-{digest}"
    first = ray.train.get_context().get_local_rank() == 0
    together = dist.is_initialized() and dist.get_world_size() > 1
    if first:
        shutil.rmtree(folder, ignore_errors=True)
        checkpoint.to_directory(str(folder))
    if together:
        dist.barrier()
    try:
        yield str(folder)
    finally:
        if together:
            dist.barrier()
        if first:
            shutil.rmtree(folder, ignore_errors=True)


def finish_on_first(student: nn.Module, finish: Finish, rank: int, zero_stage: int) -> None:
    """Run `finish` on the first worker with the student whole (ZeRO-3 gathers it)."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(student.parameters())):
            if rank == 0:
                finish(student)
    elif rank == 0:
        finish(student)
