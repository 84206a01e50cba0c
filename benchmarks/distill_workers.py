"""Distillation on several GPUs (Ray Train workers, DeepSpeed ZeRO) against one GPU.

A teacher of a model's shapes (random weights built on each worker's GPU) and a student
cut from it (every layer, `--mlp` of the MLP neurons and `--kv` of the KV heads) train with
`prunetune.training.distributed.distill_on_workers` on random tokens, for each teacher
placement of `--teacher`, ZeRO stage of `--zero`, micro-batch size of `--micro-batch` and
worker count of `--workers`. A "partitioned" teacher is built partitioned over the
workers' GPUs (`zero3.build_random_sharded`: no worker, and no host memory, ever holds it
whole), and its student is cut out of it one gathered layer at a time. Every worker runs
one micro-batch per optimizer step, so N workers train on N times the windows per step
(weak scaling, as data parallelism is used). Prints student tokens per second (steps after
the first three), the speed-up over the first worker count of the same teacher placement,
stage and micro-batch (the issue's goal: at least 1.8 on two GPUs), and the peak GPU
memory of the first worker since its models were built. With `--single`, the same pair
also trains in this process with `training.distill.distill` (no Ray, no DeepSpeed), and
the speed-ups over it are printed too. With an 8B teacher and a student whose training
state (16 bytes a parameter) does not fit one GPU, the one-GPU run fails for memory and
the table says so. `--cpu` runs the same on CPU processes (gloo), to check the script
without a GPU (with small windows: `--seq-len 32 --micro-batch 1 --steps 4`). The JSON
report is rewritten after every run, so a run cut short keeps what it measured.

    python benchmarks/distill_workers.py [--config tests/fixtures/configs/smollm2-135m.json]
        [--teacher whole partitioned] [--workers 1 2] [--zero 0 2] [--mlp 0.5] [--kv 0.5] [--seq-len 512]
        [--micro-batch 8 32] [--steps 20] [--single] [--cpu] [--out results/distill-workers.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from prunetune.evaluators.model import random_model
from prunetune.evaluators.sharded.zero3 import build_random_sharded, extract_partitioned
from prunetune.evaluators.surgery import extract
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import count_params
from prunetune.training.distill import distill
from prunetune.training.distributed import ZERO_STAGES, WorkerSettings, distill_on_workers
from prunetune.training.settings import TEACHER_PLACEMENTS, DistillSettings

GOAL = 1.8
"""The issue's goal for two GPUs' tokens/s over one's."""

SMOLLM2 = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs" / "smollm2-135m.json"


def narrowed(config, mlp: float, kv: float) -> SubnetConfig:
    """Every layer and the embedding width; `mlp` of the neurons, `kv` of the KV heads."""
    dense = SubnetConfig.dense(config)
    n = dense.num_layers
    return replace(dense, kv_heads=(max(1, round(dense.kv_heads[0] * kv)),) * n,
                   mlp=(round(dense.mlp[0] * mlp),) * n)


def random_pair(config_path: str, subnet: SubnetConfig, device: torch.device,
                placement: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A teacher built on the worker's device (bf16 on GPU), whole or partitioned over the
    workers, and its float32 student cut from it (one gathered layer at a time when
    partitioned)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_path)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if placement == "partitioned":
        teacher = build_random_sharded(config, dtype, device)
        student = extract_partitioned(teacher, subnet).float()
    else:
        teacher = random_model(config, seed=0, dtype=dtype, device=device)
        student = extract(teacher, subnet).float()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return teacher, student


def peak_memory(path: str, _: torch.nn.Module) -> None:
    """Write the first worker's peak GPU memory since its models were built, in GiB, to
    `path` (the driver reads it: one host)."""
    if torch.cuda.is_initialized():
        Path(path).write_text(f"{torch.cuda.max_memory_allocated() / 2**30:.2f}")


def one_count(args: argparse.Namespace, config, subnet: SubnetConfig, placement: str,
              zero: int, micro_batch: int, workers: int) -> dict:
    """Train on `workers` GPUs; tokens/s, or the error that stopped it."""
    settings = worker_settings(args, micro_batch, workers)
    windows = torch.randint(0, config.vocab_size,
                            (settings.steps * settings.windows_per_step, args.seq_len))
    storage = tempfile.mkdtemp(prefix="distill-")
    peak_file = Path(storage) / "peak_gib"
    placement_settings = WorkerSettings(
        workers=workers, storage=storage,
        name=f"{placement}-z{zero}-m{micro_batch}-w{workers}", use_gpu=not args.cpu,
        zero_stage=zero, teacher=placement)
    build = functools.partial(random_pair, str(args.config.resolve()), subnet)
    row = {"teacher": placement, "zero_stage": zero, "micro_batch": micro_batch,
           "workers": workers}
    try:
        result = distill_on_workers(build, windows, settings, placement_settings,
                                    finish=functools.partial(peak_memory, str(peak_file)))
    except RuntimeError as exc:
        return {**row, "error": str(exc)[:300]}
    peak = float(peak_file.read_text()) if peak_file.is_file() else None
    return {**row, "steps": result.steps, "tokens_per_s": result.tokens_per_s,
            "first_loss": result.losses[0], "last_loss": result.losses[-1], "peak_gib": peak}


