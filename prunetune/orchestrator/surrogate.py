"""A surrogate of quality from the architecture, fitted on the result log as it grows, that
picks among several proposals the one predicted to improve the front most.

With `algorithm.surrogate.candidates: K`, the guard (`algorithms.GuardedSearcher`) draws K
new, feasible proposals per trial and evaluates only one: the proposal whose optimistic
prediction adds the most hypervolume to the front of the log, or, when every one is
predicted dominated, the one closest to the front. The others are told to the algorithm
as failed (never evaluated, never logged), so a later draw may propose them again.

What is predicted: each objective that depends on the weights (perplexity, as its log,
the loss; latency; accuracy) by a Gaussian process of scikit-learn over the search
parameters, each scaled to its grid position in [0, 1]; the cost objectives (parameters,
FLOPs, ...) are exact, from the model config. Optimistic means the predicted mean less
`optimism` standard deviations (a proposal in a region the log has not seen then gets the
benefit of the doubt); the default is 0, the mean, which found the front fastest in the
replayed searches of benchmarks/README.md. A constraint on an objective (`perplexity <=
1000`) bounds the hypervolume, so a proposal predicted to break it is hopeless too. The training rows are the log's one-shot rows, each sub-network's
row of the most windows, a multi-fidelity screen's loss scaled to full fidelity as the
algorithm is told it (`fidelity.full_estimate`): the screens of dropped proposals are the
cheap evidence of where the hopeless sub-networks are.

Nothing of the fit is saved: it is a function of the log, refitted when the log has new
rows, so a resumed search refits it and decides as the stopped one would have.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from prunetune.metrics import COST_METRICS
from prunetune.orchestrator.fidelity import Fidelity, Reference, full_estimate, reference
from prunetune.orchestrator.pareto import hypervolume
from prunetune.orchestrator.results import ONESHOT
from prunetune.orchestrator.spec import Constraint, Spec
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.spaces import SearchSpace
from prunetune.search_spaces.subnet import SubnetConfig

Costs = Callable[[SubnetConfig], Mapping[str, float]]


def grid_features(space: SearchSpace, subnet: SubnetConfig) -> np.ndarray:
    """A sub-network as its search parameters, each its position on its grid in [0, 1]; a
    sub-network filled to a budget (`SearchSpace.filled`) as the grid point it was filled from."""
    config = space.encode(space.coarse(subnet))
    return np.array([values.index(config[name]) / max(len(values) - 1, 1)
                     for name, values in space.choices().items()], dtype=float)


def training_rows(rows: pd.DataFrame, fidelity: Fidelity | None,
                  objectives: Mapping[str, str]) -> pd.DataFrame:
    """Each sub-network's ok one-shot row of the most windows, a screen's loss scaled to
    full fidelity by the ratio of its rung."""
    if not len(rows):
        return rows
    ok = rows[(rows["status"] == "ok") & (rows["stage"] == ONESHOT)]
    if fidelity is None or "fidelity" not in ok.columns:
        return ok.drop_duplicates("config_hash", keep="last")
    windows = ok["fidelity"].fillna(fidelity.windows)
    best = ok.assign(_windows=windows).sort_values("_windows", kind="stable")
    best = best.drop_duplicates("config_hash", keep="last").drop(columns="_windows")
    references: dict[int, Reference] = {}
    scaled = []
    for row in best.to_dict("records"):
        rung = fidelity.windows_of(row)
        if rung < fidelity.windows:
            if rung not in references:
                references[rung] = reference(rows, rung, objectives)
            row = full_estimate(row, references[rung])
        scaled.append(row)
    return pd.DataFrame(scaled, columns=best.columns)


def _predictable(value: np.ndarray, name: str) -> np.ndarray:
    """The value a Gaussian process models: perplexity as its log (the loss), else itself."""
    return np.log(value) if name == "perplexity" else value


class Surrogate:
    """Quality predicted from the architecture; `choose` picks among proposals.

    `costs(subnet)` gives the objectives known exactly before evaluation; every other
    objective is predicted once the log holds `min_rows` training rows.
    """

    def __init__(self, space: SearchSpace, objectives: Mapping[str, str], costs: Costs,
                 candidates: int, min_rows: int, optimism: float,
                 fidelity: Fidelity | None = None, limits: Mapping[str, float] | None = None) -> None:
        if candidates < 2:
            raise ValueError(f"surrogate candidates must be >= 2 to choose among, got {candidates}")
        self.space = space
        self.objectives = dict(objectives)
        self.costs = costs
        self.candidates = candidates
        self.min_rows = min_rows
        self.optimism = optimism
        self.fidelity = fidelity
        self.limits = dict(limits or {})
        self._fit_key: int | None = None
        self._ready = False
        self._models: dict[str, Any] = {}
        self._front = np.zeros((0, len(objectives)))
        self._low = np.zeros(len(objectives))
        self._span = np.ones(len(objectives))

    def __getstate__(self) -> dict[str, Any]:
        """The settings only: a restored surrogate refits from the log."""
        state = dict(self.__dict__)
        state.update(_fit_key=None, _ready=False, _models={})
        return state

    def fit(self, rows: pd.DataFrame) -> bool:
        """Fit on the log's rows, again only once it has grown enough (`refit_due`);
        whether there were enough to fit on."""
        if refit_due(self._fit_key, len(rows)):
            self._fit_key = len(rows)
            self._ready = self._refit(rows)
        return self._ready

    def _refit(self, rows: pd.DataFrame) -> bool:
        self._models = {}
        train = training_rows(rows, self.fidelity, self.objectives)
        if not set(self.objectives) <= set(train.columns):
            return False
        train = train.dropna(subset=list(self.objectives))
        if len(train) < self.min_rows:
            return False
        X = np.stack([grid_features(self.space, SubnetConfig.from_json(c))
                      for c in train["config_json"]])
        for name in self._predicted():
            y = _predictable(train[name].to_numpy(float), name)
            self._models[name] = _gaussian_process().fit(X, y)
        F = self._minimised({n: _predictable(train[n].to_numpy(float), n) for n in self.objectives})
        self._low = F.min(0)
        self._span = np.where(F.max(0) > self._low, F.max(0) - self._low, 1.0)
        self._front = self._normalised(F)
        return True

    def _predicted(self) -> list[str]:
        """The objectives that are not known before evaluation."""
        return [n for n in self.objectives if n not in COST_METRICS]

    def optimistic(self, subnets: list[SubnetConfig]) -> np.ndarray:
        """Each sub-network's objectives (minimised, normalised by the log's range): exact
        costs, and the predicted mean less `optimism` standard deviations for the rest."""
        X = np.stack([grid_features(self.space, s) for s in subnets])
        costs = [self.costs(s) for s in subnets]
        values = {}
        for name in self.objectives:
            if name in self._models:
                mean, std = self._models[name].predict(X, return_std=True)
                sign = 1.0 if self.objectives[name] == "min" else -1.0
                values[name] = mean - sign * self.optimism * std
            else:
                values[name] = _predictable(np.array([c[name] for c in costs], float), name)
        return self._normalised(self._minimised(values))

    def _minimised(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.column_stack([values[n] if d == "min" else -values[n]
                                for n, d in self.objectives.items()])

    def _normalised(self, F: np.ndarray) -> np.ndarray:
        return (F - self._low) / self._span

    def scores(self, subnets: list[SubnetConfig]) -> np.ndarray:
        """How much each sub-network is predicted to improve the front: the hypervolume it
        would add (> 0), or minus how far it would have to move to leave the front's
        dominated region and meet the limits (<= 0). The hypervolume is bounded by the
        limits, and elsewhere 10% of the log's range beyond the worst value."""
        P = self.optimistic(subnets)
        ref = np.maximum(self._front.max(0), P.max(0)) + 0.1
        limited = np.array([n in self.limits for n in self.objectives])
        ref[limited] = self._bounds()[limited]
        base = hypervolume(self._front, ref)
        out = []
        for p in P:
            escape = max((p[None, :] - self._front).min(1).max(),
                         (p - ref)[limited].max(initial=-np.inf))
            out.append(hypervolume(np.vstack([self._front, p]), ref) - base if escape < 0 else -escape)
        return np.array(out)

    def _bounds(self) -> np.ndarray:
        """The limits as a normalised minimised point (NaN where an objective has none)."""
        values = {n: _predictable(np.array([self.limits.get(n, np.nan)], float), n)
                  for n in self.objectives}
        return self._normalised(self._minimised(values))[0]

    def choose(self, subnets: list[SubnetConfig], rows: pd.DataFrame) -> int:
        """The index of the proposal to evaluate: the best score once the surrogate is
        fitted, else the first (the algorithm's own order)."""
        if len(subnets) < 2 or not self.fit(rows):
            return 0
        return int(np.argmax(self.scores(subnets)))


