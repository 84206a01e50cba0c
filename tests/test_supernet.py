"""Super-network training: the sandwich rule's sub-networks, and one step's gradients."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from prunetune.evaluators.model import random_model, tiny_config
from prunetune.evaluators.perplexity import nll_sum, random_windows
from prunetune.evaluators.surgery import apply_masks
from prunetune.search_spaces.spaces import make_space
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.training import distill as distill_module
from prunetune.training.settings import DistillSettings, SupernetSettings
from prunetune.training.supernet import (
    StepPlan, largest_and_smallest, plan_step, supernet_step, train_supernet,
)


def model_and_space():
    model = random_model(tiny_config(initializer_range=0.2), seed=1)
    return model, make_space("uniform", model.config, min_ratio=0.5)


def test_every_step_trains_the_largest_and_the_smallest() -> None:
    model, space = model_and_space()
    largest, smallest = largest_and_smallest(space)
    assert largest == SubnetConfig.dense(model.config)
    for step in range(3):
        plan = plan_step(space, SupernetSettings(), step, 3, seed=0)
        assert plan.largest == largest and plan.learns_text
        assert plan.distilled[0] == smallest and len(plan.distilled) == 3
    assert smallest.mlp[0] < largest.mlp[0] and smallest.num_layers <= largest.num_layers


def test_a_step_reaches_only_the_weights_its_sub_networks_keep() -> None:
    model = random_model(tiny_config(initializer_range=0.2), seed=1)
    a = SubnetConfig(layers=(0, 2), kv_heads=(1, 1), q_per_kv=(3, 3), mlp=(32, 32), embed=48)
    b = SubnetConfig(layers=(0,), kv_heads=(1,), q_per_kv=(3,), mlp=(16,), embed=48)
    model.zero_grad()
    supernet_step(model, StepPlan(a, True, (b,)), random_windows(96, 4, 32), top_k=8)
    grads = {n: p.grad for n, p in model.named_parameters()}
    layer1 = [n for n in grads if ".layers.1." in n]
    assert layer1 and all(grads[n] is None or not grads[n].any() for n in layer1)
    up = grads["model.layers.0.mlp.up_proj.weight"]
    assert up[:32].abs().sum(1).gt(0).all() and not up[32:].any()
    k = grads["model.layers.2.self_attn.k_proj.weight"]
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert k[:head_dim].any() and not k[head_dim:].any()


def test_training_the_super_network_lowers_the_loss_of_random_sub_networks() -> None:
    torch.manual_seed(0)
    model, space = model_and_space()
    train, held_out = random_windows(96, 64, 32), random_windows(96, 8, 32, seed=1)
    probes = [space.sample(random.Random(i)) for i in range(10)]

    def mean_loss() -> float:
        with torch.no_grad():
            losses = []
            for subnet in probes:
                with apply_masks(model, subnet) as masked:
                    losses.append(nll_sum(masked, held_out).item() / held_out[:, 1:].numel())
        return sum(losses) / len(losses)

    before = mean_loss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        ids = train[(step * 8) % 64:(step * 8) % 64 + 8]
        supernet_step(model, plan_step(space, SupernetSettings(), step, 30, seed=0), ids,
                      top_k=16)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert mean_loss() < before - 0.1


SETTINGS = DistillSettings(tokens=32 * 8 * 6, seq_len=32, micro_batch=4, accumulation=2,
                           lr=3e-3, warmup=0.1, top_k=16, checkpoint_every=2)
"""Six optimizer steps of eight windows, two micro-batches each."""


class Killed(Exception):
    """Stands for a kill between two checkpoints."""


def test_a_killed_super_network_training_resumes_to_the_uninterrupted_result(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train = random_windows(96, 64, 32)
    model, space = model_and_space()
    reference = train_supernet(model, space, train, SETTINGS)
    assert reference.steps == 6 and reference.losses[-1] < reference.losses[0]

    save = distill_module.save_checkpoint

    def save_or_die(folder, *args) -> None:
        if args[-2].step == 4:  # killed before the second checkpoint: steps 3, 4 lost
            raise Killed
        save(folder, *args)

    monkeypatch.setattr(distill_module, "save_checkpoint", save_or_die)
    with pytest.raises(Killed):
        train_supernet(*model_and_space(), train, SETTINGS, checkpoint_dir=tmp_path)
    monkeypatch.setattr(distill_module, "save_checkpoint", save)
    resumed_model, space = model_and_space()
    resumed = train_supernet(resumed_model, space, train, SETTINGS, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2 and resumed.steps == 6
    torch.testing.assert_close(resumed.losses, reference.losses, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_super_network_training_needs_a_top_k() -> None:
    with pytest.raises(ValueError, match="distill.top_k"):
        train_supernet(*model_and_space(), random_windows(96, 8, 32),
                       DistillSettings(tokens=256, seq_len=32))


def test_each_strategy_trains_its_own_sub_networks() -> None:
    _, space = model_and_space()
    largest, _ = largest_and_smallest(space)

    def plans(strategy: str, steps: int = 6) -> list[StepPlan]:
        return [plan_step(space, SupernetSettings(strategy, random_count=2), step, steps, 0)
                for step in range(steps)]

    assert all(p == StepPlan(largest, True) for p in plans("standard"))
    for plan in plans("random"):
        assert not plan.learns_text and len(plan.distilled) == 2
    ats = plans("ats")
    assert [p.learns_text for p in ats] == [False, True] * 3
    assert all(len(p.distilled) == (0 if p.learns_text else 2) for p in ats)
    linear = plans("random_linear", steps=40)
    assert linear[0].learns_text and not linear[-1].learns_text
    first, last = (sum(not p.learns_text for p in half) for half in (linear[:20], linear[20:]))
    assert first < last
    assert plans("random") == plans("random") and plans("random")[0] != plans("random")[1]


def test_a_random_step_distils_from_the_largest_without_training_it_on_the_text() -> None:
    model = random_model(tiny_config(initializer_range=0.2), seed=1)
    largest = SubnetConfig.dense(model.config)
    small = SubnetConfig(layers=(0,), kv_heads=(1,), q_per_kv=(3,), mlp=(16,), embed=48)
    ids = random_windows(96, 4, 32)
    model.zero_grad()
    loss = supernet_step(model, StepPlan(largest, False, (small,)), ids, top_k=8)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is None or not grads[n].any() for n in grads if ".layers.2." in n)
    assert grads["model.layers.0.mlp.up_proj.weight"][:16].any()
    model.zero_grad()
    text = supernet_step(model, StepPlan(largest, True), ids, top_k=8)
    assert model.model.layers[2].mlp.up_proj.weight.grad.any()
    assert float(loss) != pytest.approx(float(text))


@pytest.mark.parametrize("strategy, random_count, message", [
    ("greedy", 2, "supernet.strategy must be one of sandwich"),
    ("random", 0, "supernet.random_count must be at least 1 for the random strategy"),
])
def test_bad_strategy_settings_name_the_field(strategy: str, random_count: int,
                                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SupernetSettings(strategy, random_count)


def test_a_sparse_sub_network_gets_no_gradient_at_its_pruned_weights() -> None:
    model = random_model(tiny_config(initializer_range=0.2), seed=1)
    sparse = SubnetConfig(layers=(0,), kv_heads=(2,), q_per_kv=(3,), mlp=(64,), embed=48,
                          sparsity={"method": "magnitude", "pattern": "2:4", "levels": (0.5,)})
    model.zero_grad()
    supernet_step(model, StepPlan(sparse, True), random_windows(96, 2, 16), top_k=8)
    up = model.model.layers[0].mlp.up_proj
    groups = up.weight.grad.reshape(up.weight.shape[0], -1, 4)
    assert (groups.count_nonzero(-1) <= 2).all() and groups.any()
