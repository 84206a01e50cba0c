"""Importance of every prunable unit, and the permutation that sorts the weights by it.

A sub-network keeps the first k heads, neurons or channels. Sorting each group of weights
so that the most important unit comes first turns "keep k" into "keep the k most
important". Activation scores follow Minitron (mean magnitude over a calibration batch:
per query head at the input of `o_proj`, per neuron at the input of `down_proj`, per
embedding channel at every RMSNorm output); block influence follows ShortGPT
(1 - cosine similarity of a layer's input and output). Permuting leaves the function
unchanged, because every permuted axis is summed over or normalised as a whole.

The same calibration pass collects the L2 norm of every input channel of every layer's
projections (`InputNorms`), which weight sparsity's Wanda scores (`wanda_scores`) need,
and of every residual channel that its attention and MLP write, which, with the norms of
what they read, choose each block's own channels in the DISP space (`block_channels`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from prunetune.search_spaces.dims import Adapter, ModelDims, adapter_for


@dataclass
class InputNorms:
    """L2 norms over the calibration tokens of the input channels of each layer's
    projections: `attn[i]` of q/k/v (the input norm's output), `o[i]` of o_proj (the query
    heads' outputs), `mlp[i]` of gate/up (the post-attention norm's output) and `down[i]`
    of down_proj (the neurons); and of the residual channels the layer's sub-layers write:
    `attn_out[i]` of o_proj's output, `mlp_out[i]` of down_proj's."""

    attn: list[torch.Tensor]
    o: list[torch.Tensor]
    mlp: list[torch.Tensor]
    down: list[torch.Tensor]
    attn_out: list[torch.Tensor]
    mlp_out: list[torch.Tensor]

    KINDS = ("attn", "o", "mlp", "down", "attn_out", "mlp_out")

    def of(self, a: Adapter, layer: int, projection: str) -> torch.Tensor:
        """The input-channel norms of `projection` (an adapter name, e.g. `a.q`) of `layer`."""
        kind = {a.q: "attn", a.k: "attn", a.v: "attn", a.o: "o",
                a.gate: "mlp", a.up: "mlp", a.down: "down"}[projection]
        return getattr(self, kind)[layer]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat named tensors (`input_norms.<kind>.<layer>`), as the scores file stores them."""
        return {f"input_norms.{kind}.{i}": t for kind in self.KINDS
                for i, t in enumerate(getattr(self, kind))}

    def block_channels(self, layer: int, attn: int, mlp: int) -> "BlockChannels":
        """The residual channels `layer` keeps when its attention reads and writes `attn`
        of them and its MLP `mlp`: each side's highest-norm channels, its reads by the
        normalised input, its writes by the output."""
        return BlockChannels(attn_read=top_channels(self.attn[layer], attn),
                             attn_write=top_channels(self.attn_out[layer], attn),
                             mlp_read=top_channels(self.mlp[layer], mlp),
                             mlp_write=top_channels(self.mlp_out[layer], mlp))

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layers: int) -> "InputNorms | None":
        """What `tensors` wrote; None for a scores file written without input norms, or
        without any of today's kinds (it is computed again)."""
        if any(f"input_norms.{kind}.0" not in tensors for kind in cls.KINDS):
            return None
        return cls(**{kind: [tensors[f"input_norms.{kind}.{i}"] for i in range(layers)]
                      for kind in cls.KINDS})


@dataclass(frozen=True)
class BlockChannels:
    """The residual channels one layer's attention and MLP read and write, ascending."""

    attn_read: torch.Tensor
    attn_write: torch.Tensor
    mlp_read: torch.Tensor
    mlp_write: torch.Tensor

    @classmethod
    def prefix(cls, width: int, device: torch.device | None = None) -> "BlockChannels":
        """The first `width` channels for every read and write (one embedding width)."""
        first = torch.arange(width, device=device)
        return cls(first, first, first, first)

    def to(self, device: torch.device) -> "BlockChannels":
        return BlockChannels(*(t.to(device) for t in (self.attn_read, self.attn_write,
                                                      self.mlp_read, self.mlp_write)))


def top_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest-scoring channels, ascending (ties keep the earlier channel), so
    that a wider choice keeps every channel of a narrower one."""
    return torch.sort(descending(scores)[:keep]).values


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """Wanda's weight scores: |W_ij| * ||X_j||_2, with `input_norms` the L2 norm of every
    input channel j over the calibration tokens (Sun et al. 2023)."""
    return weight.detach().float().abs() * input_norms.to(weight.device).float()[None, :]


def magnitude_weight_scores(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude pruning's weight scores: |W_ij|."""
    return weight.detach().float().abs()


