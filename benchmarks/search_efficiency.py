"""Search efficiency on SmolLM2-135M: the front each proposer reaches per window-evaluation,
with and without multi-fidelity evaluation, replayed from a pre-computed table.

The table (`fidelity_table.py`, run once on a GPU) holds the loss of every window of 32 x
512 tokens of WikiText-2 test for every sub-network of the `uniform` space (all 256) and
for 256 random sub-networks of the `per_layer` space. This script

1. measures how well the first k windows rank sub-networks like all 32 do (Spearman and
   Kendall rank correlation of the mean loss), and how many front points the promotion
   rule would drop for each rung and margin when every other sub-network is known;
2. replays searches over the uniform space: the real proposers (`make_algorithm`) behind
   the real `GuardedSearcher`, each trial run rung by rung by the real
   `fidelity.evaluate_in_rungs` into a real result log, with the table standing in for the
   evaluator. Every sub-network the space holds is in the table, so a proposal is looked
   up, never approximated. One evaluator, trials one after another; the dense model is
   evaluated first (32 windows) and counted, as `prunetune search` does. With
   `--surrogate 16` a method is also run with the real `Surrogate` (spec defaults),
   choosing one of 16 proposals per trial. `--max-perplexity` tells every search the
   constraint `perplexity <= X`: it bounds the surrogate's hypervolume and drops
   multi-fidelity screens above X; a search with neither cannot use it.

Cost is counted in window-evaluations (one window of 512 tokens through a sub-network,
whatever its size). Quality is the hypervolume of the full-fidelity front in (mean loss,
parameters / dense) against the reference point (ln 1000, 1): the region of sub-networks
no larger than the dense model with a perplexity under 1,000, 40 times the dense model's;
it is reported as a fraction of the hypervolume of the table's own front.

    python benchmarks/search_efficiency.py [--seeds 5] [--first-seed 0] [--budget 2080] [--rungs 2]
                                           [--margin 0.02] [--algorithms random nsga2 ...]
                                           [--surrogate 1 16] [--max-perplexity 1000] [--jobs 2]

Prints Markdown tables; writes search_efficiency-rungs<R>-margin<M>[-surrogate..][-maxppl..]
[-seeds..].json (every trace) and .png to --out (default benchmarks/results/). One BLAS
thread per search (`OMP_NUM_THREADS=1`) keeps the surrogate's fits from fighting.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import moocore
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from ray.tune.search import Searcher
from scipy.stats import kendalltau, spearmanr

from prunetune.orchestrator.algorithms import ALGORITHMS, GuardedSearcher, make_algorithm
from prunetune.orchestrator.spec import Constraint, SurrogateSpec
from prunetune.orchestrator.fidelity import (
    Fidelity, Reference, Span, evaluate_in_rungs, loss_ceiling, reference,
)
from prunetune.orchestrator.results import DENSE_TRIAL, ResultLog, make_row
from prunetune.orchestrator.surrogate import Surrogate
from prunetune.search_spaces.cost import count_params
from prunetune.search_spaces.spaces import SearchSpace, make_space
from prunetune.search_spaces.subnet import SubnetConfig

HERE = Path(__file__).resolve().parent
TABLE = HERE / "results" / "fidelity-smollm2.json.gz"
OBJECTIVES = {"perplexity": "min", "params": "min"}
REFERENCE_PERPLEXITY = 1000.0
POPULATION = 16
CORRELATION_WINDOWS = (1, 2, 4, 8, 16)
MARGINS = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1)
BASELINE = ("random", (), 1)
SURROGATE = SurrogateSpec()
MAX_SUBNETS = 192
"""A search also ends once it has scored this many of the space's 256 sub-networks: with
screens dropped at 2 windows a search can cover the space before its window budget, and
its last proposals mostly repeat known sub-networks, each ask of a model-based sampler
slower as its history grows."""


@dataclass
class Table:
    """The pre-computed losses: per sub-network (by config hash) its window losses."""

    model_config: dict[str, Any]
    layer_order: list[int]
    seq_len: int
    windows: int
    device: str
    rows: list[dict[str, Any]]

    def space_rows(self, space: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["space"] == space]

    def losses(self, space: str) -> tuple[np.ndarray, np.ndarray]:
        """Window losses `[n, windows]` and parameters `[n]` of a space's sub-networks."""
        rows = self.space_rows(space)
        return (np.array([r["window_nll"] for r in rows]),
                np.array([r["params"] for r in rows], dtype=float))


