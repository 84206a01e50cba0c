import os

import pytest
import torch

from prunetune.evaluators import evaluator as evaluator_module
from prunetune.evaluators.contract import importance_cache_path
from prunetune.evaluators.evaluator import Evaluator, make_actor
from prunetune.evaluators.settings import EvaluatorSettings, LatencySettings
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.search_spaces import SubnetConfig

SUBNET = SubnetConfig(layers=(0, 2), kv_heads=(1, 2), q_per_kv=(2, 3), mlp=(20, 64), embed=32)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2_tokenizer) -> str:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a local checkpoint."""
    path = tmp_path_factory.mktemp("tiny")
    random_model(tiny_config("llama", vocab_size=49152), seed=3).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def settings(tiny_dir, tmp_path, monkeypatch) -> EvaluatorSettings:
    monkeypatch.setenv("PRUNETUNE_CACHE", str(tmp_path / "cache"))
    return EvaluatorSettings(model=tiny_dir, seq_len=32, windows=4, batch_size=2,
                             calibration_samples=4,
                             latency=LatencySettings(prompt_tokens=8, decode_tokens=2, repeats=2,
                                                     warmup=1))


def test_same_subnet_gives_the_same_numbers_twice(settings) -> None:
    evaluator = Evaluator(settings)
    first = evaluator.evaluate(SUBNET, ["perplexity", "params"])
    second = evaluator.evaluate(SUBNET.to_json(), ["perplexity", "params"])
    assert first["status"] == "ok" and first["error"] is None
    assert first["perplexity"] == second["perplexity"] and first["params"] == second["params"]
    assert first["tokens"] == 4 * 31 and first["load_seconds"] > 0 and first["eval_seconds"] > 0
    assert evaluator.call_count() == 2
    dense = evaluator.evaluate(SubnetConfig.dense(evaluator.model.config), ["perplexity"])
    assert dense["perplexity"] != first["perplexity"] and dense["params"] > first["params"]


def test_a_window_span_scores_those_windows_only(settings) -> None:
    """The first windows, then the rest, give the loss of all windows (what a
    multi-fidelity promotion adds up), and a span beyond the windows is a failed result."""
    evaluator = Evaluator(settings)
    whole = evaluator.evaluate(SUBNET, ["perplexity"])
    first = evaluator.evaluate(SUBNET, ["perplexity"], (0, 1))
    rest = evaluator.evaluate(SUBNET, ["perplexity"], (1, 4))
    assert (first["tokens"], rest["tokens"]) == (31, 3 * 31)
    total = first["nll"] * first["tokens"] + rest["nll"] * rest["tokens"]
    assert total / whole["tokens"] == pytest.approx(whole["nll"], rel=1e-6)
    beyond = evaluator.evaluate(SUBNET, ["perplexity"], (2, 6))
    assert beyond["status"] == "failed" and "not within the 4 evaluation windows" in beyond["error"]


def test_masked_and_extracted_modes_agree(settings) -> None:
    extracted = Evaluator(settings).evaluate(SUBNET, ["perplexity"])
    masked_settings = EvaluatorSettings(**{**settings.__dict__, "mode": "masked"})
    masked = Evaluator(masked_settings).evaluate(SUBNET, ["perplexity"])
    assert masked["perplexity"] == pytest.approx(extracted["perplexity"], rel=1e-5)


def test_a_trained_sub_network_is_measured_with_its_own_weights(settings) -> None:
    from prunetune.evaluators.surgery import extract

    evaluator = Evaluator(settings)
    cut = evaluator.measure(SUBNET, {"perplexity"})
    student = extract(evaluator.model, SUBNET)
    assert evaluator.measure(SUBNET, {"perplexity"}, trained=student) == cut
    with torch.no_grad():
        student.lm_head.weight.mul_(0.5)
    trained = evaluator.measure(SUBNET, {"perplexity"}, trained=student)
    assert trained["perplexity"] != cut["perplexity"]
    assert {k: v for k, v in trained.items() if k not in ("perplexity", "nll")} == {
        k: v for k, v in cut.items() if k not in ("perplexity", "nll")}


def test_a_bad_subnet_fails_and_the_evaluator_goes_on(settings) -> None:
    evaluator = Evaluator(settings)
    bad = evaluator.evaluate(SubnetConfig((0,), (1,), (1,), (1,), 4096), ["perplexity"])
    assert bad["status"] == "failed" and "embed = 4096" in bad["error"]
    assert evaluator.evaluate(SUBNET, ["perplexity"])["status"] == "ok"


def test_out_of_memory_is_a_failed_result(settings, monkeypatch) -> None:
    evaluator = Evaluator(settings)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(evaluator_module, "perplexity", out_of_memory)
    failed = evaluator.evaluate(SUBNET, ["perplexity"])
    assert failed["status"] == "failed" and failed["error"].startswith("out of memory")
    monkeypatch.undo()
    assert evaluator.evaluate(SUBNET, ["perplexity"])["status"] == "ok"


def test_importance_scores_are_computed_once_and_reused(settings) -> None:
    first = Evaluator(settings)
    path = importance_cache_path(settings)
    written = os.path.getmtime(path)
    second = Evaluator(settings)
    assert os.path.getmtime(path) == written
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_cost_and_latency_metrics(settings) -> None:
    evaluator = Evaluator(settings)
    result = evaluator.evaluate(SUBNET, ["params", "latency_prefill_ms", "latency_decode_ms"])
    assert result["status"] == "ok"
    assert result["latency_prefill_min_ms"] <= result["latency_prefill_ms"] <= result["latency_prefill_max_ms"]
    assert result["latency_decode_ms"] > 0 and result["peak_memory_bytes"] > 0
    assert "perplexity" not in result
    assert len(evaluator.latency_cache.results) == 1


def test_evaluator_as_a_ray_actor(settings) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        handle = make_actor(settings, "evaluator-ray", num_cpus=1)
        result = ray.get(handle.evaluate.remote(SUBNET, ["perplexity"]))
        local = Evaluator(settings).evaluate(SUBNET, ["perplexity"])
        assert result["evaluator_id"] == "evaluator-ray"
        assert result["perplexity"] == pytest.approx(local["perplexity"], rel=1e-6)
    finally:
        ray.shutdown()


def test_a_config_file_gives_random_weights_of_its_shapes(tmp_path, monkeypatch) -> None:
    """Speed and scale runs: the model is a config.json alone, the windows random tokens."""
    monkeypatch.setenv("PRUNETUNE_CACHE", str(tmp_path / "cache"))
    config_file = tmp_path / "config.json"
    tiny_config("llama").to_json_file(config_file)
    settings = EvaluatorSettings(model=str(config_file), seq_len=16, windows=3, batch_size=2,
                                 calibration_samples=2)
    evaluator = Evaluator(settings)
    assert evaluator.tokenizer is None and tuple(evaluator.windows.shape) == (3, 16)
    assert int(evaluator.windows.max()) < 96 and evaluator.info()["layer_order"] is not None
    first = evaluator.evaluate(SUBNET, ["perplexity"])
    again = Evaluator(settings).evaluate(SUBNET, ["perplexity"])
    assert first["status"] == "ok" and first["perplexity"] == again["perplexity"]
    with pytest.raises(ValueError, match="has no tokenizer to score tasks"):
        Evaluator(EvaluatorSettings(**{**settings.__dict__, "tasks": ("piqa",)}))
    with pytest.raises(FileNotFoundError, match="model config file not found"):
        Evaluator(EvaluatorSettings(**{**settings.__dict__, "model": str(tmp_path / "no.json")}))
