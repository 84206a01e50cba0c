"""Search algorithms as Ray Tune searchers, and the guard that every search runs behind.

`random`, `nsga2`, `nsga3` (reference-point NSGA-III, for three or more objectives),
`tpe` (multi-objective tree-structured Parzen estimator) and `gp` (Gaussian-process
Bayesian optimisation, log expected hypervolume improvement) are Optuna samplers behind
Tune's `OptunaSearch`; `local` mutates the points of the current front. The model-based
samplers (`tpe`, `gp`) start from `population_size` random proposals; TPE hands
concurrent askers different proposals by its constant liar. Every algorithm is wrapped in `GuardedSearcher`, which turns a
proposal into a trial only when it is new (not in the result log, not running now) and
meets the constraints that can be checked before evaluation; anything else goes straight
back to the algorithm (the stored result, or a failure) and the algorithm is asked again.
So no configuration is evaluated twice — across resumes and across algorithms — and an
infeasible one is never evaluated. What is checked, logged and evaluated is the proposal's
sub-network as the space fills it to a budget (`SearchSpace.filled`, the proposal itself
without `fill_to`); the algorithm is told that sub-network's result for its proposal.
"""

from __future__ import annotations

import pickle
import random
import warnings
from collections import Counter
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from ray.tune.search import Searcher

from prunetune.orchestrator.fidelity import Fidelity, Reference, full_estimate, promote, reference
from prunetune.orchestrator.pareto import dominates
from prunetune.orchestrator.results import DENSE_TRIAL, ResultLog
from prunetune.orchestrator.surrogate import Surrogate
from prunetune.search_spaces.spaces import SearchSpace
from prunetune.search_spaces.subnet import SubnetConfig

ALGORITHMS = ("random", "nsga2", "nsga3", "tpe", "gp", "local")
MAX_PROPOSALS = 200
NEIGHBOUR_TRIES = 50


def _key(config: Mapping[str, Any]) -> tuple:
    return tuple(sorted(config.items()))


def _minimised(result: Mapping[str, Any], objectives: Mapping[str, str]) -> np.ndarray | None:
    values = [result.get(name) for name in objectives]
    if any(v is None or v != v for v in values):
        return None
    return np.array([v if objectives[n] == "min" else -v for n, v in zip(objectives, values)],
                    dtype=float)


