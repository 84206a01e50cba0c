"""Shared fixtures: tiny random models of every family and the real SmolLM2-135M."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root

from prunetune.evaluators.model import load_model, random_model, tiny_config
from prunetune.search_spaces.dims import SUPPORTED_MODEL_TYPES

FAMILIES = [(t, tie) for t in SUPPORTED_MODEL_TYPES for tie in (False, True)]

STALE_BUILD_S = 600
"""A C++ extension build lock older than this is left by a killed build: DeepSpeed's CPU
ops build in seconds, and torch waits forever while the lock is there."""


def pytest_sessionstart(session: pytest.Session) -> None:
    """Remove the locks of extension builds killed before they finished (an earlier test
    run killed while DeepSpeed built its CPU communication op), which would hang every
    distributed test of this run."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    locks = Path(root).glob("*/lock") if root else Path(get_default_build_root()).glob("*/*/lock")
    for lock in locks:
        if time.time() - lock.stat().st_mtime > STALE_BUILD_S:
            lock.unlink(missing_ok=True)


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
