"""The per-window losses of SmolLM2-135M sub-networks: the table search_efficiency.py replays.

For every sub-network of the `uniform` space (depth x width ratio, 256 of them) and for
`--per-layer` random sub-networks of the `per_layer` space, the mean negative
log-likelihood per token of each of `--windows` consecutive windows of `--seq-len` tokens
of WikiText-2 test. One pass over all windows gives every fidelity: the loss on the first k
windows is the mean of the first k entries. The model is sorted by importance exactly as a
search's evaluator sorts it (activation scores on WikiText-2 validation), and the spaces
drop layers in its block-influence order, as `prunetune search` does.

    python benchmarks/fidelity_table.py --out benchmarks/results/fidelity-smollm2.json.gz
    python benchmarks/fidelity_table.py --quick --out /tmp/table.json.gz     # a smoke run

It needs a GPU to finish in minutes (about 0.1 s a sub-network on an H100; an hour and a
half on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import random
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.perplexity import nll_per_window
from prunetune.evaluators.settings import EvaluatorSettings
from prunetune.evaluators.surgery import extract
from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.spaces import SearchSpace, make_space
from prunetune.search_spaces.subnet import SubnetConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="model to prune (default smollm2)")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--per-layer", type=int, default=256,
                   help="random sub-networks of the per_layer space")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 3 uniform and 2 per-layer sub-networks, 2 windows of 64 tokens")
    p.add_argument("--out", type=Path, required=True, help="the table, JSON (gzip if .gz)")
    return p.parse_args(argv)


def uniform_subnets(space: SearchSpace) -> list[SubnetConfig]:
    """Every sub-network of a uniform space, deepest and widest first, each once."""
    choices = space.choices()
    subnets = [space.decode({"depth": d, "ratio": r})
               for d in reversed(choices["depth"]) for r in reversed(choices["ratio"])]
    return list(dict.fromkeys(subnets))


def per_layer_subnets(space: SearchSpace, count: int, seed: int) -> list[SubnetConfig]:
    """`count` distinct random sub-networks of a per_layer space."""
    rng = random.Random(seed)
    subnets: dict[SubnetConfig, None] = {}
    while len(subnets) < count:
        subnets[space.sample(rng)] = None
    return list(subnets)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so wall times measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def window_losses(evaluator: Evaluator, subnet: SubnetConfig) -> dict[str, Any]:
    """The mean loss per token of every evaluation window of the sub-network, and the
    seconds its extraction and its scoring took."""
    start = time.perf_counter()
    dense = subnet == SubnetConfig.dense(evaluator.model.config)
    model = evaluator.model if dense else extract(evaluator.model, subnet)
    synchronize(evaluator.device)
    extracted = time.perf_counter()
    sums = nll_per_window(model, evaluator.windows, evaluator.settings.batch_size)
    synchronize(evaluator.device)
    return {"window_nll": (sums / (evaluator.windows.shape[1] - 1)).tolist(),
            "extract_seconds": extracted - start,
            "score_seconds": time.perf_counter() - extracted}


def table_rows(evaluator: Evaluator, spaces: dict[str, list[SubnetConfig]]) -> Iterator[dict[str, Any]]:
    """One row per sub-network: its space, config, parameters, window losses and timing."""
    for name, subnets in spaces.items():
        for i, subnet in enumerate(subnets):
            yield {"space": name, "config_hash": subnet.config_hash(),
                   "config_json": subnet.to_json(),
                   "params": count_params(evaluator.model.config, subnet),
                   **window_losses(evaluator, subnet)}
            if (i + 1) % 32 == 0:
                print(f"{name}: {i + 1}/{len(subnets)}", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    windows, seq_len = (2, 64) if args.quick else (args.windows, args.seq_len)
    settings = EvaluatorSettings(model=args.model, device="auto", seq_len=seq_len,
                                 windows=windows, batch_size=args.batch)
    start = time.perf_counter()
    evaluator = Evaluator(settings)
    config = evaluator.model.config
    order = evaluator.scores.layer_order()
    uniform = uniform_subnets(make_space("uniform", config, layer_order=order))
    per_layer = per_layer_subnets(make_space("per_layer", config, layer_order=order),
                                  2 if args.quick else args.per_layer, args.seed)
    spaces = {"uniform": uniform[:3] if args.quick else uniform, "per_layer": per_layer}
    loaded = time.perf_counter() - start
    rows = list(table_rows(evaluator, spaces))
    device = evaluator.device
    table = {
        "model": args.model, "model_config": config.to_dict(), "data": settings.data,
        "seq_len": seq_len,
        "windows": int(evaluator.windows.shape[0]), "batch": args.batch, "dtype": settings.dtype,
        "importance": settings.importance, "layer_order": order, "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "load_seconds": loaded,
        "seconds": time.perf_counter() - start - loaded, "rows": rows,
    }
    text = json.dumps(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix == ".gz":
        with gzip.open(args.out, "wt") as f:
            f.write(text)
    else:
        args.out.write_text(text)
    print(f"{len(rows)} sub-networks x {table['windows']} windows of {seq_len} tokens in "
          f"{table['seconds']:.0f} s on {table['device']} (loading {loaded:.0f} s): {args.out}")


if __name__ == "__main__":
    main()
