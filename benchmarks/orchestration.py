"""How much of the evaluators' time a search spends evaluating, as the evaluators grow.

For every count of evaluators and every evaluation time asked for, a random search on
the SmolLM2 config with stand-in evaluators whose evaluation takes a fixed time (the
model is not the point), on a local Ray instance: `--rounds` evaluations per evaluator.
Prints a table and writes JSON (`--out`, rewritten after every run): the share of
evaluator time spent evaluating between the first evaluation's start and the last one's
end, the overhead per evaluation, the evaluations per second, the idle gap of an evaluator
between two evaluations (and the share busy it implies once every evaluator has started,
without the start and the end of the search: `steady`), the pool's calls per evaluation,
the CPU time per evaluation of the driver, the pool, the trial processes and the rest of
Ray, and the memory of each (peak resident and unique sets; per evaluator; the driver's
and the pool's growth per 1,000 evaluations).

    python benchmarks/orchestration.py --evaluators 8 32 128 512 --seconds 2 20 --out after.json
    python benchmarks/orchestration.py --plot orchestration.png before.json after.json

`--parts` times instead, in this process and without Ray, what the head does per
evaluation besides Ray and Tune, against the rows already logged: a Parquet part of one
row and of 64 rows, the front files rewritten, a proposal of the guarded random
searcher one at a time and in batches of 64, and a proposal of each `--proposers`
algorithm (default: the local search) told as many results as rows logged.

    python benchmarks/orchestration.py --parts 1000 10000 100000
    python benchmarks/orchestration.py --parts 100 1000 --proposers random nsga2 tpe local

`--seconds 0` measures the bookkeeping's ceiling: evaluations that take no time, so the
rate is what the driver, the pool and the trials turn around, and the CPU time per
evaluation says which of them it is.

    python benchmarks/orchestration.py --evaluators 8 512 --seconds 0 --rounds 20 --out ceiling.json `--subnets-per-trial` sets
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
import time
from pathlib import Path
from typing import Any

import psutil

from prunetune.orchestrator.results import DENSE_TRIAL, ResultLog
from prunetune.orchestrator.search import run_search
from prunetune.orchestrator.spec import load_spec

SMOLLM2 = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152,
               tie_word_embeddings=True)
TRIAL_PROCESSES = ("ImplicitFunc", "run_trial")
"""Process titles of Tune's trial actors (a function trainable runs in `ImplicitFunc`)."""


class FixedTimeEvaluator:
    """Takes exactly `seconds` per evaluation; perplexity falls with the kept parameters.

    It answers the evaluator contract's two calls (`info`, `evaluate`; its evaluations
    never fail) without subclassing `EvaluatorBase`, whose module imports torch: the class
    is shipped to the workers by value, so a stand-in process imports Ray and the standard
    library only, and 512 of them fit beside the head's own processes (the `evaluators`
    memory columns say how much each takes)."""

    seconds = 1.0

    def __init__(self, settings: Any, evaluator_id: str) -> None:
        self.evaluator_id = evaluator_id

    def info(self) -> dict[str, Any]:
        return {"evaluator_id": self.evaluator_id, "model_config": SMOLLM2, "layer_order": None,
                "load_seconds": 0.0}

    def evaluate(self, subnet: str, metrics: list[str],
                 span: tuple[int, int] | None = None) -> dict[str, Any]:
        time.sleep(self.seconds)
        config = json.loads(subnet)
        size = len(config["layers"]) * config["embed"] * sum(config["mlp"])
        return {"evaluator_id": self.evaluator_id, "load_seconds": 0.0, "status": "ok",
                "error": None, "eval_seconds": self.seconds, "perplexity": 1e12 / size}


ROLES = ("driver", "pool", "trials", "evaluators", "ray")
"""The processes watched: this one (Tune's driver), the pool actor, Tune's trial actors,
the stand-in evaluators, and the rest of the local Ray instance (raylet, GCS, idle workers)."""


def role(title: str) -> str:
    """The role of a process below the driver, from its command line (Ray names its
    workers' processes after the actor class)."""
    if "EvaluatorPool" in title:
        return "pool"
    if any(name in title for name in TRIAL_PROCESSES):
        return "trials"
    if "FixedTimeEvaluator" in title:
        return "evaluators"
    return "ray"


