"""An evaluator group: one model held across several devices with DeepSpeed.

A model larger than one device is held by N Ray actors (`ShardRank`), one per device, in
one placement group; they form a torch.distributed group (NCCL on GPUs, gloo on CPUs) and
hold the model in one of two ways:

- `zero3`: ZeRO-3 inference. Parameters are partitioned as the model is built
  (`deepspeed.zero.Init`), so no rank ever holds the whole model; each rank scores its
  share of the evaluation windows and the loss sums are all-reduced. With `offload: cpu`
  the partitions live in host memory and stream to the device layer by layer.
- `autotp`: DeepSpeed AutoTP tensor parallelism. Each rank loads the whole model into host
  memory, sorts it by importance, and keeps its slice of every attention and MLP block on
  its device; every rank runs every window.

Sub-networks are masks on the resident model (`apply_masks`): masks act on activations,
so they are exact under any sharding. `ShardedEvaluatorGroup` has the interface of
`Evaluator`, so the orchestrator lends it to trials the same way. A rank that dies or
hangs makes `evaluate` return a failed result within `timeout_s`; the group is then
broken for good (its ranks are killed, and every later result says so with
`evaluator_broken: True`), and the orchestrator replaces it.

Importance: `none`; cached scores (the same file as `Evaluator`'s); `activation`, computed
on the sharded model by all ranks in step (zero3) or on the unsharded model (autotp);
`magnitude` on the unsharded model (autotp only). Weights are sorted by the scores before
sharding (autotp), or one gathered layer at a time (zero3), so that no rank ever holds
more than one layer beyond its share.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from prunetune.evaluators.evaluator import DTYPES, EvaluatorSettings, importance_cache_path
from prunetune.evaluators.data import token_windows
from prunetune.evaluators.latency import LatencyCache, subnet_latency
from prunetune.evaluators.model import (
    cache_dir, is_config_file, load_model, resolve_source,
)
from prunetune.evaluators.perplexity import LOGIT_CHUNK_ELEMENTS, hidden_states
from prunetune.evaluators.surgery import _head_mask, _hook, _prefix_mask, _scale_input, apply_masks
from prunetune.search_spaces.cost import subnet_cost
from prunetune.search_spaces.dims import Adapter, ModelDims, adapter_for
from prunetune.evaluators.importance import (
    ImportanceScores, _descending, _permute_heads, _permute_neurons, _take, activation_scores,
    head_order, magnitude_scores, permute_model,
)
from prunetune.search_spaces.subnet import SubnetConfig

MODES = ("zero3", "autotp")
OFFLOADS = ("none", "cpu")
QUALITY_METRICS = frozenset({"perplexity", "nll", "tokens"})


@dataclass(frozen=True)
class ShardingSettings:
    """How one evaluator group holds its model: ranks (devices), mode, offload, patience.

    `timeout_s` bounds one evaluation and every collective operation of the group.
    """

    ranks: int = 2
    mode: str = "zero3"
    offload: str = "none"
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"sharding.ranks must be at least 1, got {self.ranks}")
        if self.mode not in MODES:
            raise ValueError(f"sharding.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"sharding.offload must be one of {', '.join(OFFLOADS)}, "
                             f"got {self.offload!r}")
        if self.offload != "none" and self.mode != "zero3":
            raise ValueError(f"sharding.offload {self.offload!r} needs mode 'zero3' "
                             f"(AutoTP keeps every slice on its device), got {self.mode!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"sharding.timeout_s must be positive, got {self.timeout_s}")


class GroupBroken(RuntimeError):
    """A rank of the group died, hung or failed inside a collective: the group is unusable."""


def zero3_config(dtype: torch.dtype, offload: str = "none") -> dict[str, Any]:
    """The DeepSpeed config of ZeRO-3 inference: no optimizer, parameters partitioned."""
    zero: dict[str, Any] = {"stage": 3}
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero}
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    elif dtype == torch.float16:
        config["fp16"] = {"enabled": True}
    return config


@contextmanager
def _zero3_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Make transformers build and load models partitioned (zero.Init) inside the block only.

    Outside it, models built on this rank (the latency stand-ins) stay ordinary.
    """
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


