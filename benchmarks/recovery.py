"""Recovery on SmolLM2-135M: the search's front picks against the one-shot recipes, each
distilled from the dense model with the same token budget.

Sub-networks, for each budget (fraction of the dense parameters): the best point within it
of the search's front that `benchmarks/quality.py` found (its `quality.json`, the
per-layer space, selected on validation windows), and the uniform-activation, layer-drop
and mlp-only recipes of `prunetune.orchestrator.baselines`. All use the activation
importance order calibrated as in quality.py. Each is measured one-shot (WikiText-2 test
perplexity on `--test-windows` windows of 256 tokens, zero-shot PIQA on `--task-limit`
items), distilled (`prunetune.training.distill`: KL to the dense model's top `--top-k`
tokens, their logits cached once for every student, on the shipped Gutenberg corpus,
`--tokens` tokens, windows of `--seq-len`), and measured again. Prints a
Markdown table and writes recovery.json and recovery.png to --out.

    python benchmarks/recovery.py [--tokens 2000000] [--budgets 0.8 0.6 0.5]
        [--methods ...] [--device cuda] [--out benchmarks]
    python benchmarks/recovery.py --merge gpu0/recovery.json gpu1/recovery.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.settings import EvaluatorSettings
from prunetune.evaluators.surgery import extract
from prunetune.orchestrator.baselines import baseline_subnets
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training.data import training_windows
from prunetune.training.distill import distill
from prunetune.training.settings import DistillSettings
from prunetune.training.teacher import TeacherTopK, teacher_top_k

HERE = Path(__file__).resolve().parent
SEARCH = "search (per_layer)"
RECIPES = ("uniform-activation", "layer-drop", "mlp-only")
METRICS = ["perplexity", "params", "acc_piqa"]


@dataclass
class Row:
    """One sub-network's numbers, one-shot and recovered."""

    method: str
    budget: float
    params: int
    ppl_oneshot: float
    ppl_recovered: float
    piqa_oneshot: float
    piqa_recovered: float
    train_seconds: float
    tokens_per_s: float | None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quality", type=Path, default=HERE / "quality.json",
                   help="quality.py's output, whose search picks are recovered")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.8, 0.6, 0.5])
    p.add_argument("--tokens", type=int, default=2_000_000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--accumulation", type=int, default=1)
    p.add_argument("--lr", type=float, default=DistillSettings.lr)
    p.add_argument("--top-k", type=int, default=64,
                   help="distil on the teacher's top-k logits, cached once for every student "
                        "(0: the whole vocabulary, the live teacher)")
    p.add_argument("--test-windows", type=int, default=32)
    p.add_argument("--task-limit", type=int, default=200)
    p.add_argument("--methods", nargs="+", default=[SEARCH, *RECIPES],
                   help="which of the methods to recover (to split the work over GPUs)")
    p.add_argument("--merge", type=Path, nargs="+",
                   help="no measuring: table and plot of these recovery.json files together")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=HERE)
    return p.parse_args()


def report_settings(args: argparse.Namespace) -> EvaluatorSettings:
    """quality.py's test measurement: test windows, PIQA, the search's importance order
    (calibrated on 8 validation windows of 256 tokens)."""
    return EvaluatorSettings(
        model="smollm2", device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32",
        data="wikitext2:test", seq_len=256, windows=args.test_windows, batch_size=8,
        tasks=("piqa",), task_limit=args.task_limit, importance="activation",
        calibration="wikitext2:valid", calibration_samples=8,
    )


def plan(args: argparse.Namespace, evaluator: Evaluator) -> list[tuple[str, float, SubnetConfig]]:
    """The search's picks from quality.json and the recipes, at each budget."""
    points = json.loads(args.quality.read_text())["points"]
    picks = {p["budget"]: SubnetConfig(**{k: tuple(v) if isinstance(v, list) else v
                                          for k, v in p["subnet"].items()})
             for p in points if p["method"] == SEARCH}
    out = [(SEARCH, b, picks[b]) for b in args.budgets if b in picks and SEARCH in args.methods]
    order = evaluator.scores.layer_order() if evaluator.scores else None
    for name in (m for m in RECIPES if m in args.methods):
        out += [(name, b, s) for b, s in
                zip(args.budgets, baseline_subnets(name, evaluator.model.config, order,
                                                   args.budgets))]
    return out


def recover(evaluator: Evaluator, teacher: torch.nn.Module | TeacherTopK, windows: torch.Tensor,
            settings: DistillSettings, method: str, budget: float, subnet: SubnetConfig) -> Row:
    """Measure one sub-network one-shot, distil it, measure it again."""
    before = evaluator.measure(subnet, set(METRICS))
    student = extract(evaluator.model, subnet).float()
    result = distill(teacher, student, windows, settings)
    after = evaluator.measure(subnet, set(METRICS), trained=student.to(evaluator.dtype))
    return Row(method, budget, int(before["params"]), before["perplexity"], after["perplexity"],
               before["acc_piqa"], after["acc_piqa"], result.seconds, result.tokens_per_s)