class LocalSearch(Searcher):
    """Mutation of the current front: random points first, then one-step neighbours.

    A neighbour moves a random front point one step along its grid: either one search
    parameter, or one kind of width in every layer at once (all `mlp_<i>`, all
    `heads_<i>`). Group moves matter in the per-layer space: there the best sub-networks at
    mild budgets thin one kind of unit everywhere (all MLPs narrower), which single-layer
    steps reach only after dozens of accepted moves. The front is kept from completed
    results, so the search walks along it.
    """

    def __init__(self, space: SearchSpace, objectives: Mapping[str, str], seed: int,
                 initial_random: int, initial: list[dict[str, Any]] | None = None) -> None:
        super().__init__(metric=list(objectives), mode=list(objectives.values()))
        self.space = space
        self.objectives = dict(objectives)
        self.rng = random.Random(seed)
        self.initial = list(initial or [])
        self.initial_random = initial_random
        self.proposed = 0
        self.points: list[tuple[dict[str, Any], np.ndarray]] = []
        self.pending: dict[str, dict[str, Any]] = {}
        self._index()

    def _index(self) -> None:
        """What proposals read, derived from `points` and `pending` and kept current as they
        change, so that a proposal costs as much at 10,000 points as at 10 (rebuilt on a
        restore): the front's points in the order they arrived, the keys of the points, and
        how many pending proposals have each key."""
        self.front: list[tuple[dict[str, Any], np.ndarray]] = []
        for point in self.points:
            self._add_to_front(point)
        self.evaluated = {_key(config) for config, _ in self.points}
        self.proposing = Counter(_key(config) for config in self.pending.values())

    def _add_to_front(self, point: tuple[dict[str, Any], np.ndarray]) -> None:
        """Put a new point on the front unless a front point dominates it, dropping the
        front points it dominates (a point dominated by any point is dominated by one on
        the front, so the front is the non-dominated points, as recomputed from all)."""
        values = point[1]
        if any(dominates(f, values) for _, f in self.front):
            return
        self.front = [(c, f) for c, f in self.front if not dominates(values, f)] + [point]

    def _propose(self, trial_id: str, config: dict[str, Any]) -> dict[str, Any]:
        self.pending[trial_id] = config
        self.proposing[_key(config)] += 1
        return config

    def suggest(self, trial_id: str) -> dict[str, Any]:
        if self.initial:
            return self._propose(trial_id, self.initial.pop(0))
        self.proposed += 1
        if self.proposed <= self.initial_random or not self.front:
            return self._propose(trial_id, self.space.encode(self.space.sample(self.rng)))
        return self._propose(trial_id, self._new_neighbour([c for c, _ in self.front]))

    def _new_neighbour(self, front: list[dict[str, Any]]) -> dict[str, Any]:
        """A neighbour of a front point that this search has not evaluated or proposed yet;
        a random point once the front's neighbourhood is used up, so the search never
        stalls on configurations it already knows."""
        for _ in range(NEIGHBOUR_TRIES):
            config = self._neighbour(self.rng.choice(front))
            key = _key(config)
            if key not in self.evaluated and not self.proposing.get(key):
                return config
        return self.space.encode(self.space.sample(self.rng))

    def _neighbour(self, config: dict[str, Any]) -> dict[str, Any]:
        """One step of one parameter, or of one per-layer group (half the time it has
        several members), up or down; parameters at the end of their grid stay."""
        choices = self.space.choices()
        groups = parameter_groups([n for n, values in choices.items() if len(values) > 1])
        members = groups[self.rng.choice(sorted(groups))]
        if len(members) > 1 and self.rng.random() < 0.5:
            members = [self.rng.choice(members)]
        step = self.rng.choice((-1, 1))
        moved = dict(config)
        for name in members:
            values = choices[name]
            i = values.index(config[name]) + step
            if 0 <= i < len(values):
                moved[name] = values[i]
        return moved

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        config = self.pending.pop(trial_id, None)
        if config is None:
            return
        key = _key(config)
        self.proposing[key] -= 1
        if not self.proposing[key]:
            del self.proposing[key]
        values = _minimised(result or {}, self.objectives)
        if values is not None and not error:
            self.points.append((config, values))
            self.evaluated.add(key)
            self._add_to_front((config, values))

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self._index()


def parameter_groups(names: list[str]) -> dict[str, list[str]]:
    """Search parameters grouped by kind: `mlp_0`, `mlp_1`, ... form `mlp`; others stand alone."""
    groups: dict[str, list[str]] = {}
    for name in names:
        stem, _, index = name.rpartition("_")
        groups.setdefault(stem if stem and index.isdigit() else name, []).append(name)
    return groups