class ProcessWatch:
    """Memory and CPU time of the driver, the pool, the trial processes, the evaluators and
    the rest of Ray, sampled every `period` seconds over the driver's descendants (other
    Ray instances on the machine are not counted), from a process of its own, so that the
    sampling takes no time from Tune's driver thread.

    Memory is the peak over the samples of each role's total resident set (RSS, which
    counts shared libraries in every process) and unique set (USS: the pages no other
    process maps, what one more such process costs), and the driver's and the pool's USS
    at the first and the last sample (how they grow over the search). CPU time is the user
    and system time each process spent since the sample before, added to the role it has
    at this sample (a Ray worker starts as `ray::IDLE`, then takes its actor's role)."""

    def __init__(self, period: float = 1.0) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.stop = context.Event()
        self.results, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=watch_processes,
                                       args=(os.getpid(), period, self.stop, sender), daemon=True)
        self.figures: dict[str, Any] = {}

    def __enter__(self) -> "ProcessWatch":
        self.process.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.figures = self.results.recv()
        self.process.join()

    def cpu_cores(self, start: float, end: float) -> dict[str, float]:
        """CPU cores each role kept busy on average between the samples that fall within
        the wall-clock times `start` and `end` (seconds since the epoch); all zeros if
        fewer than two do."""
        inside = [(t, cpu) for t, cpu in self.figures["series"] if start <= t <= end]
        if len(inside) < 2:
            return dict.fromkeys(ROLES, 0.0)
        (t0, first), (t1, last) = inside[0], inside[-1]
        return {r: (last[r] - first[r]) / (t1 - t0) for r in ROLES}


def watch_processes(root: int, period: float, stop: Any, results: Any) -> None:
    """The watch of `ProcessWatch`, in its own process: samples the processes below `root`
    (itself left out) until `stop` is set, then sends its figures through `results`. A
    process's role is the one its command line last gave (a Ray worker starts as
    `ray::IDLE` and takes its actor's name; one that has ended has none)."""
    me, watcher = psutil.Process(root), os.getpid()
    peak = {r: {"rss": 0.0, "uss": 0.0, "processes": 0} for r in ROLES}
    names: dict[int, tuple[str, str]] = {}
    cpu: dict[int, float] = {}
    by_role = dict.fromkeys(ROLES, 0.0)
    ray_programs: dict[str, float] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    series = []
    while True:
        stopping = stop.wait(period)
        sample = {r: {"rss": 0.0, "uss": 0.0, "processes": 0} for r in ROLES}
        for process in [me, *me.children(recursive=True)]:
            if process.pid == watcher:
                continue
            try:
                title = " ".join(process.cmdline())
                memory, times = process.memory_full_info(), process.cpu_times()
            except psutil.Error:
                continue
            if title or process.pid not in names:
                names[process.pid] = ("driver" if process == me else role(title), program(title))
            name = names[process.pid][0]
            sample[name]["rss"] += memory.rss / 2**20
            sample[name]["uss"] += memory.uss / 2**20
            sample[name]["processes"] += 1
            seconds = times.user + times.system
            by_role[name] += seconds - cpu.get(process.pid, 0.0)
            if name == "ray":
                ray_programs[names[process.pid][1]] = (ray_programs.get(names[process.pid][1], 0.0)
                                                       + seconds - cpu.get(process.pid, 0.0))
            cpu[process.pid] = seconds
        for name, values in sample.items():
            for key, value in values.items():
                peak[name][key] = max(peak[name][key], value)
        for name in ("driver", "pool"):
            first.setdefault(name, sample[name]["uss"])
            last[name] = sample[name]["uss"]
        series.append((time.time(), dict(by_role)))
        if stopping:
            break
    results.send({"peak": peak, "first": first, "last": last, "series": series,
                  "ray_cpu_s": dict(sorted(ray_programs.items(), key=lambda item: -item[1]))})