def markdown(rows: list[Row], dense: dict, tokens: int) -> str:
    lines = [f"dense: perplexity {dense['perplexity']:.2f}, PIQA {dense['acc_piqa']:.3f}, "
             f"{int(dense['params']):,} parameters; recovery: {tokens:,} tokens each", "",
             "| budget | method | params (M) | ppl one-shot | ppl recovered | PIQA one-shot "
             "| PIQA recovered |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (-r.budget, r.ppl_recovered)):
        lines.append(f"| {r.budget:.0%} | {r.method} | {r.params / 1e6:.1f} | "
                     f"{r.ppl_oneshot:.1f} | **{r.ppl_recovered:.1f}** | {r.piqa_oneshot:.3f} | "
                     f"{r.piqa_recovered:.3f} |")
    return "\n".join(lines)


def plot(rows: list[Row], dense: dict, path: Path) -> None:
    """Test perplexity against parameters, one-shot (dashed) and recovered (solid)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for index, method in enumerate(dict.fromkeys(r.method for r in rows)):
        mine = sorted((r for r in rows if r.method == method), key=lambda r: r.params)
        x = [r.params / 1e6 for r in mine]
        colour = f"C{index}"
        ax.plot(x, [r.ppl_oneshot for r in mine], ls="--", marker="o", c=colour, alpha=0.5,
                label=f"{method}, one-shot")
        ax.plot(x, [r.ppl_recovered for r in mine], ls="-", marker="o", c=colour,
                lw=2.2 if method == SEARCH else 1.2, label=f"{method}, recovered")
    finish_perplexity_plot(ax, dense, "SmolLM2-135M: one-shot and recovered by distillation",
                           legend_size=7)
    figure.savefig(path)


def finish_perplexity_plot(ax: Any, dense: dict, title: str, legend_size: int) -> None:
    """The dense model's star, log test perplexity against parameters, title and legend."""
    ax.scatter([dense["params"] / 1e6], [dense["perplexity"]], marker="*", s=250, c="tab:red",
               zorder=5, label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("WikiText-2 test perplexity (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=legend_size)


def merge(args: argparse.Namespace) -> None:
    """Table, plot and one recovery.json of several runs' recovery.json files."""
    runs = [json.loads(path.read_text()) for path in args.merge]
    rows = [Row(**row) for run in runs for row in run["rows"]]
    merged = {**runs[0], "rows": [vars(r) for r in rows],
              "seconds": sum(run["seconds"] for run in runs),
              "merged": [str(path) for path in args.merge]}
    print(markdown(rows, runs[0]["dense"], runs[0]["trained_tokens"]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery.json").write_text(json.dumps(merged, indent=2))
    plot(rows, runs[0]["dense"], args.out / "recovery.png")


def main() -> None:
    args = parse_args()
    if args.merge:
        return merge(args)
    start = time.perf_counter()
    evaluator = Evaluator(report_settings(args), "recovery")
    dense = evaluator.measure(SubnetConfig.dense(evaluator.model.config), set(METRICS))
    settings = DistillSettings(tokens=args.tokens, seq_len=args.seq_len,
                               micro_batch=args.micro_batch, accumulation=args.accumulation,
                               lr=args.lr, top_k=args.top_k or None)
    windows = training_windows(evaluator.tokenizer, "gutenberg", args.seq_len)
    teacher = evaluator.model
    if args.top_k:
        teacher = teacher_top_k(evaluator.model, windows, args.top_k, batch=args.micro_batch)
        print(f"teacher top-{args.top_k} logits of {len(windows)} windows cached in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    for method, budget, subnet in plan(args, evaluator):
        rows.append(recover(evaluator, teacher, windows, settings, method, budget, subnet))
        r = rows[-1]
        print(f"{method} at {budget:.0%}: ppl {r.ppl_oneshot:.1f} -> {r.ppl_recovered:.1f}, "
              f"PIQA {r.piqa_oneshot:.3f} -> {r.piqa_recovered:.3f} "
              f"({r.train_seconds:.0f} s, {r.tokens_per_s or 0:,.0f} tokens/s)", flush=True)
        (args.out / "recovery.json").write_text(json.dumps({
            "device": device, "seconds": time.perf_counter() - start,
            "settings": {**vars(settings), "windows_available": len(windows)},
            "dense": {k: float(v) for k, v in dense.items() if k in METRICS},
            "trained_tokens": settings.trained_tokens,
            "rows": [vars(r) for r in rows]}, indent=2, default=str))
    print(markdown(rows, dense, settings.trained_tokens))
    plot(rows, dense, args.out / "recovery.png")


if __name__ == "__main__":
    main()