def load_table(path: Path) -> Table:
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    return Table(data["model_config"], data["layer_order"], data["seq_len"], data["windows"],
                 data["device"], data["rows"])


# --- 1. rank correlation and the margin ------------------------------------------------------

def rank_correlations(table: Table) -> list[dict[str, Any]]:
    """Spearman and Kendall correlation of the first-k-window loss with the full loss."""
    out = []
    for space in ("uniform", "per_layer"):
        W, _ = table.losses(space)
        full = W.mean(1)
        for k in CORRELATION_WINDOWS:
            low = W[:, :k].mean(1)
            out.append({"space": space, "sub_networks": len(W), "windows": k,
                        "spearman": float(spearmanr(low, full)[0]),
                        "kendall": float(kendalltau(low, full)[0])})
    return out


def rule_with_every_row_known(table: Table) -> list[dict[str, Any]]:
    """For each rung and margin: the share of sub-networks the rule drops, and the front
    points among them, when every other sub-network is known at full fidelity."""
    out = []
    for space in ("uniform", "per_layer"):
        W, params = table.losses(space)
        full = W.mean(1)
        front = moocore.is_nondominated(np.c_[full, params])
        for k in CORRELATION_WINDOWS[:4]:
            low = W[:, :k].mean(1)
            for margin in MARGINS:
                beaten = (params[None, :] <= params[:, None]) & (low[None, :] * (1 + margin) < low[:, None])
                np.fill_diagonal(beaten, False)
                dropped = beaten.any(1)
                out.append({"space": space, "windows": k, "margin": margin,
                            "dropped": float(dropped.mean()),
                            "front_dropped": int((dropped & front).sum()),
                            "front": int(front.sum())})
    return out


# --- 2. replayed searches -------------------------------------------------------------------

class TableHost:
    """A `fidelity.RungHost` for one sub-network whose window losses come from the table;
    it logs rows like a trial and counts the windows it scores."""

    def __init__(self, replay: "Replay", subnet: SubnetConfig, trial_id: str) -> None:
        self.replay = replay
        self.subnet = subnet
        self.trial_id = trial_id
        self.losses = replay.table_losses[subnet.config_hash()]

    def measure(self, span: Span) -> dict[str, Any]:
        start, stop = span
        self.replay.spent += stop - start
        self.replay.calls += 1
        nll = float(np.mean(self.losses[start:stop]))
        now = datetime.now(timezone.utc)
        return {"status": "ok", "perplexity": math.exp(nll), "nll": nll,
                "tokens": (stop - start) * (self.replay.table.seq_len - 1),
                "evaluator_id": "table", "started_at": now, "finished_at": now}

    def reference(self, rung: int) -> Reference:
        return reference(self.replay.log.read(), rung, OBJECTIVES)

    def record(self, result: dict[str, Any], windows: int) -> dict[str, Any]:
        metrics = {k: result[k] for k in ("perplexity", "nll", "tokens")}
        row = make_row("replay", self.trial_id, self.subnet, self.replay.table.model_config,
                       metrics, "ok", None, result["evaluator_id"], result["started_at"],
                       result["finished_at"], self.replay.table.seq_len, windows)
        self.replay.log.append([row])
        if windows == self.replay.fidelity.windows:
            self.replay.front_points.append((row["nll"], row["params"] / self.replay.dense_params))
        return row