def program(title: str) -> str:
    """A short name of a process from its command line: Ray's title of a worker
    (`ray::IDLE`), else the program's file name."""
    first = title.split(" ")[0] if title else "?"
    return first if first.startswith("ray::") else os.path.basename(first)


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
        with ProcessWatch() as watch:
            outcome = run_search(spec, FixedTimeEvaluator, num_cpus=os.cpu_count())
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
    pool_calls = outcome.summary.get("pool_calls", {})
    cores = watch.cpu_cores(done["started_at"].min().timestamp(), done["finished_at"].max().timestamp())
    return {"evaluators": evaluators, "seconds": seconds, "evaluations": len(done), "algorithm": algorithm,
            "subnets_per_trial": subnets_per_trial or "default", "span_s": span,
            "command_s": total, "parts": parts,
            "utilisation": evaluating / capacity if seconds else None,
            "overhead_ms": (capacity - evaluating) / len(done) * 1e3,
            "evaluations_per_s": len(done) / span,
            "gap_median_ms": float(gaps.median() * 1e3), "gap_p90_ms": float(gaps.quantile(0.9) * 1e3),
            "steady_utilisation": seconds / (seconds + gaps.mean()) if seconds else None,
            "pool_calls": pool_calls,
            "pool_calls_per_evaluation": sum(pool_calls.values()) / (len(done) + 1),
            "cpu_cores": cores,
            "cpu_ms_per_evaluation": {r: c * 1e3 * span / len(done) for r, c in cores.items()},
            "ray_cpu_s": watch.figures["ray_cpu_s"],
            "memory_mib": memory_figures(watch, evaluators, len(done))}


def memory_figures(watch: ProcessWatch, evaluators: int, evaluations: int) -> dict[str, Any]:
    """Peak memory by role; per evaluator, the driver's, the pool's and the trials' unique
    memory shared out and one evaluator's own; the driver's and pool's growth per 1,000
    evaluations."""
    figures = watch.figures
    peak = figures["peak"]
    each = peak["evaluators"]["uss"] / max(peak["evaluators"]["processes"], 1)
    return {**peak,
            "per_evaluator_uss": {**{r: peak[r]["uss"] / evaluators for r in ("driver", "pool", "trials")},
                                  "evaluator": each},
            "growth_uss_per_1000_evaluations": {
                r: (figures["last"][r] - figures["first"][r]) * 1000 / max(evaluations, 1)
                for r in ("driver", "pool")}}


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


def head_costs(logged: int, proposers: list[str]) -> dict[str, Any]:
    """Milliseconds of the head's own work with `logged` rows in the log: per row appended
    (one part per row, one per 64 rows), per rewrite of the front files, per proposal of
    the guarded random searcher (asked one at a time, and 64 at a time), and per proposal
    of each of the `proposers` told as many results as rows logged."""
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
            "front_rewrite_ms": front, "suggest_ms": single, "suggest_in_64_ms": batched,
            "proposal_ms": {name: proposal_ms(name, logged) for name in proposers}}


def proposal_ms(algorithm: str, points: int) -> float:
    """Milliseconds of one proposal of `algorithm` (its result told back) once it has been
    told `points` results, on the per-layer space of SmolLM2: what the searcher itself
    costs as a search grows (a model-based sampler reads every result per proposal)."""
    import random

    from prunetune.orchestrator.algorithms import make_algorithm
    from prunetune.search_spaces.spaces import make_space

    space = make_space("per_layer", SMOLLM2)
    search = make_algorithm(algorithm, space, {"perplexity": "min", "params": "min"}, seed=0,
                            population_size=8)
    rng = random.Random(0)
    told = iter(range(10**7))

    def propose_and_tell() -> None:
        trial = f"t{next(told)}"
        config = search.suggest(trial)
        size = sum(v for k, v in config.items() if k.startswith("mlp_")) + 1
        search.on_trial_complete(trial, {"perplexity": 1e9 / size + rng.random(), "params": size})

    for _ in range(points):
        propose_and_tell()
    return timed(propose_and_tell, 16) * 1e3


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
    """The runs' figures, a line each (memory: peak unique set, MiB)."""
    lines = ["evaluators  s/eval  evals  per trial  busy    steady  overhead/eval  idle gap p50/p90  evals/s  "
             "pool calls/eval  CPU cores driver/pool/trials/evaluators/ray  "
             "USS MiB driver/pool/trials (procs)/one evaluator"]
    for r in runs:
        busy = "-" if r["utilisation"] is None else f"{r['utilisation']:.1%}"
        steady = "-" if r["steady_utilisation"] is None else f"{r['steady_utilisation']:.1%}"
        m, cpu = r["memory_mib"], r["cpu_cores"]
        lines.append(f"{r['evaluators']:>10}  {r['seconds']:>6.1f}  {r['evaluations']:>5}  "
                     f"{str(r['subnets_per_trial']):>9}  {busy:>6}  {steady:>6}  {r['overhead_ms']:>10.0f} ms  "
                     f"{r['gap_median_ms']:>7.0f}/{r['gap_p90_ms']:<6.0f} ms  "
                     f"{r['evaluations_per_s']:>7.1f}  {r['pool_calls_per_evaluation']:>15.2f}  "
                     f"{cpu['driver']:>13.2f}/{cpu['pool']:.2f}/{cpu['trials']:.2f}/{cpu['evaluators']:.2f}/"
                     f"{cpu['ray']:.2f}  "
                     f"{m['driver']['uss']:>10.0f}/{m['pool']['uss']:.0f}/{m['trials']['uss']:.0f} "
                     f"({m['trials']['processes']})/{m['per_evaluator_uss']['evaluator']:.0f}")
    return "\n".join(lines)


