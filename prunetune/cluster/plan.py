"""How many GPUs one evaluator needs, and how many evaluators a cluster holds.

An evaluator keeps one copy of the model resident and evaluates sub-networks on it
(masks on the full model, so its memory is that of the dense model). A model that does
not fit on one GPU is sharded over a group of GPUs. This module sizes that group from
the model config alone, before any weights are downloaded, so that a user learns what a
search needs before renting the cluster.

Memory of one GPU in a group of N, for one perplexity batch:

- weights: parameters × dtype bytes, split evenly over the N GPUs;
- logits: batch × seq_len × vocab, held three times at the loss — once in the model's
  dtype (the LM head's output), once upcast to float32 for the loss, once as the float32
  log-softmax inside the cross-entropy (`dtype bytes + 8` bytes per element);
- activations: the widest point of a decoder layer in a forward pass without gradients —
  the MLP's gate activation, up projection and their product (3 × intermediate) and the
  residual stream, its normalised copy and the layer's input (3 × hidden), each
  batch × seq_len × dtype bytes. Attention runs through PyTorch's fused SDPA, which
  never holds the seq_len × seq_len score matrix. No KV cache: perplexity needs one
  forward pass per batch, nothing is decoded;
- headroom: a fixed reserve for the CUDA context, cuBLAS workspaces and NCCL buffers,
  plus a share of the working memory for the caching allocator's fragmentation, since
  the transient tensors of a batch are what fragments it.

Working memory (logits and activations) is counted whole on every GPU of a group: the
loss runs on gathered logits, and the residual stream is not split by tensor parallelism.

Checked against PyTorch 2.11 and transformers 5.17 on an H100 and an H200 (random
weights of the Llama-3-8B shapes, of 4 layers of the Llama-3-70B shapes, and of
SmolLM2-135M; seq_len 2048, batch 1 and 4): the measured peak working memory was 84-98%
of the estimate here, the CUDA context took 0.7 GiB, and memory reserved but not
allocated by the caching allocator reached 4-21% of the working memory. The whole
Llama-3-70B in bfloat16 evaluated a batch of 1 x 2048 tokens on one H200 using
135.1 GiB of its 139.8 GiB; this module plans 137.0 GiB for it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prunetune.search_spaces.cost import (
    LOSS_BYTES_PER_LOGIT, activation_working_bytes, count_params, logits_working_bytes,
)
from prunetune.search_spaces.dims import ModelDims
from prunetune.search_spaces.subnet import SubnetConfig

GIB = 2**30

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# The CUDA context with PyTorch's kernels and cuBLAS loaded (0.7 GiB measured), NCCL's
# communication buffers and DeepSpeed's workspaces in a sharded group.
RESERVED_BYTES = 2 * GIB

# Memory the caching allocator holds beyond the working memory, as a share of it.
FRAGMENTATION = 0.25

MAX_BATCH = 16
"""The largest batch the planner chooses: beyond it a forward pass is no faster per token
on the GPUs measured (an H100 and an H200 reached their full rate at batch 4)."""

@dataclass(frozen=True)
class Plan:
    """The memory budget of one evaluator, and the evaluator groups a cluster holds."""

    model_type: str
    params: int
    dtype: str
    dtype_bytes: int
    seq_len: int
    batch_size: int
    vocab_size: int
    weight_bytes: int
    logits_bytes: int
    activation_bytes: int
    headroom_bytes: int
    gpu_memory_bytes: int
    gpus_per_evaluator: int
    nodes: int
    gpus_per_node: int
    evaluators: int

    @property
    def working_bytes(self) -> int:
        """Memory one evaluation batch needs on every GPU of a group."""
        return self.logits_bytes + self.activation_bytes

    @property
    def per_gpu_bytes(self) -> int:
        """Memory one GPU of a group needs: its share of the weights, working memory, headroom."""
        return _per_gpu_bytes(self.weight_bytes, self.working_bytes, self.headroom_bytes,
                              self.gpus_per_evaluator)

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def idle_gpus(self) -> int:
        """GPUs that no evaluator group uses (a remainder the group size does not divide)."""
        return self.total_gpus - self.evaluators * self.gpus_per_evaluator

    def describe(self) -> str:
        """A few lines for a person deciding what cluster a search needs."""
        gpu = self.gpu_memory_bytes / GIB
        group = _plural(self.gpus_per_evaluator, "GPU")
        return "\n".join([
            f"model           {self.model_type}, {self.params / 1e9:.2f} B parameters, "
            f"{self.dtype} ({self.dtype_bytes} bytes)",
            f"weights         {_gib(self.weight_bytes)}",
            f"working memory  {_gib(self.working_bytes)} per GPU: logits "
            f"{_gib(self.logits_bytes)} ({self.batch_size} x {self.seq_len} tokens x "
            f"{self.vocab_size} vocab x {self.dtype_bytes + LOSS_BYTES_PER_LOGIT} bytes), "
            f"activations {_gib(self.activation_bytes)}",
            f"headroom        {_gib(self.headroom_bytes)} per GPU: "
            f"{_gib(RESERVED_BYTES)} CUDA context and buffers + "
            f"{FRAGMENTATION:.0%} of the working memory for fragmentation",
            f"per GPU         {_gib(self.per_gpu_bytes)} of {gpu:.1f} GiB with "
            f"{group} per evaluator",
            f"cluster         {_plural(self.nodes, 'node')} x {self.gpus_per_node} GPUs "
            f"= {self.total_gpus} GPUs",
            f"evaluators      {_plural(self.evaluators, 'group')} of {group} "
            f"({_plural(self.idle_gpus, 'GPU')} idle)",
        ])


def plan_evaluators(
    model_config: Any,
    gpu_memory_gib: float,
    nodes: int,
    gpus_per_node: int,
    dtype: str = "bfloat16",
    seq_len: int = 2048,
    batch_size: int | None = 1,
    max_batch: int = MAX_BATCH,
) -> Plan:
    """Size the evaluator groups of a cluster of `nodes` × `gpus_per_node` GPUs.

    `model_config` is a Hugging Face config object or a mapping of its fields.
    A group is the smallest power of two GPUs (1, 2, 4, ... up to a node), then whole
    nodes (multiples of `gpus_per_node`), whose GPUs together hold the weights with each
    GPU keeping working memory and headroom free. Groups that fit in a node never span
    two nodes. A `batch_size` of None is chosen: the group is sized for batches of one,
    then the batch is the largest up to `max_batch` whose working memory the group's GPUs
    still hold. Raises ValueError, naming the numbers, when not even the whole cluster
    holds one copy.
    """
    _check_positive(gpu_memory_gib=gpu_memory_gib, nodes=nodes, gpus_per_node=gpus_per_node,
                    seq_len=seq_len, batch_size=1 if batch_size is None else batch_size,
                    max_batch=max_batch)
    dtype_bytes = _dtype_bytes(dtype)
    dims = ModelDims.from_config(model_config)
    dense = SubnetConfig.dense(dims)
    params = count_params(dims, dense)
    gpu_memory_bytes = int(gpu_memory_gib * GIB)
    weight_bytes = params * dtype_bytes

    def working_at(batch: int) -> int:
        return (logits_working_bytes(dims, seq_len, batch, dtype_bytes)
                + activation_working_bytes(dims, dense, seq_len, batch, dtype_bytes))

    working = working_at(batch_size or 1)
    group = _smallest_group(weight_bytes, working, headroom(working), gpu_memory_bytes,
                            nodes, gpus_per_node)
    if group is None:
        raise ValueError(_no_fit_message(dims, params, dtype, weight_bytes, working,
                                         headroom(working), gpu_memory_gib, nodes, gpus_per_node))
    if batch_size is None:
        batch_size = max(b for b in range(1, max_batch + 1)
                         if _per_gpu_bytes(weight_bytes, working_at(b), headroom(working_at(b)),
                                           group) <= gpu_memory_bytes)
    logits_bytes = logits_working_bytes(dims, seq_len, batch_size, dtype_bytes)
    activation_bytes = activation_working_bytes(dims, dense, seq_len, batch_size, dtype_bytes)
    headroom_bytes = headroom(logits_bytes + activation_bytes)
    return Plan(
        model_type=dims.model_type,
        params=params,
        dtype=dtype,
        dtype_bytes=dtype_bytes,
        seq_len=seq_len,
        batch_size=batch_size,
        vocab_size=dims.vocab_size,
        weight_bytes=weight_bytes,
        logits_bytes=logits_bytes,
        activation_bytes=activation_bytes,
        headroom_bytes=headroom_bytes,
        gpu_memory_bytes=gpu_memory_bytes,
        gpus_per_evaluator=group,
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        evaluators=evaluator_count(group, nodes, gpus_per_node),
    )


def headroom(working_bytes: int) -> int:
    """Memory of a GPU kept beyond weights and batches: CUDA context, buffers, fragmentation."""
    return RESERVED_BYTES + math.ceil(FRAGMENTATION * working_bytes)


def group_sizes(nodes: int, gpus_per_node: int) -> list[int]:
    """Candidate group sizes, smallest first: powers of two inside a node, then whole nodes."""
    sizes = []
    n = 1
    while n < gpus_per_node:
        sizes.append(n)
        n *= 2
    return sizes + [gpus_per_node * k for k in range(1, nodes + 1)]


def evaluator_count(gpus_per_evaluator: int, nodes: int, gpus_per_node: int) -> int:
    """Groups of `gpus_per_evaluator` GPUs a cluster holds; a group inside a node stays in it."""
    if gpus_per_evaluator <= gpus_per_node:
        return nodes * (gpus_per_node // gpus_per_evaluator)
    return nodes // (gpus_per_evaluator // gpus_per_node)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The fields of a model's `config.json`, from the file or the model directory holding it.

    Reads JSON only, so planning needs neither the weights nor a network connection.
    """
    path = Path(path).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no model config at {path}: expected a config.json file or a model "
            f"directory that holds one"
        )
    try:
        fields = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{file} holds a JSON {type(fields).__name__}, not a model config object")
    return fields


