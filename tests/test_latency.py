"""Measured latency: the eager path, the choice of mode, the shape cache, the compiled
decode step against eager decode, and (on a GPU) the captured decode steps against eager
decode."""

import json

import pytest
import torch

from prunetune.evaluators.latency import (
    INDUCTOR_MODE, DecodeGraph, LatencyCache, compile_step, greedy_step, latency_mode,
    latency_model, prefill_greedy, prune_2_4_, semi_structured_layers, semi_structured_linears,
    shape_key, subnet_latency,
)
from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.settings import LatencySettings
from prunetune.evaluators.surgery import random_subnet_model
from prunetune.search_spaces import SubnetConfig

SUBNET = SubnetConfig(layers=(0, 2), kv_heads=(1, 2), q_per_kv=(2, 3), mlp=(20, 64), embed=32)
SMALL = LatencySettings(prompt_tokens=8, decode_tokens=3, repeats=2, warmup=1)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _assert_latency_metrics(result: dict[str, float]) -> None:
    for name in ("prefill", "decode"):
        low, mid, high = (result[f"latency_{name}{s}_ms"] for s in ("_min", "", "_max"))
        assert 0 < low <= mid <= high


def test_eager_latency_on_cpu() -> None:
    result = subnet_latency(tiny_config("llama"), SUBNET, SMALL, "cpu", torch.float32)
    _assert_latency_metrics(result)


@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_captured_modes_need_cuda_and_a_cache_that_advances_on_the_device(mode: str) -> None:
    llama, mistral = tiny_config("llama"), tiny_config("mistral")  # Mistral: sliding window
    asked = LatencySettings(**{**SMALL.__dict__, "mode": mode})
    assert latency_mode(asked, "cuda", llama) == mode
    assert latency_mode(asked, "cpu", llama) == "eager"
    assert latency_mode(asked, "cuda", mistral) == "eager"
    eager = LatencySettings(mode="eager")
    assert latency_mode(eager, "cuda", llama) == "eager"


@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_a_captured_mode_asked_on_cpu_is_measured_and_cached_as_eager(mode: str) -> None:
    cache = LatencyCache()
    asked = LatencySettings(**{**SMALL.__dict__, "mode": mode})
    first = subnet_latency(tiny_config("llama"), SUBNET, asked, "cpu", torch.float32, cache)
    (key,) = cache.results
    assert json.loads(key)["settings"]["mode"] == "eager"
    eager = LatencySettings(**{**SMALL.__dict__, "mode": "eager"})
    again = subnet_latency(tiny_config("llama"), SUBNET, eager, "cpu", torch.float32, cache)
    assert again == first and len(cache.results) == 1


def test_the_shape_key_includes_the_mode() -> None:
    keys = {mode: shape_key(SUBNET, LatencySettings(**{**SMALL.__dict__, "mode": mode}), "cuda",
                            torch.bfloat16)
            for mode in ("graph", "compiled", "eager")}
    assert len(set(keys.values())) == 3
    assert all(json.loads(key)["settings"]["mode"] == mode for mode, key in keys.items())


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="^latency.mode must be one of graph, compiled, eager, "
                                         "got 'turbo'$"):
        LatencySettings(mode="turbo")


def _eager_greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Logits of the prompt's last position, then of each greedy step, on a growing cache."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = [model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:]]
    for _ in range(steps):
        token = logits[-1][:, -1].argmax(-1, keepdim=True)
        logits.append(model(token, past_key_values=cache, use_cache=True).logits)
    return logits


@pytest.mark.slow  # inductor's C++ compilation: about 45 s on 2 CPU cores, 5 s once cached
@torch.inference_mode()
def test_the_compiled_step_gives_the_logits_of_eager_decode_at_every_position() -> None:
    """On CPU: the decode step compiles whole (no graph break) over transformers'
    StaticCache, and one compilation serves every position."""
    from transformers import StaticCache

    config = tiny_config("llama")
    model = random_subnet_model(config, SUBNET, torch.float32, "cpu", seed=2)
    prompt = torch.randint(0, config.vocab_size, (2, 8))
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + 4)
    token = torch.empty(prompt.shape[0], 1, dtype=torch.long)
    step = compile_step(lambda: greedy_step(model, cache, token), INDUCTOR_MODE)
    compiled = [prefill_greedy(model, prompt, cache, token).clone(), step().clone()]
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled += [step().clone() for _ in range(3)]
    for position, (e, c) in enumerate(zip(_eager_greedy(model, prompt, 4), compiled)):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4, msg=f"step {position}")