def plot(png: str, results: list[str]) -> None:
    """Utilisation against evaluators, a line per (result file, evaluation time); beside it
    evaluations per second against evaluators, with the runs of evaluations that take no
    time (the bookkeeping's ceiling) and the rate 512 evaluators of 2 s need."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (busy, rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for path in results:
        data = json.loads(Path(path).read_text())
        for seconds in sorted({r["seconds"] for r in data["runs"]}):
            runs = sorted((r for r in data["runs"] if r["seconds"] == seconds), key=lambda r: r["evaluators"])
            label = f"{data['label']}, {seconds:g} s per evaluation ({data['machine']['cpus']} CPUs)"
            x = [r["evaluators"] for r in runs]
            rate.plot(x, [r["evaluations_per_s"] for r in runs], marker="o", label=label)
            if seconds:
                busy.plot(x, [100 * r["utilisation"] for r in runs], marker="o", label=label)
    busy.set_ylim(0, 100)
    busy.set_ylabel("evaluator time spent evaluating (%)")
    busy.axhline(95, color="grey", lw=0.8, ls="--")
    rate.set_yscale("log")
    rate.set_ylabel("evaluations per second")
    rate.axhline(250, color="grey", lw=0.8, ls="--")
    for ax in (busy, rate):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluators")
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
    parser.add_argument("--proposers", nargs="+", default=["local"], metavar="ALGORITHM",
                        help="with --parts: the algorithms whose proposal is timed (a "
                             "model-based one told 10,000 results takes hours)")
    parser.add_argument("--plot", nargs="+", metavar=("PNG", "JSON"),
                        help="plot the JSON files' utilisation against evaluators instead")
    args = parser.parse_args()
    if args.plot:
        plot(args.plot[0], args.plot[1:])
        return
    if args.parts:
        costs = [head_costs(rows, args.proposers) for rows in args.parts]
        print("logged rows  append 1 row/part  append 64 rows/part  front rewrite  suggest 1  "
              "suggest in 64  " + "  ".join(f"{name} proposal" for name in args.proposers)
              + "  (ms; per row, per rewrite, per proposal)")
        for c in costs:
            print(f"{c['logged']:>11}  {c['append_row_ms']:>17.2f}  {c['append_row_in_64_ms']:>19.3f}  "
                  f"{c['front_rewrite_ms']:>13.0f}  {c['suggest_ms']:>9.2f}  {c['suggest_in_64_ms']:>13.2f}  "
                  + "  ".join(f"{c['proposal_ms'][name]:>{len(name) + 9}.2f}" for name in args.proposers))
        if args.out:
            Path(args.out).write_text(json.dumps({"machine": os.cpu_count(), "parts": costs}, indent=1))
        return
    result = {"label": args.label, "code": code_version(),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "memory_gib": round(psutil.virtual_memory().total / 2**30, 1)},
              "rounds": args.rounds, "runs": []}
    print(table([]), flush=True)
    for seconds in args.seconds:
        for evaluators in args.evaluators:
            result["runs"].append(measure(evaluators, seconds, args.rounds, args.subnets_per_trial,
                                          args.algorithm, args.surrogate))
            print(table(result["runs"][-1:]).splitlines()[-1], flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(result, indent=1))
    if args.out:
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
