"""The sharded evaluator group on CPU: 2 ranks, gloo, a tiny random Llama."""

import json
import os
import signal
import time

import pytest
import torch

pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")

from prunetune.evaluators.contract import importance_cache_path
from prunetune.evaluators.evaluator import Evaluator
from prunetune.evaluators.settings import EvaluatorSettings, ShardingSettings
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.perplexity import tokenize_windows
from prunetune.evaluators.data import load_text
from prunetune.evaluators.sharded.group import ShardedEvaluatorGroup, sharded_evaluator_class
from prunetune.search_spaces import SubnetConfig
from prunetune.shared_memory import allreduce_buffers
from prunetune.evaluators.importance import ImportanceScores, activation_scores

# 128 neurons: AutoTP splits MLPs in grains of 64, so each of 2 ranks gets half.
CONFIG = dict(vocab_size=49152, intermediate_size=128)
SUBNETS = {
    "fewer-layers": SubnetConfig((0, 2), (2, 2), (3, 3), (128, 128), 48),
    "fewer-heads": SubnetConfig((0, 1, 2), (1, 2, 2), (2, 3, 1), (128, 128, 128), 48),
    "fewer-neurons": SubnetConfig((0, 1, 2), (2, 2, 2), (3, 3, 3), (128, 70, 5), 48),
    "smaller-embed": SubnetConfig((0, 1, 2), (2, 2, 2), (3, 3, 3), (128, 128, 128), 32),
    "mixed": SubnetConfig((0, 2), (1, 2), (2, 3), (20, 128), 32),
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One cache folder for this process and the Ray workers (they inherit it at ray.init)."""
    path = str(tmp_path_factory.mktemp("cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNETUNE_CACHE", path)
        yield path


@pytest.fixture(scope="module")
def cluster(cache):
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory, smollm2_tokenizer) -> dict[bool, str]:
    """Tiny random Llamas (untied and tied embeddings) with SmolLM2's tokenizer, saved."""
    paths = {}
    for tied in (False, True):
        path = tmp_path_factory.mktemp("tied" if tied else "untied")
        random_model(tiny_config("llama", **CONFIG, tie_word_embeddings=tied), seed=3).save_pretrained(path)
        smollm2_tokenizer.save_pretrained(path)
        paths[tied] = str(path)
    return paths


def make_settings(model: str, **overrides) -> EvaluatorSettings:
    fields = dict(model=model, seq_len=32, windows=5, batch_size=2, calibration_samples=4,
                  importance="activation", mode="masked")
    return EvaluatorSettings(**{**fields, **overrides})


# zero3 holds a model with tied embeddings (one table, partitioned and permuted once),
# autotp one without (AutoTP splits the LM head), tp both. Each mode computes its own
# scores: the zero3 and tp groups on the sharded model, the autotp group on the unsharded
# one.
GROUPS = [pytest.param(("zero3", True), id="zero3-tied", marks=pytest.mark.slow),
          pytest.param(("tp", False), id="tp-untied", marks=pytest.mark.slow),
          pytest.param(("tp", True), id="tp-tied"),
          pytest.param(("autotp", False), id="autotp-untied", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=GROUPS)
def group(request, cluster, tiny_dirs):
    mode, tied = request.param
    settings = make_settings(tiny_dirs[tied])
    buffers_before = allreduce_buffers()
    group = ShardedEvaluatorGroup(settings, f"group-{mode}", ShardingSettings(2, mode, timeout_s=120))
    group.buffers_before = buffers_before
    yield group
    group.shutdown()


def test_sharding_settings_name_the_bad_field() -> None:
    with pytest.raises(ValueError, match="sharding.mode"):
        ShardingSettings(2, "pipeline")
    with pytest.raises(ValueError, match="sharding.offload 'cpu' needs mode 'zero3'"):
        ShardingSettings(2, "autotp", offload="cpu")
    with pytest.raises(ValueError, match="sharding.ranks"):
        ShardingSettings(0)


def test_unsupported_settings_are_refused_before_any_rank_starts(tmp_path) -> None:
    with pytest.raises(ValueError, match="evaluation.tasks"):
        ShardedEvaluatorGroup(make_settings(str(tmp_path), tasks=("piqa",)))
    with pytest.raises(ValueError, match="cannot be loaded partitioned"):
        ShardedEvaluatorGroup(make_settings(str(tmp_path / "model.gguf")))


def test_group_perplexity_equals_the_single_device_evaluator(group) -> None:
    settings = group.settings
    single = Evaluator(settings)
    subnets = {"dense": SubnetConfig.dense(single.model.config), **SUBNETS}
    for name, subnet in subnets.items():
        sharded = group.evaluate(subnet.to_json(), ["perplexity", "params"])
        local = single.evaluate(subnet, ["perplexity", "params"])
        assert sharded["status"] == "ok", (name, sharded["error"])
        assert sharded["perplexity"] == pytest.approx(local["perplexity"], rel=1e-5), name
        assert sharded["params"] == local["params"] and sharded["tokens"] == 5 * 31
    assert group.call_count() == len(subnets)


def test_the_live_group_leaves_no_buffer_in_shared_memory(group) -> None:
    assert group.info()["ranks"]
    assert allreduce_buffers() <= group.buffers_before


def test_no_rank_holds_the_whole_model(group) -> None:
    info = group.info()
    assert info["sharding"]["ranks"] == 2 and len(info["ranks"]) == 2
    assert info["model_config"]["intermediate_size"] == 128 and info["layer_order"] is not None
    assert info["params"] == sum(p.numel() for p in Evaluator(group.settings).model.parameters())
    assert all(0 < r["held_elements"] < info["params"] for r in info["ranks"])
    assert len({r["pid"] for r in info["ranks"]}) == 2


def test_cached_scores_equal_those_of_the_unsharded_model(group) -> None:
    settings = group.settings
    stored = ImportanceScores.load(importance_cache_path(settings))
    single = Evaluator(make_settings(settings.model, importance="none"))
    ids = tokenize_windows(single.tokenizer, load_text(settings.calibration), settings.seq_len,
                           settings.calibration_samples)
    expected = activation_scores(single.model, ids, settings.batch_size)
    for got, want in zip([stored.embed, stored.block_influence, *stored.heads, *stored.neurons],
                         [expected.embed, expected.block_influence, *expected.heads,
                          *expected.neurons]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_a_bad_subnet_fails_and_the_group_goes_on(group) -> None:
    bad = group.evaluate(SubnetConfig((0,), (1,), (1,), (1,), 4096), ["perplexity"])
    assert bad["status"] == "failed" and "embed = 4096" in bad["error"]
    assert "evaluator_broken" not in bad
    assert group.evaluate(SUBNETS["mixed"], ["perplexity"])["status"] == "ok"


def test_a_killed_rank_fails_the_evaluation_and_breaks_the_group(group) -> None:
    """Last of the tests that share a group: it leaves the group broken."""
    assert group.evaluate(SUBNETS["mixed"], ["perplexity"])["status"] == "ok"
    ray.kill(group.ranks[1])
    failed = group.evaluate(SUBNETS["mixed"], ["perplexity"])
    assert failed["status"] == "failed" and failed["evaluator_broken"] is True
    assert "rank 1 died" in failed["error"] and failed["eval_seconds"] < 30
    assert group.ranks == [] and group.placement is None
    again = group.evaluate(SUBNETS["mixed"], ["perplexity"])
    assert again["evaluator_broken"] is True and again["error"] == failed["error"]
    assert again["eval_seconds"] < 1
    assert group.info()["broken"] == failed["error"].removeprefix("evaluator group broken: ")


@pytest.mark.slow
def test_a_hung_rank_times_out_in_a_group_started_as_the_pool_does(cluster, tmp_path) -> None:
    """Random weights from a config file; the group is a Ray actor; rank 1 is stopped."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny_config("llama", **CONFIG).to_dict()))
    settings = make_settings(str(config_file), importance="none")
    group_class = ray.remote(sharded_evaluator_class(ShardingSettings(2, "zero3", timeout_s=15)))
    group = group_class.options(num_cpus=0, max_restarts=0).remote(settings, "group-hang")
    try:
        info = ray.get(group.info.remote())
        assert info["evaluator_id"] == "group-hang" and info["layer_order"] is None
        assert all(0 < r["held_elements"] < info["params"] for r in info["ranks"])
        dense = SubnetConfig.dense(info["model_config"])
        ok = ray.get(group.evaluate.remote(dense.to_json(), ["perplexity"]))
        assert ok["status"] == "ok" and ok["perplexity"] > 1
        os.kill(info["ranks"][1]["pid"], signal.SIGSTOP)
        start = time.monotonic()
        failed = ray.get(group.evaluate.remote(dense.to_json(), ["perplexity"]))
        assert failed["status"] == "failed" and failed["evaluator_broken"] is True
        assert "did not answer within 15 s" in failed["error"]
        assert 15 <= time.monotonic() - start < 40
    finally:
        ray.kill(group)


@pytest.mark.slow
def test_tp_ranks_initialize_only_their_slices_of_random_weights(cluster, tmp_path) -> None:
    """A config file under tp: every rank builds its own slices, none holds the model."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(tiny_config("llama", **CONFIG).to_dict()))
    group = ShardedEvaluatorGroup(make_settings(str(config_file), importance="none"),
                                  "group-tp-random", ShardingSettings(2, "tp", timeout_s=60))
    try:
        info = group.info()
        held = [r["held_elements"] for r in info["ranks"]]
        assert all(0 < h < info["params"] for h in held) and sum(held) < 1.5 * info["params"]
        for subnet in SUBNETS.values():
            result = group.evaluate(subnet.to_json(), ["perplexity"])
            assert result["status"] == "ok" and result["perplexity"] > 1
    finally:
        group.shutdown()


def test_tp_refuses_heads_that_do_not_split_over_the_ranks() -> None:
    from prunetune.evaluators.sharded.tp import check_divisible

    with pytest.raises(ValueError, match="num_key_value_heads = 2 does not split over 4 ranks"):
        check_divisible(tiny_config("llama", **CONFIG), 4)


def test_tp_slicing_computes_only_the_kept_heads_neurons_and_channels() -> None:
    """One rank of one: the sliced forward equals the masked one, and every projection of a
    kept layer multiplies only its kept rows and columns while the layer runs."""
    from prunetune.evaluators.sharded.tp import sliced_evaluation, striped_slices
    from prunetune.evaluators.surgery import apply_masks
    from prunetune.search_spaces.dims import ModelDims

    model = random_model(tiny_config("llama", **CONFIG), seed=3).eval()
    d = ModelDims.from_config(model.config)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    shapes = {}
    layer = model.model.layers[0]
    for name, module in (("q", layer.self_attn.q_proj), ("o", layer.self_attn.o_proj),
                         ("gate", layer.mlp.gate_proj), ("down", layer.mlp.down_proj),
                         ("head", model.lm_head)):
        module.register_forward_pre_hook(
            lambda m, args, name=name: shapes.__setitem__(name, tuple(m.weight.shape)))
    for subnet in SUBNETS.values():
        with torch.no_grad(), apply_masks(model, subnet):
            masked = model(ids).logits
        with torch.no_grad(), sliced_evaluation(model, subnet, striped_slices(d, 0, 1), d):
            sliced = model(ids).logits
        torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)
    # the last, "mixed": layer 0 keeps 1 group of 2 query heads, 20 neurons, 32 channels
    rows = 1 * 2 * d.head_dim
    assert shapes == {"q": (rows, 32), "o": (32, rows), "gate": (20, 32), "down": (32, 20),
                      "head": (d.vocab_size, 32)}
    assert tuple(layer.self_attn.q_proj.weight.shape) == (d.num_heads * d.head_dim, 48)


@pytest.mark.slow
def test_tp_over_a_checkpoint_saved_in_importance_order(cluster, tiny_dirs, tmp_path) -> None:
    """A trained super-network's weights are sorted already: tp stripes them as they are
    and evaluates as the single evaluator does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunetune.evaluators.importance import SORTED_SCORES_FILE, permute_model

    unsorted = make_settings(tiny_dirs[False])
    Evaluator(unsorted)  # computes and caches the checkpoint's scores
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[False])
    in_order = permute_model(model, ImportanceScores.load(importance_cache_path(unsorted)))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_dirs[False]).save_pretrained(tmp_path)
    in_order.save(tmp_path / SORTED_SCORES_FILE)
    settings = make_settings(str(tmp_path))
    group = ShardedEvaluatorGroup(settings, "group-tp-sorted", ShardingSettings(2, "tp", timeout_s=60))
    try:
        single = Evaluator(settings)
        for subnet in (SUBNETS["fewer-heads"], SUBNETS["mixed"]):
            sharded = group.evaluate(subnet.to_json(), ["perplexity"])
            assert sharded["perplexity"] == pytest.approx(
                single.evaluate(subnet, ["perplexity"])["perplexity"], rel=1e-5)
    finally:
        group.shutdown()
