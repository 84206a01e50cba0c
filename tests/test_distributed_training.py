"""Distillation and super-network training on Ray Train workers with DeepSpeed ZeRO: equal
to one process, resumable."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

pytest.importorskip("deepspeed")
import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402

import test_distill  # noqa: E402
import test_supernet  # noqa: E402
from test_distill import QUICK, pair, states, windows  # noqa: E402
from test_supernet import SETTINGS, model_and_space  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from prunetune.evaluators.perplexity import random_windows  # noqa: E402
from prunetune.training.distill import distill  # noqa: E402
from prunetune.training.distributed import (  # noqa: E402
    WorkerSettings, distill_on_workers, train_on_workers,
)
from prunetune.shared_memory import allreduce_buffers  # noqa: E402
from prunetune.training.settings import SupernetSettings  # noqa: E402
from prunetune.training.supernet import SupernetJob, train_supernet  # noqa: E402

pytestmark = pytest.mark.slow

ray.cloudpickle.register_pickle_by_value(test_distill)
ray.cloudpickle.register_pickle_by_value(test_supernet)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def build(device: torch.device, placement: str = "whole", die_at_forward: int = 0,
          marker: str = "") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The test pair on one thread, the teacher whole; with `die_at_forward`, the first
    worker of the first attempt (no `marker` file yet) is killed at that student forward
    pass."""
    torch.set_num_threads(1)
    teacher, student = pair()
    die_at(student, die_at_forward, marker)
    return teacher.to(device), student.to(device)


def die_at(student: torch.nn.Module, forward: int, marker: str) -> None:
    """With `forward`, the first worker of the first attempt (no `marker` file yet) is
    killed at that student forward pass."""
    if forward and not os.path.exists(marker) and int(os.environ.get("RANK", 0)) == 0:
        calls = [0]

        def count(*_: object) -> None:
            calls[0] += 1
            if calls[0] == forward:
                Path(marker).touch()
                os._exit(9)

        student.model.embed_tokens.register_forward_hook(count)


def save_to(path: Path, student: torch.nn.Module) -> None:
    torch.save(states(student), path)


@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_two_gloo_workers_train_what_one_process_does(tmp_path: Path, zero_stage: int) -> None:
    teacher, alone = pair()
    reference = distill(teacher, alone, windows(), QUICK)
    buffers_before = allreduce_buffers()

    workers = WorkerSettings(workers=2, storage=str(tmp_path / "ray"), name="two",
                             use_gpu=False, zero_stage=zero_stage)
    result = distill_on_workers(build, windows(), QUICK, workers,
                                finish=functools.partial(save_to, tmp_path / "student.pt"))
    assert result.steps == reference.steps == 12 and result.tokens == reference.tokens
    assert result.tokens_per_s > 0
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=1e-7)
    trained = torch.load(tmp_path / "student.pt", weights_only=True)
    torch.testing.assert_close(trained, states(alone), rtol=1e-5, atol=1e-6)
    assert allreduce_buffers() <= buffers_before


