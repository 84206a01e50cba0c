"""Where the time of one decode step goes: the kernels of the captured step, by kind.

On one GPU, for the shapes `latency.py` measures (Llama-3-8B by default, random bf16
weights; dense and width-pruned to the given shares of the parameters), it builds the
decode step of `latency_decode_ms` (`DecodeGraph`: in `compiled` mode compiled by inductor
first, in `graph` mode Hugging Face's modules as they are), times its CUDA-graph replays,
then runs the same step outside the graph under torch.profiler (a replayed graph shows
the profiler one launch, not its kernels) and prints, per decode step: the number of
kernels, their summed device time by kind (matrix products, cuBLAS's split-K reductions,
attention, the rest: norms, rotary embedding, cache writes, activation, argmax), and the
time a replay takes beyond its kernels' (the gaps between kernels in the graph). Next to
the matrix products it prints the time their weights take to read at the measured copy
bandwidth, so that the share of a step that width pruning cannot shrink is visible.

    python benchmarks/latency_profile.py [--targets 1.0 0.5] [--inductor-mode default] \\
        [--modes compiled graph] [--out results/latency-profile.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from latency import LLAMA3_8B, copy_bandwidth, width_targets
from tp_profile import kind_of
from prunetune.evaluators.latency import (
    INDUCTOR_MODE, DecodeGraph, DeviceTimer, latency_model, prefill_greedy,
)
from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.subnet import SubnetConfig

def kernel_kind(name: str) -> str:
    """`tp_profile`'s kind of a kernel, but cuBLAS's split-K reductions (`cublas` kernels by
    name) counted apart from the matrix products whose partial sums they add."""
    return "split-K reduction" if "splitkreduce" in name.lower() else kind_of(name)


def replay_ms(graph: DecodeGraph, steps: int) -> float:
    """Milliseconds per replay of `steps` back-to-back replays."""
    return DeviceTimer(graph.token.device)(lambda: graph.replay(steps)) / steps


def step_kernels(graph: DecodeGraph, steps: int) -> list[tuple[str, float]]:
    """(name, device µs) of every kernel of `steps` un-captured runs of the graph's step."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            graph.step()
        torch.cuda.synchronize()
    return [(event.name, event.device_time) for event in prof.events()
            if event.device_type == DeviceType.CUDA and not event.is_user_annotation]


def profile_shape(config: Any, subnet: SubnetConfig, mode: str, inductor_mode: str,
                  prompt_tokens: int, steps: int, bandwidth: float) -> dict[str, Any]:
    """One shape's decode step in `mode` (`graph` or `compiled`): replay time, kernels by kind."""
    model = latency_model(config, subnet, torch.bfloat16, "cuda")
    with torch.inference_mode():
        from transformers import StaticCache

        prompt = torch.randint(0, config.vocab_size, (1, prompt_tokens), device="cuda")
        token = torch.empty(1, 1, dtype=torch.long, device="cuda")
        cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + 2 * steps + 2)
        prefill_greedy(model, prompt, cache, token)
        graph = DecodeGraph(model, cache, token, inductor_mode if mode == "compiled" else None)
        cache.reset()
        prefill_greedy(model, prompt, cache, token)
        replay = replay_ms(graph, steps)
        kernels = step_kernels(graph, steps)
    del graph, cache, model
    torch.cuda.empty_cache()
    by_kind: dict[str, float] = {}
    for name, micros in kernels:
        kind = kernel_kind(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + micros / steps / 1e3
    kernel_ms = sum(by_kind.values())
    weights = count_params(config, subnet) - config.vocab_size * subnet.embed
    return {"mode": mode, "replay_ms": replay, "kernels_per_step": len(kernels) / steps,
            "kernel_ms": kernel_ms, "by_kind_ms": by_kind, "gaps_ms": replay - kernel_ms,
            "weight_read_ms": weights * 2 / bandwidth * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(LLAMA3_8B), help="a config.json")
    parser.add_argument("--targets", nargs="+", type=float, default=[1.0, 0.5],
                        help="parameter shares, the dense model (1.0) first")
    parser.add_argument("--modes", nargs="+", choices=("compiled", "graph"), default=["compiled"])
    parser.add_argument("--inductor-mode", default=INDUCTOR_MODE)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed and profiled")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    bandwidth = copy_bandwidth()
    dense = count_params(config, SubnetConfig.dense(config))
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"torch {torch.__version__}, inductor mode {args.inductor_mode!r}", flush=True)
    rows = []
    for target, subnet in width_targets(config, args.targets):
        for mode in args.modes:
            row = {"target": target, "params_fraction": count_params(config, subnet) / dense,
                   **profile_shape(config, subnet, mode, args.inductor_mode, args.prompt,
                                   args.steps, bandwidth)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                                "bandwidth": bandwidth,
                                                "inductor_mode": args.inductor_mode,
                                                "rows": rows}, indent=2))
    kinds = ["matmul", "split-K reduction", "attention", "other"]
    print("\n| params % | mode | replay ms | kernels/step | kernels ms | "
          + " | ".join(f"{k} ms" for k in kinds) + " | gaps ms | weights' read ms |")
    print("|---|---|---|---|---|" + "---|" * len(kinds) + "---|---|")
    for row in rows:
        cells = " | ".join(f"{row['by_kind_ms'].get(k, 0.0):.3f}" for k in kinds)
        print(f"| {row['params_fraction']:.0%} | {row['mode']} | {row['replay_ms']:.3f} | "
              f"{row['kernels_per_step']:.0f} | {row['kernel_ms']:.3f} | {cells} | "
              f"{row['gaps_ms']:.3f} | {row['weight_read_ms']:.3f} |")


if __name__ == "__main__":
    main()