@dataclass(frozen=True)
class InputSlices:
    """The part of the query-head outputs (`num_heads * head_dim`) and of the MLP neurons
    that a model's `o_proj` and `down_proj` read: all of them, or, under tensor
    parallelism, one rank's contiguous slice."""

    heads: slice = field(default_factory=lambda: slice(None))
    neurons: slice = field(default_factory=lambda: slice(None))

    SLICED = ("heads", "neurons", "o", "down")
    """What a tensor-parallel rank scores of its own slice only: the per-head and
    per-neuron scores and the input norms of `o_proj` and `down_proj`."""


def local_input_slices(model: nn.Module, rank: int, world: int) -> InputSlices:
    """Where this tensor-parallel rank's `o_proj` and `down_proj` inputs sit in the full
    widths, from the local widths of every rank (a collective over the default group)."""
    a = adapter_for(model)
    layer = model.get_submodule(a.layers)[0]
    weights = (layer.get_submodule(a.attn).get_submodule(a.o).weight,
               layer.get_submodule(a.mlp).get_submodule(a.down).weight)
    widths = tuple(local_part(w).shape[1] for w in weights)
    every: list[Any] = [None] * world
    torch.distributed.all_gather_object(every, widths)
    heads_start = sum(w[0] for w in every[:rank])
    neurons_start = sum(w[1] for w in every[:rank])
    return InputSlices(slice(heads_start, heads_start + widths[0]),
                       slice(neurons_start, neurons_start + widths[1]))


def local_part(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: a DTensor's local shard, or the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


@dataclass
class ImportanceScores:
    """Scores of one model: higher means more important.

    `heads[i]` has one score per query head of layer i (in the model's head order),
    `neurons[i]` one per MLP neuron, `embed` one per embedding channel, and
    `block_influence` one per layer; `input_norms` are those of the activation criterion
    (None for the others).
    """

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    embed: torch.Tensor
    block_influence: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)
    input_norms: InputNorms | None = None

    def layer_order(self) -> list[int]:
        """Layer indices, most influential first (ShortGPT drops from the end of this)."""
        return torch.argsort(self.block_influence, descending=True, stable=True).tolist()

    def save(self, path: str | Path) -> Path:
        """Write the scores as one safetensors file, so a resumed search reuses them."""
        from safetensors.torch import save_file

        tensors = {"embed": self.embed, "block_influence": self.block_influence}
        for i, (h, n) in enumerate(zip(self.heads, self.neurons)):
            tensors[f"heads.{i}"] = h
            tensors[f"neurons.{i}"] = n
        if self.input_norms is not None:
            tensors.update(self.input_norms.tensors())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                  str(tmp), metadata=self.meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ImportanceScores":
        from safetensors import safe_open
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        n = sum(1 for k in tensors if k.startswith("heads."))
        return cls(heads=[tensors[f"heads.{i}"] for i in range(n)],
                   neurons=[tensors[f"neurons.{i}"] for i in range(n)],
                   embed=tensors["embed"], block_influence=tensors["block_influence"], meta=meta,
                   input_norms=InputNorms.from_tensors(tensors, n))


