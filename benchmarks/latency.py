"""Decode latency that sees pruning: compiled and graph modes against eager and the floor.

On one GPU, for a model given by its config (Llama-3-8B shapes by default, random bf16
weights built on the GPU), dense and at about 75% and 50% of its parameters, it measures
what the `latency_decode_ms` objective reports (`measure_latency`, the call behind
`subnet_latency`) in each mode, `eager`, `graph` and `compiled`, and prints them next to
the floor:
the bytes one decode step must read from GPU memory (every weight except the input
embedding table, of which a step gathers one row per sequence, plus the whole static KV
cache, which graph mode's attention spans) over the GPU's memory bandwidth, measured in the
same run as a device-to-device copy (bytes read plus bytes written, over its time).

The sub-networks keep every layer and the embedding width, and cut each layer's KV heads
(query heads with them: query heads per group are kept), and MLP neurons by one ratio,
chosen so that the parameters come closest to the target share.

Each mode's seconds per shape are the wall time of its whole measurement (cache, compilation
in `compiled`, capture, every run; the model's build aside): what a search pays per new
shape. The JSON (--out) is rewritten after every shape, so an interrupted run keeps those
measured.

With `--sparsity` it measures 2:4 weight sparsity instead: the dense model, the dense
shapes with every layer's linear weights 2:4 sparse (`torch.sparse.to_sparse_semi_structured`,
as `latency_model` builds them for the latency metric), and the structural sub-network
whose parameters come closest to the 2:4 model's nonzero parameters.

    python benchmarks/latency.py [--prompt 128] [--decode 32] [--batch 1] \
        [--modes eager graph compiled] [--inductor-mode default] [--out results/latency.json]
    python benchmarks/latency.py --sparsity [--out results/latency-2of4.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from prunetune.evaluators.latency import (
    INDUCTOR_MODE, DeviceTimer, latency_model, measure_latency,
)
from prunetune.evaluators.settings import LATENCY_MODES, LatencySettings
from prunetune.search_spaces import SubnetConfig
from prunetune.search_spaces.cost import (
    count_nonzero_params, count_params, kv_cache_bytes_per_token,
)
from prunetune.search_spaces.subnet import Sparsity

LLAMA3_8B = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "configs" / "llama3-8b.json"
TARGETS = (1.0, 0.75, 0.5)
MODES = ("eager", "graph", "compiled")
CAPTURED = ("graph", "compiled")


def copy_bandwidth(gib: int = 2, repeats: int = 20) -> float:
    """Bytes per second of a device-to-device copy of `gib` GiB (read plus written), median."""
    src = torch.randn(gib * 2**29, device="cuda")
    dst = torch.empty_like(src)
    timer = DeviceTimer(src.device)
    times = [timer(lambda: dst.copy_(src)) / 1e3 for _ in range(repeats + 3)]
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


def width_targets(config: Any, targets: list[float]) -> list[tuple[float, SubnetConfig]]:
    """Dense (target 1.0), and the width-pruned sub-networks closest to each other share."""
    return [(target, SubnetConfig.dense(config) if target == 1.0
             else width_subnet(config, target)) for target in targets]


def sparsity_targets(config: Any) -> list[tuple[float, SubnetConfig]]:
    """Dense, the dense shapes 2:4 sparse in every layer, and the structural sub-network
    whose parameters come closest to the 2:4 model's nonzero parameters (each with its
    share of the dense parameters that are nonzero)."""
    dense = SubnetConfig.dense(config)
    two_four = SubnetConfig(**{**dense.to_dict(), "sparsity": Sparsity(
        "magnitude", "2:4", (0.5,) * dense.num_layers)})
    fraction = count_nonzero_params(config, two_four) / count_params(config, dense)
    return [(1.0, dense), (fraction, two_four), (fraction, width_subnet(config, fraction))]


def floor_ms(config: Any, subnet: SubnetConfig, settings: LatencySettings,
             bandwidth: float, dtype_bytes: int = 2) -> float:
    """Milliseconds to read what one decode step must read, at `bandwidth` bytes/s."""
    weights = count_params(config, subnet) - config.vocab_size * subnet.embed
    cache_tokens = settings.batch_size * (settings.prompt_tokens + settings.decode_tokens)
    kv = kv_cache_bytes_per_token(config, subnet, dtype_bytes) * cache_tokens
    return (weights * dtype_bytes + kv) / bandwidth * 1e3


def measure(config: Any, subnet: SubnetConfig, settings: LatencySettings,
            modes: list[str], inductor_mode: str) -> dict[str, Any]:
    """Each of `modes` on one random-weight model of the sub-network's shapes."""
    model = latency_model(config, subnet, torch.bfloat16, "cuda")
    out = {mode: measure_mode(model, replace(settings, mode=mode), inductor_mode)
           for mode in modes}
    del model
    torch.cuda.empty_cache()
    return out


