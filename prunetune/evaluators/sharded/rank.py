"""One device of an evaluator group: its part of the model, and its part of each evaluation.

Every method that touches the model is a collective: the group calls it on all ranks at
once. How the model is held is the `Holding` of the group's sharding mode.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from prunetune.evaluators.contract import DTYPES, release_memory
from prunetune.evaluators.data import token_windows
from prunetune.evaluators.importance import local_part
from prunetune.evaluators.latency import LatencyCache, latency_cache_file, subnet_latency
from prunetune.evaluators.perplexity import perplexity_metrics, window_span, window_tokens
from prunetune.evaluators.settings import EvaluatorSettings, ShardingSettings
from prunetune.evaluators.sharded.autotp import AutoTPHolding
from prunetune.evaluators.sharded.holding import Holding, RankContext
from prunetune.evaluators.sharded.tp import TensorParallelHolding
from prunetune.evaluators.sharded.zero3 import Zero3Holding
from prunetune.metrics import wants_latency, wants_perplexity
from prunetune.search_spaces.subnet import SubnetConfig
from prunetune.shared_memory import unlink_allreduce_buffer

HOLDINGS: dict[str, type[Holding]] = {"zero3": Zero3Holding, "tp": TensorParallelHolding,
                                      "autotp": AutoTPHolding}


def from_rank0(value: Any, device: torch.device) -> Any:
    """Rank 0's `value` on every rank of the process group, sent through `device` (the
    rank's GPU under nccl, the CPU under gloo)."""
    shared = [value]
    torch.distributed.broadcast_object_list(shared, src=0, device=device)
    return shared[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ShardRank:
    """One rank of an evaluator group (a Ray actor on one device)."""

    def __init__(self, rank: int, world: int, use_gpu: bool) -> None:
        os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
        self.rank, self.world = rank, world
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.backend = "nccl" if use_gpu else "gloo"

    def address(self) -> dict[str, Any]:
        """Where this rank runs, and a free port there (rank 0's becomes the group's)."""
        import ray

        return {"node_ip": ray.util.get_node_ip_address(), "port": _free_port(),
                "host": socket.gethostname(), "pid": os.getpid()}

    def setup(self, settings: EvaluatorSettings, sharding: ShardingSettings, master_addr: str,
              master_port: int, local_size: int) -> dict[str, Any]:
        """Join the group, load the model sorted by importance, tokenize the windows."""
        start = time.perf_counter()
        self.settings, self.sharding = settings, sharding
        self.dtype = DTYPES[settings.dtype]
        self._join(master_addr, master_port, local_size, sharding.timeout_s)
        self.holding = HOLDINGS[sharding.mode]()
        tokenizer = self.holding.load(RankContext(self.rank, self.world, local_size, self.device,
                                                  self.dtype, settings, sharding, self.from_rank0))
        self.model_config = self.holding.model.config
        self.windows = token_windows(tokenizer, settings.data, settings.seq_len, settings.windows,
                                     self.model_config.vocab_size).to(self.device)
        self.latency_cache = LatencyCache(latency_cache_file())
        scores = self.holding.scores
        return {**self._held(), "rank": self.rank, "device": str(self.device),
                "host": socket.gethostname(), "pid": os.getpid(),
                "model_config": self.model_config.to_dict(),
                "layer_order": scores.layer_order() if scores else None,
                "windows": int(self.windows.shape[0]), "tokens": int(self.windows.numel()),
                "load_seconds": time.perf_counter() - start}

    def _join(self, master_addr: str, master_port: int, local_size: int, timeout_s: float) -> None:
        import deepspeed

        # Ray shows each rank its own device only, so every rank's device is index 0.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          LOCAL_SIZE=str(local_size), MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=timeout_s), verbose=False)
        unlink_allreduce_buffer()

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        return from_rank0(value, self.device if self.backend == "nccl" else torch.device("cpu"))

    def _held(self) -> dict[str, int]:
        """Parameter elements resident on this rank: partitions or tensor-parallel slices,
        plus any gathered in full."""
        held = 0
        for p in self.holding.model.parameters():
            held += local_part(p).numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)
        return {"held_elements": held}

    def evaluate(self, subnet_json: str, metrics: list[str],
                 span: tuple[int, int] | None = None) -> dict[str, Any]:
        """This rank's part of one evaluation, perplexity on the windows of `span` (all for
        None): `{"metrics": ..., "error": ...}`.

        An exception raised here means the ranks may be out of step, and breaks the group;
        a failure outside the collective part (latency, on rank 0) is an `error` only.
        """
        subnet = SubnetConfig.from_json(subnet_json)
        out: dict[str, Any] = {}
        try:
            if wants_perplexity(metrics):
                with self._masked(subnet):
                    windows = window_span(self.windows, span)
                    out.update(perplexity_metrics(self._nll_sum(windows), window_tokens(windows)))
        finally:
            release_memory(self.device)
        if self.rank != 0 or not wants_latency(metrics):
            return {"metrics": out, "error": None}
        try:
            out.update(subnet_latency(self.model_config, subnet, self.settings.latency,
                                      torch.device(self.device.type), self.dtype,
                                      self.latency_cache))
        except Exception as exc:  # a failed measurement must not break the group
            return {"metrics": out, "error": f"latency: {type(exc).__name__}: {exc}".splitlines()[0]}
        finally:
            release_memory(self.device)
        return {"metrics": out, "error": None}

    def _masked(self, subnet: SubnetConfig) -> AbstractContextManager[nn.Module]:
        if subnet == SubnetConfig.dense(self.model_config):
            return nullcontext(self.holding.model)
        return self.holding.masked(subnet)

    @torch.no_grad()
    def _nll_sum(self, windows: torch.Tensor) -> float:
        """The loss sum over `windows`.

        Every rank runs the same number of batches: a rank whose share is used up scores
        a placeholder window and drops it, because each forward pass may be collective.
        """
        batch_size = self.settings.batch_size
        share, steps = self.holding.share(windows, batch_size)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for step in range(steps):
            batch = share[step * batch_size:(step + 1) * batch_size]
            if len(batch):
                total += self.holding.loss(batch)
            else:
                self.holding.loss(self.windows[:1])
        self.holding.combine(total)
        return total.item()
