"""Evaluator planning: GPUs per evaluator group and groups per cluster, from configs alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prunetune.cluster.plan import (
    GIB,
    Plan,
    evaluator_count,
    group_sizes,
    load_config_file,
    plan_evaluators,
)

CONFIGS = Path(__file__).parent / "fixtures" / "configs"


def config(name: str) -> dict:
    return load_config_file(CONFIGS / f"{name}.json")


@pytest.fixture(scope="module")
def llama70b() -> dict:
    return config("llama3-70b")


def per_gpu_gib(plan: Plan, group: int) -> float:
    """The documented arithmetic, written out: weights / N + working memory + headroom."""
    return (math.ceil(plan.weight_bytes / group) + plan.logits_bytes + plan.activation_bytes
            + plan.headroom_bytes) / GIB


@pytest.mark.parametrize("name, params", [
    ("llama3-70b", 70_553_706_496),
    ("llama3-8b", 8_030_261_248),
    ("smollm2-135m", 134_515_008),
])
def test_parameters_match_the_published_model_sizes(name: str, params: int) -> None:
    plan = plan_evaluators(config(name), gpu_memory_gib=80, nodes=1, gpus_per_node=8)
    assert plan.params == params
    assert plan.weight_bytes == 2 * params


def test_working_memory_is_logits_for_the_loss_and_one_layer_of_activations(llama70b) -> None:
    plan = plan_evaluators(llama70b, 80, nodes=1, gpus_per_node=8, seq_len=2048, batch_size=1)
    # bfloat16 logits, their float32 copy and the float32 log-softmax: 2 + 4 + 4 bytes.
    assert plan.logits_bytes == 1 * 2048 * 128256 * 10
    # MLP: gate activation, up projection, product; residual, normed copy, layer input.
    assert plan.activation_bytes == 1 * 2048 * (3 * 28672 + 3 * 8192) * 2
    doubled = plan_evaluators(llama70b, 80, nodes=1, gpus_per_node=8, seq_len=2048, batch_size=2)
    assert doubled.working_bytes == 2 * plan.working_bytes
    assert doubled.weight_bytes == plan.weight_bytes


def test_llama3_70b_on_80gb_gpus_needs_a_pair(llama70b) -> None:
    plan = plan_evaluators(llama70b, gpu_memory_gib=80, nodes=1, gpus_per_node=8)
    assert plan.gpus_per_evaluator == 2
    assert per_gpu_gib(plan, 1) > 80  # the weights alone are 131.4 GiB
    assert per_gpu_gib(plan, 2) <= 80
    assert plan.per_gpu_bytes / GIB == pytest.approx(per_gpu_gib(plan, 2))
    assert plan.evaluators == 4


def test_llama3_70b_on_141gb_gpus_fits_one_gpu_at_batch_1_but_not_at_batch_4(llama70b) -> None:
    plan = plan_evaluators(llama70b, gpu_memory_gib=141, nodes=1, gpus_per_node=8)
    assert plan.gpus_per_evaluator == 1
    assert 131 < per_gpu_gib(plan, 1) <= 141
    wide = plan_evaluators(llama70b, gpu_memory_gib=141, nodes=1, gpus_per_node=8, batch_size=4)
    assert per_gpu_gib(wide, 1) > 141
    assert wide.gpus_per_evaluator == 2


def test_llama3_70b_on_40gb_a100s_needs_four(llama70b) -> None:
    plan = plan_evaluators(llama70b, gpu_memory_gib=40, nodes=2, gpus_per_node=8)
    assert plan.gpus_per_evaluator == 4
    assert plan.evaluators == 4


def test_float32_doubles_the_weights(llama70b) -> None:
    plan = plan_evaluators(llama70b, gpu_memory_gib=80, nodes=1, gpus_per_node=8, dtype="float32")
    assert plan.weight_bytes == 4 * plan.params
    assert plan.gpus_per_evaluator == 4


@pytest.mark.parametrize("gpu_gib", [24, 80, 141])
def test_llama3_8b_fits_on_one_gpu(gpu_gib: float) -> None:
    plan = plan_evaluators(config("llama3-8b"), gpu_memory_gib=gpu_gib, nodes=2, gpus_per_node=8)
    assert plan.gpus_per_evaluator == 1
    assert plan.evaluators == 16
    assert plan.idle_gpus == 0


@pytest.mark.parametrize("gpu_gib", [8, 80, 141])
def test_smollm2_fits_on_one_gpu(gpu_gib: float) -> None:
    plan = plan_evaluators(config("smollm2-135m"), gpu_memory_gib=gpu_gib, nodes=1, gpus_per_node=1)
    assert plan.gpus_per_evaluator == 1
    assert plan.evaluators == 1


def test_evaluators_on_two_nodes_of_eight(llama70b) -> None:
    plan = plan_evaluators(llama70b, gpu_memory_gib=80, nodes=2, gpus_per_node=8)
    assert (plan.gpus_per_evaluator, plan.evaluators, plan.total_gpus) == (2, 8, 16)
    assert plan.idle_gpus == 0


def test_groups_span_nodes_only_when_a_node_is_too_small(llama70b) -> None:
    plan = plan_evaluators(llama70b, gpu_memory_gib=16, nodes=3, gpus_per_node=8)
    assert plan.gpus_per_evaluator == 16  # 131.4 GiB / 8 = 16.4 GiB > 16 GiB per GPU
    assert plan.evaluators == 1
    assert plan.idle_gpus == 8


def test_group_sizes_are_powers_of_two_inside_a_node_then_whole_nodes() -> None:
    assert group_sizes(nodes=3, gpus_per_node=8) == [1, 2, 4, 8, 16, 24]
    assert group_sizes(nodes=2, gpus_per_node=4) == [1, 2, 4, 8]
    assert group_sizes(nodes=2, gpus_per_node=1) == [1, 2]
    assert group_sizes(nodes=1, gpus_per_node=6) == [1, 2, 4, 6]


def test_evaluator_count_keeps_small_groups_inside_a_node() -> None:
    assert evaluator_count(4, nodes=2, gpus_per_node=6) == 2  # 2 GPUs idle per node
    assert evaluator_count(16, nodes=5, gpus_per_node=8) == 2
    assert evaluator_count(1, nodes=3, gpus_per_node=8) == 24


def test_a_cluster_too_small_for_one_copy_names_the_numbers(llama70b) -> None:
    with pytest.raises(ValueError) as err:
        plan_evaluators(llama70b, gpu_memory_gib=24, nodes=1, gpus_per_node=4)
    message = str(err.value)
    for number in ("70.55 B", "131.4 GiB", "all 4 GPUs (1 node x 4 GPUs)", "24 GiB", "38.4 GiB"):
        assert number in message


def test_working_memory_beyond_one_gpu_errors_whatever_the_cluster() -> None:
    with pytest.raises(ValueError, match="smaller seq_len or batch_size"):
        plan_evaluators(config("smollm2-135m"), gpu_memory_gib=8, nodes=64, gpus_per_node=8,
                        batch_size=512)


@pytest.mark.parametrize("field, kwargs", [
    ("nodes", {"nodes": 0}),
    ("gpus_per_node", {"gpus_per_node": -1}),
    ("gpu_memory_gib", {"gpu_memory_gib": 0}),
    ("seq_len", {"seq_len": 0}),
    ("batch_size", {"batch_size": 0}),
])
def test_bad_numbers_name_their_field(llama70b, field: str, kwargs: dict) -> None:
    args = {"gpu_memory_gib": 80, "nodes": 1, "gpus_per_node": 8, **kwargs}
    with pytest.raises(ValueError, match=field):
        plan_evaluators(llama70b, **args)


def test_unknown_dtype_is_named(llama70b) -> None:
    with pytest.raises(ValueError, match="'int3'"):
        plan_evaluators(llama70b, 80, 1, 8, dtype="int3")


def test_a_transformers_config_object_plans_like_its_mapping(llama70b) -> None:
    from transformers import LlamaConfig

    from_object = plan_evaluators(LlamaConfig(**llama70b), 80, nodes=2, gpus_per_node=8)
    assert from_object == plan_evaluators(llama70b, 80, nodes=2, gpus_per_node=8)


def test_describe_states_the_budget_and_the_groups(llama70b) -> None:
    text = plan_evaluators(llama70b, gpu_memory_gib=80, nodes=2, gpus_per_node=8).describe()
    lines = text.splitlines()
    assert len(lines) == 7
    assert "70.55 B parameters, bfloat16" in lines[0]
    assert "131.4 GiB" in lines[1]
    assert "1 x 2048 tokens x 128256 vocab x 10 bytes" in lines[2]
    assert "of 80.0 GiB with 2 GPUs per evaluator" in lines[4]
    assert "2 nodes x 8 GPUs = 16 GPUs" in lines[5]
    assert "8 groups of 2 GPUs (0 GPUs idle)" in lines[6]


@settings(max_examples=60, deadline=None)
@given(
    gpu_gib=st.floats(min_value=20, max_value=200),
    nodes=st.integers(min_value=1, max_value=4),
    gpus_per_node=st.sampled_from([1, 2, 4, 8]),
    batch_size=st.integers(min_value=1, max_value=8),
)
def test_the_group_is_the_smallest_candidate_that_fits(
    llama70b, gpu_gib: float, nodes: int, gpus_per_node: int, batch_size: int
) -> None:
    gpu_bytes = int(gpu_gib * GIB)
    try:
        plan = plan_evaluators(llama70b, gpu_gib, nodes, gpus_per_node, batch_size=batch_size)
    except ValueError:
        largest = nodes * gpus_per_node
        probe = plan_evaluators(llama70b, 10_000, 1, 1, batch_size=batch_size)
        assert per_gpu_gib(probe, largest) * GIB > gpu_bytes
        return
    candidates = group_sizes(nodes, gpus_per_node)
    index = candidates.index(plan.gpus_per_evaluator)
    assert plan.per_gpu_bytes <= gpu_bytes
    assert all(per_gpu_gib(plan, smaller) * GIB > gpu_bytes for smaller in candidates[:index])
    assert plan.evaluators * plan.gpus_per_evaluator <= plan.total_gpus
    assert plan.evaluators >= 1


def test_load_config_file_reads_a_file_or_a_model_directory(tmp_path: Path) -> None:
    fields = json.loads((CONFIGS / "llama3-8b.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert load_config_file(tmp_path) == fields
    assert load_config_file(tmp_path / "config.json") == fields


def test_load_config_file_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model config at .*missing"):
        load_config_file(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_config_file(tmp_path)  # a directory without config.json
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_config_file(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[]")
    with pytest.raises(ValueError, match="JSON list"):
        load_config_file(listed)


def test_auto_gpus_take_the_planned_groups_of_the_connected_cluster(monkeypatch) -> None:
    """`gpus_per_evaluator: auto`: the planner sizes groups from the cluster's GPUs."""
    import prunetune.cluster.plan as plan_module
    from prunetune.evaluators.sharded.group import ShardedEvaluatorGroup
    from prunetune.orchestrator.spec import load_spec
    from prunetune.orchestrator.pool import evaluator_class_for
    from prunetune.orchestrator.search import plan_resources

    model = str(CONFIGS / "llama3-70b.json")
    spec = load_spec({"model": model, "dtype": "bfloat16",
                      "evaluation": {"seq_len": 2048, "batch_size": 1, "mode": "masked"},
                      "resources": {"gpus_per_evaluator": "auto"}})
    monkeypatch.setattr(plan_module, "cluster_gpus", lambda: (2, 8, 79.6))
    planned = plan_resources(spec)
    assert planned.resources.gpus_per_evaluator == 2 and planned.resources.evaluators == 8
    assert planned.resources.sharding == "tp"  # in a node, and 8 KV heads split over 2
    group = evaluator_class_for(planned)
    assert issubclass(group, ShardedEvaluatorGroup)
    monkeypatch.setattr(plan_module, "cluster_gpus", lambda: (1, 2, 139.8))
    small = load_spec({"model": str(CONFIGS / "llama3-8b.json"), "dtype": "bfloat16",
                       "resources": {"gpus_per_evaluator": "auto"}})
    one_each = plan_resources(small).resources
    assert (one_each.gpus_per_evaluator, one_each.evaluators, one_each.sharding) == (1, 2, "none")
    assert plan_resources(load_spec({})) == load_spec({})


