"""How much of the evaluators' time a search spends evaluating, as the evaluators grow.

For every count of evaluators and every evaluation time asked for, a random search on
the SmolLM2 config with stand-in evaluators whose evaluation takes a fixed time (the
model is not the point), on a local Ray instance: `--rounds` evaluations per evaluator.
Prints a table and writes JSON (`--out`): the share of evaluator time spent evaluating
between the first evaluation's start and the last one's end, the overhead per evaluation,
the evaluations per second, the idle gap of an evaluator between two evaluations (and
the share busy it implies once every evaluator has started, without the start and the
end of the search: `steady`), and the memory (peak resident set) of the driver, the pool
and the trial processes, with the trial processes counted.

    python benchmarks/orchestration.py --evaluators 8 32 128 512 --seconds 2 20 --out after.json
    python benchmarks/orchestration.py --plot orchestration.png before.json after.json

`--parts` times instead, in this process and without Ray, what the head does per
evaluation besides Ray and Tune, against the rows already logged: a Parquet part of one
row and of 64 rows, the front files rewritten, and a proposal of the guarded random
searcher one at a time and in batches of 64.

    python benchmarks/orchestration.py --parts 1000 10000 100000

`--seconds 0` measures the bookkeeping's ceiling: evaluations that take no time, so the
rate is what the driver, the pool and the trials turn around. `--subnets-per-trial` sets
`resources.subnets_per_trial` (left out: the spec's default, which code older than the
setting does not know, so the same script measures the commit before it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from prunetune.evaluators.contract import EvaluatorBase
from prunetune.orchestrator.results import DENSE_TRIAL, ResultLog
from prunetune.orchestrator.search import run_search
from prunetune.orchestrator.spec import load_spec
from prunetune.search_spaces.subnet import SubnetConfig

SMOLLM2 = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
               tie_word_embeddings=True)
TRIAL_PROCESSES = ("ImplicitFunc", "run_trial")
"""Process titles of Tune's trial actors (a function trainable runs in `ImplicitFunc`)."""


class FixedTimeEvaluator(EvaluatorBase):
    """Takes exactly `seconds` per evaluation (the class is shipped to the workers by
    value, with it); perplexity falls with the kept parameters."""

    seconds = 1.0

    def __init__(self, settings: Any, evaluator_id: str) -> None:
        self.evaluator_id = evaluator_id

    def info(self) -> dict[str, Any]:
        return {"evaluator_id": self.evaluator_id, "model_config": SMOLLM2, "layer_order": None,
                "load_seconds": 0.0}

    def model_config(self) -> Any:
        return SMOLLM2

    def measure(self, subnet: SubnetConfig, metrics: set[str],
                span: tuple[int, int] | None = None) -> dict[str, Any]:
        time.sleep(self.seconds)
        size = subnet.num_layers * subnet.embed * sum(subnet.mlp)
        return {"perplexity": 1e12 / size}

    def release_memory(self) -> None:
        """Holds no model."""


class MemoryWatch:
    """Peak resident memory (MiB) of the driver, the pool and the trial processes, sampled
    every second over the driver's descendants (other Ray instances on the machine are
    not counted)."""

    def __init__(self) -> None:
        self.peak = {"driver": 0.0, "pool": 0.0, "trials": 0.0, "trial_processes": 0,
                     "evaluators": 0.0}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "MemoryWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()

    def _watch(self) -> None:
        me = psutil.Process()
        while not self.stop.wait(1.0):
            sample = {"driver": me.memory_info().rss, "pool": 0, "trials": 0, "trial_processes": 0,
                      "evaluators": 0}
            for child in me.children(recursive=True):
                try:
                    title, rss = " ".join(child.cmdline()), child.memory_info().rss
                except psutil.Error:
                    continue
                if "EvaluatorPool" in title:
                    sample["pool"] += rss
                elif any(name in title for name in TRIAL_PROCESSES):
                    sample["trials"] += rss
                    sample["trial_processes"] += 1
                elif "FixedTimeEvaluator" in title:
                    sample["evaluators"] += rss
            for key, value in sample.items():
                value = value if key == "trial_processes" else value / 2**20
                self.peak[key] = max(self.peak[key], value)