def model_config_path(model: str) -> str:
    """The config.json of a model source, without loading weights.

    A GGUF file has none: planning then needs the model's config.json given instead.
    """
    from prunetune.evaluators.model import hub_config_file, resolve_source

    source = Path(resolve_source(model))
    if source.suffix == ".gguf":
        raise ValueError(f"model: {model} is a GGUF file; planning needs a config.json "
                         "(give the model's config.json or checkpoint directory)")
    if source.exists():
        return str(source)
    return hub_config_file(model)


def cluster_gpus() -> tuple[int, int, float]:
    """(nodes with GPUs, GPUs of the smallest such node, GiB of one GPU) of the Ray
    cluster this process is connected to; the memory is read on a GPU by a Ray task."""
    import ray

    per_node = [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]]
    per_node = [g for g in per_node if g > 0]
    if not per_node:
        raise ValueError("resources.gpus_per_evaluator: auto needs GPUs, and the Ray cluster "
                         "has none (set gpus_per_evaluator: 0 to evaluate on CPUs)")
    memory = ray.get(ray.remote(num_gpus=1)(_gpu_memory_gib).remote())
    return len(per_node), min(per_node), memory


def _gpu_memory_gib() -> float:
    import torch

    return torch.cuda.get_device_properties(0).total_memory / GIB