def test_auto_groups_shard_with_tp_inside_a_node_when_the_widths_split(monkeypatch) -> None:
    """Otherwise ZeRO-3: a group across nodes, or SmolLM2's 3 KV heads over 2 GPUs."""
    import prunetune.cluster.plan as plan_module
    from prunetune.orchestrator.search import plan_resources
    from prunetune.orchestrator.spec import load_spec

    def sharding(model: str, cluster: tuple[int, int, float]) -> tuple[int, str]:
        monkeypatch.setattr(plan_module, "cluster_gpus", lambda: cluster)
        spec = load_spec({"model": str(CONFIGS / model), "dtype": "bfloat16",
                          "evaluation": {"mode": "masked", "batch_size": 1},
                          "resources": {"gpus_per_evaluator": "auto"}})
        r = plan_resources(spec).resources
        return r.gpus_per_evaluator, r.sharding

    assert sharding("llama3-70b.json", (1, 8, 79.6)) == (2, "tp")
    assert sharding("llama3-70b.json", (4, 1, 79.6)) == (2, "zero3")
    assert sharding("smollm2-135m.json", (1, 8, 2.4)) == (2, "zero3")


def test_an_unset_batch_is_the_largest_the_planned_group_holds(llama70b) -> None:
    """`batch_size=None`: groups sized for one window, then the batch filling what is left."""
    plan = plan_evaluators(llama70b, gpu_memory_gib=80, nodes=1, gpus_per_node=8,
                           batch_size=None)
    assert plan.gpus_per_evaluator == 2 and plan.batch_size == 3
    assert plan.per_gpu_bytes <= 80 * GIB
    wider = plan_evaluators(llama70b, 80, nodes=1, gpus_per_node=8, batch_size=4)
    assert wider.gpus_per_evaluator == 4  # what batch 4 would have asked for instead
    capped = plan_evaluators(config("llama3-8b"), 80, nodes=1, gpus_per_node=8,
                             batch_size=None, max_batch=6)
    assert capped.gpus_per_evaluator == 1 and capped.batch_size == 6