def measure(evaluators: int, seconds: float, rounds: int, subnets_per_trial: str | None,
            algorithm: str = "random", surrogate: int | None = None) -> dict[str, Any]:
    """One search: `rounds` evaluations per evaluator of `seconds` each; its figures.
    `surrogate` sets `algorithm.surrogate.candidates` (None: the spec's default)."""
    FixedTimeEvaluator.seconds = seconds
    trials = evaluators * rounds
    resources: dict[str, Any] = {"evaluators": evaluators, "cpus_per_evaluator": 0.01}
    if subnets_per_trial is not None:
        resources["subnets_per_trial"] = subnets_per_trial if subnets_per_trial == "auto" else int(subnets_per_trial)
    with tempfile.TemporaryDirectory() as run_dir:
        spec = load_spec({"run_dir": run_dir, "search_space": {"preset": "per_layer"},
                          "algorithm": {"name": algorithm, "num_samples": trials,
                                        **({"surrogate": {"candidates": surrogate}}
                                           if surrogate is not None else {})},
                          "resources": resources})
        start = time.perf_counter()
        with MemoryWatch() as memory:
            run_search(spec, FixedTimeEvaluator, num_cpus=os.cpu_count())
        total = time.perf_counter() - start
        rows = ResultLog(run_dir).read()
        parts = len(ResultLog(run_dir).parts())
    import ray

    ray.shutdown()
    done = rows[rows["trial_id"] != DENSE_TRIAL]
    span = (done["finished_at"].max() - done["started_at"].min()).total_seconds()
    gaps = idle_gaps(done)
    capacity = span * evaluators
    evaluating = len(done) * seconds
    return {"evaluators": evaluators, "seconds": seconds, "evaluations": len(done), "algorithm": algorithm,
            "subnets_per_trial": subnets_per_trial or "default", "span_s": span,
            "command_s": total, "parts": parts,
            "utilisation": evaluating / capacity if seconds else None,
            "overhead_ms": (capacity - evaluating) / len(done) * 1e3,
            "evaluations_per_s": len(done) / span,
            "gap_median_ms": float(gaps.median() * 1e3), "gap_p90_ms": float(gaps.quantile(0.9) * 1e3),
            "steady_utilisation": seconds / (seconds + gaps.mean()) if seconds else None,
            "memory_mib": {**memory.peak,
                           "per_evaluator": {k: memory.peak[k] / evaluators
                                             for k in ("driver", "pool", "trials")}}}


def logged_rows(count: int, start: int = 0) -> list[dict[str, Any]]:
    """`count` distinct result-log rows of random per-layer sub-networks of SmolLM2."""
    import random
    from datetime import datetime, timezone

    from prunetune.orchestrator.results import make_row
    from prunetune.search_spaces.spaces import make_space

    space = make_space("per_layer", SMOLLM2)
    rng = random.Random(start)
    now = datetime.now(timezone.utc)
    rows = []
    for i in range(count):
        subnet = space.decode(space.encode(space.sample(rng)))
        rows.append(make_row("bench", f"t{start + i}", subnet, SMOLLM2,
                             {"perplexity": 1e12 / (subnet.embed * sum(subnet.mlp) + 1)}, "ok",
                             None, "e", now, now, 2048))
    return rows


