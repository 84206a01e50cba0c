"""Where the time of one sharded evaluation goes, rank by rank.

Builds one evaluator group on random weights of a config's shapes, times evaluations of
sub-networks of the `uniform` search space (every layer kept, every width the given ratio
of the dense one, on the space's grid of widths) from the driver (as the pool calls them),
then evaluates each once more under torch.profiler on every rank and prints the device
time by kind of work: matrix products, attention, communication, the rest (norms,
activations, copies, the loss), and the wall time not covered by device work (launches,
Python, hooks, waiting on the other rank). Only kernels count as device time: an
operator's device time, or a collective's annotation on the device timeline (`nccl:...`),
is its kernels' again. Communication kernels run on their own stream and include the time
a rank waits for the other, so the kinds can add up to more than the wall time.

    python benchmarks/tp_profile.py --model tests/fixtures/configs/llama3-70b.json \\
        --ranks 2 --windows 64 --batch 4 --fractions 0.6 0.8

On CPU (gloo) it profiles the CPU operators instead of GPU kernels, which checks the
script, not the hardware:

    python benchmarks/tp_profile.py --model tests/fixtures/configs/smollm2-135m.json \\
        --ranks 3 --windows 4 --seq-len 64 --batch 2 --repeats 1 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

KINDS = {
    "communication": ("nccl", "c10d", "allreduce", "all_reduce", "allgather", "all_gather",
                      "gloo"),
    "attention": ("flash", "fmha", "attention", "sdpa", "efficient"),
    "matmul": ("gemm", "cutlass", "xmma", "cublas", "nvjet", "aten::mm", "aten::addmm",
               "aten::bmm", "aten::matmul"),
}


def kind_of(name: str) -> str:
    """The kind of work a kernel or operator name is (first match in `KINDS`), else `other`."""
    lower = name.lower()
    return next((kind for kind, marks in KINDS.items() if any(m in lower for m in marks)),
                "other")


def profiled_evaluation(rank: Any, subnet_json: str, top: int) -> dict[str, Any]:
    """Run in a rank actor's process: one evaluation of `subnet_json` under torch.profiler;
    its wall seconds, the seconds of device kernels (or, on CPU, of operators' own time) by
    kind, and the `top` names by time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = rank.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        rank.evaluate(subnet_json, ["perplexity"])
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    rows = []
    for event in prof.key_averages():
        if cuda and (event.device_type != DeviceType.CUDA or event.is_user_annotation):
            continue
        seconds = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
        if seconds > 0:
            rows.append((event.key, seconds, event.count))
    rows.sort(key=lambda row: -row[1])
    by_kind: dict[str, float] = {}
    for name, seconds, _ in rows:
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    busy = sum(by_kind.values())
    return {"rank": rank.rank, "wall_s": wall, "busy_s": busy, "by_kind_s": by_kind,
            "uncovered_s": max(0.0, wall - busy) if cuda else None,
            "top": [{"name": n[:100], "s": s, "calls": c} for n, s, c in rows[:top]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model's config.json")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--mode", default="tp")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.6, 0.8],
                        help="the `uniform` space's ratio of every width to profile")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations per sub-network")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    import ray

    from prunetune.evaluators.settings import EvaluatorSettings, ShardingSettings
    from prunetune.evaluators.sharded.group import ShardedEvaluatorGroup
    from prunetune.search_spaces.cost import count_params
    from prunetune.search_spaces.dims import ModelDims
    from prunetune.search_spaces.spaces import make_space
    from prunetune.search_spaces.subnet import SubnetConfig

    # a CPU group takes one CPU per rank: enough for the ranks on a small machine
    ray.init(num_cpus=max(args.ranks, os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)
    settings = EvaluatorSettings(model=str(args.model), dtype="bfloat16", seq_len=args.seq_len,
                                 windows=args.windows, batch_size=args.batch, mode="masked",
                                 importance="none", device=args.device)
    group = ShardedEvaluatorGroup(settings, "profile", ShardingSettings(args.ranks, args.mode))
    print(f"group of {args.ranks} ({args.mode}) built in {group.load_seconds:.0f} s", flush=True)
    config = group.model_config()
    dense = count_params(config, SubnetConfig.dense(config))
    space = make_space("uniform", config)
    results = []
    for fraction in args.fractions:
        subnet = space.decode({"depth": ModelDims.of(config).num_layers, "ratio": fraction})
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            row = group.evaluate(subnet.to_json(), ["perplexity", "params"])
            times.append(time.perf_counter() - start)
            assert row["status"] == "ok", row["error"]
        ranks = ray.get([r.__ray_call__.remote(profiled_evaluation, subnet.to_json(), args.top)
                         for r in group.ranks])
        result = {"fraction": fraction, "subnet": subnet.to_json(),
                  "params_fraction": count_params(config, subnet) / dense,
                  "eval_s": times, "median_eval_s": statistics.median(times), "ranks": ranks}
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=2))
    group.shutdown()
    print("\n| widths | params % | eval s (driver) | rank | wall s | matmul s | attention s | "
          "communication s | other s | uncovered s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for k in r["ranks"]:
            kinds = k["by_kind_s"]
            uncovered = "—" if k["uncovered_s"] is None else f"{k['uncovered_s']:.2f}"
            print(f"| {r['fraction']:.2f} | {100 * r['params_fraction']:.1f} | "
                  f"{r['median_eval_s']:.2f} | {k['rank']} | {k['wall_s']:.2f} | "
                  + " | ".join(f"{kinds.get(kind, 0.0):.2f}"
                               for kind in ("matmul", "attention", "communication", "other"))
                  + f" | {uncovered} |")


if __name__ == "__main__":
    main()
