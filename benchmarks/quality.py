"""Quality of the searched front against the standard pruning recipes, on SmolLM2-135M (CPU).

For parameter budgets of 90, 80, 70, 60 and 50% of the dense model, measures the WikiText-2
test perplexity and the zero-shot PIQA accuracy of

(a) the best point within the budget of a search's Pareto front (objectives perplexity and
    params; warm-started from the baselines), for each search-space preset asked for, and
    of the same search without the importance permutation (units kept in the checkpoint's
    own order, layers dropped from the end): what importance ordering is worth;
(b) each baseline of `prunetune.orchestrator.baselines` at the same budget, evaluated with
    the importance setting it needs.

The search selects on WikiText-2 validation windows and the importance scores are
calibrated on the validation split too; every reported number is measured afterwards on
test windows, so no point is picked on the data it is scored on. Prints a Markdown table,
and writes quality.png (perplexity vs parameters) and quality.json to --out.

With `--sparsity` it measures weight sparsity instead (no search): the dense shapes with
50% unstructured and 2:4 sparsity in every layer (Wanda and magnitude), against the
structural recipes at the same nonzero parameters (each recipe's largest sub-network
whose parameters do not exceed the sparse model's nonzero ones), on the same test
windows and PIQA items; it prints a table and writes sparsity.json to --out.

    python benchmarks/quality.py [--quick] [--presets per_layer uniform]
                                 [--no-importance-presets per_layer] [--trials 150]
    python benchmarks/quality.py --sparsity [--quick] [--test-windows 32] [--task-limit 200]
    python benchmarks/quality.py --disp [--quick] [--trials 150] [--device auto]
                                 [--fill-presets per_layer disp]

With `--disp` it searches the `disp` space (per-block residual channels, DISP-LLM) and
the `per_layer` space (one embedding width) with the same algorithm, seed and number of
trials, and reports each front's best point at 90 to 50% of the parameters on the test
split, with the baselines at the same budgets; it writes disp.png and disp.json to --out.
`--device auto` (or cuda) runs the searches and the report on a GPU when there is one.

`--fill-presets` adds, for each preset named, the same search with `search_space.fill_to`
set to the budgets: each proposal is evaluated with its MLPs filled toward the smallest
budget at or above it, so the front has points at the budgets themselves. The figure and
record are then named `<name>-fill` (quality-fill, disp-fill), beside those of runs
without it.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.settings import EvaluatorSettings
from prunetune.orchestrator.baselines import BASELINE_IMPORTANCE, BASELINES, baseline_subnets
from prunetune.orchestrator.spec import load_spec
from prunetune.orchestrator.search import run_search
from prunetune.search_spaces.cost import count_nonzero_params, count_params
from prunetune.search_spaces.subnet import Sparsity, SubnetConfig

BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
PRESETS = ["uniform", "per_layer", "disp"]
SEQ_LEN = 256
CALIBRATION = "wikitext2:valid"
CALIBRATION_SAMPLES = 8
SPARSE_RECIPES = (("wanda", "unstructured"), ("wanda", "2:4"), ("magnitude", "unstructured"),
                  ("magnitude", "2:4"))
"""Weight-sparsity recipes compared, each at 50% of every kept linear weight."""
SPARSE_LEVEL = 0.5
STRUCTURAL_AT_EQUAL_NONZERO = ("uniform-activation", "mlp-only", "layer-drop")
"""The structural recipes the sparse models are compared with at equal nonzero parameters."""


@dataclass
class Options:
    """What one benchmark run measures and how hard it searches."""

    presets: list[str]
    no_importance_presets: list[str]
    fill_presets: list[str]
    algorithm: str
    trials: int
    population: int
    search_windows: int
    test_windows: int
    task_limit: int
    out: Path
    run_root: Path
    quick: bool = False
    seed: int = 0
    budgets: tuple[float, ...] = BUDGETS
    sparsity: bool = False
    device: str = "cpu"
    name: str = "quality"
    """Base name of the figure and record written to `out` (`disp` with --disp)."""


@dataclass
class SearchRun:
    """One search: its front, how long it ran, and how many sub-networks it evaluated."""

    preset: str
    importance: str
    filled: bool
    front: pd.DataFrame
    trials: int
    wall_seconds: float
    eval_seconds: float
    run_dir: str

    @property
    def label(self) -> str:
        notes = (", no importance" if self.importance == "none" else "") + (
            ", filled" if self.filled else "")
        return f"search ({self.preset}{notes})"


@dataclass
class Measured:
    """One sub-network's reported numbers."""

    method: str
    budget: float | None
    subnet: SubnetConfig
    params: int
    perplexity: float
    acc_piqa: float
    extra: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: few trials, 2 windows, 20 PIQA items, uniform preset only")
    p.add_argument("--presets", nargs="+", default=None, choices=PRESETS)
    p.add_argument("--no-importance-presets", nargs="*", default=None,
                   choices=[p for p in PRESETS if p != "disp"],
                   help="presets also searched without the importance permutation")
    p.add_argument("--fill-presets", nargs="*", default=[],
                   choices=PRESETS,
                   help="presets also searched with their proposals filled to the budgets")
    p.add_argument("--algorithm", default=None, choices=["nsga2", "local", "random"])
    p.add_argument("--trials", type=int, default=None, help="search trials per preset")
    p.add_argument("--search-windows", type=int, default=None,
                   help="validation windows of 256 tokens each trial is scored on")
    p.add_argument("--test-windows", type=int, default=None,
                   help="test windows of 256 tokens each reported point is scored on")
    p.add_argument("--task-limit", type=int, default=None, help="PIQA items scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparsity", action="store_true",
                   help="compare 50%% unstructured and 2:4 weight sparsity with the structural "
                        "recipes at equal nonzero parameters (no search)")
    p.add_argument("--disp", action="store_true",
                   help="compare the disp front (per-block channels) with the per_layer front "
                        "at the same number of trials; writes disp.png and disp.json")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where searches and reports run (auto: the GPU when there is one)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                   help="where quality.png and quality.json go (default: benchmarks/)")
    p.add_argument("--run-root", type=Path, default=Path("runs/quality"),
                   help="where the searches keep their run directories (replaced each run)")
    a = p.parse_args(argv)
    quick = a.quick
    default_presets = (["per_layer", "disp"] if a.disp else ["uniform"] if quick
                       else ["per_layer", "uniform"])
    return Options(
        presets=a.presets or default_presets,
        no_importance_presets=(a.no_importance_presets if a.no_importance_presets is not None
                               else [] if quick or a.disp else ["per_layer"]),
        fill_presets=a.fill_presets,
        algorithm=a.algorithm or "local",
        trials=a.trials or (6 if quick else 150),
        population=4 if quick else 8,
        search_windows=a.search_windows or (2 if quick else 8),
        test_windows=a.test_windows or (2 if quick else 32),
        task_limit=a.task_limit or (20 if quick else 200),
        out=a.out, run_root=a.run_root, quick=quick, seed=a.seed, sparsity=a.sparsity,
        device=resolved_device(a.device),
        name=("disp" if a.disp else "quality") + ("-fill" if a.fill_presets else ""),
    )