def timed(action: Any, repeats: int) -> float:
    """Mean seconds of `action()` over `repeats` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        action()
    return (time.perf_counter() - start) / repeats


def head_costs(logged: int) -> dict[str, float]:
    """Milliseconds of the head's own work with `logged` rows in the log: per row appended
    (one part per row, one per 64 rows), per rewrite of the front files, and per proposal
    of the guarded random searcher (asked one at a time, and 64 at a time)."""
    from prunetune.orchestrator.algorithms import GuardedSearcher, make_algorithm
    from prunetune.orchestrator.callbacks import write_front_files
    from prunetune.search_spaces.spaces import make_space

    objectives = {"perplexity": "min", "params": "min"}
    with tempfile.TemporaryDirectory() as run_dir:
        log = ResultLog(run_dir)
        log.append(logged_rows(logged))
        fresh = iter(logged_rows(64 * 11, start=logged))
        one = timed(lambda: log.append([next(fresh)]), 64) * 1e3
        batch = timed(lambda: log.append([next(fresh) for _ in range(64)]), 10) * 1e3 / 64
        front = timed(lambda: write_front_files(run_dir, objectives, None, ResultLog(run_dir)), 3) * 1e3
        space = make_space("per_layer", SMOLLM2)
        guard = GuardedSearcher(make_algorithm("random", space, objectives, 0, 8), space, objectives,
                                run_dir, lambda subnet: True, budget=10**9)
        asked = iter(range(10**6))
        single = timed(lambda: guard.suggest(f"s{next(asked)}"), 64) * 1e3
        batched = timed(lambda: guard.suggest_batch([f"b{next(asked)}" for _ in range(64)]), 4) * 1e3 / 64
    return {"logged": logged, "append_row_ms": one, "append_row_in_64_ms": batch,
            "front_rewrite_ms": front, "suggest_ms": single, "suggest_in_64_ms": batched}


def idle_gaps(rows: Any) -> Any:
    """Seconds each evaluator waited between one evaluation's end and its next one's start
    (the start-up before an evaluator's first evaluation is not a gap)."""
    rows = rows.assign(evaluator=rows["evaluator_id"].str.split("@").str[0]).sort_values("started_at")
    previous_end = rows.groupby("evaluator")["finished_at"].shift()
    return (rows["started_at"] - previous_end).dropna().dt.total_seconds()


def code_version() -> str:
    """The commit of the prunetune package measured (with `+dirty` for local changes)."""
    import prunetune

    root = Path(prunetune.__file__).parent
    try:
        rev = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    return f"{rev} ({root})"


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["evaluators  s/eval  evals  per trial  busy    steady  overhead/eval  idle gap p50/p90  evals/s  "
             "driver MiB  pool MiB  trials MiB (procs)"]
    for r in runs:
        busy = "-" if r["utilisation"] is None else f"{r['utilisation']:.1%}"
        steady = "-" if r["steady_utilisation"] is None else f"{r['steady_utilisation']:.1%}"
        m = r["memory_mib"]
        lines.append(f"{r['evaluators']:>10}  {r['seconds']:>6.1f}  {r['evaluations']:>5}  "
                     f"{str(r['subnets_per_trial']):>9}  {busy:>6}  {steady:>6}  {r['overhead_ms']:>10.0f} ms  "
                     f"{r['gap_median_ms']:>7.0f}/{r['gap_p90_ms']:<6.0f} ms  "
                     f"{r['evaluations_per_s']:>7.1f}  {m['driver']:>10.0f}  {m['pool']:>8.0f}  "
                     f"{m['trials']:>10.0f} ({m['trial_processes']})")
    return "\n".join(lines)


def plot(png: str, results: list[str]) -> None:
    """Utilisation against evaluators, a line per (result file, evaluation time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for path in results:
        data = json.loads(Path(path).read_text())
        for seconds in sorted({r["seconds"] for r in data["runs"] if r["utilisation"] is not None}):
            runs = sorted((r for r in data["runs"] if r["seconds"] == seconds), key=lambda r: r["evaluators"])
            ax.plot([r["evaluators"] for r in runs], [100 * r["utilisation"] for r in runs], marker="o",
                    label=f"{data['label']}, {seconds:g} s per evaluation ({data['machine']['cpus']} CPUs)")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 100)
    ax.set_xlabel("evaluators")
    ax.set_ylabel("evaluator time spent evaluating (%)")
    ax.axhline(95, color="grey", lw=0.8, ls="--")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluators", type=int, nargs="+", default=[8])
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0])
    parser.add_argument("--rounds", type=int, default=10, help="evaluations per evaluator")
    parser.add_argument("--subnets-per-trial", default=None)
    parser.add_argument("--algorithm", default="random",
                        help="random (Optuna's sampler, as before) or local (no Optuna)")
    parser.add_argument("--surrogate", type=int, default=None, metavar="K",
                        help="algorithm.surrogate.candidates (1: off; default: the spec's)")
    parser.add_argument("--label", default="after")
    parser.add_argument("--out", help="JSON file of the results")
    parser.add_argument("--parts", type=int, nargs="+", metavar="ROWS",
                        help="time the head's own work per evaluation at these log sizes instead")
    parser.add_argument("--plot", nargs="+", metavar=("PNG", "JSON"),
                        help="plot the JSON files' utilisation against evaluators instead")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot[0], args.plot[1:])
        return
    if args.parts:
        costs = [head_costs(rows) for rows in args.parts]
        print("logged rows  append 1 row/part  append 64 rows/part  front rewrite  "
              "suggest 1  suggest in 64  (ms; per row, per rewrite, per proposal)")
        for c in costs:
            print(f"{c['logged']:>11}  {c['append_row_ms']:>17.2f}  {c['append_row_in_64_ms']:>19.3f}  "
                  f"{c['front_rewrite_ms']:>13.0f}  {c['suggest_ms']:>9.2f}  {c['suggest_in_64_ms']:>13.2f}")
        if args.out:
            Path(args.out).write_text(json.dumps({"machine": os.cpu_count(), "parts": costs}, indent=1))
        return
    runs = []
    for seconds in args.seconds:
        for evaluators in args.evaluators:
            runs.append(measure(evaluators, seconds, args.rounds, args.subnets_per_trial,
                                args.algorithm, args.surrogate))
            print(table(runs[-1:]).splitlines()[-1], flush=True)
    result = {"label": args.label, "code": code_version(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
              "rounds": args.rounds, "runs": runs}
    print(table(runs))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
