"""Several sub-networks per Tune trial: what keeps Tune's bookkeeping per evaluation flat.

Tune's driver turns trials around one at a time (suggest, start, report, callbacks, the
experiment checkpoint), and each trial alive is a process on the head node. With one
sub-network per trial, both grow with the evaluators: hundreds of evaluators finish
evaluations faster than the driver turns trials around, and hold hundreds of trial
processes (`benchmarks/orchestration.py` and its README section measure both). So a trial
carries a batch of sub-networks and evaluates them in parallel, each on an evaluator
borrowed from the pool for that one evaluation (`trial.run_trial`): the driver's work per
trial is shared by the batch, and about `TRIALS_ALIVE` trials are alive whatever the
cluster's size.

`BatchSearcher` is the Tune searcher of such trials: it asks the guard
(`algorithms.GuardedSearcher`) for a batch of new, feasible proposals at once, and tells
the guard each sub-network's row when the trial completes. Every sub-network keeps its
own id `<trial id>_<k>`, in the guard and in the result log.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.search import Searcher

from prunetune.orchestrator.algorithms import GuardedSearcher
from prunetune.orchestrator.pool import HEAD

TRIAL_CPUS = 0.01
"""A trial waits on evaluators: it takes a sliver of a CPU."""
TRIALS_ALIVE = 4
"""Trials alive at once (besides the spare) once the evaluators outnumber them: each
trial carries evaluators / TRIALS_ALIVE sub-networks. With one sub-network per trial, a
loaded 2-core head turned around about 2 trials a second and 4 evaluators of 1 s were
busy 54% of the time; with 4 per trial, 99% (benchmarks/README.md)."""


def subnets_per_trial(evaluators: int, setting: int | str = "auto") -> int:
    """Sub-networks per trial: `setting`, or for `auto` one per trial up to `TRIALS_ALIVE`
    evaluators, then enough that about `TRIALS_ALIVE` trials keep every evaluator busy."""
    if setting != "auto":
        return int(setting)
    return max(1, math.ceil(evaluators / TRIALS_ALIVE))


def running_trials(evaluators: int, batch: int) -> int:
    """Trials that run at once: enough to cover every evaluator, and one spare. The spare
    trial's sub-networks wait in the pool's queue and take each evaluator the moment it is
    released, so no evaluator waits while Tune turns a trial around."""
    return math.ceil(evaluators / batch) + 1


def concurrent_trials(evaluators: int, batch: int) -> int:
    """Trials Tune keeps: those running, and staged ones, waiting for a running one's
    resources (`trial_resources`). Tune hands a finished trial's process to a staged
    trial; with none staged it ends the process and starts a new Ray worker, which imports
    torch and prunetune, for the next trial: at 8 evaluators of 0 s, those starts took
    most of a 2-core head's CPU. Trials of several sub-networks stage as many as one wave
    of evaluations ends, so that their sub-networks are proposed while the wave runs: with
    one staged, 128 evaluators of 2 s ending together on a 64-core head waited for the
    driver to propose the next trials' (p90 idle gap 375 ms, 42 ms with the wave staged;
    benchmarks/README.md). Trials of one sub-network stage one: their wave is a few
    proposals, and each staged trial is one more proposal made before the results it
    could learn from."""
    running = running_trials(evaluators, batch)
    return running + (running - 1 if batch > 1 else 1)


def trial_resources(evaluators: int, batch: int) -> dict[str, float]:
    """What a trial asks Ray for: a sliver of a CPU, on the head node (`pool.HEAD`, whose
    resource has capacity 1 and gives the pool its share), with a share of that resource
    such that `running_trials` fit beside the pool and one more does not, so that the
    trials Tune keeps besides them (`concurrent_trials`) stay staged. (Ray counts
    resources in steps of 1e-4: past about 100 running trials one more may fit, and
    trials then start new processes, as they did before.)"""
    (name, pool_share), = HEAD.items()
    return {"cpu": TRIAL_CPUS,
            name: (1 - pool_share) / (running_trials(evaluators, batch) + 0.5)}


def member_id(trial_id: str, index: int) -> str:
    """The id of a batch's `index`-th sub-network: its trial id in the guard and the log."""
    return f"{trial_id}_{index}"


class BatchSearcher(Searcher):
    """Hands Tune trials of up to `batch` sub-networks each (config `{"subnets": [...]}`).

    It names no metric to Tune: a trial reports its sub-networks' rows (`{"rows": [...]}`),
    and the objectives are in each row, which the guard reads."""

    def __init__(self, guard: GuardedSearcher, batch: int) -> None:
        super().__init__()
        self.guard = guard
        self.batch = batch

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        configs = self.guard.suggest_batch([member_id(trial_id, k) for k in range(self.batch)])
        if not isinstance(configs, list):
            return configs
        return {"subnets": [config["subnet"] for config in configs]}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Each sub-network's row to the guard; all of a failed trial's as failures. The
        guard's running members of the trial are its sub-networks (numbered from 0), so
        the batch keeps no state of its own and a restored guard is all a resume needs."""
        rows = (result or {}).get("rows") or []
        k = 0
        while member_id(trial_id, k) in self.guard.running:
            row = rows[k] if k < len(rows) and not error else None
            self.guard.on_trial_complete(member_id(trial_id, k), row, error=row is None)
            k += 1

    def save(self, checkpoint_path: str) -> None:
        self.guard.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.guard.restore(checkpoint_path)
