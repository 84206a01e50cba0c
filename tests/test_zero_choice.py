"""The ZeRO stage that training on several workers takes when none is named, and where
the teacher is placed."""

from __future__ import annotations

import pytest

from prunetune.evaluators.model import random_model, tiny_config
from prunetune.training.distributed import (
    WorkerSettings, choose_zero_stage, partitioned_teacher, state_bytes,
)

BILLION = 1_000_000_000


def test_training_state_shrinks_with_the_stage_and_the_workers() -> None:
    params = 1000
    assert state_bytes(params, 0, 2) == 12 * params      # gradients and both moments, whole
    assert state_bytes(params, 1, 2) == 4 * params + 4 * params + 2 * params
    assert state_bytes(params, 2, 2) == 2 * params + 4 * params + 2 * params
    assert state_bytes(params, 3, 2) == 8 * params - 2 * params  # half the weights freed
    assert state_bytes(params, 2, 8) < state_bytes(params, 2, 2)


@pytest.mark.parametrize(("params", "free", "workers", "stage"), [
    (100_000_000, 60 * BILLION, 2, 0),   # a SmolLM2-sized student: plain data parallelism
    (BILLION, 16 * BILLION, 2, 2),       # 12 GB of state whole, 8 GB split over two
    (3 * BILLION, 10 * BILLION, 4, 3),   # only with its weights split too
    (7 * BILLION, 40 * BILLION, 2, 3),   # nothing fits: the most that can be split
])
def test_the_fastest_stage_that_fits_is_chosen(params: int, free: int, workers: int,
                                               stage: int) -> None:
    assert choose_zero_stage(params, free, workers) == stage


def test_workers_choose_unless_a_stage_is_named() -> None:
    assert WorkerSettings(workers=2, storage="/tmp/x", name="n").zero_stage is None
    with pytest.raises(ValueError, match="zero_stage must be one of"):
        WorkerSettings(workers=2, storage="/tmp/x", name="n", zero_stage=4)


def test_the_teacher_is_whole_unless_partitioned_is_asked_for() -> None:
    assert WorkerSettings(workers=2, storage="/tmp/x", name="n").teacher == "whole"
    assert WorkerSettings(workers=2, storage="/tmp/x", name="n", teacher="partitioned")
    with pytest.raises(ValueError, match="teacher must be one of"):
        WorkerSettings(workers=2, storage="/tmp/x", name="n", teacher="halved")


def test_a_teacher_built_whole_is_refused_as_partitioned() -> None:
    with pytest.raises(ValueError, match="teacher: partitioned, but the build made"):
        partitioned_teacher(random_model(tiny_config()))