def partitioned_build(folder: str, shares: str, device: torch.device, placement: str,
                      die_at_forward: int = 0,
                      marker: str = "") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The test pair, its teacher loaded partitioned from `folder` (the whole teacher saved
    there); at every teacher pass, each worker writes to `shares`-<rank> the elements of
    the teacher that its partitions hold and the teacher's elements. `die_at_forward` and
    `marker` as for `build`."""
    from prunetune.evaluators.sharded.zero3 import load_sharded

    torch.set_num_threads(1)
    teacher = load_sharded(folder, torch.float32)

    def record(*_: object) -> None:
        held = sum(p.ds_tensor.numel() for p in teacher.parameters())
        whole = sum(p.ds_numel for p in teacher.parameters())
        Path(f"{shares}-{os.environ['RANK']}").write_text(json.dumps([held, whole]))

    teacher.model.embed_tokens.register_forward_hook(record)
    student = pair()[1]
    die_at(student, die_at_forward, marker)
    return teacher, student.to(device)


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_partitioned_teacher_trains_what_a_whole_one_does(tmp_path: Path,
                                                           zero_stage: int) -> None:
    teacher, alone = pair()
    teacher.save_pretrained(tmp_path / "teacher")
    reference = distill(teacher, alone, windows(), QUICK)

    workers = WorkerSettings(workers=2, storage=str(tmp_path / "ray"), name="partitioned",
                             use_gpu=False, zero_stage=zero_stage, teacher="partitioned")
    build = functools.partial(partitioned_build, str(tmp_path / "teacher"),
                              str(tmp_path / "shares"))
    result = distill_on_workers(build, windows(), QUICK, workers,
                                finish=functools.partial(save_to, tmp_path / "student.pt"))
    assert result.steps == reference.steps == 12
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=1e-7)
    trained = torch.load(tmp_path / "student.pt", weights_only=True)
    torch.testing.assert_close(trained, states(alone), rtol=1e-5, atol=1e-6)
    whole = sum(p.numel() for p in teacher.parameters())
    for rank in (0, 1):
        held, counted = json.loads((tmp_path / f"shares-{rank}").read_text())
        assert counted == whole and whole / 2 <= held < whole / 2 * 1.01


def killed_then_resumed(tmp_path: Path, storage: str, zero_stage: int,
                        stored: Callable[[], object] = lambda: True,
                        teacher: str = "whole") -> tuple:
    """A 2-worker run killed in step 7, then started again; `stored()` is checked in
    between (that the checkpoints reached the storage). The resumed run must end where
    one process does. With `teacher` "partitioned", the teacher is partitioned over the
    workers. Returns the run's workers, build, finish and result."""
    marker = tmp_path / "killed"
    made = build
    if teacher == "partitioned":
        pair()[0].save_pretrained(tmp_path / "teacher")
        made = functools.partial(partitioned_build, str(tmp_path / "teacher"),
                                 str(tmp_path / "shares"))
    dying = functools.partial(made, die_at_forward=7, marker=str(marker))
    workers = WorkerSettings(workers=2, storage=storage, name="killed",
                             use_gpu=False, zero_stage=zero_stage, teacher=teacher)
    finish = functools.partial(save_to, tmp_path / "student.pt")
    with pytest.raises(RuntimeError, match="failed"):
        distill_on_workers(dying, windows(), QUICK, workers, finish=finish)
    assert marker.exists() and stored()

    result = distill_on_workers(dying, windows(), QUICK, workers, finish=finish)
    teacher, alone = pair()
    reference = distill(teacher, alone, windows(), QUICK)
    # Killed in step 7: the checkpoint of step 6, or an earlier one that Ray had
    # registered when the worker died (its controller registers reports asynchronously,
    # later on a loaded machine).
    assert result.resumed_from in (2, 4, 6) and result.steps == 12
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=1e-7)
    trained = torch.load(tmp_path / "student.pt", weights_only=True)
    torch.testing.assert_close(trained, states(alone), rtol=1e-5, atol=1e-6)
    return workers, dying, finish, result


@pytest.mark.parametrize("zero_stage, teacher", [(0, "whole"), (2, "whole"),
                                                  (2, "partitioned")])
def test_a_killed_worker_run_resumes_from_its_last_checkpoint(tmp_path: Path, zero_stage: int,
                                                              teacher: str) -> None:
    workers, dying, finish, result = killed_then_resumed(tmp_path, str(tmp_path / "ray"),
                                                         zero_stage, teacher=teacher)
    (tmp_path / "student.pt").unlink()
    again = distill_on_workers(dying, windows(), QUICK, workers, finish=finish)
    assert again == result and not (tmp_path / "student.pt").exists()


def test_steps_that_do_not_split_over_the_workers_are_refused(tmp_path: Path) -> None:
    workers = WorkerSettings(workers=3, storage=str(tmp_path), name="three", use_gpu=False)
    with pytest.raises(ValueError, match="8 windows per step do not split evenly over 3"):
        distill_on_workers(build, windows(), QUICK, workers)


def supernet_model(device: torch.device) -> tuple[torch.nn.Module, None]:
    """The super-network test's model on one thread, unsorted."""
    torch.set_num_threads(1)
    return model_and_space()[0].to(device), None


def supernet_space(model: torch.nn.Module, scores: None) -> object:
    return model_and_space()[1]


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_gloo_workers_train_the_super_network_one_process_does(tmp_path: Path,
                                                                    zero_stage: int) -> None:
    train, strategy = random_windows(96, 64, 32), SupernetSettings("sandwich", 1)
    alone, space = model_and_space()
    reference = train_supernet(alone, space, train, SETTINGS, strategy)

    job = SupernetJob(supernet_model, supernet_space, str(tmp_path / "out"), strategy)
    workers = WorkerSettings(workers=2, storage=str(tmp_path / "ray"), name="supernet",
                             use_gpu=False, zero_stage=zero_stage)
    result = train_on_workers(job, train, SETTINGS, workers)
    assert result.steps == reference.steps == 6
    torch.testing.assert_close(result.losses, reference.losses, rtol=1e-5, atol=1e-7)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(states(trained), states(alone), rtol=1e-5, atol=1e-6)