class Replay:
    """One search replayed against the table: its log, its spending, its front."""

    def __init__(self, table: Table, space: SearchSpace, fidelity: Fidelity, run_dir: str) -> None:
        self.table = table
        self.space = space
        self.fidelity = fidelity
        self.log = ResultLog(run_dir)
        self.table_losses = {r["config_hash"]: r["window_nll"] for r in table.space_rows("uniform")}
        self.dense = SubnetConfig.dense(table.model_config)
        self.dense_params = next(r["params"] for r in table.rows
                                 if r["config_hash"] == self.dense.config_hash())
        self.spent = 0
        self.calls = 0
        self.front_points: list[tuple[float, float]] = []

    def evaluate(self, subnet: SubnetConfig, trial_id: str, always_promote: bool = False) -> dict[str, Any]:
        """What a trial does, with the table as its evaluator."""
        stored = self.log.lookup(subnet.config_hash(), refresh=False)
        return evaluate_in_rungs(self.fidelity, OBJECTIVES, TableHost(self, subnet, trial_id),
                                 stored, always_promote)

    def hypervolume(self) -> float:
        if not self.front_points:
            return 0.0
        return float(moocore.hypervolume(np.array(self.front_points),
                                          ref=[math.log(REFERENCE_PERPLEXITY), 1.0]))


def best_hypervolume(table: Table) -> float:
    """The hypervolume of the whole uniform space's front (what a search can reach)."""
    W, params = table.losses("uniform")
    points = np.c_[W.mean(1), params / params.max()]
    return float(moocore.hypervolume(points, ref=[math.log(REFERENCE_PERPLEXITY), 1.0]))


def replay_search(table: Table, algorithm: str, rungs: tuple[int, ...], margin: float, seed: int,
                  budget: int, candidates: int = 1,
                  max_perplexity: float | None = None) -> dict[str, Any]:
    """One search until `budget` window-evaluations: its trace of (windows spent,
    hypervolume, evaluator calls) after each trial. `candidates` > 1: the surrogate picks
    one of that many proposals per trial (`algorithm.surrogate` at its spec defaults).
    `max_perplexity`: the search is told the constraint `perplexity <= max_perplexity`,
    which bounds the surrogate's hypervolume and drops multi-fidelity screens above it."""
    started = time.perf_counter()
    space = make_space("uniform", table.model_config, layer_order=table.layer_order)
    told = [] if max_perplexity is None else [Constraint("perplexity", "<=", max_perplexity, False)]
    limits = {c.metric: c.value for c in told}
    fidelity = Fidelity(table.windows, rungs, margin, loss_ceiling(told, {}))
    with tempfile.TemporaryDirectory() as run_dir:
        replay = Replay(table, space, fidelity, run_dir)
        replay.evaluate(replay.dense, DENSE_TRIAL, always_promote=True)
        proposer = make_algorithm(algorithm, space, OBJECTIVES, seed, POPULATION,
                                  [space.encode(replay.dense)])
        surrogate = None if candidates == 1 else Surrogate(
            space, OBJECTIVES, lambda subnet: {"params": count_params(table.model_config, subnet)},
            candidates, SURROGATE.min_rows, SURROGATE.optimism, fidelity, limits)
        searcher = GuardedSearcher(proposer, space, OBJECTIVES, run_dir, lambda subnet: True,
                                   MAX_SUBNETS, fidelity, surrogate)
        trace = [(replay.spent, replay.hypervolume(), replay.calls)]
        trial = 0
        while replay.spent < budget:
            config = searcher.suggest(f"t{trial}")
            if config is None or config == Searcher.FINISHED:
                break
            row = replay.evaluate(SubnetConfig.from_json(config["subnet"]), f"t{trial}")
            searcher.on_trial_complete(f"t{trial}", row)
            trace.append((replay.spent, replay.hypervolume(), replay.calls))
            trial += 1
    return {"algorithm": algorithm, "rungs": list(rungs), "margin": margin, "seed": seed,
            "surrogate": candidates, "limits": limits, "trials": trial,
            "skipped": searcher.skipped, "evaluator_calls": replay.calls, "trace": trace,
            "seconds": time.perf_counter() - started}


def device_seconds(table: Table, calls: float, windows: float) -> float:
    """What `calls` evaluations scoring `windows` windows in all took on the table's GPU:
    the median extraction per call plus the median scoring time per window."""
    rows = table.space_rows("uniform")
    extract = float(np.median([r["extract_seconds"] for r in rows]))
    per_window = float(np.median([r["score_seconds"] for r in rows])) / table.windows
    return calls * extract + windows * per_window


def hypervolume_at(trace: list[list[float]], spent: float) -> float:
    """The hypervolume a search had once it had spent no more than `spent` windows."""
    return max((hv for s, hv, _ in trace if s <= spent), default=0.0)


