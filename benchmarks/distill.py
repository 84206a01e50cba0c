"""Distillation throughput on one GPU, against a plain Hugging Face training step.

A teacher of a model's shapes (random weights built on the GPU; SmolLM2-135M by default)
and a student extracted from it at about half its parameters (every layer, half the MLP
neurons and KV heads) train with `prunetune.training.distill` for a few optimizer steps
on random tokens (the first `WARMUP_STEPS` untimed). The same student shapes then train
with a plain Hugging Face step (`model(ids, labels=ids).loss`, AdamW, clipping, bf16
autocast), on the same micro-batches and sequence length, with no teacher, timed over the
same steps with no host-device synchronisation between them (its best case). Then a fresh
student trains against the teacher's cached top-K logits (`training.teacher`), built once
beforehand and timed apart. For each micro-batch size it prints student tokens per second
of each and their ratios to the plain step: what the teacher's forward pass and
prunetune's KL loss cost per token (the issue's goal is a ratio of at least 0.85).

    python benchmarks/distill.py [--config tests/fixtures/configs/smollm2-135m.json]
        [--seq-len 512] [--micro-batch 8 32] [--steps 20] [--teacher-cache 64]
        [--out results/distill.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from prunetune.evaluators.model import random_model
from prunetune.evaluators.surgery import extract
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import count_params
from prunetune.training.distill import WARMUP_STEPS, distill
from prunetune.training.data import to_device
from prunetune.training.settings import DistillSettings
from prunetune.training.teacher import teacher_top_k

GOAL = 0.85
"""The issue's goal for the ratio of distillation's tokens/s to the plain step's."""

SMOLLM2 = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs" / "smollm2-135m.json"


def half_width(config) -> SubnetConfig:
    """Every layer and the embedding width; half the KV heads and MLP neurons."""
    dense = SubnetConfig.dense(config)
    n = dense.num_layers
    return replace(dense, kv_heads=(max(1, dense.kv_heads[0] // 2),) * n,
                   mlp=(dense.mlp[0] // 2,) * n)


def plain_tokens_per_s(model: torch.nn.Module, windows: torch.Tensor,
                       settings: DistillSettings) -> float:
    """Student tokens per second of a plain HF causal-LM training step on the batches
    `distill` trains on, timed as `distill` times itself: the steps after the first
    `WARMUP_STEPS`, with no synchronisation between steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    model.train()
    device = torch.device("cuda")
    per_step = settings.windows_per_step
    for step in range(settings.steps):
        if step == WARMUP_STEPS:
            torch.cuda.synchronize()
            start = time.perf_counter()
        batch = to_device(windows[step * per_step:(step + 1) * per_step], device)
        for ids in batch.split(settings.micro_batch):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss / settings.accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    timed = settings.steps - WARMUP_STEPS
    return timed * per_step * settings.seq_len / (time.perf_counter() - start)


def cached_run(teacher: torch.nn.Module, subnet: SubnetConfig, windows: torch.Tensor,
               settings: DistillSettings, k: int) -> dict:
    """Distil a fresh student against the teacher's cached top-k logits: the seconds the
    cache took to build (once for every student of the windows) and the student's tokens/s."""
    if not k:
        return {}
    torch.cuda.synchronize()
    start = time.perf_counter()
    cache = teacher_top_k(teacher, windows, k, batch=settings.micro_batch)
    seconds = time.perf_counter() - start
    result = distill(cache, extract(teacher, subnet).float(), windows, replace(settings, top_k=k))
    return {"cache_k": k, "cache_seconds": seconds, "cache_windows": len(windows),
            "cached_tokens_per_s": result.tokens_per_s, "cached_last_loss": result.losses[-1]}


def one_size(args: argparse.Namespace, config, teacher: torch.nn.Module, subnet: SubnetConfig,
             micro_batch: int) -> dict:
    """The live-teacher, plain and cached-teacher runs of one micro-batch size, and ratios."""
    tokens_per_step = micro_batch * args.accumulation * args.seq_len
    settings = DistillSettings(tokens=args.steps * tokens_per_step, seq_len=args.seq_len,
                               micro_batch=micro_batch, accumulation=args.accumulation)
    windows = torch.randint(0, config.vocab_size, (settings.steps * settings.windows_per_step,
                                                   args.seq_len))
    result = distill(teacher, extract(teacher, subnet).float(), windows, settings)
    plain_tps = plain_tokens_per_s(extract(teacher, subnet).float(), windows, settings)
    cached = cached_run(teacher, subnet, windows, settings, args.teacher_cache)
    return {"seq_len": args.seq_len, "micro_batch": micro_batch,
            "accumulation": args.accumulation, "steps": settings.steps,
            "first_loss": result.losses[0], "last_loss": result.losses[-1],
            "distill_tokens_per_s": result.tokens_per_s, "plain_tokens_per_s": plain_tps,
            "ratio": result.tokens_per_s / plain_tps, **cached,
            "cached_ratio": cached["cached_tokens_per_s"] / plain_tps if cached else None}


def summary(row: dict) -> str:
    """One line of a row: tokens/s of each run and the ratios to the plain step."""
    line = (f"seq {row['seq_len']} x micro-batch {row['micro_batch']}: plain HF "
            f"{row['plain_tokens_per_s']:,.0f} tok/s | live teacher "
            f"{row['distill_tokens_per_s']:,.0f} tok/s, ratio {row['ratio']:.3f}")
    if row["cached_ratio"] is not None:
        line += (f" | cached top-{row['cache_k']} {row['cached_tokens_per_s']:,.0f} tok/s, "
                 f"ratio {row['cached_ratio']:.3f}")
    return line + f" (goal >= {GOAL})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=SMOLLM2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--teacher-cache", type=int, default=64, metavar="K",
                        help="also train against the teacher's cached top-K logits (0: not)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.config)
    teacher = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    subnet = half_width(config)
    rows = [one_size(args, config, teacher, subnet, size) for size in args.micro_batch]
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "config": args.config.name,
              "teacher_params": count_params(config, SubnetConfig.dense(config)),
              "student_params": count_params(config, subnet), "rows": rows}
    print(json.dumps(report, indent=2))
    for row in rows:
        print(summary(row))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