def resolved_device(device: str) -> str:
    """`cpu` or `cuda`; `auto` is the GPU when there is one."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resources(opts: Options) -> dict[str, Any]:
    """One evaluator: a GPU, or 2 CPU cores."""
    if opts.device == "cuda":
        return {"evaluators": 1, "gpus_per_evaluator": 1}
    return {"evaluators": 1, "cpus_per_evaluator": 2}


def search_spec(opts: Options, preset: str, importance: str, filled: bool,
                run_dir: Path) -> Any:
    """The spec of one search: perplexity vs params, warm-started from every baseline;
    `filled`: proposals filled toward the budgets."""
    space = {"preset": preset, **({"fill_to": list(opts.budgets)} if filled else {})}
    return load_spec({
        "name": f"quality-{run_dir.name}",
        "run_dir": str(run_dir),
        "search_space": space,
        "objectives": {"perplexity": "min", "params": "min"},
        "algorithm": {"name": opts.algorithm, "num_samples": opts.trials, "seed": opts.seed,
                      "population_size": opts.population, "warm_start": list(BASELINES)},
        "evaluation": {"data": "wikitext2:valid", "windows": opts.search_windows,
                       "seq_len": SEQ_LEN, "calibration": CALIBRATION,
                       "calibration_samples": CALIBRATION_SAMPLES, "importance": importance},
        "resources": resources(opts),
    })


def run_one_search(opts: Options, preset: str, importance: str, filled: bool) -> SearchRun:
    """Search one preset from scratch (an old run directory of the benchmark is replaced)."""
    name = preset + ("-no-importance" if importance == "none" else "") + ("-fill" if filled else "")
    run_dir = opts.run_root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    start = time.perf_counter()
    outcome = run_search(search_spec(opts, preset, importance, filled, run_dir))
    wall = time.perf_counter() - start
    log = pd.read_parquet(Path(outcome.run_dir) / "results")
    return SearchRun(preset, importance, filled, outcome.front, trials=len(log) - 1,
                     wall_seconds=wall, eval_seconds=float(log["eval_seconds"].sum()),
                     run_dir=outcome.run_dir)


def best_within(front: pd.DataFrame, max_params: float) -> SubnetConfig | None:
    """The front point with the lowest (search) perplexity whose params fit the budget."""
    ok = front[(front["status"] == "ok") & (front["params"] <= max_params)]
    if ok.empty:
        return None
    return SubnetConfig.from_json(ok.sort_values("perplexity").iloc[0]["config_json"])


def report_settings(opts: Options, importance: str) -> EvaluatorSettings:
    """Test-split windows and PIQA; the importance calibration of the search."""
    return EvaluatorSettings(
        model="smollm2", device=opts.device, data="wikitext2:test", seq_len=SEQ_LEN,
        windows=opts.test_windows, batch_size=4, tasks=("piqa",), task_limit=opts.task_limit,
        importance=importance, calibration=CALIBRATION, calibration_samples=CALIBRATION_SAMPLES,
    )


def measure(evaluator: Evaluator, method: str, budget: float | None,
            subnet: SubnetConfig) -> Measured:
    result = evaluator.evaluate(subnet, ["perplexity", "params", "acc_piqa"])
    if result["status"] != "ok":
        raise RuntimeError(f"{method} at budget {budget}: evaluation failed: {result['error']}")
    return Measured(method, budget, subnet, int(result["params"]), float(result["perplexity"]),
                    float(result["acc_piqa"]), {"eval_seconds": result["eval_seconds"],
                                                "nonzero_params": int(result["nonzero_params"])})


def planned_points(opts: Options, searches: list[SearchRun], model_config: Any,
                   layer_order: list[int]) -> dict[str, list[tuple[str, float | None, SubnetConfig]]]:
    """Every (method, budget, sub-network) to report, grouped by the importance it needs."""
    dense_params = count_params(model_config, SubnetConfig.dense(model_config))
    plan: dict[str, list[tuple[str, float | None, SubnetConfig]]] = {
        "activation": [("dense", None, SubnetConfig.dense(model_config))]}
    for run in searches:
        for budget in opts.budgets:
            subnet = best_within(run.front, budget * dense_params)
            if subnet is not None:
                plan.setdefault(run.importance, []).append((run.label, budget, subnet))
    for name in BASELINES:
        subnets = baseline_subnets(name, model_config, layer_order, opts.budgets)
        plan.setdefault(BASELINE_IMPORTANCE[name], []).extend(
            (name, b, s) for b, s in zip(opts.budgets, subnets))
    return plan


def evaluate_plan(opts: Options, plan: dict[str, list[tuple[str, float | None, SubnetConfig]]]
                  ) -> list[Measured]:
    """Measure the plan, one evaluator (one importance permutation) at a time."""
    measured: list[Measured] = []
    for importance, points in plan.items():
        evaluator = Evaluator(report_settings(opts, importance), f"report-{importance}")
        cache: dict[SubnetConfig, Measured] = {}
        for method, budget, subnet in points:
            if subnet not in cache:
                cache[subnet] = measure(evaluator, method, budget, subnet)
            m = cache[subnet]
            measured.append(Measured(method, budget, subnet, m.params, m.perplexity,
                                     m.acc_piqa, m.extra))
            print(f"  {method:<20} budget {budget}: ppl {m.perplexity:.2f}, piqa {m.acc_piqa:.3f}",
                  flush=True)
        del evaluator
        gc.collect()
    return measured


def sparse_recipe(model_config: Any, method: str, pattern: str,
                  level: float = SPARSE_LEVEL) -> SubnetConfig:
    """The dense shapes with `level` weight sparsity of `method` and `pattern` in every layer."""
    dense = SubnetConfig.dense(model_config)
    return SubnetConfig(**{**dense.to_dict(), "sparsity": Sparsity(
        method, pattern, (level,) * dense.num_layers)})


def sparsity_plan(model_config: Any, layer_order: list[int]
                  ) -> dict[str, list[tuple[str, float | None, SubnetConfig]]]:
    """The sparse recipes, and each structural recipe at the nonzero fraction of dense
    parameters they keep (its budget), grouped by the importance each is evaluated with.
    Sparse sub-networks are cut from the activation-sorted model, as a search cuts them."""
    dense_params = count_params(model_config, SubnetConfig.dense(model_config))
    plan: dict[str, list[tuple[str, float | None, SubnetConfig]]] = {
        "activation": [("dense", None, SubnetConfig.dense(model_config))]}
    budgets = set()
    for method, pattern in SPARSE_RECIPES:
        subnet = sparse_recipe(model_config, method, pattern)
        budget = count_nonzero_params(model_config, subnet) / dense_params
        budgets.add(budget)
        plan["activation"].append((f"{method} {pattern} 50%", budget, subnet))
    for name in STRUCTURAL_AT_EQUAL_NONZERO:
        subnets = baseline_subnets(name, model_config, layer_order, sorted(budgets))
        plan.setdefault(BASELINE_IMPORTANCE[name], []).extend(
            (name, b, s) for b, s in zip(sorted(budgets), subnets))
    return plan


def sparsity_table(measured: list[Measured], dense_params: int) -> str:
    """One row per method: params and nonzero params (% dense), test perplexity, PIQA."""
    lines = ["| method | params (% dense) | nonzero params (% dense) | shape (layers, mean "
             "heads, mean neurons, embed) | WikiText-2 ppl | PIQA acc |",
             "|---|---|---|---|---|---|"]
    for m in sorted(measured, key=lambda m: (m.budget is not None, m.perplexity)):
        nonzero = m.extra["nonzero_params"]
        lines.append(f"| {m.method} | {100 * m.params / dense_params:.1f} | "
                     f"{100 * nonzero / dense_params:.1f} | {_shape(m.subnet)} | "
                     f"{m.perplexity:.2f} | {m.acc_piqa:.3f} |")
    return "\n".join(lines)


def compare_sparsity(opts: Options) -> None:
    """Measure the sparse recipes against the structural ones at equal nonzero parameters."""
    start = time.perf_counter()
    opts.out.mkdir(parents=True, exist_ok=True)
    probe = Evaluator(report_settings(opts, "activation"), "report-layer-order")
    info = probe.info()
    del probe
    gc.collect()
    model_config = info["model_config"]
    dense_params = count_params(model_config, SubnetConfig.dense(model_config))
    measured = evaluate_plan(opts, sparsity_plan(model_config, info["layer_order"]))
    seconds = time.perf_counter() - start
    record = {"seconds": seconds, "test_windows": opts.test_windows, "seq_len": SEQ_LEN,
              "task_limit": opts.task_limit,
              "points": [{"method": m.method, "params": m.params,
                          "nonzero_params": m.extra["nonzero_params"],
                          "perplexity": m.perplexity, "acc_piqa": m.acc_piqa,
                          "subnet": m.subnet.to_dict()} for m in measured]}
    (opts.out / "sparsity.json").write_text(json.dumps(record, indent=2) + "\n")
    print()
    print(sparsity_table(measured, dense_params))
    print(f"total: {seconds / 60:.1f} min; WikiText-2 test: {opts.test_windows} windows of "
          f"{SEQ_LEN} tokens; PIQA: first {opts.task_limit} validation items")
    print(f"wrote {opts.out / 'sparsity.json'}")


def _shape(subnet: SubnetConfig) -> str:
    """Layers, mean heads, mean neurons, and embedding channels (per-block channels: the
    mean of the attention's and of the MLP's)."""
    n = subnet.num_layers
    mlp = sum(subnet.mlp) / n
    heads = sum(k * q for k, q in zip(subnet.kv_heads, subnet.q_per_kv)) / n
    if subnet.channels is None:
        channels = f"{subnet.embed} e"
    else:
        channels = (f"{sum(subnet.channels.attn) / n:.0f}/{sum(subnet.channels.mlp) / n:.0f} "
                    "e (attn/mlp)")
    return f"{n} L, {heads:.1f} h, {mlp:.0f} n, {channels}"


def markdown_table(measured: list[Measured], dense_params: int) -> str:
    """One row per budget and method: params, shape, test perplexity, PIQA accuracy."""
    lines = ["| budget | method | params (% dense) | shape (layers, mean heads, mean neurons, "
             "embed) | WikiText-2 ppl | PIQA acc |",
             "|---|---|---|---|---|---|"]
    dense = [m for m in measured if m.method == "dense"]
    for m in dense:
        lines.append(f"| 100% | dense | 100.0 | {_shape(m.subnet)} | {m.perplexity:.2f} | "
                     f"{m.acc_piqa:.3f} |")
    for budget in sorted({m.budget for m in measured if m.budget is not None}, reverse=True):
        rows = sorted((m for m in measured if m.budget == budget), key=lambda m: m.perplexity)
        best = rows[0].perplexity
        for m in rows:
            ppl = f"**{m.perplexity:.2f}**" if m.perplexity == best else f"{m.perplexity:.2f}"
            lines.append(f"| {budget:.0%} | {m.method} | {100 * m.params / dense_params:.1f} | "
                         f"{_shape(m.subnet)} | {ppl} | {m.acc_piqa:.3f} |")
    return "\n".join(lines)


def search_summary(searches: list[SearchRun], opts: Options) -> str:
    lines = []
    for run in searches:
        lines.append(
            f"{run.label}: {opts.algorithm}, {run.trials} trials, {len(run.front)} on "
            f"the front, {run.wall_seconds / 60:.1f} min wall, {run.eval_seconds / 60:.1f} min "
            f"in evaluations ({opts.search_windows} validation windows of {SEQ_LEN} tokens, "
            f"1 evaluator on {'a GPU' if opts.device == 'cuda' else '2 CPU cores'})")
    return "\n".join(lines)


def plot(measured: list[Measured], searches: list[SearchRun], dense_params: int,
         path: Path) -> None:
    """Test perplexity vs params (log y): each method a line over the budgets, dense a star,
    and each search's whole front (validation perplexity) as faint points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for run in searches:
        ok = run.front[run.front["status"] == "ok"]
        ax.scatter(ok["params"] / 1e6, ok["perplexity"], s=8, alpha=0.35,
                   label=f"front of {run.label}, validation ppl")
    markers = iter("osD^vP<>")
    for method in dict.fromkeys(m.method for m in measured if m.method != "dense"):
        points = sorted((m for m in measured if m.method == method), key=lambda m: m.params)
        width = 2.2 if method.startswith("search") else 1.2
        ax.plot([m.params / 1e6 for m in points], [m.perplexity for m in points],
                marker=next(markers), lw=width, label=f"{method} (test ppl)")
    for m in measured:
        if m.method == "dense":
            ax.scatter([m.params / 1e6], [m.perplexity], marker="*", s=250, c="tab:red",
                       zorder=5, label="dense (test ppl)")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(f"SmolLM2-135M ({dense_params / 1e6:.1f} M), pruned without fine-tuning")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    figure.savefig(path)


