"""The YAML spec of a search: model, search space, objectives, constraints, algorithm,
evaluation and resources.

Every section rejects unknown keys and wrong types, and the spec checks that each metric
an objective or constraint names is produced by the evaluation settings, so a search
fails before any model is loaded, with a message naming the file and the field path
(`spec.yaml: evaluation.seq_len: Input should be greater than 0`). An empty spec is
valid: its defaults run a small CPU search on SmolLM2.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic import SerializerFunctionWrapHandler, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from prunetune.evaluators.settings import (
    DEFAULTS, HARNESS_PREFIX, LATENCY_MODES, EvaluatorSettings, LatencySettings, task_name,
)
from prunetune.metrics import (
    ACCURACY_AVERAGE, COST_METRICS, LATENCY_METRICS, MEMORY_METRIC, PERPLEXITY_METRICS,
    SCREENED_METRICS, task_of, wants_accuracy,
)
from prunetune.search_spaces.spaces import SparsityGrid, preset_bounds
from prunetune.search_spaces.subnet import SPARSITY_METHODS

ALWAYS_PRODUCED = (*PERPLEXITY_METRICS, *COST_METRICS, MEMORY_METRIC)
KNOWN_METRICS = (
    *ALWAYS_PRODUCED, "acc_<task>", "acc_norm_<task>", ACCURACY_AVERAGE, *LATENCY_METRICS,
)

_LATENCY = DEFAULTS.latency

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt,
}
_CONSTRAINT = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op><=|>=|<|>)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<dense>\*\s*dense)?\s*$"
)
CONSTRAINT_FORM = (
    "'<metric> <op> <number>' or '<metric> <op> <number> * dense' with <op> one of "
    "<=, <, >=, > (e.g. 'params <= 0.6 * dense', 'latency_decode_ms < 20')"
)


@dataclass(frozen=True)
class Constraint:
    """A bound on one metric, absolute or a multiple of the dense model's value."""

    metric: str
    op: str
    value: float
    relative_to_dense: bool

    @classmethod
    def parse(cls, text: str) -> "Constraint":
        """Parse `params <= 0.6 * dense`; a ValueError gives the expected form."""
        match = _CONSTRAINT.match(text)
        if match is None:
            raise ValueError(f"cannot parse {text!r}: expected {CONSTRAINT_FORM}")
        return cls(
            metric=match["metric"],
            op=match["op"],
            value=float(match["value"]),
            relative_to_dense=match["dense"] is not None,
        )

    def __str__(self) -> str:
        dense = " * dense" if self.relative_to_dense else ""
        return f"{self.metric} {self.op} {self.value:g}{dense}"

    @property
    def is_precheckable(self) -> bool:
        """True when the metric is a cost known before evaluation (params, flops, KV bytes)."""
        return self.metric in COST_METRICS

    def threshold(self, dense_metrics: Mapping[str, float] | None = None) -> float:
        """The bound in the metric's units; relative bounds need the dense model's metrics."""
        if not self.relative_to_dense:
            return self.value
        if dense_metrics is None or self.metric not in dense_metrics:
            raise ValueError(f"constraint '{self}' needs the dense model's {self.metric}")
        return self.value * float(dense_metrics[self.metric])

    def satisfied(
        self, metrics: Mapping[str, float], dense_metrics: Mapping[str, float] | None = None
    ) -> bool:
        """Whether a sub-network's metrics meet the bound; a NaN metric never does."""
        if self.metric not in metrics:
            raise ValueError(
                f"constraint '{self}' needs the metric {self.metric}, which is missing"
            )
        value = float(metrics[self.metric])
        return not math.isnan(value) and _OPERATORS[self.op](value, self.threshold(dense_metrics))


def _field_error(path: str, reason: str) -> PydanticCustomError:
    """A validation error at `path` below the model that raises it."""
    return PydanticCustomError("spec_field", "{path}: {reason}", {"path": path, "reason": reason})


def _check_constraint(text: str) -> str:
    Constraint.parse(text)
    return text