def measure_mode(model: torch.nn.Module, settings: LatencySettings,
                 inductor_mode: str) -> dict[str, Any]:
    """`measure_latency` in `settings.mode`, with its wall time (cache, compilation, capture
    and every timed run: what a search pays per shape), or the error it failed with: the
    other modes and shapes are still measured."""
    start = time.perf_counter()
    try:
        result: dict[str, Any] = measure_latency(model, settings, inductor_mode)
        summary = f"{result['latency_decode_ms']:.2f} ms/token"
    except Exception as error:  # reported; the other modes and shapes go on
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"}
        summary = "failed"
    result["seconds"] = time.perf_counter() - start
    print(f"  {settings.mode}: {summary}, {result['seconds']:.1f} s", flush=True)
    return result


def table(rows: list[dict[str, Any]], modes: list[str]) -> str:
    """The rows (the first one the dense model) as a Markdown table: ms/token of each mode,
    the floor, and for the captured modes their ratio to the floor and the dense model's
    speed-up; prefill; s/shape. A mode that failed shows as such."""
    captured = [m for m in modes if m in CAPTURED]
    header = (["params", "KV heads, q/KV, MLP, embed (every layer)"]
              + [f"{m} ms/token" for m in modes] + ["floor ms"]
              + [f"{m} / floor" for m in captured] + [f"dense / {m}" for m in captured]
              + [f"prefill {' / '.join(modes)} ms", f"s/shape {' / '.join(modes)}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    dense = rows[0]
    for row in rows:
        s, floor = row["subnet"], row["floor_ms"]
        cells = ([f"{row['params'] / 1e9:.2f} B ({row['params_fraction']:.0%}; "
                  f"{row['nonzero_fraction']:.0%} nonzero)",
                  f"{s['kv_heads'][0]}, {s['q_per_kv'][0]}, {s['mlp'][0]}, {s['embed']}"]
                 + [decode_cell(row[m]) for m in modes] + [f"{floor:.2f}"]
                 + [ratio_cell(row[m], floor) for m in captured]
                 + [ratio_cell(dense[m], row[m]) for m in captured]
                 + [" / ".join(f"{row[m]['latency_prefill_ms']:.1f}" if measured(row[m]) else "–"
                               for m in modes),
                    " / ".join(f"{row[m]['seconds']:.1f}" for m in modes)])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def measured(result: dict[str, Any]) -> bool:
    """Whether a mode's measurement ran (rather than failed)."""
    return "error" not in result


def decode_cell(result: dict[str, Any]) -> str:
    """Median ms/token [min–max], or `failed`."""
    if not measured(result):
        return "failed"
    return (f"{result['latency_decode_ms']:.2f} [{result['latency_decode_min_ms']:.2f}–"
            f"{result['latency_decode_max_ms']:.2f}]")


def ratio_cell(numerator: dict[str, Any] | float, denominator: dict[str, Any] | float) -> str:
    """The ratio of two decode times (a result's median, or a number), or `–` if either
    measurement failed."""
    values = [x if isinstance(x, float) else x.get("latency_decode_ms")
              for x in (numerator, denominator)]
    return "–" if None in values else f"{values[0] / values[1]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(LLAMA3_8B), help="a config.json")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS),
                        help="parameter shares, the dense model (1.0) first")
    parser.add_argument("--modes", nargs="+", choices=LATENCY_MODES, default=list(MODES))
    parser.add_argument("--inductor-mode", default=INDUCTOR_MODE,
                        help="torch.compile mode of `compiled` (one without CUDA graphs)")
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
          f"median of {args.repeats} runs after 2 warm-ups; torch {torch.__version__}, "
          f"inductor mode {args.inductor_mode!r}", flush=True)
    rows = []
    shapes = sparsity_targets(config) if args.sparsity else width_targets(config, args.targets)
    for target, subnet in shapes:
        print(f"{target:.0%} of the parameters{' (2:4)' if subnet.sparsity else ''}:", flush=True)
        params = count_params(config, subnet)
        nonzero = count_nonzero_params(config, subnet)
        row = {"target": target, "params": params, "params_fraction": params / dense_params,
               "nonzero_fraction": nonzero / dense_params,
               "subnet": subnet.to_dict(), "floor_ms": floor_ms(config, subnet, settings, bandwidth),
               **measure(config, subnet, settings, args.modes, args.inductor_mode)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            write_results(Path(args.out), rows, settings, bandwidth, args.inductor_mode)
    print("\n" + table(sorted(rows, key=lambda row: -row["target"]), args.modes))


def write_results(path: Path, rows: list[dict[str, Any]], settings: LatencySettings,
                  bandwidth: float, inductor_mode: str) -> None:
    """The rows measured so far, with the device, software and settings that gave them."""
    import transformers

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                "torch": torch.__version__,
                                "transformers": transformers.__version__,
                                "inductor_mode": inductor_mode,
                                "bandwidth_bytes_per_s": bandwidth,
                                "settings": asdict(settings), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