def write_json(measured: list[Measured], searches: list[SearchRun], opts: Options,
               seconds: float, path: Path) -> None:
    record = {
        "seconds": seconds,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "searches": [{"preset": r.preset, "importance": r.importance, "filled": r.filled,
                      "trials": r.trials, "front_size": len(r.front),
                      "wall_seconds": r.wall_seconds, "eval_seconds": r.eval_seconds}
                     for r in searches],
        "points": [{"method": m.method, "budget": m.budget, "params": m.params,
                    "perplexity": m.perplexity, "acc_piqa": m.acc_piqa,
                    "subnet": m.subnet.to_dict()} for m in measured],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def search_record(searches: list[SearchRun]) -> tuple[list[int], dict[str, Any]]:
    """The block-influence layer order and the model config the searches used."""
    record = json.loads((Path(searches[0].run_dir) / "run.json").read_text())
    return record["layer_order"], record["model_config"]


def main(argv: list[str] | None = None) -> None:
    opts = parse_args(argv)
    if opts.sparsity:
        compare_sparsity(opts)
        return
    start = time.perf_counter()
    opts.out.mkdir(parents=True, exist_ok=True)
    searches = []
    runs = ([(p, "activation", False) for p in opts.presets]
            + [(p, "none", False) for p in opts.no_importance_presets]
            + [(p, "activation", True) for p in opts.fill_presets])
    for preset, importance, filled in runs:
        print(f"searching the {preset} space, importance {importance}"
              f"{', filled to the budgets' if filled else ''} ({opts.trials} trials)...", flush=True)
        searches.append(run_one_search(opts, preset, importance, filled))
    layer_order, model_config = search_record(searches)
    dense_params = count_params(model_config, SubnetConfig.dense(model_config))
    print("measuring the reported points on the test split...", flush=True)
    measured = evaluate_plan(opts, planned_points(opts, searches, model_config, layer_order))
    seconds = time.perf_counter() - start
    figure, record = opts.out / f"{opts.name}.png", opts.out / f"{opts.name}.json"
    plot(measured, searches, dense_params, figure)
    write_json(measured, searches, opts, seconds, record)
    print()
    print(markdown_table(measured, dense_params))
    print()
    print(search_summary(searches, opts))
    print(f"total: {seconds / 60:.1f} min; WikiText-2 test: {opts.test_windows} windows of "
          f"{SEQ_LEN} tokens; PIQA: first {opts.task_limit} validation items")
    print(f"wrote {figure} and {record}")


if __name__ == "__main__":
    main()