def _check_gpus(value: Any) -> int | str:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise ValueError(f"must be a non-negative integer or 'auto', got {value!r}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class SparsitySpec(_Section):
    """Weight sparsity as a search dimension (`prunetune.search_spaces.spaces.SparsityGrid`
    holds its defaults): how weights are scored, the pattern, and the levels to choose
    from (0 is always one)."""

    method: Literal[SPARSITY_METHODS] = SparsityGrid.method
    pattern: str = SparsityGrid.pattern
    levels: list[float] | None = None

    @model_validator(mode="after")
    def _grid_is_valid(self) -> "SparsitySpec":
        try:
            SparsityGrid.of(self.model_dump())
        except ValueError as exc:
            field, reason = str(exc).removeprefix("sparsity.").split(": ", 1)
            raise _field_error(field, reason) from None
        return self


class SearchSpaceSpec(_Section):
    """The preset and its bounds (see `prunetune.search_spaces.spaces`).

    `fill_to` (uniform, per_layer, disp): parameter budgets as fractions of the dense
    model, e.g. [0.9, 0.8]. Each proposal is evaluated with its MLPs widened in fine steps
    (8 neurons on SmolLM2) toward the smallest budget at or above its parameters, within
    its grid step, so sub-networks land on the budgets (within one fine step where the
    MLPs have room) while the algorithm searches the grid it searched before. Unset (the
    default): proposals are evaluated as proposed.
    """

    preset: Literal["layers", "uniform", "per_layer", "disp"] = "uniform"
    min_layers: int | None = Field(None, ge=1)
    min_ratio: float = Field(0.25, gt=0, le=1)
    neuron_step: int | None = Field(None, ge=1)
    embed_step: int | None = Field(None, ge=1)
    sparsity: SparsitySpec | None = None
    fill_to: list[Annotated[float, Field(gt=0, le=1)]] | None = None

    @model_validator(mode="after")
    def _bounds_fit_preset(self) -> "SearchSpaceSpec":
        accepted = preset_bounds(self.preset)
        for name in sorted(self.model_fields_set - {"preset"}):
            if name not in accepted:
                raise _field_error(
                    name, f"the {self.preset!r} preset has no bound {name}; it takes "
                    f"{', '.join(b for b in accepted if b in type(self).model_fields)}"
                )
        return self

    @model_serializer(mode="wrap")
    def _dump_preset_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Leave out the bounds the preset does not take, and sparsity when off, so a dump
        loads back and specs without sparsity dump as before."""
        accepted = preset_bounds(self.preset)
        return {k: v for k, v in handler(self).items()
                if k == "preset" or (k in accepted and not (k == "sparsity" and v is None))}

    def bounds(self) -> dict[str, Any]:
        """Keyword bounds for `make_space`: the preset's, unset ones left to its defaults."""
        accepted = preset_bounds(self.preset)
        return {
            name: value for name, value in self.model_dump(exclude={"preset"}).items()
            if name in accepted and value is not None
        }


class SurrogateSpec(_Section):
    """The surrogate that picks, among `candidates` proposals per trial, the one predicted
    to improve the front most (`orchestrator/surrogate.py`); `candidates: 1` is none.

    It predicts once the log holds `min_rows` sub-networks, each objective that needs an
    evaluation by a Gaussian process over the search parameters, optimistic by `optimism`
    standard deviations. Off by default: it runs on the driver for every proposal, and at
    scale that is the bottleneck (128 stand-in evaluators of 2 s on a 64-core machine:
    12% busy with it, 87% without; benchmarks/README.md). Where evaluations are slow and
    evaluators few, `candidates: 16` pays: in the searches replayed on SmolLM2-135M TPE
    with multi-fidelity and the surrogate reaches random search's full-budget hypervolume
    in 680 window-evaluations of 2,080 (33%; 864 without it; on 5 other seeds 842
    against 1,296); told the constraint `perplexity <= 1000` that bounds that hypervolume,
    455 against 509 on 10 fresh seeds. (16, 3, 0) were the best settings of the few tried
    there.
    """

    candidates: int = Field(1, ge=1)
    min_rows: int = Field(3, ge=2)
    optimism: float = Field(0.0, ge=0)


class AlgorithmSpec(_Section):
    """Which search algorithm proposes sub-networks, and how many.

    TPE is the default: in searches replayed on SmolLM2-135M (benchmarks/README.md), with
    multi-fidelity evaluation it reaches the hypervolume of random search's whole budget in
    42% of that budget's window-evaluations, the fewest of the six (65% without); the
    surrogate (`surrogate.candidates: 16`, off by default) brings that to 33% (40% on
    other seeds).
    """

    name: Literal["random", "nsga2", "nsga3", "tpe", "gp", "local"] = "tpe"
    num_samples: int = Field(40, ge=1)
    seed: int = 0
    population_size: int = Field(16, ge=2)
    warm_start: list[str] = []
    surrogate: SurrogateSpec = SurrogateSpec()


class LatencySpec(_Section):
    """Measured prefill and decode latency on the evaluator's device."""

    enabled: bool = False
    prompt_tokens: int = Field(_LATENCY.prompt_tokens, ge=1)
    decode_tokens: int = Field(_LATENCY.decode_tokens, ge=1)
    batch_size: int = Field(_LATENCY.batch_size, ge=1)
    repeats: int = Field(_LATENCY.repeats, ge=1)
    warmup: int = Field(_LATENCY.warmup, ge=0)
    mode: Literal[LATENCY_MODES] = _LATENCY.mode


class FidelitySpec(_Section):
    """Multi-fidelity evaluation: the window counts a proposal is screened at first.

    No rungs (the default): every proposal is scored on every window. With rungs, a proposal
    is scored on the first `rungs[0]` windows and goes on to the next rung, and at last to
    all windows, only while no sub-network scored there, at least as good in every other
    objective, beats it on those same windows by more than `margin` (relative, in mean
    loss). Off by default: a rung is a number of windows, and the figures that support it
    (`rungs: [2]` of `windows: 32` of 512 tokens, margin 0.02; benchmarks/README.md) are
    not those of the default evaluation (8 windows of 256 tokens).
    """

    rungs: list[Annotated[int, Field(ge=1)]] = []
    margin: float = Field(0.02, ge=0)

    @model_validator(mode="after")
    def _rungs_ascend(self) -> "FidelitySpec":
        if self.rungs != sorted(set(self.rungs)):
            raise _field_error("rungs", f"must ascend without repeats, got {self.rungs}")
        return self


class EvaluationSpec(_Section):
    """How one sub-network is measured, and the calibration data of importance scores."""

    data: str = Field(DEFAULTS.data, min_length=1)
    calibration: str = Field(DEFAULTS.calibration, min_length=1)
    calibration_samples: int = Field(DEFAULTS.calibration_samples, ge=1)
    seq_len: int = Field(DEFAULTS.seq_len, gt=0)
    windows: int = Field(DEFAULTS.windows, ge=1)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    tasks: list[str] = list(DEFAULTS.tasks)
    task_limit: int | None = Field(DEFAULTS.task_limit, ge=1)
    mode: Literal["extracted", "masked"] = DEFAULTS.mode
    importance: Literal["activation", "magnitude", "none"] = DEFAULTS.importance
    latency: LatencySpec = LatencySpec()
    fidelity: FidelitySpec = FidelitySpec()

    def batch(self) -> int:
        """The batch size: the spec's, or for `auto` (which the planner replaces when it
        sizes the evaluators, `search.plan_resources`) the evaluator's default."""
        return DEFAULTS.batch_size if self.batch_size == "auto" else self.batch_size

    @model_validator(mode="after")
    def _rungs_below_windows(self) -> "EvaluationSpec":
        if self.fidelity.rungs and self.fidelity.rungs[-1] >= self.windows:
            raise _field_error("fidelity.rungs", f"each rung must be fewer windows than "
                               f"windows = {self.windows}, got {self.fidelity.rungs}")
        return self

    @model_validator(mode="after")
    def _task_names_are_distinct(self) -> "EvaluationSpec":
        names = [task_name(t) for t in self.tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise _field_error("tasks", f"{', '.join(repeated)} named twice (built in and as "
                               f"{HARNESS_PREFIX}<task> both give acc_<task>): keep one")
        return self

    def missing_producer(self, metric: str) -> str | None:
        """Why these settings do not produce `metric`, or None when they do."""
        if metric in ALWAYS_PRODUCED:
            return None
        if metric in LATENCY_METRICS:
            return None if self.latency.enabled else "needs evaluation.latency.enabled: true"
        if metric == ACCURACY_AVERAGE:
            return None if self.tasks else "needs at least one task in evaluation.tasks"
        task = task_of(metric)
        if task is None:
            return f"unknown metric; known metrics are {', '.join(KNOWN_METRICS)}"
        if task not in {task_name(t) for t in self.tasks}:
            return f"needs task {task!r} in evaluation.tasks (now {self.tasks})"
        return None


class ResourcesSpec(_Section):
    """Evaluator groups: how many, and what one group holds.

    An evaluator group holds one copy of the model. One GPU per group needs no sharding;
    several GPUs per group need sharding: `tp` (tensor parallel, 2 or more GPUs, each
    rank loading only its slices), `autotp` (DeepSpeed's tensor parallelism, each rank
    loading the whole model into host memory first) or `zero3` (1 or more GPUs,
    optionally offloading weights to host memory).
    `gpus_per_evaluator: auto` lets the planner size groups from the model and GPU memory.
    `subnets_per_trial` is how many sub-networks one Tune trial evaluates (in parallel,
    `batches.py`); `auto` is evaluators / 4 (one up to 4 evaluators).
    """

    evaluators: int = Field(1, ge=1)
    subnets_per_trial: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    gpus_per_evaluator: Annotated[int | Literal["auto"], PlainValidator(_check_gpus)] = 0
    cpus_per_evaluator: float = Field(1.0, gt=0)
    sharding: Literal["none", "zero3", "tp", "autotp"] = "none"
    offload: Literal["none", "cpu"] = "none"

    @model_validator(mode="after")
    def _sharding_fits_gpus(self) -> "ResourcesSpec":
        gpus = self.gpus_per_evaluator
        if self.offload != "none" and self.sharding != "zero3":
            raise _field_error("offload", f"{self.offload} needs sharding: zero3")
        least = {"tp": 2, "autotp": 2, "zero3": 1}.get(self.sharding)
        if least is not None and gpus != "auto" and gpus < least:
            raise _field_error(
                "sharding",
                f"{self.sharding} needs gpus_per_evaluator >= {least} or auto, got {gpus}",
            )
        if self.sharding == "none" and gpus != "auto" and gpus > 1:
            raise _field_error(
                "gpus_per_evaluator",
                f"{gpus} GPUs per evaluator need sharding: zero3, tp or autotp (or one GPU each)",
            )
        return self


class Spec(_Section):
    """A whole search. `load_spec` reads one from YAML; `to_yaml` writes it back."""

    name: str = Field("search", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(DEFAULTS.model, min_length=1)
    dtype: Literal["float32", "bfloat16", "float16"] = DEFAULTS.dtype
    run_dir: str | None = None
    search_space: SearchSpaceSpec = SearchSpaceSpec()
    objectives: dict[str, Literal["min", "max"]] = Field(
        default_factory=lambda: {"perplexity": "min", "params": "min"}, min_length=2
    )
    constraints: list[Annotated[str, AfterValidator(_check_constraint)]] = []
    algorithm: AlgorithmSpec = AlgorithmSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    resources: ResourcesSpec = ResourcesSpec()
    address: str | None = None
    ship_code: bool = False
    max_failures: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _metrics_are_produced(self) -> "Spec":
        for metric in self.objectives:
            reason = self.evaluation.missing_producer(metric)
            if reason:
                raise _field_error(f"objectives.{metric}", reason)
        for i, constraint in enumerate(self.parsed_constraints()):
            reason = self.evaluation.missing_producer(constraint.metric)
            if reason:
                raise _field_error(f"constraints[{i}]", f"{constraint.metric} {reason}")
        return self

    @model_validator(mode="after")
    def _fidelity_screens_perplexity(self) -> "Spec":
        if not self.evaluation.fidelity.rungs:
            return self
        if not set(self.objectives) & set(SCREENED_METRICS):
            raise _field_error("evaluation.fidelity.rungs", "multi-fidelity evaluation screens "
                               "by perplexity: name perplexity or nll among the objectives")
        for metric in self.metrics_needed():
            if wants_accuracy([metric]):
                raise _field_error("evaluation.fidelity.rungs", f"{metric} is measured on "
                                   "tasks, not windows: multi-fidelity evaluation would measure "
                                   "it at every rung; leave the rungs out")
        return self

    @model_validator(mode="after")
    def _sparsity_has_what_it_needs(self) -> "Spec":
        sparsity = self.search_space.sparsity
        if sparsity is None:
            return self
        if sparsity.method == "wanda" and self.evaluation.importance != "activation":
            raise _field_error("search_space.sparsity.method",
                               "wanda scores weights by the input norms of the activation "
                               "calibration pass; set evaluation.importance: activation or "
                               "use method: magnitude")
        self._refuse_sharding("search_space.sparsity", "weight sparsity needs whole weights")
        return self

    @model_validator(mode="after")
    def _disp_has_what_it_needs(self) -> "Spec":
        if self.search_space.preset != "disp":
            return self
        if self.evaluation.importance != "activation":
            raise _field_error("evaluation.importance",
                               "the disp preset chooses each block's channels by the "
                               "activations of the calibration pass; set importance: activation")
        self._refuse_sharding("search_space.preset", "disp needs whole layers")
        return self

    def _refuse_sharding(self, field: str, needs: str) -> None:
        """Name `field` when the evaluators shard the model: `needs` (what it needs whole)
        on one device."""
        if self.resources.sharding != "none":
            raise _field_error(field, f"{needs} on one device; sharding: "
                                      f"{self.resources.sharding} splits them")

    @model_validator(mode="after")
    def _sharding_needs_masks(self) -> "Spec":
        if self.resources.sharding != "none" and self.evaluation.mode != "masked":
            raise _field_error(
                "evaluation.mode",
                f"sharding: {self.resources.sharding} evaluates sub-networks as masks; "
                "set evaluation.mode: masked",
            )
        return self

    def parsed_constraints(self) -> list[Constraint]:
        return [Constraint.parse(text) for text in self.constraints]

    def metrics_needed(self) -> list[str]:
        """Every metric an objective or constraint names, in order, once each."""
        names = [*self.objectives, *(c.metric for c in self.parsed_constraints())]
        return list(dict.fromkeys(names))

    def evaluator_settings(self) -> EvaluatorSettings:
        """What each evaluator of this spec loads and measures."""
        e = self.evaluation
        return EvaluatorSettings(
            model=self.model, dtype=self.dtype,
            device="cpu" if self.resources.gpus_per_evaluator == 0 else "auto",
            data=e.data, seq_len=e.seq_len, windows=e.windows, batch_size=e.batch(),
            tasks=tuple(e.tasks), task_limit=e.task_limit, mode=e.mode, importance=e.importance,
            calibration=e.calibration, calibration_samples=e.calibration_samples,
            latency=LatencySettings(**e.latency.model_dump(exclude={"enabled"})),
        )

    def with_run_dir(self, now: datetime | None = None) -> "Spec":
        """This spec with `run_dir` set: unchanged if given, else runs/<name>-<UTC time>."""
        if self.run_dir is not None:
            return self
        stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
        return self.model_copy(update={"run_dir": f"runs/{self.name}-{stamp:%Y%m%dT%H%M%SZ}"})

    def to_yaml(self) -> str:
        """YAML that `load_spec` reads back to an equal spec."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class SpecError(ValueError):
    """An invalid spec; one line per problem: `<source>: <field path>: <message>`."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = (f"{source}: {path or '(top level)'}: {msg}" for path, msg in problems)
        super().__init__("\n".join(lines))


def _join_path(loc: tuple[Any, ...], suffix: str = "") -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if suffix:
        path += suffix if suffix.startswith("[") or not path else f".{suffix}"
    return path


def _problems(error: ValidationError) -> list[tuple[str, str]]:
    problems = []
    for item in error.errors():
        ctx = item.get("ctx") or {}
        if item["type"] == "spec_field":
            problems.append((_join_path(item["loc"], ctx["path"]), ctx["reason"]))
        elif item["type"] == "value_error":
            problems.append((_join_path(item["loc"]), str(ctx["error"])))
        else:
            problems.append((_join_path(item["loc"]), item["msg"]))
    return problems


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise SpecError(str(path), [("", f"cannot read the spec file: {exc.strerror}")]) from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(str(path), [("", f"not valid YAML: {exc}")]) from exc


def load_spec(source: str | Path | Mapping[str, Any]) -> Spec:
    """A validated spec from a YAML file path or a mapping; an empty file gives the defaults."""
    if isinstance(source, Mapping):
        name, data = "<spec>", dict(source)
    else:
        name, data = str(source), _read_yaml(Path(source))
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        got = type(data).__name__
        raise SpecError(name, [("", f"expected a mapping of spec fields, got {got}")])
    try:
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(name, _problems(exc)) from None


DEFAULT_SEARCH: dict[str, Any] = {
    "constraints": ["params >= 0.65 * dense"],
    "algorithm": {"name": "random", "num_samples": 20},
}
"""What `prunetune search` without a spec sets beyond the field defaults.

Pruned without retraining, SmolLM2-135M's sub-networks below about 65% of its parameters
score WikiText-2 perplexities from several hundred to tens of thousands (dense: 32), so
the built-in search looks above that; 20 of those larger sub-networks take less time
than the 40 mostly small ones it drew without the bound (241 s against 290 s from an
empty cache, on the same 2 busy CPU cores). A spec file starts from the field defaults
alone, which bound nothing: the constraint would silently narrow every search that names
none. It proposes at random, as when those figures were measured: with 20 proposals and
a population of 16, a model-based proposer would be random for all but 4 of them.
"""


def default_spec() -> Spec:
    """The built-in search of `prunetune search` without a spec: a random search over
    SmolLM2 on CPU (the field defaults) with `DEFAULT_SEARCH` on top."""
    return load_spec(DEFAULT_SEARCH)