def _per_gpu_bytes(weight_bytes: int, working: int, headroom_bytes: int, group: int) -> int:
    return math.ceil(weight_bytes / group) + working + headroom_bytes


def _smallest_group(weight_bytes: int, working: int, headroom_bytes: int,
                    gpu_memory_bytes: int, nodes: int, gpus_per_node: int) -> int | None:
    for group in group_sizes(nodes, gpus_per_node):
        if _per_gpu_bytes(weight_bytes, working, headroom_bytes, group) <= gpu_memory_bytes:
            return group
    return None


def _no_fit_message(dims: ModelDims, params: int, dtype: str, weight_bytes: int, working: int,
                    headroom_bytes: int, gpu_memory_gib: float, nodes: int,
                    gpus_per_node: int) -> str:
    total = nodes * gpus_per_node
    need = _per_gpu_bytes(weight_bytes, working, headroom_bytes, total)
    return (
        f"the {dims.model_type} model ({params / 1e9:.2f} B parameters, {dtype}) does not fit "
        f"on the cluster: {_gib(weight_bytes)} of weights split over all {total} GPUs "
        f"({_plural(nodes, 'node')} x {gpus_per_node} GPUs), plus {_gib(working)} working "
        f"memory and {_gib(headroom_bytes)} headroom, needs {_gib(need)} per GPU, more than the "
        f"{gpu_memory_gib:g} GiB each GPU has; use more or larger GPUs, or a smaller seq_len "
        f"or batch_size"
    )


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