SMALL_LOG = 256
"""Logs up to this many rows are fitted again on every new row (a fit is milliseconds)."""
REFIT_GROWTH = 1.1
"""Larger logs are fitted again once they have grown by this factor: a Gaussian process
fit costs the cube of the rows, and hundreds of evaluators add rows faster than it fits."""


def refit_due(fitted_rows: int | None, rows: int) -> bool:
    """Whether a surrogate fitted on `fitted_rows` rows (None: never) is fitted again on a
    log of `rows`: on every new row while the log is small, then after each 10% growth."""
    if fitted_rows is None:
        return True
    if rows <= SMALL_LOG:
        return rows != fitted_rows
    return rows >= REFIT_GROWTH * fitted_rows


def spec_surrogate(spec: Spec, space: SearchSpace, model_config: Mapping[str, Any],
                   dense: Mapping[str, Any], fidelity: Fidelity) -> Surrogate | None:
    """The surrogate `algorithm.surrogate` asks for (None for `candidates: 1`): exact costs
    at the spec's sequence length, limits from its constraints (`dense`: the dense row)."""
    settings = spec.algorithm.surrogate
    if settings.candidates == 1:
        return None
    costs = partial(subnet_cost, model_config, seq_len=spec.evaluation.seq_len)
    limits = objective_limits(spec.parsed_constraints(), spec.objectives, dense)
    return Surrogate(space, spec.objectives, costs, settings.candidates, settings.min_rows,
                     settings.optimism, fidelity, limits)


def objective_limits(constraints: list[Constraint], objectives: Mapping[str, str],
                     dense: Mapping[str, float]) -> dict[str, float]:
    """The worst value each objective may take under the spec's constraints (`perplexity <=
    1000`: 1000), for the objectives a constraint bounds on their bad side."""
    worse = {"min": ("<=", "<"), "max": (">=", ">")}
    return {c.metric: c.threshold(dense) for c in constraints
            if c.metric in objectives and c.op in worse[objectives[c.metric]]}


def _gaussian_process() -> Any:
    """A Gaussian process with a Matérn kernel and a noise term, fitted deterministically."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    kernel = ConstantKernel(1.0) * Matern(length_scale=0.3, nu=2.5) + WhiteKernel(1e-3)
    warnings.filterwarnings("ignore", module="sklearn.gaussian_process")
    return GaussianProcessRegressor(kernel=kernel, normalize_y=True, random_state=0)
