"""The driver side of an evaluator group: N rank actors in one placement group, one evaluator.

`ShardedEvaluatorGroup` implements the evaluator contract, so the orchestrator lends it
to trials like a single-device `Evaluator`. A rank that dies or hangs makes `evaluate`
return a failed result within `timeout_s`; the group is then broken for good (its ranks
are killed, and every later result says so with `evaluator_broken: True`), and the
orchestrator replaces it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import torch

from prunetune.evaluators.contract import DTYPES, EvaluatorBase, EvaluatorBroken
from prunetune.evaluators.settings import EvaluatorSettings, ShardingSettings
from prunetune.evaluators.sharded.rank import ShardRank
from prunetune.evaluators.sharded.zero3 import check_partitionable
from prunetune.metrics import wants_accuracy, wants_latency, wants_perplexity
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.subnet import SubnetConfig


def _wants_gpu(device: str) -> bool:
    """GPU ranks for `cuda...`, CPU ranks for `cpu`; `auto` asks the cluster."""
    import ray

    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.device(device).type == "cuda"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ShardedEvaluatorGroup(EvaluatorBase):
    """Holds one model sharded over `sharding.ranks` devices; evaluates sub-networks on it.

    The group always evaluates with masks (`settings.mode` does not apply), and measures
    cost, perplexity and latency (on rank 0's device); zero-shot tasks are not supported.
    """

    def __init__(self, settings: EvaluatorSettings, evaluator_id: str = "evaluator-0",
                 sharding: ShardingSettings | None = None) -> None:
        start = time.perf_counter()
        if settings.tasks:
            raise ValueError(f"evaluation.tasks {list(settings.tasks)}: zero-shot tasks are not "
                             "measured by a sharded evaluator group")
        self.settings = settings
        self.evaluator_id = evaluator_id
        self.sharding = sharding or ShardingSettings()
        if self.sharding.mode in ("zero3", "tp"):
            check_partitionable(settings.model)
        self.broken: str | None = None
        self.ranks: list[Any] = []
        use_gpu = _wants_gpu(settings.device)
        self.placement = self._place(use_gpu)
        try:
            self.rank_infos = self._start_ranks(use_gpu)
        except BaseException:
            self.shutdown()
            raise
        self.config = self.rank_infos[0]["model_config"]
        self.dtype_bytes = DTYPES[settings.dtype].itemsize
        self.load_seconds = time.perf_counter() - start

    def _place(self, use_gpu: bool) -> Any:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        bundle = {"GPU": 1} if use_gpu else {"CPU": 1}
        group = placement_group([bundle] * self.sharding.ranks, strategy="PACK",
                                name=f"prunetune-{self.evaluator_id}-{os.getpid()}")
        ready, _ = ray.wait([group.ready()], timeout=self.sharding.timeout_s)
        if not ready:
            remove_placement_group(group)
            raise RuntimeError(f"{self.evaluator_id}: the cluster did not grant "
                               f"{self.sharding.ranks} x {bundle} within "
                               f"{self.sharding.timeout_s:g} s")
        return group

    def _start_ranks(self, use_gpu: bool) -> list[dict[str, Any]]:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = self.sharding.ranks
        rank_class = ray.remote(ShardRank)
        for i in range(n):
            strategy = PlacementGroupSchedulingStrategy(self.placement, placement_group_bundle_index=i)
            self.ranks.append(rank_class.options(
                num_cpus=0 if use_gpu else 1, num_gpus=1 if use_gpu else 0, max_restarts=0,
                scheduling_strategy=strategy).remote(i, n, use_gpu))
        addresses = self._gather([r.address.remote() for r in self.ranks], None)
        nodes = Counter(a["node_ip"] for a in addresses)
        master = addresses[0]
        return self._gather([r.setup.remote(self.settings, self.sharding, master["node_ip"],
                                             master["port"], nodes[a["node_ip"]])
                             for r, a in zip(self.ranks, addresses)], None)

    def _gather(self, refs: list[Any], timeout_s: float | None) -> list[Any]:
        """Every rank's answer; the first rank that fails, dies or (with a timeout) is late
        breaks the group, without waiting for the others."""
        import ray

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        index = {ref: i for i, ref in enumerate(refs)}
        answers: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=left)
            if not ready:
                late = sorted(index[r] for r in pending)
                self._break(f"ranks {late} did not answer within {timeout_s:g} s")
            i = index[ready[0]]
            try:
                answers[i] = ray.get(ready[0])
            except ray.exceptions.RayActorError as exc:
                self._break(f"rank {i} died: {_first_line(exc)}")
            except ray.exceptions.RayTaskError as exc:
                self._break(f"rank {i} failed: {_first_line(exc.cause or exc)}")
        return [answers[i] for i in range(len(refs))]

    def _break(self, reason: str) -> None:
        self.broken = reason
        self.shutdown()
        raise EvaluatorBroken(reason)

    def shutdown(self) -> None:
        """End every rank and free their devices (a broken group does this itself)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for handle in self.ranks:
            ray.kill(handle, no_restart=True)
        self.ranks = []
        if self.placement is not None:
            remove_placement_group(self.placement)
            self.placement = None

    def info(self) -> dict[str, Any]:
        """What the group holds: model config, layer order, ranks and their shares."""
        first = self.rank_infos[0]
        ranks = [{k: r[k] for k in ("rank", "host", "pid", "device", "held_elements",
                                    "load_seconds")} for r in self.rank_infos]
        dense = SubnetConfig.dense(self.config)
        return {"evaluator_id": self.evaluator_id, "device": first["device"],
                "model_config": self.config, "load_seconds": self.load_seconds,
                "layer_order": first["layer_order"], "windows": first["windows"],
                "tokens": first["tokens"], "host": first["host"], "pid": os.getpid(),
                "sharding": asdict(self.sharding), "ranks": ranks,
                "params": subnet_cost(self.config, dense)["params"], "broken": self.broken}

    def model_config(self) -> Any:
        return self.config

    def measure(self, subnet: SubnetConfig, metrics: set[str],
                span: tuple[int, int] | None = None) -> dict[str, Any]:
        """Cost here; perplexity and latency from the ranks. A rank that dies, hangs past
        `timeout_s` or fails in a collective breaks the group for good."""
        if self.broken:
            raise EvaluatorBroken(self.broken)
        if wants_accuracy(metrics):
            unsupported = sorted(m for m in metrics if m.startswith("acc"))
            raise ValueError(f"metrics {unsupported}: zero-shot accuracy is not measured by a "
                             "sharded evaluator group")
        out: dict[str, Any] = dict(subnet_cost(self.config, subnet, self.settings.seq_len,
                                               self.dtype_bytes, self.settings.batch_size))
        if wants_perplexity(metrics) or wants_latency(metrics):
            answers = self._gather([r.evaluate.remote(subnet.to_json(), sorted(metrics), span)
                                    for r in self.ranks], self.sharding.timeout_s)
            out.update(answers[0]["metrics"])
            if answers[0]["error"]:
                return {**out, "status": "failed", "error": answers[0]["error"]}
        return out

    def release_memory(self) -> None:
        """The driver side holds no model: nothing to release."""


def sharded_evaluator_class(sharding: ShardingSettings) -> type[ShardedEvaluatorGroup]:
    """`ShardedEvaluatorGroup` with `sharding` bound, constructed as `(settings, evaluator_id)`
    like every evaluator class the orchestrator's pool starts."""

    class BoundShardedEvaluatorGroup(ShardedEvaluatorGroup):
        def __init__(self, settings: EvaluatorSettings, evaluator_id: str = "evaluator-0") -> None:
            super().__init__(settings, evaluator_id, sharding)

    return BoundShardedEvaluatorGroup