def _graph_greedy(model: torch.nn.Module, prompt: torch.Tensor, steps: int,
                  inductor_mode: str | None) -> list[torch.Tensor]:
    """The same through a static cache and the captured (compiled or plain) decode step."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps)
    token = torch.empty(prompt.shape[0], 1, dtype=torch.long, device=prompt.device)
    prefill_greedy(model, prompt, cache, token)
    graph = DecodeGraph(model, cache, token, inductor_mode)
    cache.reset()
    logits = [prefill_greedy(model, prompt, cache, token).clone()]
    for _ in range(steps):
        graph.replay(1)
        logits.append(graph.logits.clone())
    return logits


@needs_cuda
@pytest.mark.parametrize("inductor_mode", [None, INDUCTOR_MODE], ids=["graph", "compiled"])
@pytest.mark.parametrize("subnet", [None, SUBNET], ids=["dense", "per-layer-widths"])
@torch.inference_mode()
def test_graph_decode_gives_the_logits_of_eager_decode(subnet: SubnetConfig | None,
                                                       inductor_mode: str | None) -> None:
    config = tiny_config("llama")
    model = (random_model(config, seed=2, device="cuda") if subnet is None
             else random_subnet_model(config, subnet, torch.float32, "cuda", seed=2))
    prompt = torch.randint(0, config.vocab_size, (2, 8), device="cuda")
    eager = _eager_greedy(model, prompt, 6)
    graph = _graph_greedy(model, prompt, 6, inductor_mode)
    for step, (e, g) in enumerate(zip(eager, graph)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4, msg=f"step {step}")


@needs_cuda
@pytest.mark.parametrize("mode", ["graph", "compiled"])
def test_captured_latency_on_a_gpu(mode: str) -> None:
    cache = LatencyCache()
    asked = LatencySettings(**{**SMALL.__dict__, "mode": mode})
    result = subnet_latency(tiny_config("llama"), SUBNET, asked, "cuda", torch.bfloat16, cache)
    _assert_latency_metrics(result)
    assert json.loads(next(iter(cache.results)))["settings"]["mode"] == mode


TWO_FOUR = SubnetConfig(layers=(0, 1, 2), kv_heads=(2, 2, 2), q_per_kv=(2, 2, 2), mlp=(128, 128, 64),
                        embed=64, sparsity={"method": "wanda", "pattern": "2:4",
                                            "levels": (0.5, 0.0, 0.5)})
WIDE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)


def test_2_4_layers_run_semi_structured_on_a_gpu_only() -> None:
    assert semi_structured_layers(TWO_FOUR, "cpu") == [False] * 3
    assert semi_structured_layers(TWO_FOUR, "cuda") == [True, False, True]
    unstructured = SubnetConfig(**{**TWO_FOUR.to_dict(), "sparsity": {
        "method": "wanda", "pattern": "unstructured", "levels": (0.5, 0.5, 0.5)}})
    assert semi_structured_layers(unstructured, "cuda") == [False] * 3
    dense = SubnetConfig(**{**TWO_FOUR.to_dict(), "sparsity": None})
    assert shape_key(TWO_FOUR, SMALL, "cuda", torch.bfloat16) != shape_key(dense, SMALL, "cuda", torch.bfloat16)
    assert shape_key(TWO_FOUR, SMALL, "cpu", torch.float32) == shape_key(dense, SMALL, "cpu", torch.float32)


def test_the_2_4_linears_are_those_of_sparse_layers_whose_shapes_fit() -> None:
    model = random_subnet_model(tiny_config("llama", **WIDE), TWO_FOUR, torch.bfloat16, "cpu")
    linears = semi_structured_linears(model, [True, False, True])
    layers = model.model.layers
    expected = [layers[i].get_submodule(path) for i in (0, 2) for path in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert linears == expected
    narrow = random_subnet_model(tiny_config("llama"), SUBNET, torch.bfloat16, "cpu")
    fitting = semi_structured_linears(narrow, [True, True])
    assert [tuple(l.weight.shape) for l in fitting] == [(32, 64)], "only down_proj of layer 2 fits"


def test_prune_2_4_leaves_two_of_every_four() -> None:
    linear = torch.nn.Linear(64, 32)
    prune_2_4_(linear)
    assert (linear.weight.reshape(32, -1, 4).count_nonzero(-1) == 2).all()


def test_the_latency_model_on_cpu_keeps_dense_weights() -> None:
    model = latency_model(tiny_config("llama", **WIDE), TWO_FOUR, torch.float32, "cpu")
    assert all(p.count_nonzero() == p.numel() for p in model.parameters() if p.dim() == 2)


def test_the_2_4_latency_benchmark_compares_at_equal_nonzero_parameters() -> None:
    import importlib.util
    from pathlib import Path

    from transformers import AutoConfig

    from prunetune.search_spaces.cost import count_nonzero_params, count_params

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "latency.py"
    spec = importlib.util.spec_from_file_location("latency_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = AutoConfig.from_pretrained(str(bench.LLAMA3_8B))
    (_, dense), (_, two_four), (_, structural) = bench.sparsity_targets(config)
    assert two_four.sparsity.pattern == "2:4" and structural.sparsity is None
    nonzero = count_nonzero_params(config, two_four)
    assert count_params(config, two_four) == count_params(config, dense)
    assert abs(count_params(config, structural) - nonzero) < 0.02 * count_params(config, dense)


@needs_cuda
def test_2_4_latency_runs_semi_structured_on_a_gpu() -> None:
    result = subnet_latency(tiny_config("llama", **WIDE), TWO_FOUR, SMALL, "cuda", torch.bfloat16)
    _assert_latency_metrics(result)