def build_random_sharded(config: Any, dtype: torch.dtype, device: str | torch.device,
                         offload: str = "none") -> nn.Module:
    """A model of `config` with random weights, partitioned across the distributed group.

    Every module's weights are created and initialized on `device` and partitioned at once
    (`deepspeed.zero.Init`), so no full copy ever exists, in host memory or on a device.
    Needs torch.distributed initialized (as `ShardRank` does) with a DeepSpeed accelerator
    of `device`'s type.
    """
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    accelerator = get_accelerator().device_name()
    if torch.device(device).type != accelerator:
        raise ValueError(f"device {device} is not DeepSpeed's accelerator ({accelerator}); "
                         "set DS_ACCELERATOR before deepspeed is imported")
    with _zero3_construction(zero3_config(dtype, offload)):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    adapter_for(model)
    return model.eval()


def check_partitionable(source: str) -> None:
    """Fail early for a model source that ZeRO-3 cannot load partitioned (a GGUF file)."""
    if resolve_source(source).endswith(".gguf"):
        raise ValueError(f"model {source!r}: a .gguf file cannot be loaded partitioned; load it "
                         "once with `load_model` and give the dequantized checkpoint directory")


def load_sharded(source: str, dtype: torch.dtype, offload: str = "none") -> nn.Module:
    """A pretrained checkpoint (hub id or local directory) loaded partitioned (ZeRO-3).

    Rank 0 copies the checkpoint into one gathered module at a time, which is then
    partitioned again; the other ranks only receive their partitions.
    """
    from transformers import AutoModelForCausalLM

    check_partitionable(source)
    with _zero3_construction(zero3_config(dtype, offload)):
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    adapter_for(model)
    return model.eval()


def _permute_layer(layer: nn.Module, a: Adapter, d: ModelDims, scores: ImportanceScores,
                   index: int, channels: torch.Tensor) -> None:
    """What `permute_model` does to one decoder layer: heads, neurons, and its channels."""
    heads, groups = head_order(scores.heads[index], d)
    _permute_heads(layer, a, d, heads, groups)
    _permute_neurons(layer, a, _descending(scores.neurons[index]))
    attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
    for norm in (a.input_norm, a.post_attn_norm):
        _take(layer.get_submodule(norm).weight, channels, 0)
    for reader in (attn.get_submodule(a.q), attn.get_submodule(a.k), attn.get_submodule(a.v),
                   mlp.get_submodule(a.gate), mlp.get_submodule(a.up)):
        _take(reader.weight, channels, 1)
    for writer in (attn.get_submodule(a.o), mlp.get_submodule(a.down)):
        _take(writer.weight, channels, 0)
        if writer.bias is not None:
            _take(writer.bias, channels, 0)


@torch.inference_mode()
def permute_partitioned(model: nn.Module, scores: ImportanceScores) -> None:
    """`permute_model` for a ZeRO-3 model: the same permutation, one gathered part at a time.

    Each decoder layer (then each embedding table and the final norm) is gathered on every
    rank, permuted by rank 0, and partitioned again from rank 0's copy.
    """
    import deepspeed

    a, d = adapter_for(model), ModelDims.from_config(model.config)
    first = torch.distributed.get_rank() == 0
    channels = _descending(scores.embed)
    tables = [(model.get_submodule(a.embed).weight, 1), (model.get_submodule(a.lm_head).weight, 1),
              (model.get_submodule(a.final_norm).weight, 0)]
    for param, dim in {id(p): (p, dim) for p, dim in tables}.values():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if first:
                _take(param, channels, dim)
    for i, layer in enumerate(model.get_submodule(a.layers)):
        with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
            if first:
                _permute_layer(layer, a, d, scores, i, channels)


