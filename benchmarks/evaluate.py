"""Evaluator speed and the numbers it produces.

On CPU (default): the dense SmolLM2-135M's WikiText-2 perplexity at seq_len 512 (and 2048
with --long), with tokens/s.

On a GPU (--gpu): a Llama-3-8B-shaped model with random bf16 weights, built on the GPU by
the `Evaluator` itself (its model source is the config file); the evaluator's perplexity
throughput (`Evaluator.evaluate`, dense, then extracted and masked sub-networks) against a
plain Hugging Face forward + loss over the same windows, side by side; then measured
prefill and decode latency in eager mode (batch 1 and 16) of the dense model and of uniform
sub-networks with about 75% and 50% of its parameters (graph mode: `latency.py`).

    python benchmarks/evaluate.py [--long]
    python benchmarks/evaluate.py --gpu [--windows 32] [--batch 4] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from prunetune.evaluators.latency import subnet_latency
from prunetune.evaluators.settings import LatencySettings
from prunetune.evaluators.perplexity import perplexity, tokenize_windows
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


def evaluator_seconds(evaluator, subnet: SubnetConfig, repeats: int) -> tuple[float, dict]:
    """Median wall time of `Evaluator.evaluate(subnet, ["perplexity"])`, and one result."""
    results = [evaluator.evaluate(subnet, ["perplexity"]) for _ in range(repeats)]
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        raise RuntimeError(f"evaluation failed: {failed[0]['error']}")
    return statistics.median(r["eval_seconds"] for r in results), results[0]


def gpu_throughput(windows: int, seq_len: int, batch: int, repeats: int) -> dict:
    """The evaluator (dense, and extracted or masked sub-networks) against plain HF."""
    from prunetune.evaluators.evaluator import Evaluator
    from prunetune.evaluators.settings import EvaluatorSettings

    settings = EvaluatorSettings(model=str(LLAMA3_8B), dtype="bfloat16", device="cuda",
                                 seq_len=seq_len, windows=windows, batch_size=batch,
                                 importance="none")
    evaluator = Evaluator(settings)
    model, ids, config = evaluator.model, evaluator.windows, evaluator.model.config
    tokens = ids.numel()
    dense = SubnetConfig.dense(config)
    dense_params = count_params(config, dense)
    out: dict = {"device": torch.cuda.get_device_name(), "model": "Llama-3-8B shape, random bf16",
                 "build_seconds": evaluator.load_seconds, "windows": windows,
                 "seq_len": seq_len, "batch": batch, "repeats": repeats}
    evaluator.evaluate(dense, ["perplexity"])
    plain_hf_loss(model, ids[:batch], batch)
    plain = _median_seconds(lambda: plain_hf_loss(model, ids, batch), repeats)
    ours, _ = evaluator_seconds(evaluator, dense, repeats)
    out["dense"] = {"evaluator_tokens_per_s": tokens / ours, "plain_hf_tokens_per_s": tokens / plain,
                    "evaluator_vs_plain": plain / ours,
                    "evaluator_tflops": 2 * dense_params * tokens / ours / 1e12,
                    "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}
    print(json.dumps({"dense": out["dense"]}), flush=True)
    out["subnets"] = []
    for mode, fraction in (("extracted", 0.75), ("extracted", 0.5), ("masked", 0.5)):
        evaluator.settings = replace(settings, mode=mode)
        subnet = uniform_subnet(config, fraction)
        seconds, result = evaluator_seconds(evaluator, subnet, repeats)
        row = {"mode": mode, "params_fraction": result["params"] / dense_params,
               "tokens_per_s": tokens / seconds, "vs_dense_evaluator": ours / seconds}
        out["subnets"].append(row)
        print(json.dumps(row), flush=True)
    return out


def gpu_latency(prompt_tokens: int, decode_tokens: int, batch: int) -> dict:
    """Prefill and per-token decode latency of the dense model and of ~75% and ~50% ones."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(LLAMA3_8B)
    dense_params = count_params(config, SubnetConfig.dense(config))
    settings = LatencySettings(prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
                               batch_size=batch, repeats=5, warmup=2, mode="eager")
    rows = []
    for fraction in (1.0, 0.75, 0.5):
        subnet = SubnetConfig.dense(config) if fraction == 1.0 else uniform_subnet(config, fraction)
        params = count_params(config, subnet)
        result = subnet_latency(config, subnet, settings, "cuda", torch.bfloat16)
        row = {"target": fraction, "params_fraction": params / dense_params, "params": params,
               "kv_heads": subnet.kv_heads[0], "mlp": subnet.mlp[0], "embed": subnet.embed, **result}
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return {"settings": asdict(settings), "rows": rows}


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
        result = gpu_throughput(args.windows or 32, args.seq_len, args.batch or 4, args.repeats)
        torch.cuda.empty_cache()
        result["latency"] = [gpu_latency(1024, 32, b) for b in (1, 16)]
    else:
        seq_lens = [512, 2048] if args.long else [512]
        result = {"cpu": cpu_perplexity(seq_lens, args.windows or 16, args.batch or 4)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
