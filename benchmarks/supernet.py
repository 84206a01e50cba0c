"""Super-network training against recovering one-shot picks, on SmolLM2-135M (one GPU).

Four fronts of WikiText-2 test perplexity (and PIQA) against parameters:

(a) one-shot: the pretrained model, sorted by activation importance, searched;
(b) (a)'s pick at each budget, distilled from the dense model with `--tokens` tokens each;
(c) the model trained once as a super-network of the per_layer space (`train_supernet`,
    sandwich rule, `--tokens` tokens in all), then searched, no per-point training;
(d) (c)'s picks, each distilled from the dense model with `--pick-tokens` tokens.

Both searches score the same candidates: the baseline recipes at every budget and
`--candidates` random sub-networks of the per_layer space (one seed), on `--search-windows`
WikiText-2 validation windows of 256 tokens; a model's pick at a budget is its candidate of
lowest validation perplexity within it. Reported numbers are test windows and PIQA items,
as in recovery.py; the distillations are recovery.py's (top-`--top-k` teacher logits cached
once, the shipped Gutenberg corpus, windows of `--seq-len`). Hypervolume of each set of
picks in (fraction of the dense parameters, log test perplexity), up to (1, log of the
worst one-shot pick's perplexity); and of each search's whole validation front. Prints a
Markdown table; writes supernet.json and supernet.png to --out.

    python benchmarks/supernet.py [--tokens 2000000] [--budgets 0.9 0.8 0.7 0.6 0.5]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunetune.evaluators.data import token_windows
from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.perplexity import perplexity
from prunetune.evaluators.surgery import extract
from prunetune.orchestrator.baselines import BASELINES, baseline_subnets
from prunetune.orchestrator.pareto import hypervolume
from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.spaces import make_space
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.data import training_windows
from prunetune.training.distill import distill
from prunetune.training.settings import DistillSettings, SupernetSettings
from prunetune.training.supernet import train_supernet
from prunetune.training.teacher import teacher_top_k
from recovery import METRICS, finish_perplexity_plot, report_settings

HERE = Path(__file__).resolve().parent
FRONTS = {"a": "one-shot search", "b": "one-shot search, picks recovered",
          "c": "super-network, searched", "d": "super-network, picks recovered"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    p.add_argument("--tokens", type=int, default=2_000_000,
                   help="tokens of each pick's recovery (b) and of the super-network (c)")
    p.add_argument("--pick-tokens", type=int, default=500_000,
                   help="tokens of each super-network pick's recovery (d)")
    p.add_argument("--strategy", default="sandwich")
    p.add_argument("--random", type=int, default=2, help="random sub-networks per step")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--data", default="gutenberg", help="training text (default gutenberg)")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--supernet-micro-batch", type=int, default=16)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--candidates", type=int, default=300)
    p.add_argument("--search-windows", type=int, default=8)
    p.add_argument("--test-windows", type=int, default=32)
    p.add_argument("--task-limit", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=HERE)
    return p.parse_args()


def candidates(evaluator: Evaluator, space: Any, count: int,
               budgets: list[float]) -> list[SubnetConfig]:
    """The baseline recipes at every budget and `count` random draws of the space."""
    order = evaluator.scores.layer_order() if evaluator.scores else None
    config = evaluator.model.config
    out = [s for name in BASELINES for s in baseline_subnets(name, config, order, budgets)]
    rng = random.Random(0)
    out += [space.sample(rng) for _ in range(count)]
    return list(dict.fromkeys(out))


def search(model: torch.nn.Module, subnets: list[SubnetConfig],
           windows: torch.Tensor) -> list[dict[str, Any]]:
    """Every candidate's parameters and validation perplexity, cut from `model`."""
    rows = []
    for subnet in subnets:
        with torch.no_grad():
            ppl = perplexity(extract(model, subnet), windows, 8)["perplexity"]
        rows.append({"subnet": subnet, "params": count_params(model.config, subnet),
                     "val_ppl": ppl})
    return rows