class WindowLoss(nn.Module):
    """The summed negative log-likelihood of a batch of windows, as one module call.

    Under ZeRO-3 it is the engine's top module, so every call is one DeepSpeed step. The
    vocabulary projection runs on a fixed number of row chunks, so that every rank makes
    the same module calls in the same order whatever its batch: ZeRO-3 gathers a module's
    parameters collectively each time it runs. The chunks stay 3-D (`[1, rows, hidden]`)
    because AutoTP's split LM head slices its input as `[batch, len, hidden]`.
    """

    def __init__(self, model: nn.Module, chunks: int) -> None:
        super().__init__()
        self.model = model
        self.chunks = chunks

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states(self.model, ids)[:, :-1].flatten(0, 1)
        targets = ids[:, 1:].reshape(-1)
        head = self.model.get_output_embeddings()
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for h, t in zip(hidden.tensor_split(self.chunks), targets.tensor_split(self.chunks)):
            logits = head(h.unsqueeze(0)).squeeze(0).float()
            total += F.cross_entropy(logits, t, reduction="none").sum(dtype=torch.float64)
        return total


def logit_chunks(model_config: Any, batch_size: int, seq_len: int) -> int:
    """Chunks of a batch's LM-head rows that keep its float32 logits within
    `LOGIT_CHUNK_ELEMENTS`, as `perplexity` does."""
    rows = batch_size * (seq_len - 1)
    return math.ceil(rows / max(1, LOGIT_CHUNK_ELEMENTS // model_config.vocab_size))


@dataclass(frozen=True)
class LocalSlices:
    """The contiguous part of the attention output (query heads) and of the MLP neurons that
    this rank's `o_proj` and `down_proj` read under tensor parallelism."""

    heads: slice
    neurons: slice


@contextmanager
def tensor_parallel_masks(model: nn.Module, subnet: SubnetConfig,
                          local: LocalSlices) -> Iterator[nn.Module]:
    """`apply_masks` for a tensor-parallel model: head and neuron masks cut to this rank.

    Layers and embedding channels are masked by `apply_masks` itself (they are not split);
    removed heads and neurons are zeroed at the input of this rank's slice of `o_proj` and
    `down_proj`.
    """
    d = ModelDims.from_config(model.config)
    subnet.validate(d)
    a = adapter_for(model)
    n = subnet.num_layers
    full_width = replace(subnet, kv_heads=(d.num_kv_heads,) * n, q_per_kv=(d.q_per_kv,) * n,
                         mlp=(d.intermediate_size,) * n)
    layers = model.get_submodule(a.layers)
    like = next(model.parameters())
    with apply_masks(model, full_width), ExitStack() as stack:
        for i, kv, q, m in zip(subnet.layers, subnet.kv_heads, subnet.q_per_kv, subnet.mlp):
            attn, mlp = layers[i].get_submodule(a.attn), layers[i].get_submodule(a.mlp)
            if (kv, q) != (d.num_kv_heads, d.q_per_kv):
                mask = _head_mask(d, kv, q, like)[local.heads]
                stack.enter_context(_hook(attn.get_submodule(a.o).register_forward_pre_hook(
                    _scale_input(mask))))
            if m != d.intermediate_size:
                mask = _prefix_mask(d.intermediate_size, m, like)[local.neurons]
                stack.enter_context(_hook(mlp.get_submodule(a.down).register_forward_pre_hook(
                    _scale_input(mask))))
        yield model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ShardRank:
    """One device of an evaluator group: its part of the model, and its part of each evaluation.

    Every method that touches the model is a collective: the group calls it on all ranks
    at once.
    """

    def __init__(self, rank: int, world: int, use_gpu: bool) -> None:
        os.environ["DS_ACCELERATOR"] = "cuda" if use_gpu else "cpu"
        self.rank, self.world = rank, world
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        self.backend = "nccl" if use_gpu else "gloo"
        self.model: nn.Module | None = None

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
        self._join(master_addr, master_port, local_size)
        tokenizer = self._load_model()
        self.windows = self._windows(tokenizer).to(self.device)
        self.latency_cache = LatencyCache(cache_dir() / "latency" / f"{socket.gethostname()}.json")
        return {**self._held(), "rank": self.rank, "device": str(self.device),
                "host": socket.gethostname(), "pid": os.getpid(),
                "model_config": self.model_config.to_dict(),
                "layer_order": self.scores.layer_order() if self.scores else None,
                "windows": int(self.windows.shape[0]), "tokens": int(self.windows.numel()),
                "load_seconds": time.perf_counter() - start}

    def _join(self, master_addr: str, master_port: int, local_size: int) -> None:
        import deepspeed

        # Ray shows each rank its own device only, so every rank's device is index 0.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          LOCAL_SIZE=str(local_size), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=self.sharding.timeout_s),
                                   verbose=False)

    def _load_model(self) -> Any:
        """Load and sort the model as the mode wants; returns the tokenizer (None if random)."""
        from transformers import AutoTokenizer

        source = self.settings.model
        tokenizer = None
        if self.sharding.mode == "zero3":
            random_weights = is_config_file(source)
            if not random_weights:
                tokenizer = AutoTokenizer.from_pretrained(source)
            self._load_zero3(source, random_weights, tokenizer)
        else:
            full, tokenizer = load_model(source, self.dtype, "cpu")
            self._load_autotp(full, tokenizer)
        self.model_config = self.model.config
        return tokenizer

    def _load_zero3(self, source: str, random_weights: bool, tokenizer: Any) -> None:
        import deepspeed
        from transformers import AutoConfig

        offload = self.sharding.offload
        if random_weights:
            model = build_random_sharded(AutoConfig.from_pretrained(source), self.dtype,
                                         self.device, offload)
        else:
            model = load_sharded(source, self.dtype, offload)
        chunks = logit_chunks(model.config, self.settings.batch_size, self.settings.seq_len)
        self.loss = deepspeed.initialize(model=WindowLoss(model, chunks).eval(),
                                         config=zero3_config(self.dtype, offload))[0]
        self.model = model
        self.scores = self._sorting_scores(lambda: self._sharded_scores(tokenizer))
        if self.scores is not None:
            permute_partitioned(model, self.scores)

    def _sharded_scores(self, tokenizer: Any) -> ImportanceScores:
        """Activation scores of the partitioned model, every rank running the same batches."""
        if self.settings.importance != "activation":
            raise ValueError(f"importance {self.settings.importance!r} reads whole weights, which "
                             "no rank holds in zero3 mode: use 'activation' or 'none', or cache "
                             "the scores with a single-device evaluator first")
        return activation_scores(self.model, self._calibration(tokenizer).to(self.device),
                                 self.settings.batch_size)

    def _load_autotp(self, full: nn.Module, tokenizer: Any) -> None:
        import deepspeed

        if self.device.type == "cpu" and int(os.environ["LOCAL_SIZE"]) != self.world:
            raise RuntimeError("autotp on CPU needs every rank on one node: DeepSpeed's CPU "
                               "all-reduce runs through shared memory")
        self.model = full
        self.scores = self._sorting_scores(lambda: self._full_model_scores(tokenizer))
        if self.scores is not None:
            permute_model(full, self.scores)
        engine = deepspeed.init_inference(full, tensor_parallel={"tp_size": self.world},
                                          dtype=self.dtype, replace_with_kernel_inject=False)
        self.model = engine.module.to(self.device).eval()
        self.local = self._local_slices()
        self.loss = WindowLoss(self.model, logit_chunks(self.model.config, self.settings.batch_size,
                                                        self.settings.seq_len)).eval()

    def _full_model_scores(self, tokenizer: Any) -> ImportanceScores | None:
        """Scores of the unsharded model, computed by rank 0 only."""
        if self.rank != 0:
            return None
        if self.settings.importance == "magnitude":
            return magnitude_scores(self.model)
        return activation_scores(self.model, self._calibration(tokenizer), self.settings.batch_size)

    def _sorting_scores(self, compute: Any) -> ImportanceScores | None:
        """The scores to sort the weights by, the same on every rank: rank 0's cached scores,
        or `compute()` (called on every rank, since it may be collective), rank 0's result
        shared with the others and cached."""
        if self.settings.importance == "none":
            return None
        path = importance_cache_path(self.settings)
        cached = self._from_rank0(ImportanceScores.load(path) if self.rank == 0 and
                                  os.path.isfile(path) else None)
        if cached is not None:
            return cached
        scores = self._from_rank0(compute())
        if self.rank == 0:
            scores.save(path)
        return scores

    def _from_rank0(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        shared = [value]
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        torch.distributed.broadcast_object_list(shared, src=0, device=device)
        return shared[0]

    def _calibration(self, tokenizer: Any) -> torch.Tensor:
        return token_windows(tokenizer, self.settings.calibration, self.settings.seq_len,
                             self.settings.calibration_samples, self.model.config.vocab_size)

    def _windows(self, tokenizer: Any) -> torch.Tensor:
        return token_windows(tokenizer, self.settings.data, self.settings.seq_len,
                             self.settings.windows, self.model.config.vocab_size)

    def _local_slices(self) -> LocalSlices:
        """Where this rank's `o_proj` and `down_proj` inputs sit in the full widths."""
        a = adapter_for(self.model)
        layer = self.model.get_submodule(a.layers)[0]
        widths = (layer.get_submodule(a.attn).get_submodule(a.o).weight.shape[1],
                  layer.get_submodule(a.mlp).get_submodule(a.down).weight.shape[1])
        every = [None] * self.world
        torch.distributed.all_gather_object(every, widths)
        heads_start = sum(w[0] for w in every[:self.rank])
        neurons_start = sum(w[1] for w in every[:self.rank])
        return LocalSlices(slice(heads_start, heads_start + widths[0]),
                           slice(neurons_start, neurons_start + widths[1]))

    def _held(self) -> dict[str, int]:
        """Parameter elements resident on this rank: partitions, plus any gathered in full."""
        held = 0
        for p in self.model.parameters():
            held += p.numel() + (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else 0)
        return {"held_elements": held}

    def evaluate(self, subnet_json: str, metrics: list[str]) -> dict[str, Any]:
        """This rank's part of one evaluation: `{"metrics": ..., "error": ...}`.

        An exception raised here means the ranks may be out of step, and breaks the group;
        a failure outside the collective part (latency, on rank 0) is an `error` only.
        """
        subnet = SubnetConfig.from_json(subnet_json)
        wanted = set(metrics)
        out: dict[str, Any] = {}
        try:
            if wanted & QUALITY_METRICS:
                with self._masked(subnet):
                    out.update(self._perplexity())
        finally:
            self._release_memory()
        if self.rank != 0 or not any(m.startswith("latency") for m in wanted):
            return {"metrics": out, "error": None}
        try:
            out.update(subnet_latency(self.model_config, subnet, self.settings.latency,
                                      torch.device(self.device.type), self.dtype,
                                      self.latency_cache))
        except Exception as exc:  # a failed measurement must not break the group
            return {"metrics": out, "error": f"latency: {type(exc).__name__}: {exc}".splitlines()[0]}
        finally:
            self._release_memory()
        return {"metrics": out, "error": None}

    @contextmanager
    def _masked(self, subnet: SubnetConfig) -> Iterator[nn.Module]:
        if subnet == SubnetConfig.dense(self.model_config):
            yield self.model
        elif self.sharding.mode == "zero3":
            with apply_masks(self.model, subnet) as model:
                yield model
        else:
            with tensor_parallel_masks(self.model, subnet, self.local) as model:
                yield model

    def _perplexity(self) -> dict[str, float]:
        tokens = self.windows.shape[0] * (self.windows.shape[1] - 1)
        nll = self._nll_sum() / tokens
        return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}

    @torch.no_grad()
    def _nll_sum(self) -> float:
        """The loss sum over all windows.

        zero3: each rank scores its share and the sums are all-reduced; every rank runs the
        same number of steps (a rank whose share is used up scores a placeholder window and
        drops it), because each step gathers parameters collectively. autotp: every rank
        scores every window, its slices joined by the all-reduces inside the layers.
        """
        batch_size = self.settings.batch_size
        n = self.windows.shape[0]
        if self.sharding.mode == "zero3":
            share = self.windows.tensor_split(self.world)[self.rank]
            steps = math.ceil(math.ceil(n / self.world) / batch_size)
        else:
            share, steps = self.windows, math.ceil(n / batch_size)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for step in range(steps):
            batch = share[step * batch_size:(step + 1) * batch_size]
            if len(batch):
                total += self.loss(batch)
            else:
                self.loss(self.windows[:1])
        if self.sharding.mode == "zero3":
            torch.distributed.all_reduce(total)
        return total.item()

    def _release_memory(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _wants_gpu(device: str) -> bool:
    """GPU ranks for `cuda...`, CPU ranks for `cpu`; `auto` asks the cluster."""
    import ray

    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return torch.device(device).type == "cuda"


class ShardedEvaluatorGroup:
    """Holds one model sharded over `sharding.ranks` devices; evaluates sub-networks on it.

    Same interface as `Evaluator`: `info()`, and `evaluate()`, which never raises. The
    group always evaluates with masks (`settings.mode` does not apply), and measures cost,
    perplexity and latency (on rank 0's device); zero-shot tasks are not supported.
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
        if self.sharding.mode == "zero3":
            check_partitionable(settings.model)
        self.broken: str | None = None
        self.calls = 0
        self.ranks: list[Any] = []
        use_gpu = _wants_gpu(settings.device)
        self.placement = self._place(use_gpu)
        try:
            self.rank_infos = self._start_ranks(use_gpu)
        except BaseException:
            self.shutdown()
            raise
        self.model_config = self.rank_infos[0]["model_config"]
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
        raise GroupBroken(reason)

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
        dense = SubnetConfig.dense(self.model_config)
        return {"evaluator_id": self.evaluator_id, "device": first["device"],
                "model_config": self.model_config, "load_seconds": self.load_seconds,
                "layer_order": first["layer_order"], "windows": first["windows"],
                "tokens": first["tokens"], "host": first["host"], "pid": os.getpid(),
                "sharding": asdict(self.sharding), "ranks": ranks,
                "params": subnet_cost(self.model_config, dense)["params"], "broken": self.broken}

    def evaluate(self, subnet: SubnetConfig | str, metrics: list[str]) -> dict[str, Any]:
        """Every requested metric of `subnet`, plus status, error and timings.

        Never raises. A rank that dies, hangs past `timeout_s` or fails in a collective
        gives a failed result with `evaluator_broken: True`, as does every later call: the
        group cannot evaluate again and must be replaced.
        """
        self.calls += 1
        start = time.perf_counter()
        result: dict[str, Any] = {"evaluator_id": self.evaluator_id,
                                  "load_seconds": self.load_seconds}
        try:
            if self.broken:
                raise GroupBroken(self.broken)
            if isinstance(subnet, str):
                subnet = SubnetConfig.from_json(subnet)
            subnet.validate(self.model_config)
            result.update(self._measure(subnet, list(metrics)))
        except GroupBroken as exc:
            result.update(status="failed", error=f"evaluator group broken: {exc}",
                          evaluator_broken=True)
        except Exception as exc:  # a failed evaluation must not end the search
            result.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        result["eval_seconds"] = time.perf_counter() - start
        return result

    def _measure(self, subnet: SubnetConfig, metrics: list[str]) -> dict[str, Any]:
        unsupported = [m for m in metrics if m.startswith("acc")]
        if unsupported:
            raise ValueError(f"metrics {unsupported}: zero-shot accuracy is not measured by a "
                             "sharded evaluator group")
        out: dict[str, Any] = dict(subnet_cost(self.model_config, subnet, self.settings.seq_len,
                                               self.dtype_bytes, self.settings.batch_size))
        if QUALITY_METRICS & set(metrics) or any(m.startswith("latency") for m in metrics):
            answers = self._gather([r.evaluate.remote(subnet.to_json(), metrics)
                                    for r in self.ranks], self.sharding.timeout_s)
            out.update(answers[0]["metrics"])
            if answers[0]["error"]:
                return {**out, "status": "failed", "error": answers[0]["error"]}
        return {**out, "status": "ok", "error": None}

    def call_count(self) -> int:
        """How many evaluations this group has run."""
        return self.calls


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def sharded_evaluator_class(sharding: ShardingSettings) -> type[ShardedEvaluatorGroup]:
    """`ShardedEvaluatorGroup` with `sharding` bound, constructed as `(settings, evaluator_id)`
    like every evaluator class the orchestrator's pool starts."""

    class BoundShardedEvaluatorGroup(ShardedEvaluatorGroup):
        def __init__(self, settings: EvaluatorSettings, evaluator_id: str = "evaluator-0") -> None:
            super().__init__(settings, evaluator_id, sharding)

    return BoundShardedEvaluatorGroup