def test_auto_batch_is_planned_with_the_groups(monkeypatch) -> None:
    import prunetune.cluster.plan as plan_module
    from prunetune.orchestrator.search import plan_resources
    from prunetune.orchestrator.spec import load_spec

    monkeypatch.setattr(plan_module, "cluster_gpus", lambda: (1, 4, 79.6))
    spec = load_spec({"model": str(CONFIGS / "llama3-70b.json"), "dtype": "bfloat16",
                      "evaluation": {"mode": "masked", "windows": 64, "seq_len": 2048},
                      "resources": {"gpus_per_evaluator": "auto", "sharding": "tp"}})
    assert spec.evaluation.batch_size == "auto" and spec.evaluator_settings().batch_size == 4
    planned = plan_resources(spec)
    assert planned.evaluation.batch_size == 3 and planned.resources.sharding == "tp"
    assert planned.evaluator_settings().batch_size == 3
    few = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(
        update={"windows": 1})})
    assert plan_resources(few).evaluation.batch_size == 1
    fixed = load_spec({"model": str(CONFIGS / "llama3-70b.json"), "dtype": "bfloat16",
                       "evaluation": {"mode": "masked", "batch_size": 1},
                       "resources": {"gpus_per_evaluator": "auto"}})
    assert plan_resources(fixed).evaluation.batch_size == 1


def test_auto_gpus_on_a_cluster_without_gpus_says_so() -> None:
    import ray

    from prunetune.cluster.plan import cluster_gpus

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        with pytest.raises(ValueError, match="gpus_per_evaluator: auto needs GPUs"):
            cluster_gpus()
    finally:
        ray.shutdown()
