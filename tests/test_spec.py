"""The search spec: defaults, YAML round trip, errors naming file and field, constraints."""

from __future__ import annotations

import math
import re
from datetime import datetime, timezone

import pytest
import yaml
from pydantic import ValidationError

from prunetune.orchestrator.spec import (
    Constraint,
    Spec,
    SpecError,
    default_spec,
    load_spec,
)
from prunetune.search_spaces.spaces import make_space

SMOLLM2 = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
)


def _write(tmp_path, data, name="spec.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_defaults_run_a_small_cpu_search_on_smollm2(tmp_path):
    spec = default_spec()
    empty = load_spec(_write(tmp_path, ""))
    assert spec == empty.model_copy(update={
        "constraints": ["params >= 0.65 * dense"],
        "algorithm": empty.algorithm.model_copy(update={"num_samples": 20, "name": "random"})})
    assert empty.constraints == [] and empty.algorithm.num_samples == 40
    assert empty.algorithm.name == "tpe" and empty.evaluation.fidelity.rungs == []
    assert empty.algorithm.surrogate.candidates == 1
    assert (spec.model, spec.dtype, spec.search_space.preset) == ("smollm2", "float32", "uniform")
    assert spec.objectives == {"perplexity": "min", "params": "min"}
    assert spec.metrics_needed() == ["perplexity", "params"]
    assert (spec.resources.gpus_per_evaluator, spec.resources.sharding) == (0, "none")
    assert spec.evaluation.seq_len == 256
    space = make_space(spec.search_space.preset, SMOLLM2, **spec.search_space.bounds())
    assert space.min_ratio == 0.25


FULL = {
    "name": "smol-7",
    "model": "HuggingFaceTB/SmolLM2-135M",
    "dtype": "bfloat16",
    "run_dir": "/tmp/runs/x",
    "search_space": {"preset": "per_layer", "min_layers": 20, "min_ratio": 0.5, "neuron_step": 128},
    "objectives": {"perplexity": "min", "acc_avg": "max", "latency_decode_ms": "min"},
    "constraints": ["params <= 0.6 * dense", "acc_norm_piqa >= 0.5", "flops < 1.5e9"],
    "algorithm": {"name": "nsga2", "num_samples": 200, "seed": 3, "population_size": 24,
                  "warm_start": ["magnitude", "shortgpt"]},
    "evaluation": {"tasks": ["piqa"], "task_limit": None, "mode": "masked",
                   "latency": {"enabled": True, "repeats": 3, "mode": "eager"}},
    "resources": {"evaluators": 2, "gpus_per_evaluator": "auto", "cpus_per_evaluator": 2.5,
                  "sharding": "zero3", "offload": "cpu"},
    "address": "ray://head:10001",
    "ship_code": True,
    "max_failures": 0,
}


def test_a_yaml_file_round_trips(tmp_path):
    spec = load_spec(_write(tmp_path, FULL))
    assert spec.search_space.bounds() == {"min_layers": 20, "min_ratio": 0.5, "neuron_step": 128}
    assert spec.evaluation.latency.repeats == 3 and spec.evaluation.task_limit is None
    assert spec.evaluator_settings().latency.mode == "eager"
    assert load_spec({}).evaluator_settings().latency.mode == "graph"
    again = load_spec(_write(tmp_path, spec.to_yaml(), "again.yaml"))
    assert again == spec
    assert again.to_yaml() == spec.to_yaml()
    assert spec.metrics_needed() == [
        "perplexity", "acc_avg", "latency_decode_ms", "params", "acc_norm_piqa", "flops",
    ]


def test_sparsity_dumps_and_loads_back():
    spec = load_spec({"search_space": {"preset": "per_layer",
                                       "sparsity": {"pattern": "2:4", "levels": [0, 0.5]}}})
    assert load_spec(yaml.safe_load(spec.to_yaml())) == spec
    assert spec.search_space.bounds()["sparsity"] == {"method": "wanda", "pattern": "2:4",
                                                      "levels": [0.0, 0.5]}
    assert "nonzero_params" in load_spec({"constraints": ["nonzero_params <= 0.5 * dense"]}).metrics_needed()


def test_layers_preset_dumps_only_its_bounds(tmp_path):
    spec = load_spec({"search_space": {"preset": "layers", "min_layers": 3}})
    assert yaml.safe_load(spec.to_yaml())["search_space"] == {"preset": "layers", "min_layers": 3}
    assert load_spec(_write(tmp_path, spec.to_yaml())) == spec
    assert spec.search_space.bounds() == {"min_layers": 3}


def test_run_dir_defaults_to_name_and_utc_time():
    now = datetime(2025, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
    assert load_spec({"name": "abc"}).with_run_dir(now).run_dir == "runs/abc-20250304T050607Z"
    assert load_spec({"run_dir": "here"}).with_run_dir(now).run_dir == "here"


@pytest.mark.parametrize(
    "data,expected",
    [
        ({"evaluation": {"seq_len": 0}}, "evaluation.seq_len: Input should be greater than 0"),
        ({"evaluation": {"seq_len": "long"}},
         "evaluation.seq_len: Input should be a valid integer"),
        ({"evaluation": {"latency": {"enabled": "yes please"}}},
         "evaluation.latency.enabled: Input should be a valid boolean"),
        ({"evaluation": {"latency": {"mode": "turbo"}}},
         "evaluation.latency.mode: Input should be 'graph', 'compiled' or 'eager'"),
        ({"evalution": {}}, "evalution: Extra inputs are not permitted"),
        ({"algorithm": {"name": "nsga2", "pop": 4}},
         "algorithm.pop: Extra inputs are not permitted"),
        ({"algorithm": {"name": "bayes"}},
         "algorithm.name: Input should be 'random', 'nsga2', 'nsga3', 'tpe', 'gp' or 'local'"),
        ({"search_space": {"min_ratio": 1.5}},
         "search_space.min_ratio: Input should be less than or equal to 1"),
        ({"search_space": {"preset": "layers", "neuron_step": 64}},
         "search_space.neuron_step: the 'layers' preset has no bound neuron_step; it takes min_layers"),
        ({"objectives": {"perplexity": "min"}},
         "objectives: Dictionary should have at least 2 items"),
        ({"objectives": {"perplexity": "min", "params": "smaller"}},
         "objectives.params: Input should be 'min' or 'max'"),
        ({"objectives": {"perplexity": "min", "acc_avg": "max"}},
         "objectives.acc_avg: needs at least one task in evaluation.tasks"),
        ({"objectives": {"acc_piqa": "max", "params": "min"}, "evaluation": {"tasks": ["arc_easy"]}},
         "objectives.acc_piqa: needs task 'piqa' in evaluation.tasks"),
        ({"objectives": {"perplexity": "min", "speed": "max"}},
         "objectives.speed: unknown metric; known metrics are perplexity"),
        ({"constraints": ["params <= 0.6 * dense", "params at most 3"]},
         "constraints[1]: cannot parse 'params at most 3': expected '<metric> <op> <number>'"),
        ({"constraints": ["latency_prefill_ms < 20"]},
         "constraints[0]: latency_prefill_ms needs evaluation.latency.enabled: true"),
        ({"resources": {"gpus_per_evaluator": "many"}},
         "resources.gpus_per_evaluator: must be a non-negative integer or 'auto'"),
        ({"resources": {"gpus_per_evaluator": 4}},
         "resources.gpus_per_evaluator: 4 GPUs per evaluator need sharding: zero3, tp or autotp"),
        ({"resources": {"gpus_per_evaluator": 1, "sharding": "autotp"}},
         "resources.sharding: autotp needs gpus_per_evaluator >= 2 or auto"),
        ({"resources": {"offload": "cpu"}}, "resources.offload: cpu needs sharding: zero3"),
        ({"resources": {"offload": "nvme"}}, "resources.offload: Input should be 'none' or 'cpu'"),
        ({"resources": {"gpus_per_evaluator": 2, "sharding": "autotp"}},
         "evaluation.mode: sharding: autotp evaluates sub-networks as masks"),
        ({"name": "a/b"}, "name: String should match pattern"),
        ({"search_space": {"sparsity": {"method": "sparsegpt"}}},
         "search_space.sparsity.method: Input should be 'magnitude' or 'wanda'"),
        ({"search_space": {"sparsity": {"pattern": "4:2"}}},
         "search_space.sparsity.pattern: must be 'unstructured' or 'N:M' with 0 < N < M"),
        ({"search_space": {"sparsity": {"pattern": "2:4", "levels": [0, 0.25]}}},
         "search_space.sparsity.levels: 0.25: pattern 2:4 allows 0 or 0.5"),
        ({"search_space": {"sparsity": {"levels": [1.0]}}},
         "search_space.sparsity.levels: 1.0: must be in [0, 1)"),
        ({"search_space": {"sparsity": {"levels": [0.5], "ratio": 2}}},
         "search_space.sparsity.ratio: Extra inputs are not permitted"),
        ({"search_space": {"sparsity": {}}, "evaluation": {"importance": "magnitude"}},
         "search_space.sparsity.method: wanda scores weights by the input norms"),
        ({"search_space": {"sparsity": {"method": "magnitude"}},
          "resources": {"gpus_per_evaluator": 2, "sharding": "zero3"},
          "evaluation": {"mode": "masked"}},
         "search_space.sparsity: weight sparsity needs whole weights on one device"),
        ({"evaluation": {"tasks": ["piqa", "lm_eval:piqa"]}},
         "evaluation.tasks: piqa named twice (built in and as lm_eval:<task> both give acc_<task>)"),
    ],
)
def test_errors_name_the_file_and_field_path(tmp_path, data, expected):
    path = _write(tmp_path, data)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert str(info.value).startswith(f"{path}: {expected}")
    assert info.value.source == str(path)


def test_every_problem_is_reported_once_per_line(tmp_path):
    path = _write(tmp_path, {"evaluation": {"seq_len": -1, "windows": 0}, "ship_code": 3})
    with pytest.raises(SpecError) as info:
        load_spec(path)
    lines = str(info.value).splitlines()
    assert [p for p, _ in info.value.problems] == ["evaluation.seq_len", "evaluation.windows", "ship_code"]
    assert all(line.startswith(f"{path}: ") for line in lines) and len(lines) == 3


def test_unreadable_or_malformed_files(tmp_path):
    with pytest.raises(SpecError, match="missing.yaml: \\(top level\\): cannot read the spec file"):
        load_spec(tmp_path / "missing.yaml")
    with pytest.raises(SpecError, match="bad.yaml: \\(top level\\): not valid YAML"):
        load_spec(_write(tmp_path, "model: [unclosed", "bad.yaml"))
    with pytest.raises(SpecError, match="list.yaml: \\(top level\\): expected a mapping of spec fields, got list"):
        load_spec(_write(tmp_path, "- model\n", "list.yaml"))


def test_a_mapping_is_named_in_errors():
    with pytest.raises(SpecError, match=r"^<spec>: max_failures: Input should be greater than or equal to 0"):
        load_spec({"max_failures": -1})


@pytest.mark.parametrize("data, message", [
    ({"evaluation": {"fidelity": {"rungs": [8]}}},
     "evaluation.fidelity.rungs: each rung must be fewer windows than windows = 8, got [8]"),
    ({"evaluation": {"windows": 32, "fidelity": {"rungs": [4, 2]}}},
     "evaluation.fidelity.rungs: must ascend without repeats, got [4, 2]"),
    ({"evaluation": {"fidelity": {"rungs": [0]}}}, "evaluation.fidelity.rungs[0]: Input should be"),
    ({"evaluation": {"fidelity": {"rungs": [2], "margin": -0.1}}}, "evaluation.fidelity.margin"),
    ({"objectives": {"params": "min", "flops": "min"}, "evaluation": {"fidelity": {"rungs": [2]}}},
     "name perplexity or nll among the objectives"),
    ({"objectives": {"perplexity": "min", "acc_piqa": "max"},
      "evaluation": {"tasks": ["piqa"], "fidelity": {"rungs": [2]}}},
     "acc_piqa is measured on tasks, not windows"),
])
def test_multi_fidelity_rungs_are_window_counts_below_windows_screening_perplexity(data, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        load_spec(data)
    ok = load_spec({"evaluation": {"windows": 32, "fidelity": {"rungs": [2, 8]},
                                   "latency": {"enabled": True}},
                    "objectives": {"nll": "min", "latency_decode_ms": "min"}})
    assert ok.evaluation.fidelity.rungs == [2, 8] and ok.evaluation.fidelity.margin == 0.02


def test_sections_are_immutable():
    spec = default_spec()
    with pytest.raises(ValidationError, match="frozen"):
        spec.evaluation.seq_len = 5
    assert Spec().evaluation.seq_len == 256


@pytest.mark.parametrize(
    "text,parsed",
    [
        ("params <= 0.6 * dense", Constraint("params", "<=", 0.6, True)),
        ("latency_decode_ms<20", Constraint("latency_decode_ms", "<", 20.0, False)),
        ("  perplexity <= 2.0*dense ", Constraint("perplexity", "<=", 2.0, True)),
        ("acc_avg >= .45", Constraint("acc_avg", ">=", 0.45, False)),
        ("flops > 1e9", Constraint("flops", ">", 1e9, False)),
    ],
)
def test_constraints_parse(text, parsed):
    assert Constraint.parse(text) == parsed
    assert Constraint.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["params <= dense", "params == 3", "<= 3", "params <= 3 * base", "params <= 0.6 dense"])
def test_malformed_constraints_are_rejected(text):
    with pytest.raises(ValueError, match="expected '<metric> <op> <number>'"):
        Constraint.parse(text)


def test_constraints_evaluate():
    dense = {"params": 1000.0, "perplexity": 10.0}
    params = Constraint.parse("params <= 0.6 * dense")
    assert params.threshold(dense) == pytest.approx(600.0)
    assert params.satisfied({"params": 600}, dense)
    assert not params.satisfied({"params": 601}, dense)
    strict = Constraint.parse("latency_decode_ms < 20")
    assert strict.threshold() == 20.0
    assert strict.satisfied({"latency_decode_ms": 19.9}) and not strict.satisfied({"latency_decode_ms": 20})
    floor = Constraint.parse("acc_avg >= 0.5")
    assert floor.satisfied({"acc_avg": 0.5}) and not floor.satisfied({"acc_avg": 0.49})
    ppl = Constraint.parse("perplexity <= 2.0 * dense")
    assert ppl.satisfied({"perplexity": 20.0}, dense) and not ppl.satisfied({"perplexity": math.nan}, dense)


def test_constraint_errors_and_precheck():
    params = Constraint.parse("params <= 0.6 * dense")
    with pytest.raises(ValueError, match="needs the dense model's params"):
        params.threshold()
    with pytest.raises(ValueError, match="needs the metric params, which is missing"):
        params.satisfied({"flops": 1.0}, {"params": 1.0})
    checks = {t: Constraint.parse(t).is_precheckable for t in (
        "params <= 0.6 * dense", "flops < 1e9", "kv_bytes_per_token <= 1000",
        "perplexity <= 2 * dense", "latency_decode_ms < 20", "peak_memory_bytes < 1e9",
    )}
    assert list(checks.values()) == [True, True, True, False, False, False]


def test_spec_exposes_parsed_constraints():
    spec = load_spec({"constraints": ["params <= 0.6 * dense", "perplexity < 40"]})
    assert spec.parsed_constraints() == [
        Constraint("params", "<=", 0.6, True), Constraint("perplexity", "<", 40.0, False),
    ]
    assert spec.metrics_needed() == ["perplexity", "params"]


def test_lm_eval_tasks_produce_accuracy_metrics_under_their_own_names():
    spec = load_spec({"objectives": {"acc_arc_easy": "max", "acc_norm_piqa": "max", "params": "min"},
                      "evaluation": {"tasks": ["lm_eval:arc_easy", "piqa"]}})
    assert spec.evaluator_settings().tasks == ("lm_eval:arc_easy", "piqa")


def test_fill_to_budgets_reach_the_space_and_are_checked() -> None:
    spec = load_spec({"search_space": {"preset": "per_layer", "fill_to": [0.9, 0.5]}})
    assert spec.search_space.bounds() == {"min_ratio": 0.25, "fill_to": [0.9, 0.5]}
    assert load_spec(yaml.safe_load(spec.to_yaml())) == spec
    for bad, message in (({"preset": "layers", "fill_to": [0.9]},
                          "search_space.fill_to: the 'layers' preset has no bound fill_to"),
                         ({"preset": "uniform", "fill_to": [1.5]},
                          r"search_space.fill_to\[0\]: Input should be less than or equal to 1")):
        with pytest.raises(SpecError, match=message):
            load_spec({"search_space": bad})