def worker_settings(args: argparse.Namespace, micro_batch: int, workers: int) -> DistillSettings:
    """One micro-batch of `micro_batch` windows per worker and optimizer step."""
    return DistillSettings(tokens=args.steps * workers * micro_batch * args.seq_len,
                           seq_len=args.seq_len, micro_batch=micro_batch, accumulation=workers,
                           checkpoint_every=10 ** 9)


def single_process(args: argparse.Namespace, config, subnet: SubnetConfig,
                   micro_batch: int) -> dict:
    """The same pair (teacher whole) and steps in this process on one GPU, without Ray or
    DeepSpeed."""
    device = torch.device("cpu" if args.cpu else "cuda")
    teacher, student = random_pair(str(args.config.resolve()), subnet, device, "whole")
    settings = worker_settings(args, micro_batch, 1)
    windows = torch.randint(0, config.vocab_size,
                            (settings.steps * settings.windows_per_step, args.seq_len))
    result = distill(teacher, student, windows, settings)
    del teacher, student
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"micro_batch": micro_batch, "workers": 1, "single_process": True,
            "steps": result.steps, "tokens_per_s": result.tokens_per_s}


def add_speedups(rows: list[dict], singles: dict[int, float]) -> None:
    """Each row's speed-up over the first worker count of its teacher placement, stage and
    micro-batch, and over the single process of its micro-batch."""
    for row in rows:
        if "tokens_per_s" not in row:
            continue
        key = ("teacher", "zero_stage", "micro_batch")
        base = next((r.get("tokens_per_s") for r in rows
                     if all(r[k] == row[k] for k in key)), None)
        if base:
            row["speedup"] = row["tokens_per_s"] / base
        if row["micro_batch"] in singles:
            row["speedup_over_single"] = row["tokens_per_s"] / singles[row["micro_batch"]]


def summary(row: dict) -> str:
    """One line of a row: its tokens/s and speed-ups, or its error."""
    head = (f"teacher {row['teacher']}, ZeRO-{row['zero_stage']}, micro-batch "
            f"{row['micro_batch']}, {row['workers']} GPU(s): ")
    if "error" in row:
        return head + "failed: " + row["error"]
    line = head + f"{row['tokens_per_s']:,.0f} tok/s"
    if row["peak_gib"] is not None:
        line += f", peak {row['peak_gib']:.1f} GiB on the first GPU"
    if "speedup" in row:
        line += f", {row['speedup']:.2f}x over the first worker count (goal >= {GOAL} for 2)"
    if "speedup_over_single" in row:
        line += f", {row['speedup_over_single']:.2f}x over one process without DeepSpeed"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=SMOLLM2)
    parser.add_argument("--teacher", nargs="+", default=["whole"],
                        choices=TEACHER_PLACEMENTS)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--zero", type=int, nargs="+", default=[0, 2], choices=ZERO_STAGES)
    parser.add_argument("--mlp", type=float, default=0.5)
    parser.add_argument("--kv", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--single", action="store_true",
                        help="also train in this process without Ray or DeepSpeed")
    parser.add_argument("--cpu", action="store_true",
                        help="train on CPU processes (gloo) to check the script without a GPU")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import ray
    from transformers import AutoConfig

    ray.init(include_dashboard=False, log_to_driver=True)
    config = AutoConfig.from_pretrained(args.config)
    subnet = narrowed(config, args.mlp, args.kv)
    student = count_params(config, subnet)
    gpu = not args.cpu
    report = {"gpu": torch.cuda.get_device_name() if gpu else "none (--cpu)",
              "config": args.config.name,
              "teacher_params": count_params(config, SubnetConfig.dense(config)),
              "student_params": student, "training_state_gib": student * 16 / 2**30,
              "gpu_memory_gib": (torch.cuda.get_device_properties(0).total_memory / 2**30
                                 if gpu else None),
              "seq_len": args.seq_len, "single": [], "rows": []}
    singles: dict[int, float] = {}
    if args.single:
        for size in args.micro_batch:
            single = single_process(args, config, subnet, size)
            singles[size] = single["tokens_per_s"]
            report["single"].append(single)
            print(f"one process, micro-batch {size}: {single['tokens_per_s']:,.0f} tok/s",
                  flush=True)
    for placement, zero, size, workers in itertools.product(
            args.teacher, args.zero, args.micro_batch, args.workers):
        report["rows"].append(one_count(args, config, subnet, placement, zero, size, workers))
        add_speedups(report["rows"], singles)
        print(summary(report["rows"][-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    for row in report["rows"]:
        print(summary(row))


if __name__ == "__main__":
    main()
