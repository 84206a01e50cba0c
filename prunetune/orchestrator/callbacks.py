"""What a running search shows and writes as it goes: the progress bar and the front files.

`FrontCallback` is a Tune callback: after every few finished trials (each a batch of
sub-networks, `batches.py`) it recomputes the Pareto front from the result log and
rewrites `front.parquet` and `front.png`, so a search stopped at any moment leaves a
current front behind. The rewrite runs on Tune's driver and grows with the log (about a
second at 10,000 rows, most of it drawing the plot), so it waits at least
`FRONT_SPACING` times as long as the last one took: the front lags the log by about 20 s
per second a rewrite takes, and rewriting takes at most 5% of the driver whatever the
rate of trials. The last rewrite, at the end, misses nothing.
"""

from __future__ import annotations

import time
from typing import Any

from ray import tune

from prunetune.orchestrator.console import console
from prunetune.orchestrator.pareto import (
    full_fidelity, hypervolume, objective_matrix, pareto_front, plot_front, write_front,
)
from prunetune.orchestrator.results import ONESHOT, RECOVERED, ResultLog
from prunetune.orchestrator.run_record import FRONT_FILE, PLOT_FILE

FRONT_EVERY = 5
FRONT_SPACING = 20


class FrontCallback(tune.Callback):
    """Progress bar, and front.parquet / front.png rewritten every few trials."""

    def __init__(self, run_dir: str, objectives: dict[str, str], budget: int, dense_hash: str) -> None:
        self.run_dir = run_dir
        self.objectives = objectives
        self.budget = budget
        self.dense_hash = dense_hash
        self.since_front = 0
        self.next_front = 0.0
        self.log: ResultLog | None = None
        self.bar: Any = None
        self.stats = {"failed": 0, "front": 0, "hv": 0.0}

    def setup(self, **info: Any) -> None:
        from tqdm import tqdm

        self.log = ResultLog(self.run_dir)
        done = max(len(self.log.evaluated_hashes()) - 1, 0)
        self.bar = tqdm(total=self.budget, initial=min(done, self.budget), desc="trials",
                        unit="trial", file=console(), dynamic_ncols=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rows = (trial.last_result or {}).get("rows") or []
        self.stats["failed"] += sum(row.get("status") != "ok" for row in rows)
        self.since_front += 1
        if self.since_front >= FRONT_EVERY and time.monotonic() >= self.next_front:
            self.write()
        running = sum(t.status == "RUNNING" for t in trials)
        if self.bar is not None:
            self.bar.update(len(rows))
            self.bar.set_postfix(running=running, failed=self.stats["failed"],
                                 front=self.stats["front"], hv=f"{self.stats['hv']:.4g}")

    def write(self) -> dict[str, Any]:
        """Recompute the front from the log and write it; its size and hypervolume."""
        self.since_front = 0
        start = time.monotonic()
        summary = write_front_files(self.run_dir, self.objectives, self.dense_hash, self.log)
        self.next_front = time.monotonic() + FRONT_SPACING * (time.monotonic() - start)
        self.stats.update(front=summary["front_size"], hv=summary["hypervolume"])
        return summary

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.write()
        if self.bar is not None:
            self.bar.close()


def reference_point(df: Any, objectives: dict[str, str]) -> list[float]:
    """The hypervolume reference: 10% beyond the worst value of each (minimised) objective."""
    F = objective_matrix(df, objectives)
    worst, best = F.max(0), F.min(0)
    return list(worst + 0.1 * (worst - best) + 1e-12)


def write_front_files(run_dir: str, objectives: dict[str, str], dense_hash: str | None,
                      log: ResultLog | None = None) -> dict[str, Any]:
    """front.parquet and front.png of a run, from its result log.

    The front is the search's: one-shot rows of full fidelity only. front.png also draws
    the front of the recovered rows, when `prunetune recover --front` has logged any.
    """
    log = log or ResultLog(run_dir)
    df = log.read(stage=ONESHOT)
    ok = df[(df["status"] == "ok").to_numpy(dtype=bool) & full_fidelity(df)] if len(df) else df
    if len(ok) == 0:
        return {"front_size": 0, "hypervolume": 0.0, "rows": len(df)}
    front = pareto_front(df, objectives)
    write_front(front, f"{run_dir}/{FRONT_FILE}")
    dense = ok[ok["config_hash"] == dense_hash].to_dict("records")
    plot_front(df, front, objectives, f"{run_dir}/{PLOT_FILE}", dense=dense[0] if dense else None,
               recovered=pareto_front(log.read(stage=RECOVERED), objectives))
    F = objective_matrix(front, objectives)
    hv = hypervolume(F, reference_point(ok, objectives)) if len(F) else 0.0
    return {"front_size": len(front), "hypervolume": hv, "rows": len(df)}

