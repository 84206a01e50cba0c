"""Distillation throughput on one GPU, against a plain Hugging Face training step.

A teacher of a model's shapes (random weights built on the GPU; SmolLM2-135M by default)
and a student extracted from it at about half its parameters (every layer, half the MLP
neurons and KV heads) train with `prunetune.training.distill` for a few optimizer steps
on random tokens, after a short untimed warm-up run. The same student shapes then train with a plain Hugging Face step
(`model(ids, labels=ids).loss`, AdamW, bf16 autocast), on the same micro-batches and
sequence length, with no teacher. It prints student tokens per second of both and their
ratio: what the teacher's forward pass and prunetune's chunked KL loss cost per token.

    python benchmarks/distill.py [--config tests/fixtures/configs/smollm2-135m.json]
        [--seq-len 512] [--micro-batch 8] [--steps 20] [--out results/distill.json]
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
from prunetune.training.distill import distill
from prunetune.training.settings import DistillSettings

WARMUP_STEPS = 3
"""Optimizer steps run before the timed ones (CUDA and cuBLAS set-up), in both."""
SMOLLM2 = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs" / "smollm2-135m.json"


def half_width(config) -> SubnetConfig:
    """Every layer and the embedding width; half the KV heads and MLP neurons."""
    dense = SubnetConfig.dense(config)
    n = dense.num_layers
    return replace(dense, kv_heads=(max(1, dense.kv_heads[0] // 2),) * n,
                   mlp=(dense.mlp[0] // 2,) * n)


def plain_steps(model: torch.nn.Module, windows: torch.Tensor, settings: DistillSettings) -> float:
    """Mean seconds per optimizer step of a plain HF causal-LM training step on the same
    batches, after `WARMUP_STEPS` untimed ones (as `distill`'s timed run follows a warm-up)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    model.train()
    times = []
    for step in range(settings.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for micro in windows[step * settings.windows_per_step:(step + 1) * settings.windows_per_step].split(settings.micro_batch):
            ids = micro.cuda(non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss / settings.accumulation
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[WARMUP_STEPS:]
    return sum(timed) / len(timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=SMOLLM2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.config)
    teacher = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda")
    subnet = half_width(config)
    student = extract(teacher, subnet).float()
    tokens_per_step = args.micro_batch * args.accumulation * args.seq_len
    settings = DistillSettings(tokens=args.steps * tokens_per_step, seq_len=args.seq_len,
                               micro_batch=args.micro_batch, accumulation=args.accumulation)
    windows = torch.randint(0, config.vocab_size, (settings.steps * settings.windows_per_step,
                                                   args.seq_len))
    distill(teacher, student, windows, replace(settings, tokens=WARMUP_STEPS * tokens_per_step))
    result = distill(teacher, student, windows, settings)
    distill_tps = result.tokens / result.seconds
    plain = extract(teacher, subnet).float()
    plain_tps = tokens_per_step / plain_steps(plain, windows, settings)
    row = {"gpu": torch.cuda.get_device_name(), "config": args.config.name,
           "teacher_params": count_params(config, SubnetConfig.dense(config)),
           "student_params": count_params(config, subnet), "seq_len": args.seq_len,
           "micro_batch": args.micro_batch, "accumulation": args.accumulation,
           "steps": settings.steps, "first_loss": result.losses[0], "last_loss": result.losses[-1],
           "distill_tokens_per_s": distill_tps, "plain_tokens_per_s": plain_tps,
           "ratio": distill_tps / plain_tps}
    print(json.dumps(row, indent=2))
    if args.out:
        args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
