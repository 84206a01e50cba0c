"""Sharded and single-device evaluators in a real search, on random weights of a model's shapes.

Each layout runs `prunetune`'s own search (random proposals over the `uniform` space, masks,
perplexity and params as objectives) on a model given by its `config.json` alone, so the
weights are random and built on the GPUs directly. For each layout it prints the time to
build the evaluators, evaluations per hour, tokens scored per second per GPU, and two
FLOP rates per GPU: the FLOPs the sub-networks need (`search_spaces.cost.forward_flops` of
each evaluated sub-network), and the FLOPs evaluation executes, which is more: masks skip
removed layers, but run every kept layer at full width (removed heads, neurons and
channels are computed, then zeroed); `tp` computes the sub-network's own widths only.

    python benchmarks/sharded.py --model tests/fixtures/configs/llama3-70b.json \\
        --layout zero3:2x1 --trials 20 --windows 64
    python benchmarks/sharded.py --model tests/fixtures/configs/llama3-8b.json \\
        --layout zero3:2x1 --layout none:1x2 --trials 20 --windows 64

A layout is `SHARDING:GPUSxEVALUATORS`: `zero3:2x1` is one group of two GPUs (ZeRO-3),
`none:1x2` two single-GPU evaluators, `tp:2x1` one tensor-parallel group of two (each rank
loading only its slices), `tp:2x2` two such groups, `autotp:2x1` DeepSpeed's AutoTP.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.search import run_search
from prunetune.orchestrator.results import DENSE_TRIAL
from prunetune.search_spaces.cost import count_params, forward_flops
from prunetune.search_spaces.subnet import SubnetConfig


@dataclass(frozen=True)
class Layout:
    """How the GPUs are used: sharding mode, GPUs per evaluator, evaluators."""

    sharding: str
    gpus: int
    evaluators: int

    @classmethod
    def parse(cls, text: str) -> "Layout":
        try:
            mode, shape = text.split(":")
            gpus, evaluators = (int(v) for v in shape.split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"layout {text!r}: expected SHARDING:GPUSxEVALUATORS, e.g. zero3:2x1") from None
        return cls(mode, gpus, evaluators)

    def __str__(self) -> str:
        return f"{self.sharding}:{self.gpus}x{self.evaluators}"


def spec_for(args: argparse.Namespace, layout: Layout, run_dir: Path):
    """A search spec of this layout: masks, random proposals (the local search's random
    start), perplexity vs params."""
    return load_spec({
        "name": f"sharded-{layout.sharding}-{layout.gpus}x{layout.evaluators}",
        "model": str(args.model), "dtype": "bfloat16", "run_dir": str(run_dir),
        "search_space": {"preset": "uniform"},
        "objectives": {"perplexity": "min", "params": "min"},
        "algorithm": {"name": "local", "num_samples": args.trials, "seed": 0,
                      "population_size": args.trials},
        "evaluation": {"windows": args.windows, "seq_len": args.seq_len,
                       "batch_size": args.batch, "mode": "masked", "importance": "none"},
        "resources": {"evaluators": layout.evaluators, "gpus_per_evaluator": layout.gpus,
                      "sharding": layout.sharding, "cpus_per_evaluator": 1},
    })


def executed_work(config: dict, subnet: SubnetConfig, sharding: str) -> SubnetConfig:
    """What evaluation of `subnet` computes: masks run its kept layers at full width; `tp`
    runs the sub-network's own widths."""
    if sharding == "tp":
        return subnet
    dense = SubnetConfig.dense(config)
    n = subnet.num_layers
    return SubnetConfig(subnet.layers, dense.kv_heads[:n], dense.q_per_kv[:n], dense.mlp[:n],
                        dense.embed)


def evaluating_seconds(rows: pd.DataFrame) -> float:
    """From the first search evaluation's start to the last one's end: the search's span
    without the start of Tune and of its first trial process, which a long search pays once."""
    return (rows["finished_at"].max() - rows["started_at"].min()).total_seconds()


