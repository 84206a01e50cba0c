"""Shared fixtures: tiny random models of every family and the real SmolLM2-135M."""

from __future__ import annotations

import copy

import pytest
import torch

from prunetune.evaluators.model import load_model, random_model, tiny_config
from prunetune.search_spaces.dims import SUPPORTED_MODEL_TYPES

FAMILIES = [(t, tie) for t in SUPPORTED_MODEL_TYPES for tie in (False, True)]


@pytest.fixture(params=FAMILIES, ids=[f"{t}-{'tied' if tie else 'untied'}" for t, tie in FAMILIES])
def tiny_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    model_type, tied = request.param
    return random_model(tiny_config(model_type, tie_word_embeddings=tied), seed=1)


@pytest.fixture(scope="session")
def smollm2_loaded() -> tuple[torch.nn.Module, object]:
    return load_model("smollm2")


@pytest.fixture
def smollm2(smollm2_loaded: tuple[torch.nn.Module, object]) -> torch.nn.Module:
    """A private copy of SmolLM2-135M that a test may permute."""
    return copy.deepcopy(smollm2_loaded[0])


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_loaded: tuple[torch.nn.Module, object]) -> object:
    return smollm2_loaded[1]