def make_algorithm(name: str, space: SearchSpace, objectives: Mapping[str, str], seed: int,
                   population_size: int, initial: list[dict[str, Any]] | None = None) -> Searcher:
    """The searcher of an algorithm name; its proposals depend only on the seed and results.

    `initial` configurations (the dense model, warm starts) are the algorithm's own first
    proposals, so their results reach it like any other: the local search walks from them,
    and Optuna's samplers count them in their population.
    """
    if name == "local":
        return LocalSearch(space, objectives, seed, initial_random=population_size,
                           initial=initial)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    samplers: dict[str, Callable[[], Any]] = {
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(population_size=population_size, seed=seed),
        "nsga3": lambda: optuna.samplers.NSGAIIISampler(population_size=population_size, seed=seed),
        "tpe": lambda: optuna.samplers.TPESampler(n_startup_trials=population_size, multivariate=True,
                                                  constant_liar=True, seed=seed),
        "gp": lambda: optuna.samplers.GPSampler(n_startup_trials=population_size, seed=seed),
    }
    if name not in samplers:
        raise ValueError(f"algorithm.name: unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    sampler = samplers[name]()
    return OptunaSearch(space=OptunaSearch.convert_search_space(space.param_space()),
                        metric=list(objectives), mode=list(objectives.values()), sampler=sampler,
                        points_to_evaluate=list(initial or []) or None)


class GuardedSearcher(Searcher):
    """Only new, feasible configurations become trials.

    The results already in the run's log (read again on every restore, since trials write
    it themselves) and those completed since are the cache; `feasible(subnet)` is False
    for a configuration that breaks a constraint checked before evaluation. A proposal
    already in the log is answered with its stored result at once. The budget counts
    the log, not Tune's trials: after a hard stop Tune's own state may lag behind the log,
    and the search must still end with exactly `budget` results.

    With multi-fidelity evaluation (`fidelity` with rungs), a proposal dropped at a rung is
    told to the algorithm with its loss scaled to full fidelity (`fidelity.full_estimate`),
    and a logged screen that the promotion rule passes is not a finished evaluation: it
    becomes a trial again, which scores only the windows it lacks.

    With a `surrogate`, each trial draws several such proposals and evaluates the one the
    surrogate predicts to improve the front most; the others are told as failed
    (`surrogate.py`).
    """

    surrogate: Surrogate | None = None
    """Class default: a searcher saved before surrogates existed is restored without one."""

    def __init__(self, algorithm: Searcher, space: SearchSpace, objectives: Mapping[str, str],
                 run_dir: str, feasible: Callable[[SubnetConfig], bool], budget: int,
                 fidelity: Fidelity | None = None, surrogate: Surrogate | None = None) -> None:
        super().__init__(metric=list(objectives), mode=list(objectives.values()))
        self.algorithm = algorithm
        self.surrogate = surrogate
        self.space = space
        self.objectives = dict(objectives)
        self.fidelity = fidelity
        self.run_dir = run_dir
        self.feasible = feasible
        self.budget = budget
        self.running: dict[str, tuple[str, str | None]] = {}
        self.references: dict[int, Reference] = {}
        self.asks = 0
        self.skipped = {"known": 0, "running": 0, "infeasible": 0, "surrogate": 0}
        self.log = ResultLog(run_dir)
        self.log.known()

    def set_search_properties(self, metric: Any, mode: Any, config: dict, **spec: Any) -> bool:
        return True

    def spent(self) -> int:
        """Configs that count against the budget: logged (the dense reference aside) or running."""
        known = self.log.known(refresh=False)
        logged = {h for h, r in known.items() if r.get("trial_id") != DENSE_TRIAL}
        return len(logged | {h for h, _ in self.running.values()})

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        batch = self.suggest_batch([trial_id])
        return batch[0] if isinstance(batch, list) else batch

    def suggest_batch(self, trial_ids: list[str]) -> list[dict[str, Any]] | str | None:
        """New, feasible configs for several ids at once (the sub-networks of one batched
        Tune trial, `batches.py`): as many as the budget and the algorithm give, up to one
        per id; FINISHED (or the algorithm's None) when there is none. The budget is
        counted once per batch, not once per proposal."""
        room = self.budget - self.spent()
        if room <= 0:
            return Searcher.FINISHED
        rows = self.log.read() if self.surrogate else None
        batch: list[dict[str, Any]] = []
        for trial_id in trial_ids[:room]:
            config = self._chosen(trial_id, rows)
            if not isinstance(config, dict):
                return batch or config
            batch.append(config)
        return batch

    def _chosen(self, trial_id: str, rows: pd.DataFrame | None) -> dict[str, Any] | str | None:
        """The config of `trial_id`: of the proposals drawn for it, the one the surrogate
        (fitted on the log's `rows`, read once per batch) keeps, the others told to the
        algorithm as failed; what ended the drawing when nothing new was drawn."""
        drawn, end = self._draw(self._candidates(rows))
        if not drawn:
            return end
        keep = self.surrogate.choose([s for _, _, s in drawn], rows) if self.surrogate else 0
        for i, (_, inner_id, _) in enumerate(drawn):
            if i != keep:
                self.skipped["surrogate"] += 1
                self._tell(inner_id, None)
        config, inner_id, subnet = drawn[keep]
        self.running[trial_id] = (subnet.config_hash(), inner_id)
        return {**config, "subnet": subnet.to_json()}

    def _candidates(self, rows: pd.DataFrame | None) -> int:
        """Proposals to draw for one trial: the surrogate's number once it is fitted on the
        log's `rows`, else 1."""
        surrogate = self.surrogate
        return surrogate.candidates if surrogate and surrogate.fit(rows) else 1

    def _draw(self, count: int) -> tuple[list[tuple[dict[str, Any], str, SubnetConfig]], Any]:
        """Up to `count` new, feasible, distinct proposals (config, the algorithm's id,
        sub-network), and what ended the drawing early (None: the algorithm has nothing now;
        FINISHED: it is done, or it proposed nothing new `MAX_PROPOSALS` times).

        Proposals of running configs end it with None instead: an algorithm that ignores
        failures (Optuna's GP) proposes its running favourite again and again, and proposes
        something else once the running trial's result is told, so Tune asks again then."""
        taken = {h for h, _ in self.running.values()}
        drawn: list[tuple[dict[str, Any], str, SubnetConfig]] = []
        waiting = False
        for _ in range(MAX_PROPOSALS):
            config, inner_id = self._propose()
            if config is None or config == Searcher.FINISHED:
                return drawn, config
            subnet = self.space.filled(self.space.decode(config))
            digest = subnet.config_hash()
            stored = self.log.lookup(digest, refresh=False)
            if stored is not None and self._unfinished_promotion(stored):
                stored = None
            if stored is not None or digest in taken or not self.feasible(subnet):
                self._refuse(inner_id, stored, digest in taken)
                waiting = waiting or (stored is None and digest in taken)
                continue
            taken.add(digest)
            drawn.append((config, inner_id, subnet))
            if len(drawn) == count:
                break
        return drawn, None if waiting and self.running else Searcher.FINISHED

    def _propose(self) -> tuple[dict[str, Any] | None, str]:
        self.asks += 1
        inner_id = f"ask-{self.asks}"
        return self.algorithm.suggest(inner_id), inner_id

    def _refuse(self, inner_id: str, stored: dict | None, running: bool) -> None:
        """Tell the algorithm at once what it proposed: the stored result, or a failure."""
        reason = "known" if stored is not None else "running" if running else "infeasible"
        self.skipped[reason] += 1
        self._tell(inner_id, stored)

    def _unfinished_promotion(self, row: dict[str, Any]) -> bool:
        """Whether a config's row is a multi-fidelity screen that the rule promotes: a stop
        came between its screen and the rest of its windows, so it is not done. (Fronts only
        improve, so a screen the rule drops now was dropped when it was made.)"""
        fidelity = self.fidelity
        if fidelity is None or fidelity.windows_of(row) >= fidelity.windows:
            return False
        return promote(row, self._reference(fidelity.windows_of(row)), self.objectives,
                       fidelity.margin, fidelity.ceiling)

    def _reference(self, rung: int) -> Reference:
        """The reference at a rung from the log, kept until the next trial completes."""
        if rung not in self.references:
            self.references[rung] = reference(self.log.read(), rung, self.objectives)
        return self.references[rung]

    def _tell(self, inner_id: str, result: dict | None) -> None:
        ok = bool(result) and result.get("status") == "ok"
        fidelity = self.fidelity
        if ok and fidelity is not None and fidelity.windows_of(result) < fidelity.windows:
            result = full_estimate(result, self._reference(fidelity.windows_of(result)))
        self.algorithm.on_trial_complete(inner_id, result=result if ok else None, error=not ok)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        digest, inner_id = self.running.pop(trial_id, (None, None))
        self.references.clear()
        if digest is not None and result and not error:
            self.log.remember({**result, "config_hash": digest})
        if inner_id is not None:
            self._tell(inner_id, None if error else result)

    def save(self, checkpoint_path: str) -> None:
        state = {k: v for k, v in self.__dict__.items() if k not in ("log", "references")}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        self.log = ResultLog(self.run_dir)
        self.log.known()
        self.references = {}
