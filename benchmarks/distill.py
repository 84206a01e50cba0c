"""Distillation throughput on one GPU, against a plain Hugging Face training step.

A teacher of a model's shapes (random weights built on the GPU; SmolLM2-135M by default)
and a student extracted from it at about half its parameters (every layer, half the MLP
neurons and KV heads) train with `prunetune.training.distill` for a few optimizer steps
on random tokens (the first `WARMUP_STEPS` untimed). The same student shapes then train
with a plain Hugging Face step (`model(ids, labels=ids).loss`, AdamW, bf16 autocast), on
the same micro-batches and sequence length, with no teacher. Then a fresh student trains
against the teacher's cached top-K logits (`training.teacher`), built once beforehand and
timed apart. It prints student tokens per second of each and their ratios to the plain
step: what the teacher's forward pass and prunetune's KL loss cost per token.

    python benchmarks/distill.py [--config tests/fixtures/configs/smollm2-135m.json]
        [--seq-len 512] [--micro-batch 8] [--steps 20] [--teacher-cache 64]
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
from prunetune.training.settings import DistillSettings
from prunetune.training.teacher import teacher_top_k

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=SMOLLM2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
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
    student = extract(teacher, subnet).float()
    tokens_per_step = args.micro_batch * args.accumulation * args.seq_len
    settings = DistillSettings(tokens=args.steps * tokens_per_step, seq_len=args.seq_len,
                               micro_batch=args.micro_batch, accumulation=args.accumulation)
    windows = torch.randint(0, config.vocab_size, (settings.steps * settings.windows_per_step,
                                                   args.seq_len))
    result = distill(teacher, student, windows, settings)
    distill_tps = result.tokens_per_s
    plain = extract(teacher, subnet).float()
    plain_tps = tokens_per_step / plain_steps(plain, windows, settings)
    cached = cached_run(teacher, subnet, windows, settings, args.teacher_cache)
    row = {"gpu": torch.cuda.get_device_name(), "config": args.config.name,
           "teacher_params": count_params(config, SubnetConfig.dense(config)),
           "student_params": count_params(config, subnet), "seq_len": args.seq_len,
           "micro_batch": args.micro_batch, "accumulation": args.accumulation,
           "steps": settings.steps, "first_loss": result.losses[0], "last_loss": result.losses[-1],
           "distill_tokens_per_s": distill_tps, "plain_tokens_per_s": plain_tps,
           "ratio": distill_tps / plain_tps, **cached,
           "cached_ratio": cached["cached_tokens_per_s"] / plain_tps if cached else None}
    print(json.dumps(row, indent=2))
    if args.out:
        args.out.write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