def busy_fraction(rows: pd.DataFrame, evaluators: int) -> float:
    """The share of the evaluating span in which the evaluators evaluated: their summed
    evaluation seconds over `evaluators` times the span. The rest is evaluators waiting,
    on Tune or, at the end, on the last evaluation of another group."""
    return float(rows["eval_seconds"].sum()) / (evaluating_seconds(rows) * evaluators)


def run_layout(args: argparse.Namespace, layout: Layout) -> dict:
    """One search in this layout, and its throughput figures."""
    import ray

    run_dir = args.run_root / str(layout).replace(":", "-")
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    outcome = run_search(spec_for(args, layout, run_dir))
    total = time.perf_counter() - start
    ray.shutdown()
    log = pd.read_parquet(run_dir / "results")
    record = json.loads((run_dir / "run.json").read_text())
    config = record["model_config"]
    ok = log[(log["status"] == "ok") & (log["trial_id"] != DENSE_TRIAL)]
    search_seconds = outcome.summary["seconds"]
    gpus = layout.gpus * layout.evaluators
    devices = max(gpus, layout.evaluators)
    tokens = float(ok["tokens"].sum())
    mean_params = float(ok["params"].mean()) if len(ok) else 0.0
    tokens_per_gpu = tokens / search_seconds / devices
    dense_params = count_params(config, SubnetConfig.dense(config))
    subnets = [SubnetConfig.from_json(text) for text in ok["config_json"]]
    needed = sum(forward_flops(config, s, args.seq_len) for s in subnets) * args.windows
    executed = sum(forward_flops(config, executed_work(config, s, layout.sharding), args.seq_len)
                   for s in subnets) * args.windows
    per_gpu_second = search_seconds * devices * 1e12
    evaluating = evaluating_seconds(ok)
    return {
        "layout": str(layout), "gpus": gpus, "trials": len(log) - 1, "failed": int((log["status"] != "ok").sum()),
        "build_seconds": max(e["load_seconds"] for e in record["evaluators"]),
        "total_seconds": total, "search_seconds": search_seconds,
        "evaluations_per_hour": (len(log) - 1) / search_seconds * 3600,
        "median_eval_seconds": float(ok["eval_seconds"].median()),
        "mean_eval_seconds": float(ok["eval_seconds"].mean()),
        "busy_fraction": busy_fraction(ok, layout.evaluators),
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "subnet_tflops_per_gpu": needed / per_gpu_second,
        "executed_tflops_per_gpu": executed / per_gpu_second,
        "evaluating_seconds": evaluating,
        "evaluations_per_hour_evaluating": len(ok) / evaluating * 3600,
        "subnet_tflops_per_gpu_evaluating": needed / (evaluating * devices * 1e12),
        "mean_params_fraction": mean_params / dense_params,
        "windows": args.windows, "seq_len": args.seq_len, "batch": args.batch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model's config.json")
    parser.add_argument("--layout", type=Layout.parse, action="append", required=True)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--run-root", type=Path, default=Path("runs/sharded"))
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    rows = []
    for layout in args.layout:
        print(f"layout {layout}: {args.trials} trials on {args.windows} windows of "
              f"{args.seq_len} tokens...", flush=True)
        rows.append(run_layout(args, layout))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            args.out.write_text(json.dumps(rows, indent=2))
    print("\n| layout | GPUs | build s | evals/h | evals/h evaluating | median (mean) eval s | "
          "busy % | params % | tokens/s/GPU | sub-network TFLOP/s/GPU (evaluating) | "
          "executed TFLOP/s/GPU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['gpus']} | {r['build_seconds']:.0f} | {r['evaluations_per_hour']:.0f} | "
              f"{r['evaluations_per_hour_evaluating']:.0f} | {r['median_eval_seconds']:.1f} "
              f"({r['mean_eval_seconds']:.1f}) | {100 * r['busy_fraction']:.0f} | "
              f"{100 * r['mean_params_fraction']:.1f} | {r['tokens_per_s_per_gpu']:,.0f} | "
              f"{r['subnet_tflops_per_gpu']:.0f} ({r['subnet_tflops_per_gpu_evaluating']:.0f}) | "
              f"{r['executed_tflops_per_gpu']:.0f} |")


if __name__ == "__main__":
    main()
