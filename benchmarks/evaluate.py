"""Evaluator speed and the numbers it produces.

On CPU (default): the dense SmolLM2-135M's WikiText-2 perplexity at seq_len 512 (and 2048
with --long), with tokens/s.

On a GPU (--gpu): a Llama-3-8B-shaped model with random bf16 weights, built on the GPU;
the evaluator's perplexity throughput against a plain Hugging Face forward + loss over the
same batches, side by side; then measured prefill and decode latency of the dense model
and of uniform sub-networks with about 75% and 50% of its parameters.

    python benchmarks/evaluate.py [--long]
    python benchmarks/evaluate.py --gpu [--windows 32] [--batch 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from prunetune.evaluators.latency import LatencySettings, subnet_latency
from prunetune.evaluators.model import random_model
from prunetune.evaluators.perplexity import perplexity, tokenize_windows
from prunetune.evaluators.surgery import extract
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import count_params

LLAMA3_8B = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs" / "llama3-8b.json"


def cpu_perplexity(seq_lens: list[int], windows: int, batch: int) -> list[dict]:
    """Dense SmolLM2-135M on the WikiText-2 test split."""
    from prunetune.evaluators.data import load_text
    from prunetune.evaluators.model import load_model

    model, tokenizer = load_model("smollm2")
    text = load_text("wikitext2")
    rows = []
    for seq_len in seq_lens:
        ids = tokenize_windows(tokenizer, text, seq_len, windows)
        start = time.perf_counter()
        result = perplexity(model, ids, batch_size=batch)
        seconds = time.perf_counter() - start
        rows.append({"seq_len": seq_len, "windows": len(ids), **result, "seconds": seconds,
                     "tokens_per_s": ids.numel() / seconds})
        print(f"seq_len {seq_len:5d}: {len(ids)} windows, perplexity {result['perplexity']:.3f} "
              f"({result['tokens']} tokens scored) in {seconds:.1f} s = "
              f"{ids.numel() / seconds:,.0f} tokens/s on {torch.get_num_threads()} threads")
    return rows


def uniform_subnet(config, fraction: float) -> SubnetConfig:
    """The uniform all-layer sub-network whose params are closest to `fraction` of dense."""
    n, kv, q = config.num_hidden_layers, config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads
    dense = count_params(config, SubnetConfig.dense(config))
    best = None
    for r in [i / 64 for i in range(16, 65)]:
        subnet = SubnetConfig(range(n), (max(1, round(r * kv)),) * n, (q,) * n,
                              (round(r * config.intermediate_size / 128) * 128,) * n,
                              round(r * config.hidden_size / 128) * 128)
        gap = abs(count_params(config, subnet) / dense - fraction)
        if best is None or gap < best[0]:
            best = (gap, subnet)
    return best[1]


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def plain_hf_loss(model, windows: torch.Tensor, batch: int) -> float:
    """The reference: `model(input_ids, labels=input_ids).loss` over the same batches."""
    total = 0.0
    for chunk in windows.split(batch):
        total += model(input_ids=chunk, labels=chunk).loss.float().item()
    return total


def gpu_benchmark(windows: int, seq_len: int, batch: int, repeats: int) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(LLAMA3_8B)
    out: dict = {"device": torch.cuda.get_device_name(), "model": "Llama-3-8B shape, random bf16"}
    start = time.perf_counter()
    model = random_model(config, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    out["build_seconds"] = time.perf_counter() - start
    dense_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (windows, seq_len), device="cuda")
    tokens = ids.numel()
    perplexity(model, ids[:batch], batch)
    plain_hf_loss(model, ids[:batch], batch)
    ours = _median_seconds(lambda: perplexity(model, ids, batch), repeats)
    plain = _median_seconds(lambda: plain_hf_loss(model, ids, batch), repeats)
    flops_per_token = 2 * dense_params
    out["throughput"] = {
        "windows": windows, "seq_len": seq_len, "batch": batch,
        "evaluator_tokens_per_s": tokens / ours, "plain_hf_tokens_per_s": tokens / plain,
        "evaluator_vs_plain": plain / ours,
        "evaluator_tflops": flops_per_token * tokens / ours / 1e12,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(json.dumps(out["throughput"], indent=2))

    half = uniform_subnet(config, 0.5)
    small = extract(model, half)
    extracted = _median_seconds(lambda: perplexity(small, ids, batch), repeats)
    out["extracted_half_tokens_per_s"] = tokens / extracted
    del small, model
    torch.cuda.empty_cache()

    settings = LatencySettings(prompt_tokens=1024, decode_tokens=32, batch_size=1, repeats=5,
                               warmup=2)
    out["latency"] = []
    for fraction in (1.0, 0.75, 0.5):
        subnet = SubnetConfig.dense(config) if fraction == 1.0 else uniform_subnet(config, fraction)
        params = count_params(config, subnet)
        result = subnet_latency(config, subnet, settings, "cuda", torch.bfloat16)
        row = {"target": fraction, "params_fraction": params / dense_params, "params": params,
               "kv_heads": subnet.kv_heads[0], "mlp": subnet.mlp[0], "embed": subnet.embed, **result}
        out["latency"].append(row)
        print(json.dumps(row))
        torch.cuda.empty_cache()
    out["latency_settings"] = settings.__dict__
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--long", action="store_true", help="CPU: also seq_len 2048")
    parser.add_argument("--windows", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if args.gpu:
        result = gpu_benchmark(args.windows or 32, args.seq_len, args.batch or 4, args.repeats)
    else:
        seq_lens = [512, 2048] if args.long else [512]
        result = {"cpu": cpu_perplexity(seq_lens, args.windows or 16, args.batch or 4)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