def picks(rows: list[dict[str, Any]], dense_params: int,
          budgets: list[float]) -> dict[float, SubnetConfig]:
    """The candidate of lowest validation perplexity within each budget."""
    out = {}
    for budget in budgets:
        fits = [r for r in rows if r["params"] <= budget * dense_params]
        if fits:
            out[budget] = min(fits, key=lambda r: r["val_ppl"])["subnet"]
    return out


def recovered(evaluator: Evaluator, source: torch.nn.Module, subnet: SubnetConfig,
              teacher: Any, windows: torch.Tensor, settings: DistillSettings
              ) -> tuple[dict[str, Any], float]:
    """The pick cut from `source`, distilled from the dense model, measured; its seconds."""
    student = extract(source, subnet).float()
    result = distill(teacher, student, windows, settings)
    return (evaluator.measure(subnet, set(METRICS), trained=student.to(evaluator.dtype)),
            result.seconds)


def validation_front_hv(rows: list[dict[str, Any]], dense_params: int, ref_ppl: float) -> float:
    """Hypervolume of a search's validation front in (params fraction, log perplexity):
    that of all its candidates, which the dominated ones do not change."""
    F = np.array([[r["params"] / dense_params, math.log(r["val_ppl"])] for r in rows])
    return hypervolume(F, [1.0, math.log(ref_ppl)])


def picks_hv(points: list[dict[str, Any]], dense_params: int, ref_ppl: float) -> float:
    """Hypervolume of a set of measured picks in (params fraction, log test perplexity)."""
    F = np.array([[p["params"] / dense_params, math.log(p["perplexity"])] for p in points])
    return hypervolume(F, [1.0, math.log(ref_ppl)])


