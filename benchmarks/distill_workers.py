"""Distillation on several GPUs (Ray Train workers, DeepSpeed ZeRO) against one GPU.

A teacher of a model's shapes (random weights built on each worker's GPU) and a student
cut from it (every layer, `--mlp` of the MLP neurons and `--kv` of the KV heads) train with
`prunetune.training.distributed.distill_on_workers` on random tokens, for each worker
count of `--workers`. Every worker runs one micro-batch of `--micro-batch` windows per
optimizer step, so N workers train on N times the windows per step (weak scaling, as data
parallelism is used). Prints student tokens per second (steps after the first three) and
the speed-up over the first worker count, and the peak GPU memory of a worker. With an 8B
teacher and a student whose training state (16 bytes a parameter with AdamW) does not fit
one GPU, the one-GPU run fails for memory and the table says so.

    python benchmarks/distill_workers.py [--config tests/fixtures/configs/smollm2-135m.json]
        [--workers 1 2] [--zero 2] [--mlp 0.5] [--kv 0.5] [--seq-len 512]
        [--micro-batch 8] [--steps 20] [--out results/distill-workers.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from prunetune.evaluators.model import random_model
from prunetune.evaluators.surgery import extract
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import count_params
from prunetune.training.distributed import WorkerSettings, distill_on_workers
from prunetune.training.settings import DistillSettings

SMOLLM2 = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs" / "smollm2-135m.json"


def narrowed(config, mlp: float, kv: float) -> SubnetConfig:
    """Every layer and the embedding width; `mlp` of the neurons, `kv` of the KV heads."""
    dense = SubnetConfig.dense(config)
    n = dense.num_layers
    return replace(dense, kv_heads=(max(1, round(dense.kv_heads[0] * kv)),) * n,
                   mlp=(round(dense.mlp[0] * mlp),) * n)


def random_pair(config_path: str, subnet: SubnetConfig,
                device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A bf16 teacher built on the worker's device, and its float32 student."""
    from transformers import AutoConfig

    teacher = random_model(AutoConfig.from_pretrained(config_path), seed=0,
                           dtype=torch.bfloat16, device=device)
    student = extract(teacher, subnet).float()
    torch.cuda.reset_peak_memory_stats()
    return teacher, student


def peak_memory(_: torch.nn.Module) -> None:
    """Print the first worker's peak GPU memory (read by the driver from the log)."""
    print(f"PEAK_GIB {torch.cuda.max_memory_allocated() / 2**30:.2f}", flush=True)


def one_count(args: argparse.Namespace, config, subnet: SubnetConfig, workers: int) -> dict:
    """Train on `workers` GPUs; tokens/s, or the error that stopped it."""
    settings = DistillSettings(tokens=args.steps * workers * args.micro_batch * args.seq_len,
                               seq_len=args.seq_len, micro_batch=args.micro_batch,
                               accumulation=workers, checkpoint_every=10 ** 9)
    windows = torch.randint(0, config.vocab_size,
                            (settings.steps * settings.windows_per_step, args.seq_len))
    placement = WorkerSettings(workers=workers, storage=tempfile.mkdtemp(prefix="distill-"),
                               name=f"w{workers}", use_gpu=True, zero_stage=args.zero)
    build = functools.partial(random_pair, str(args.config.resolve()), subnet)
    try:
        result = distill_on_workers(build, windows, settings, placement, finish=peak_memory)
    except RuntimeError as exc:
        return {"workers": workers, "error": str(exc)[:300]}
    return {"workers": workers, "steps": result.steps, "tokens_per_s": result.tokens_per_s,
            "first_loss": result.losses[0], "last_loss": result.losses[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=SMOLLM2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--zero", type=int, default=2, choices=(2, 3))
    parser.add_argument("--mlp", type=float, default=0.5)
    parser.add_argument("--kv", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import ray
    from transformers import AutoConfig

    ray.init(include_dashboard=False, log_to_driver=True)
    config = AutoConfig.from_pretrained(args.config)
    subnet = narrowed(config, args.mlp, args.kv)
    rows = [one_count(args, config, subnet, n) for n in args.workers]
    base = next((r["tokens_per_s"] for r in rows if "tokens_per_s" in r), None)
    for row in rows:
        if base and "tokens_per_s" in row:
            row["speedup"] = row["tokens_per_s"] / base
    student = count_params(config, subnet)
    report = {"gpu": torch.cuda.get_device_name(), "config": args.config.name,
              "teacher_params": count_params(config, SubnetConfig.dense(config)),
              "student_params": student, "training_state_gib": student * 16 / 2**30,
              "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
              "zero_stage": args.zero, "seq_len": args.seq_len,
              "micro_batch_per_worker": args.micro_batch, "rows": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