def reaching(trace: list[list[float]], target: float) -> tuple[float, float] | None:
    """The windows spent and evaluator calls made until the hypervolume reached `target`."""
    return next(((s, calls) for s, hv, calls in trace if hv >= target - 1e-12), None)


def by_method(runs: list[dict[str, Any]]) -> dict[tuple[str, tuple[int, ...], int], list[dict[str, Any]]]:
    """The runs of each method: (algorithm, rungs, surrogate candidates)."""
    methods: dict[tuple[str, tuple[int, ...], int], list[dict[str, Any]]] = {}
    for run in runs:
        methods.setdefault((run["algorithm"], tuple(run["rungs"]), run["surrogate"]), []).append(run)
    return methods


def summarise(table: Table, runs: list[dict[str, Any]], budget: int,
              best: float) -> list[dict[str, Any]]:
    """Per method: hypervolume at a third of the budget and at the budget (mean over seeds,
    as a fraction of the space's), the windows it needs to reach random search's
    full-budget hypervolume and what they took on the table's GPU, extraction per
    evaluator call included (medians)."""
    methods = by_method(runs)
    target = float(np.mean([hypervolume_at(r["trace"], budget) for r in methods[BASELINE]]))
    out = []
    for (algorithm, rungs, candidates), group in methods.items():
        reach = [reaching(r["trace"], target) for r in group]
        spent = [math.inf if x is None else x[0] for x in reach]
        seconds = [math.inf if x is None else device_seconds(table, x[1], x[0]) for x in reach]
        out.append({
            "algorithm": algorithm, "rungs": list(rungs), "surrogate": candidates,
            "seeds": len(group),
            "hv_third": float(np.mean([hypervolume_at(r["trace"], budget / 3) for r in group])) / best,
            "hv_budget": float(np.mean([hypervolume_at(r["trace"], budget) for r in group])) / best,
            "hv_budget_std": float(np.std([hypervolume_at(r["trace"], budget) for r in group])) / best,
            "reached": sum(x is not None for x in reach),
            "windows_to_target": float(np.median(spent)),
            "device_seconds_to_target": float(np.median(seconds)),
            "trials": float(np.mean([r["trials"] for r in group])),
        })
    return sorted(out, key=lambda m: m["windows_to_target"])


# --- output -----------------------------------------------------------------------------------

def method_name(algorithm: str, rungs: list[int], candidates: int) -> str:
    parts = [algorithm] + ([f"multi-fidelity {rungs}"] if rungs else [])
    return " + ".join(parts + ([f"surrogate of {candidates}"] if candidates > 1 else []))


