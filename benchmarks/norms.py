"""Hugging Face's eager RMSNorm against the fused `rms_norm` the evaluators use.

Times one Llama RMSNorm forward on hidden states of the given shape both ways (CUDA
events on a GPU; the mean of `--repeats` calls after 3 warm-ups) and prints how many of
the fused outputs differ from the eager ones, and by how much at most.

    python benchmarks/norms.py --widths 4928 8192                       # on a GPU
    python benchmarks/norms.py --tokens 512 --widths 576 --device cpu   # checks the script
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from prunetune.evaluators.norms import rms_norm


def mean_seconds(call: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> float:
    """Mean seconds of `call` over `repeats` calls after 3 warm-ups."""
    for _ in range(3):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def compare(width: int, tokens: int, dtype: torch.dtype, device: torch.device,
            repeats: int) -> dict[str, float]:
    """Eager and fused microseconds of one norm of `[tokens, width]`, and their outputs'
    difference."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = 3 * torch.randn(tokens, width, generator=generator, device=device).to(dtype)
    norm = LlamaRMSNorm(width, eps=1e-5).to(device=device, dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=generator, device=device) + 0.5)
        eager, fused = norm(x), rms_norm(norm, x)
        diff = (eager.float() - fused.float()).abs()
        return {"width": width, "tokens": tokens,
                "eager_us": 1e6 * mean_seconds(lambda: norm(x), repeats, device),
                "fused_us": 1e6 * mean_seconds(lambda: rms_norm(norm, x), repeats, device),
                "differing": float((diff > 0).float().mean()), "max_abs_diff": float(diff.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4928, 8192])
    parser.add_argument("--tokens", type=int, default=4 * 2047, help="batch x sequence")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = [compare(w, args.tokens, dtype, device, args.repeats) for w in args.widths]
    print("| tokens x width | eager us | fused us | speed-up | outputs differing | max abs diff |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} x {r['width']} | {r['eager_us']:.1f} | {r['fused_us']:.1f} | "
              f"{r['eager_us'] / r['fused_us']:.1f}x | {100 * r['differing']:.1f}% | "
              f"{r['max_abs_diff']:.3g} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
