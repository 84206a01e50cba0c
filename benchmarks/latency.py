"""Decode latency that sees pruning: graph mode against eager mode and the bandwidth floor.

On one GPU, for a model given by its config (Llama-3-8B shapes by default, random bf16
weights built on the GPU), dense and at about 75% and 50% of its parameters, it measures
what the `latency_decode_ms` objective reports (`measure_latency`, the call behind
`subnet_latency`) in both modes, `eager` and `graph`, and prints them next to the floor:
the bytes one decode step must read from GPU memory (every weight except the input
embedding table, of which a step gathers one row per sequence, plus the whole static KV
cache, which graph mode's attention spans) over the GPU's memory bandwidth, measured in the
same run as a device-to-device copy (bytes read plus bytes written, over its time).

The sub-networks keep every layer and the embedding width, and cut each layer's KV heads
(query heads with them: query heads per group are kept), and MLP neurons by one ratio,
chosen so that the parameters come closest to the target share.

With `--sparsity` it measures 2:4 weight sparsity instead: the dense model, the dense
shapes with every layer's linear weights 2:4 sparse (`torch.sparse.to_sparse_semi_structured`,
as `latency_model` builds them for the latency metric), and the structural sub-network
whose parameters come closest to the 2:4 model's nonzero parameters.

    python benchmarks/latency.py [--prompt 128] [--decode 32] [--batch 1] [--out results/latency.json]
    python benchmarks/latency.py --sparsity [--out results/latency-2of4.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from prunetune.evaluators.latency import latency_model, measure_latency
from prunetune.evaluators.settings import LatencySettings
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import (
    count_nonzero_params, count_params, kv_cache_bytes_per_token,
)
from prunetune.search_spaces.subnet import Sparsity

LLAMA3_8B = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs" / "llama3-8b.json"
TARGETS = (1.0, 0.75, 0.5)
MODES = ("eager", "graph")


def copy_bandwidth(gib: int = 2, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy of `gib` GiB (read plus written), median."""
    src = torch.randn(gib * 2**29, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times[3:])


def width_subnet(config: Any, fraction: float) -> SubnetConfig:
    """Every layer and the embedding width kept; KV heads and MLP neurons cut by one ratio,
    the one whose parameters come closest to `fraction` of the dense model's."""
    n, kv = config.num_hidden_layers, config.num_key_value_heads
    q = config.num_attention_heads // kv
    dense = count_params(config, SubnetConfig.dense(config))
    candidates = [
        SubnetConfig(range(n), (max(1, round(r * kv)),) * n, (q,) * n,
                     (max(1, round(r * config.intermediate_size / 128)) * 128,) * n,
                     config.hidden_size)
        for r in [i / 64 for i in range(8, 65)]
    ]
    return min(candidates, key=lambda s: abs(count_params(config, s) / dense - fraction))


def width_targets(config: Any) -> list[tuple[str, SubnetConfig]]:
    """Dense, and the width-pruned sub-networks closest to each share of `TARGETS`."""
    return [(f"{target:.0%} params", SubnetConfig.dense(config) if target == 1.0
             else width_subnet(config, target)) for target in TARGETS]


def sparsity_targets(config: Any) -> list[tuple[str, SubnetConfig]]:
    """Dense, the dense shapes 2:4 sparse in every layer, and the structural sub-network
    whose parameters come closest to the 2:4 model's nonzero parameters."""
    dense = SubnetConfig.dense(config)
    two_four = SubnetConfig(**{**dense.to_dict(), "sparsity": Sparsity(
        "magnitude", "2:4", (0.5,) * dense.num_layers)})
    fraction = count_nonzero_params(config, two_four) / count_params(config, dense)
    return [("dense", dense), ("2:4 every layer", two_four),
            (f"structural, {fraction:.0%} params", width_subnet(config, fraction))]


def floor_ms(config: Any, subnet: SubnetConfig, settings: LatencySettings,
             bandwidth: float, dtype_bytes: int = 2) -> float:
    """Milliseconds to read what one decode step must read, at `bandwidth` bytes/s (dense
    storage; a 2:4 weight stores half its values plus metadata)."""
    weights = count_params(config, subnet) - config.vocab_size * subnet.embed
    cache_tokens = settings.batch_size * (settings.prompt_tokens + settings.decode_tokens)
    kv = kv_cache_bytes_per_token(config, subnet, dtype_bytes) * cache_tokens
    return (weights * dtype_bytes + kv) / bandwidth * 1e3


def measure(config: Any, subnet: SubnetConfig, settings: LatencySettings) -> dict[str, Any]:
    """Both modes on one random-weight model of the sub-network's shapes, each with its
    wall time (model, cache, capture and every timed run: what a search pays per shape)."""
    model = latency_model(config, subnet, torch.bfloat16, "cuda")
    out: dict[str, Any] = {}
    for mode in MODES:
        start = time.perf_counter()
        out[mode] = measure_latency(model, LatencySettings(**{**asdict(settings), "mode": mode}))
        out[mode]["seconds"] = time.perf_counter() - start
    del model
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(LLAMA3_8B), help="a config.json")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the results as JSON here")
    parser.add_argument("--sparsity", action="store_true",
                        help="dense, 2:4 sparse and structural at equal nonzero parameters")
    args = parser.parse_args()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    settings = LatencySettings(prompt_tokens=args.prompt, decode_tokens=args.decode,
                               batch_size=args.batch, repeats=args.repeats, warmup=2)
    bandwidth = copy_bandwidth()
    dense_params = count_params(config, SubnetConfig.dense(config))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"batch {args.batch}, prompt {args.prompt}, {args.decode} decoded tokens, "
          f"median of {args.repeats} runs after 2 warm-ups", flush=True)
    rows = []
    for label, subnet in (sparsity_targets if args.sparsity else width_targets)(config):
        params = count_params(config, subnet)
        nonzero = count_nonzero_params(config, subnet)
        row = {"label": label, "params": params, "params_fraction": params / dense_params,
               "nonzero_params": nonzero, "nonzero_fraction": nonzero / dense_params,
               "subnet": subnet.to_dict(), "floor_ms": floor_ms(config, subnet, settings, bandwidth),
               **measure(config, subnet, settings)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    dense_graph = rows[0]["graph"]["latency_decode_ms"]
    print("\n| model | params (nonzero) | KV heads, q/KV, MLP, embed (every layer) | eager ms/token "
          "| graph ms/token | floor ms | graph / floor | dense / graph | prefill eager / graph ms "
          "| graph s/shape |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        s, eager, graph = row["subnet"], row["eager"], row["graph"]
        decode = graph["latency_decode_ms"]
        print(f"| {row['label']} | {row['params'] / 1e9:.2f} B ({row['nonzero_fraction']:.0%}) "
              f"| {s['kv_heads'][0]}, {s['q_per_kv'][0]}, {s['mlp'][0]}, {s['embed']} "
              f"| {eager['latency_decode_ms']:.2f} | {decode:.2f} "
              f"[{graph['latency_decode_min_ms']:.2f}–{graph['latency_decode_max_ms']:.2f}] "
              f"| {row['floor_ms']:.2f} | {decode / row['floor_ms']:.2f} | {dense_graph / decode:.2f} "
              f"| {eager['latency_prefill_ms']:.1f} / {graph['latency_prefill_ms']:.1f} "
              f"| {graph['seconds']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                              "bandwidth_bytes_per_s": bandwidth,
                                              "settings": asdict(settings), "rows": rows},
                                             indent=2))


if __name__ == "__main__":
    main()