def plot(runs: list[dict[str, Any]], budget: int, best: float, target: float, path: Path) -> None:
    """Mean normalised hypervolume against window-evaluations, one line per method."""
    figure = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    grid = np.linspace(0, budget, 200)
    colours = dict(zip(ALGORITHMS, ("tab:grey", "tab:blue", "tab:cyan", "tab:green", "tab:purple",
                                    "tab:orange")))
    for (algorithm, rungs, candidates), group in by_method(runs).items():
        curve = np.mean([[hypervolume_at(r["trace"], s) for s in grid] for r in group], 0) / best
        ax.plot(grid, curve, c=colours[algorithm], ls="-" if rungs else "--",
                lw=2.5 if candidates > 1 else 1.0, label=method_name(algorithm, list(rungs), candidates))
    ax.axhline(target / best, c="k", lw=0.8, ls=":", label="random, full budget")
    ax.axvline(budget / 3, c="k", lw=0.8, ls="-.", label="a third of the budget")
    ax.set_xlabel("window-evaluations (32 per full evaluation)")
    ax.set_ylabel("hypervolume / hypervolume of the space's front")
    ax.set_ylim(bottom=0.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    figure.savefig(path)


def markdown(summary: list[dict[str, Any]], correlations: list[dict[str, Any]],
             rule: list[dict[str, Any]], budget: int) -> str:
    lines = ["| space | sub-networks | windows | Spearman | Kendall |", "|---|---|---|---|---|"]
    lines += [f"| {c['space']} | {c['sub_networks']} | {c['windows']} | {c['spearman']:.3f} | "
              f"{c['kendall']:.3f} |" for c in correlations]
    lines += ["", "| space | rung (windows) | margin | dropped | front points dropped |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['space']} | {r['windows']} | {r['margin']:.2f} | {r['dropped']:.0%} | "
              f"{r['front_dropped']} of {r['front']} |" for r in rule]
    lines += ["", f"| method | HV at {budget // 3} windows | HV at {budget} | windows to random's "
              f"HV (median) | GPU seconds to it | seeds there | trials |",
              "|---|---|---|---|---|---|---|"]
    for m in summary:
        never = math.isinf(m["windows_to_target"])
        reach = "not reached" if never else f"{m['windows_to_target']:.0f}"
        seconds = "" if never else f"{m['device_seconds_to_target']:.1f}"
        lines.append(f"| {method_name(m['algorithm'], m['rungs'], m['surrogate'])} | {m['hv_third']:.4f} | "
                     f"{m['hv_budget']:.4f} ± {m['hv_budget_std']:.4f} | {reach} | {seconds} | "
                     f"{m['reached']}/{m['seeds']} | {m['trials']:.0f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", type=Path, default=TABLE)
    p.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed, first-seed + 1, ... (other seeds check a setting "
                        "chosen on the default ones)")
    p.add_argument("--budget", type=int, default=65 * 32,
                   help="window-evaluations per search (default: the dense model and 64 "
                        "full evaluations)")
    p.add_argument("--rungs", type=lambda s: tuple(int(x) for x in s.split(",")), default=(2,),
                   help="the multi-fidelity rungs compared with single fidelity, e.g. 2 or 1,4")
    p.add_argument("--margin", type=float, default=0.02)
    p.add_argument("--surrogate", type=int, nargs="+", default=[1],
                   help="proposals the surrogate chooses among per trial; 1: no surrogate "
                        "(e.g. 1 8 compares without and with)")
    p.add_argument("--max-perplexity", type=float,
                   help="tell the searches the constraint perplexity <= this (it bounds the "
                        "surrogate's hypervolume and drops multi-fidelity screens above it)")
    p.add_argument("--jobs", type=int, default=2, help="searches replayed in parallel")
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    table = load_table(args.table)
    correlations, rule = rank_correlations(table), rule_with_every_row_known(table)
    methods = [(a, r, c) for a in args.algorithms for r in ((), args.rungs) for c in args.surrogate]
    methods = ([] if BASELINE in methods else [BASELINE]) + methods
    jobs = [(table, algorithm, rungs, args.margin, seed, args.budget, candidates, args.max_perplexity)
            for algorithm, rungs, candidates in methods
            for seed in range(args.first_seed, args.first_seed + args.seeds)]
    started = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        runs = pool.starmap(replay_search, jobs)
    best = best_hypervolume(table)
    summary = summarise(table, runs, args.budget, best)
    target = float(np.mean([hypervolume_at(r["trace"], args.budget) for r in runs
                            if (r["algorithm"], tuple(r["rungs"]), r["surrogate"]) == BASELINE]))
    name = f"search_efficiency-rungs{'-'.join(map(str, args.rungs))}-margin{args.margin:g}"
    if args.surrogate != [1]:
        name += f"-surrogate{'-'.join(map(str, args.surrogate))}"
    if args.max_perplexity is not None:
        name += f"-maxppl{args.max_perplexity:g}"
    if args.first_seed:
        name += f"-seeds{args.first_seed}-{args.first_seed + args.seeds - 1}"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(runs, args.budget, best, target, args.out / f"{name}.png")
    (args.out / f"{name}.json").write_text(json.dumps({
        "table": str(args.table.name), "table_device": table.device, "budget": args.budget,
        "margin": args.margin, "rungs": list(args.rungs), "best_hypervolume": best,
        "correlations": correlations, "rule_with_every_row_known": rule, "summary": summary,
        "runs": runs, "seconds": time.perf_counter() - started,
    }, indent=1))
    print(markdown(summary, correlations, rule, args.budget))
    print(f"\n{len(runs)} searches in {time.perf_counter() - started:.0f} s; "
          f"{args.out / name}.png, .json")


if __name__ == "__main__":
    main()