def markdown(result: dict[str, Any]) -> str:
    dense = result["dense"]
    lines = [f"dense: test perplexity {dense['perplexity']:.2f}, PIQA {dense['acc_piqa']:.3f}",
             "", "| budget | " + " | ".join(f"({k}) {v}" for k, v in FRONTS.items()) + " |",
             "|---|" + "---|" * len(FRONTS)]
    for budget in result["budgets"]:
        cells = []
        for key in FRONTS:
            point = next((p for p in result["points"][key] if p["budget"] == budget), None)
            cells.append("—" if point is None else
                         f"{point['perplexity']:.1f} / {point['acc_piqa']:.3f} "
                         f"({point['params'] / 1e6:.1f} M)")
        lines.append(f"| {budget:.0%} | " + " | ".join(cells) + " |")
    lines.append("| hypervolume of the picks | " + " | ".join(
        f"{result['hypervolume'][k]:.3f}" for k in FRONTS) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Test perplexity against parameters of the four sets of picks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for index, (key, label) in enumerate(FRONTS.items()):
        points = sorted(result["points"][key], key=lambda p: p["params"])
        ax.plot([p["params"] / 1e6 for p in points], [p["perplexity"] for p in points],
                marker="o", c=f"C{index}", ls="--" if key in "ac" else "-",
                label=f"({key}) {label}")
    finish_perplexity_plot(ax, result["dense"],
                           "SmolLM2-135M: super-network training against recovered picks",
                           legend_size=8)
    figure.savefig(path)


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    evaluator = Evaluator(report_settings(args), "supernet-benchmark")
    model = evaluator.model
    dense = evaluator.measure(SubnetConfig.dense(model.config), set(METRICS))
    dense_params = int(dense["params"])
    order = evaluator.scores.layer_order() if evaluator.scores else None
    space = make_space("per_layer", model.config, layer_order=order)
    validation = token_windows(evaluator.tokenizer, "wikitext2:valid", 256, args.search_windows,
                               model.config.vocab_size).to(evaluator.device)
    subnets = candidates(evaluator, space, args.candidates, args.budgets)
    windows = training_windows(evaluator.tokenizer, args.data, args.seq_len)
    settings = DistillSettings(tokens=args.tokens, seq_len=args.seq_len,
                               micro_batch=args.micro_batch, accumulation=1, top_k=args.top_k)
    teacher = teacher_top_k(model, windows, args.top_k, batch=args.micro_batch)
    log = lambda message: print(f"[{time.perf_counter() - start:5.0f} s] {message}", flush=True)
    log(f"{len(subnets)} candidates; teacher top-{args.top_k} of {len(windows)} windows cached")

    oneshot_rows = search(model, subnets, validation)
    oneshot_picks = picks(oneshot_rows, dense_params, args.budgets)
    points: dict[str, list[dict[str, Any]]] = {key: [] for key in FRONTS}
    seconds: dict[str, float] = {key: 0.0 for key in FRONTS}
    for budget, subnet in oneshot_picks.items():
        points["a"].append({"budget": budget, **evaluator.measure(subnet, set(METRICS))})
        measured, spent = recovered(evaluator, model, subnet, teacher, windows, settings)
        points["b"].append({"budget": budget, **measured})
        seconds["b"] += spent
        log(f"{budget:.0%}: one-shot {points['a'][-1]['perplexity']:.1f}, "
            f"recovered {measured['perplexity']:.1f}")

    supernet = copy.deepcopy(model).float()
    trained = train_supernet(
        supernet, space, windows,
        DistillSettings(tokens=args.tokens, seq_len=args.seq_len,
                        micro_batch=args.supernet_micro_batch,
                        accumulation=args.micro_batch // args.supernet_micro_batch,
                        top_k=args.top_k),
        SupernetSettings(args.strategy, args.random))
    seconds["c"] = trained.seconds
    log(f"super-network trained on {trained.tokens:,} tokens in {trained.seconds:.0f} s: "
        f"loss {trained.losses[0]:.3f} -> {trained.final_loss:.3f}")
    supernet = supernet.to(evaluator.dtype).eval()
    supernet_rows = search(supernet, subnets, validation)
    pick_settings = DistillSettings(tokens=args.pick_tokens, seq_len=args.seq_len,
                                    micro_batch=args.micro_batch, accumulation=1,
                                    top_k=args.top_k)
    for budget, subnet in picks(supernet_rows, dense_params, args.budgets).items():
        cut = extract(supernet, subnet)
        points["c"].append({"budget": budget,
                            **evaluator.measure(subnet, set(METRICS), trained=cut)})
        measured, spent = recovered(evaluator, supernet, subnet, teacher, windows,
                                    pick_settings)
        points["d"].append({"budget": budget, **measured})
        seconds["d"] += spent
        log(f"{budget:.0%}: super-network {points['c'][-1]['perplexity']:.1f}, "
            f"recovered {measured['perplexity']:.1f}")

    ref_ppl = max(p["perplexity"] for p in points["a"] + points["c"])
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "seconds": time.perf_counter() - start, "options": {**vars(args), "out": str(args.out)},
        "budgets": args.budgets, "dense": {k: float(dense[k]) for k in METRICS},
        "candidates": len(subnets), "training_seconds": seconds,
        "supernet_losses": [trained.losses[0], trained.final_loss],
        "points": {k: [{**p, "params": int(p["params"])} for p in v] for k, v in points.items()},
        "hypervolume": {k: picks_hv(points[k], dense_params, ref_ppl) for k in FRONTS},
        "validation_front_hypervolume": {
            "a": validation_front_hv(oneshot_rows, dense_params, ref_ppl),
            "c": validation_front_hv(supernet_rows, dense_params, ref_ppl)},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "supernet.json").write_text(json.dumps(result, indent=2, default=float))
    print(markdown(result))
    print(f"validation-front hypervolume: one-shot {result['validation_front_hypervolume']['a']:.3f}, "
          f"super-network {result['validation_front_hypervolume']['c']:.3f}")
    plot(result, args.out / "supernet.png")


if __name__ == "__main__":
    main()
