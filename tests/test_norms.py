"""The fused RMSNorm every forward pass of an evaluator or a training step runs."""

from __future__ import annotations

from types import MethodType

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.norms import fused_norms, rms_norm
from prunetune.evaluators.perplexity import hidden_states


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2"])
def test_fused_norms_give_hugging_face_hidden_states_in_float32(model_type: str) -> None:
    model = random_model(tiny_config(model_type))
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = model.base_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(hidden_states(model, ids), expected, rtol=1e-6, atol=1e-6)


def test_a_bfloat16_norm_differs_from_eager_by_one_rounding_at_most() -> None:
    generator = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(256, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256, generator=generator) + 0.5)
    norm = norm.to(torch.bfloat16)
    x = (3 * torch.randn(64, 256, generator=generator)).to(torch.bfloat16)
    eager, fused = norm(x).float(), rms_norm(norm, x).float()
    assert not torch.equal(eager, fused)
    assert ((eager - fused).abs() <= 2 * 2**-8 * eager.abs()).all()


def test_the_norms_are_fused_inside_only() -> None:
    model = random_model(tiny_config())
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    with fused_norms(model):
        assert all("forward" in m.__dict__ for m in norms)
    assert not any("forward" in m.__dict__ for m in norms)


def test_a_norm_patched_before_keeps_its_own_forward() -> None:
    model = random_model(tiny_config())
    final = model.get_submodule("model.norm")
    own = MethodType(lambda self, x: torch.zeros_like(x), final)
    final.forward = own
    with fused_norms(model):
        assert final.forward is own
        assert "forward" in model.get_submodule("model.layers.0.input_layernorm").__dict__
    assert final.forward is own


def test_rms_norm_over_the_first_channels_uses_their_weights() -> None:
    norm = LlamaRMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 9.0))
    x = torch.randn(3, 8)
    expected = LlamaRMSNorm(5, eps=1e-6)
    with torch.no_grad():
        expected.weight.copy_(norm.weight[:5])
    torch.testing.assert_close(rms_norm(norm, x, 5), expected(x[:, :5]))