class _Accumulator:
    """Sums of per-unit activation magnitudes collected by forward hooks."""

    def __init__(self, model: nn.Module, slices: InputSlices) -> None:
        self.model = model
        self.a = adapter_for(model)
        self.d = ModelDims.from_config(model.config)
        rows = slices.heads
        self.part = {"o": rows, "down": slices.neurons, "neurons": slices.neurons,
                     "heads": slice(None) if rows.start is None
                     else slice(rows.start // self.d.head_dim, rows.stop // self.d.head_dim)}
        n = self.d.num_layers
        self.heads = [torch.zeros(self.d.num_heads, dtype=torch.float64) for _ in range(n)]
        self.neurons = [torch.zeros(self.d.intermediate_size, dtype=torch.float64) for _ in range(n)]
        self.embed = torch.zeros(self.d.hidden_size, dtype=torch.float64)
        self.influence = torch.zeros(n, dtype=torch.float64)
        widths = {"attn": self.d.hidden_size, "o": self.d.num_heads * self.d.head_dim,
                  "mlp": self.d.hidden_size, "down": self.d.intermediate_size,
                  "attn_out": self.d.hidden_size, "mlp_out": self.d.hidden_size}
        self.squares = {kind: [torch.zeros(w, dtype=torch.float64) for _ in range(n)]
                        for kind, w in widths.items()}
        self.tokens = 0

    def hooks(self) -> Iterator[torch.utils.hooks.RemovableHandle]:
        a = self.a
        layers = self.model.get_submodule(a.layers)
        for i, layer in enumerate(layers):
            attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
            yield attn.get_submodule(a.o).register_forward_pre_hook(self._head_hook(i))
            yield mlp.get_submodule(a.down).register_forward_pre_hook(self._neuron_hook(i))
            yield attn.get_submodule(a.o).register_forward_hook(self._square_hook("attn_out", i))
            yield mlp.get_submodule(a.down).register_forward_hook(self._square_hook("mlp_out", i))
            yield layer.register_forward_hook(self._influence_hook(i), with_kwargs=True)
            for norm, kind in ((a.input_norm, "attn"), (a.post_attn_norm, "mlp")):
                yield layer.get_submodule(norm).register_forward_hook(self._embed_hook)
                yield layer.get_submodule(norm).register_forward_hook(self._square_hook(kind, i))
        yield self.model.get_submodule(a.final_norm).register_forward_hook(self._embed_hook)

    def _head_hook(self, i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].float()
            per_head = x.reshape(*x.shape[:-1], -1, self.d.head_dim).norm(dim=-1)
            heads = per_head.reshape(-1, per_head.shape[-1]).sum(0)
            self.heads[i][self.part["heads"]] += heads.double().cpu()
            self._add_squares("o", i, x)
        return hook

    def _square_hook(self, kind: str, i: int):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._add_squares(kind, i, output.float())
        return hook

    def _add_squares(self, kind: str, i: int, x: torch.Tensor) -> None:
        """Add the squares of every channel of `x` over its tokens (Wanda's input norms)."""
        part = self.part.get(kind, slice(None))
        self.squares[kind][i][part] += x.pow(2).reshape(-1, x.shape[-1]).sum(0).double().cpu()

    def _neuron_hook(self, i: int):
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].float()
            self.neurons[i][self.part["neurons"]] += x.abs().reshape(-1, x.shape[-1]).sum(0).double().cpu()
            self._add_squares("down", i, x)
        return hook

    def _embed_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        x = output.float().abs()
        self.embed += x.reshape(-1, x.shape[-1]).sum(0).double().cpu()

    def _influence_hook(self, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            inp = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            cos = nn.functional.cosine_similarity(inp.float(), out.float(), dim=-1)
            self.influence[i] += (1 - cos).sum().double().cpu()
        return hook

    def scores(self, meta: dict[str, str]) -> ImportanceScores:
        t = max(self.tokens, 1)
        return ImportanceScores(heads=[(h / t).float() for h in self.heads],
                                neurons=[(n / t).float() for n in self.neurons],
                                embed=(self.embed / t).float(),
                                block_influence=(self.influence / t).float(), meta=meta,
                                input_norms=InputNorms(**{
                                    kind: [v.sqrt().float() for v in values]
                                    for kind, values in self.squares.items()}))


@torch.inference_mode()
def activation_scores(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4,
                      slices: InputSlices | None = None) -> ImportanceScores:
    """Minitron activation magnitudes and ShortGPT block influence over a calibration batch.

    On a tensor-parallel rank, `slices` says which heads and neurons it sees: their scores
    are filled in and the others left at zero (`InputSlices.SLICED`), so that summing
    every rank's scores gives the whole model's.
    """
    acc = _Accumulator(model, slices or InputSlices())
    handles = list(acc.hooks())
    device = next(model.parameters()).device
    try:
        for start in range(0, len(input_ids), batch_size):
            batch = input_ids[start:start + batch_size].to(device)
            model(batch, use_cache=False)
            acc.tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return acc.scores({"criterion": "activation", "sequences": str(len(input_ids)),
                       "seq_len": str(input_ids.shape[-1])})


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> ImportanceScores:
    """Weight-magnitude scores (classic L2 structured pruning), no data needed.

    Block influence is left at zero (weights say nothing about it): layer order stays the
    model's own.
    """
    a, d = adapter_for(model), ModelDims.from_config(model.config)
    heads, neurons = [], []
    embed = model.get_submodule(a.embed).weight.float().pow(2).sum(0)
    for layer in model.get_submodule(a.layers):
        attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
        q = attn.get_submodule(a.q).weight.float().reshape(d.num_heads, -1)
        o = attn.get_submodule(a.o).weight.float().t().reshape(d.num_heads, -1)
        heads.append((q.pow(2).sum(1) + o.pow(2).sum(1)).sqrt())
        gate, up = mlp.get_submodule(a.gate).weight.float(), mlp.get_submodule(a.up).weight.float()
        down = mlp.get_submodule(a.down).weight.float()
        neurons.append((gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).sqrt())
        for name in (a.q, a.k, a.v, a.gate, a.up):
            w = (attn if name in (a.q, a.k, a.v) else mlp).get_submodule(name).weight.float()
            embed += w.pow(2).sum(0)
    return ImportanceScores(heads=[h.cpu() for h in heads], neurons=[n.cpu() for n in neurons],
                            embed=embed.sqrt().cpu(), block_influence=torch.zeros(d.num_layers),
                            meta={"criterion": "magnitude"})


def descending(scores: torch.Tensor) -> torch.Tensor:
    """Unit indices, most important first (ties keep the model's order)."""
    return torch.argsort(scores, descending=True, stable=True)


def striped(order: torch.Tensor, stripes: int) -> torch.Tensor:
    """`order` (most important first) rearranged so that the s-th of `stripes` equal
    contiguous slices holds positions s, s + stripes, s + 2 stripes, ...: a kept prefix of
    the order then spreads evenly over the slices (tensor-parallel ranks)."""
    local = len(order) // stripes
    slot = torch.arange(len(order))
    return order[(slot % local) * stripes + slot // local]


def head_order(scores: torch.Tensor, d: ModelDims,
               stripes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """New-to-old indices of query heads and of groups, most important first (`striped`
    over `stripes` slices).

    Groups are ordered by the total score of their heads, heads within a group by score.
    """
    per_group = scores.reshape(d.num_kv_heads, d.q_per_kv)
    groups = striped(descending(per_group.sum(1)), stripes)
    within = torch.stack([descending(per_group[g]) for g in groups.tolist()])
    return (groups[:, None] * d.q_per_kv + within).reshape(-1), groups


def reorder_(param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    """Reorder `param` in place along `dim`: new position i takes old `index[i]`.

    A tensor-parallel parameter (a DTensor) is gathered whole, reordered, and this rank's
    part of the result written back: one parameter at a time is ever whole.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        whole = param.full_tensor().index_select(dim, index.to(param.device))
        part = distribute_tensor(whole, param.device_mesh, param.placements)
        param.to_local().copy_(part.to_local())
        return
    param.copy_(param.index_select(dim, index.to(param.device)))


def _expand(units: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of whole units (heads of `width` rows) in the given unit order."""
    return (units[:, None] * width + torch.arange(width)).reshape(-1)


SORTED_SCORES_FILE = "importance.safetensors"
"""In a checkpoint folder saved with its weights in importance order (a trained
super-network), the scores of that order: a search of it keeps the order it was trained in."""


def saved_order(source: str) -> ImportanceScores | None:
    """The scores a checkpoint folder's weights are already sorted by; None if it has none."""
    path = Path(source) / SORTED_SCORES_FILE
    return ImportanceScores.load(path) if path.is_file() else None


def in_model_order(scores: ImportanceScores) -> bool:
    """Whether the scores are those of the weights' current order (`permute_model`'s
    result, or `saved_order`'s): sorting by them moves nothing."""
    return scores.meta.get("permuted") == "true"


@torch.no_grad()
def permute_model(model: nn.Module, scores: ImportanceScores, stripes: int = 1) -> ImportanceScores:
    """Sort the model's weights in place by importance; return the scores in the new order.

    The model's logits are unchanged (to float32 rounding): heads move with their group's
    keys and values, neurons with their gate/up rows and down column, and embedding
    channels everywhere at once (tied embeddings are one tensor, permuted once). Scores
    already in the model's order (`in_model_order`) leave it as it is. With `stripes`,
    the heads and neurons of a model split over that many tensor-parallel ranks are
    `striped`, so that every rank holds its share of any kept prefix.
    """
    if in_model_order(scores):
        return scores
    a, d = adapter_for(model), ModelDims.from_config(model.config)
    channels = descending(scores.embed)
    for param, dim in residual_tables(model, a):
        reorder_(param, channels, dim)
    new_heads, new_neurons, orders = [], [], []
    for i, layer in enumerate(model.get_submodule(a.layers)):
        heads, neurons = permute_layer(layer, a, d, scores.heads[i], scores.neurons[i], channels,
                                       stripes)
        new_heads.append(scores.heads[i][heads])
        new_neurons.append(scores.neurons[i][neurons])
        orders.append((_expand(heads, d.head_dim), neurons))
    norms = scores.input_norms
    if norms is not None:
        norms = InputNorms(attn=[t[channels] for t in norms.attn],
                           o=[t[rows] for t, (rows, _) in zip(norms.o, orders)],
                           mlp=[t[channels] for t in norms.mlp],
                           down=[t[neurons] for t, (_, neurons) in zip(norms.down, orders)],
                           attn_out=[t[channels] for t in norms.attn_out],
                           mlp_out=[t[channels] for t in norms.mlp_out])
    return ImportanceScores(heads=new_heads, neurons=new_neurons, embed=scores.embed[channels],
                            block_influence=scores.block_influence.clone(),
                            meta={**scores.meta, "permuted": "true"}, input_norms=norms)


def residual_tables(model: nn.Module, a: Adapter) -> list[tuple[torch.Tensor, int]]:
    """The weights outside the decoder layers that carry the residual stream, each with its
    channel axis, and each once (tied embeddings are one tensor)."""
    tables = [(model.get_submodule(a.embed).weight, 1), (model.get_submodule(a.lm_head).weight, 1),
              (model.get_submodule(a.final_norm).weight, 0)]
    return list({id(param): (param, dim) for param, dim in tables}.values())


def permute_layer(layer: nn.Module, a: Adapter, d: ModelDims, head_scores: torch.Tensor,
                  neuron_scores: torch.Tensor, channels: torch.Tensor,
                  stripes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort one decoder layer in place: heads and neurons by their scores (`striped` over
    `stripes` slices), and its part of the residual stream by `channels`. Returns the
    new-to-old head and neuron indices."""
    heads, groups = head_order(head_scores, d, stripes)
    _permute_heads(layer, a, d, heads, groups)
    neurons = striped(descending(neuron_scores), stripes)
    _permute_neurons(layer, a, neurons)
    _permute_layer_channels(layer, a, channels)
    return heads, neurons


def _permute_heads(layer: nn.Module, a: Adapter, d: ModelDims, heads: torch.Tensor,
                   groups: torch.Tensor) -> None:
    attn = layer.get_submodule(a.attn)
    q_rows, kv_rows = _expand(heads, d.head_dim), _expand(groups, d.head_dim)
    _reorder_outputs(attn, ((a.q, q_rows), (a.k, kv_rows), (a.v, kv_rows)))
    reorder_(attn.get_submodule(a.o).weight, q_rows, 1)


def _permute_neurons(layer: nn.Module, a: Adapter, neurons: torch.Tensor) -> None:
    mlp = layer.get_submodule(a.mlp)
    _reorder_outputs(mlp, ((a.gate, neurons), (a.up, neurons)))
    reorder_(mlp.get_submodule(a.down).weight, neurons, 1)


def _reorder_outputs(parent: nn.Module, rows_of: tuple[tuple[str, torch.Tensor], ...]) -> None:
    """Reorder the output rows (weight and bias) of `parent`'s named projections."""
    for name, rows in rows_of:
        proj = parent.get_submodule(name)
        reorder_(proj.weight, rows, 0)
        if proj.bias is not None:
            reorder_(proj.bias, rows, 0)


def _permute_layer_channels(layer: nn.Module, a: Adapter, channels: torch.Tensor) -> None:
    """Permute one layer's part of the residual stream: its norms, every reader's
    columns and every writer's rows."""
    attn, mlp = layer.get_submodule(a.attn), layer.get_submodule(a.mlp)
    for norm in (a.input_norm, a.post_attn_norm):
        reorder_(layer.get_submodule(norm).weight, channels, 0)
    for reader in (attn.get_submodule(a.q), attn.get_submodule(a.k), attn.get_submodule(a.v),
                   mlp.get_submodule(a.gate), mlp.get_submodule(a.up)):
        reorder_(reader.weight, channels, 1)
    for writer in (attn.get_submodule(a.o), mlp.get_submodule(a.down)):
        reorder_(writer.weight, channels, 0)
        if writer.bias is not None:
            reorder_(writer.bias, channels, 0)
