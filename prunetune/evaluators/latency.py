"""Measured latency of a sub-network on the evaluator's own device.

Prefill of a P-token prompt and per-token decode with a KV cache, batch B: warm-up runs,
then several timed repetitions, reported as the median with its spread. Latency depends on
the shapes only, so it runs on random weights of the sub-network's shapes and is cached by
shape: two sub-networks with the same widths (whichever layers they keep) share a result.

Three modes (`LatencySettings.mode`), each cached under its own key:

- `graph` (the default; CUDA): what a deployment runs. A transformers `StaticCache` of
  P + D positions; prefill is one forward through the fused SDPA kernels (flash attention
  on the causal prompt) that keeps the last position's logits only; greedy decode is one
  step (forward of one token per sequence, argmax, the token fed back, the cache advanced)
  captured once in a CUDA graph and replayed D times back to back, with no host work in
  between. `latency_decode_ms` is the time of those D replays over D: milliseconds per
  generated token of the whole batch. The captured step is Hugging Face's modules as they
  are: each norm, rotary embedding and cache write is several small kernels.
- `compiled` (CUDA): `graph` with the decode step compiled whole first, by torch.compile's
  inductor for these exact shapes (`compile_step`), so that each layer's norms, rotary
  embedding, cache writes, activation and residual adds become a few fused kernels; the
  compiled step is then captured and replayed as in `graph`. Prefill is `graph`'s. The
  compilation (tens of seconds for an 8B model) is paid once per shape, as the result is
  cached by shape.
- `eager`: every step launched from Python on a growing `DynamicCache`, each decode step
  timed alone with the median over the D steps; prefill keeps every position's logits.
  On a GPU it is bound by launch overhead, so pruning widths hardly moves it. It is what
  runs on CPU, and wherever the other modes cannot (`latency_mode`).

Times are CUDA events on a GPU, wall time on CPU, in milliseconds.

Weight sparsity changes no shape, and unstructured zeros run at dense speed, so it leaves
latency alone, except 2:4 on a GPU: there the linear weights of every 2:4 layer are pruned
2:4 and stored as `torch.sparse.to_sparse_semi_structured` tensors (sparse tensor-core
kernels), and the result is cached under the layers' pattern too (`semi_structured_layers`).
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunetune.evaluators.importance import magnitude_weight_scores
from prunetune.evaluators.model import cache_dir
from prunetune.evaluators.settings import LatencySettings
from prunetune.evaluators.surgery import n_m_keep, random_subnet_model
from prunetune.search_spaces.dims import adapter_for
from prunetune.search_spaces.subnet import SubnetConfig

SEMI_STRUCTURED = (2, 4)
"""The N:M pattern the GPU's sparse tensor cores run."""
SEMI_STRUCTURED_MULTIPLES = {torch.float16: (32, 64), torch.bfloat16: (32, 64),
                             torch.float32: (32, 32)}
"""(rows, columns) a weight's shape must be a multiple of to be stored semi-structured."""


class DeviceTimer:
    """Milliseconds a call takes on a device: wall time on CPU; CUDA events on GPU, so
    that queued kernels are counted."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Milliseconds one call of `fn` takes on the device."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def _summary(name: str, samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {f"latency_{name}_ms": statistics.median(ordered),
            f"latency_{name}_min_ms": ordered[0],
            f"latency_{name}_max_ms": ordered[-1]}


INDUCTOR_MODE = "default"
"""The torch.compile mode of `compiled`: one without CUDA graphs of its own, as the compiled
step is captured in ours."""


def latency_mode(settings: LatencySettings, device: torch.device | str, model_config: Any) -> str:
    """The mode that runs: `graph` or `compiled` where asked and possible, else `eager`.

    Both capture a CUDA graph, which needs a CUDA device, and a cache that advances on the
    device: transformers tracks the fill of a sliding-window layer's static cache on the
    host, so a captured step would replay one position forever. Elsewhere the eager figure
    is measured, and cached under mode `eager`.
    """
    from transformers import StaticCache

    if settings.mode == "eager" or torch.device(device).type != "cuda":
        return "eager"
    sliding = StaticCache(config=model_config, max_cache_len=1).is_sliding
    return "eager" if any(sliding) else settings.mode


@torch.inference_mode()
def measure_latency(model: nn.Module, settings: LatencySettings,
                    inductor_mode: str = INDUCTOR_MODE) -> dict[str, float]:
    """Median, min and max of prefill time and of per-token decode time, in milliseconds.

    `inductor_mode` is the torch.compile mode of mode `compiled` (one without CUDA graphs).
    """
    device = next(model.parameters()).device
    mode = latency_mode(settings, device, model.config)
    if mode == "eager":
        return _eager_latency(model, settings, device)
    return _graph_latency(model, settings, device, inductor_mode if mode == "compiled" else None)


def _eager_latency(model: nn.Module, settings: LatencySettings,
                   device: torch.device) -> dict[str, float]:
    """Every step launched from Python on a growing cache; decode is the median step."""
    from transformers import DynamicCache

    timer = DeviceTimer(device)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (settings.batch_size, settings.prompt_tokens), device=device)
    step = torch.randint(0, vocab, (settings.batch_size, 1), device=device)
    prefill, decode = [], []
    for run in range(settings.warmup + settings.repeats):
        cache = DynamicCache(config=model.config)
        prefill_ms = timer(lambda: model(prompt, past_key_values=cache, use_cache=True))
        decode_ms = [timer(lambda: model(step, past_key_values=cache, use_cache=True))
                     for _ in range(settings.decode_tokens)]
        if run >= settings.warmup:
            prefill.append(prefill_ms)
            decode.append(statistics.median(decode_ms) if decode_ms else 0.0)
    return {**_summary("prefill", prefill), **_summary("decode", decode)}


def _graph_latency(model: nn.Module, settings: LatencySettings, device: torch.device,
                   inductor_mode: str | None) -> dict[str, float]:
    """Prefill into a static cache, then the captured decode step (compiled first, in
    `inductor_mode`, unless None) replayed back to back."""
    from transformers import StaticCache

    timer = DeviceTimer(device)
    tokens = settings.decode_tokens
    prompt = torch.randint(0, model.config.vocab_size,
                           (settings.batch_size, settings.prompt_tokens), device=device)
    token = torch.empty(settings.batch_size, 1, dtype=torch.long, device=device)
    cache = StaticCache(config=model.config, max_cache_len=settings.prompt_tokens + tokens)
    prefill_greedy(model, prompt, cache, token)
    graph = DecodeGraph(model, cache, token, inductor_mode)
    prefill, decode = [], []
    for run in range(settings.warmup + settings.repeats):
        cache.reset()
        prefill_ms = timer(lambda: prefill_greedy(model, prompt, cache, token))
        decode_ms = timer(lambda: graph.replay(tokens))
        if run >= settings.warmup:
            prefill.append(prefill_ms)
            decode.append(decode_ms / tokens)
    return {**_summary("prefill", prefill), **_summary("decode", decode)}


def prefill_greedy(model: nn.Module, prompt: torch.Tensor, cache: Any,
                   token: torch.Tensor) -> torch.Tensor:
    """Run `prompt` into `cache`, write its greedy next token into `token`; the last logits.

    Only the last position's logits are computed, as a generating deployment does.
    """
    logits = model(prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    token.copy_(logits[:, -1].argmax(-1, keepdim=True))
    return logits


def greedy_step(model: nn.Module, cache: Any, token: torch.Tensor) -> torch.Tensor:
    """One greedy decode step: `token` (batch, 1) in, its logits out, their argmax written
    back into `token`, `cache` advanced by one position."""
    logits = model(token, past_key_values=cache, use_cache=True).logits
    token.copy_(logits[:, -1].argmax(-1, keepdim=True))
    return logits


def compile_step(step: Callable[[], torch.Tensor],
                 inductor_mode: str) -> Callable[[], torch.Tensor]:
    """`step` compiled whole (no graph break allowed) by inductor, for its exact shapes.

    The first call compiles. The cache's fill counter is a tensor, so every later position
    runs the same code. Compiled code of earlier calls is dropped first: each sub-network
    shape compiles the same Python code anew, and a search measures more shapes than
    torch.compile keeps versions of one function.
    """
    torch.compiler.reset()
    return torch.compile(step, fullgraph=True, dynamic=False, mode=inductor_mode)


class DecodeGraph:
    """One greedy decode step over a static KV cache, captured in a CUDA graph.

    `token` (batch, 1) is the step's input and output: a replay reads it, writes the step's
    logits into `logits` and the argmax back into `token`, and advances `cache` by one
    position. The positions, the causal mask and the cache writes all derive from the
    cache's fill counters, which live on the device, so one capture serves every position:
    no tensor to update between replays. With an `inductor_mode`, the step is compiled
    (`compile_step`) before it is captured; without, Hugging Face's modules are captured
    as they are. Capturing does not run the step, but the warm-up before it does (and
    compiles): reset the cache before the first real prefill. `step` is the (compiled) step
    itself, which also runs outside the graph, e.g. to see its kernels in a profiler.
    """

    def __init__(self, model: nn.Module, cache: Any, token: torch.Tensor,
                 inductor_mode: str | None = None) -> None:
        self.model, self.cache, self.token = model, cache, token
        self.step = (self._step if inductor_mode is None
                     else compile_step(self._step, inductor_mode))
        side = torch.cuda.Stream(token.device)
        side.wait_stream(torch.cuda.current_stream(token.device))
        with torch.cuda.stream(side):
            self.step()  # compilation, lazy library and workspace set-up stay out of the graph
        torch.cuda.current_stream(token.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.compiler.set_stance("fail_on_recompile"), torch.cuda.graph(self.graph):
            self.logits = self.step()

    def _step(self) -> torch.Tensor:
        return greedy_step(self.model, self.cache, self.token)

    def replay(self, steps: int) -> None:
        """Decode `steps` tokens: the captured step, launched `steps` times."""
        for _ in range(steps):
            self.graph.replay()


def semi_structured_layers(subnet: SubnetConfig, device: torch.device | str) -> list[bool]:
    """Per kept layer, whether its linear weights run 2:4 sparse: on a CUDA device, in the
    layers a 2:4 sparsity prunes; nowhere else (other patterns run at dense speed)."""
    sparsity = subnet.sparsity
    if (torch.device(device).type != "cuda" or sparsity is None
            or sparsity.n_m != SEMI_STRUCTURED):
        return [False] * subnet.num_layers
    return [level > 0 for level in sparsity.levels]


def semi_structured_linears(model: nn.Module, sparse_layers: list[bool]) -> list[nn.Linear]:
    """The q, k, v, o, gate, up and down projections of the layers marked in
    `sparse_layers` whose shapes sparse tensor cores take (others stay dense)."""
    a = adapter_for(model)
    linears = []
    for layer, sparse in zip(model.get_submodule(a.layers), sparse_layers):
        if not sparse:
            continue
        for parent, names in ((a.attn, (a.q, a.k, a.v, a.o)), (a.mlp, (a.gate, a.up, a.down))):
            for name in names:
                linear = layer.get_submodule(parent).get_submodule(name)
                rows, cols = SEMI_STRUCTURED_MULTIPLES.get(linear.weight.dtype, (0, 0))
                out_f, in_f = linear.weight.shape
                if rows and out_f % rows == 0 and in_f % cols == 0:
                    linears.append(linear)
    return linears


@torch.no_grad()
def prune_2_4_(linear: nn.Linear) -> None:
    """Zero the 2 smallest-magnitude weights of every 4 consecutive inputs, in place."""
    keep = n_m_keep(magnitude_weight_scores(linear.weight), *SEMI_STRUCTURED)
    linear.weight.mul_(keep.to(linear.weight.dtype))


def to_semi_structured_(linears: list[nn.Linear]) -> None:
    """Store each (2:4-pruned) weight as a semi-structured sparse tensor (CUDA only)."""
    from torch.sparse import to_sparse_semi_structured

    for linear in linears:
        linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight),
                                     requires_grad=False)


def latency_model(model_config: Any, subnet: SubnetConfig, dtype: torch.dtype,
                  device: torch.device | str) -> nn.Module:
    """Random weights of the sub-network's shapes on `device`, with its 2:4 layers pruned
    2:4 and stored semi-structured where they run so (`semi_structured_layers`)."""
    model = random_subnet_model(model_config, subnet, dtype, device)
    linears = semi_structured_linears(model, semi_structured_layers(subnet, device))
    for linear in linears:
        prune_2_4_(linear)
    if linears:
        to_semi_structured_(linears)
    return model


def shape_key(subnet: SubnetConfig, settings: LatencySettings, device: torch.device | str,
              dtype: torch.dtype) -> str:
    """What latency depends on: widths of the kept layers, embed, settings (the mode among
    them), device, dtype, which kept layers run 2:4 sparse (named only when any does), and
    per-block channels (only when set)."""
    widths = list(zip(subnet.kv_heads, subnet.q_per_kv, subnet.mlp))
    key: dict[str, Any] = {"widths": widths, "embed": subnet.embed, "settings": asdict(settings),
                           "device": str(device), "dtype": str(dtype)}
    sparse = semi_structured_layers(subnet, device)
    if any(sparse):
        key["semi_structured"] = sparse
    if subnet.channels is not None:
        key["channels"] = subnet.channels.to_dict()
    return json.dumps(key, sort_keys=True)


def latency_cache_file() -> Path:
    """This host's latency cache file: latency depends on the machine, not on the run."""
    return cache_dir() / "latency" / f"{socket.gethostname()}.json"


class LatencyCache:
    """Latency results by shape, in memory and (when given a file) on disk across runs."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self.results: dict[str, dict[str, float]] = {}
        if self.path and self.path.is_file():
            self.results = json.loads(self.path.read_text())

    def get_or_measure(self, key: str, measure: Callable[[], dict[str, float]]) -> dict[str, float]:
        if key not in self.results:
            self.results[key] = measure()
            self._save()
        return self.results[key]

    def _save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(self.results))
            tmp.replace(self.path)


def subnet_latency(model_config: Any, subnet: SubnetConfig, settings: LatencySettings,
                   device: torch.device | str, dtype: torch.dtype,
                   cache: LatencyCache | None = None) -> dict[str, float]:
    """Latency of `subnet` measured on random weights of its shapes (cached by shape).

    The result is cached under the mode that ran (`latency_mode`), not the one asked for.
    """
    def measure() -> dict[str, float]:
        model = latency_model(model_config, subnet, dtype, device)
        try:
            return measure_latency(model, settings)
        finally:
            del model
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()

    settings = replace(settings, mode=latency_mode(settings, device, model_config))
    cache = cache or LatencyCache()
    return cache.get_or_measure(shape_key(subnet, settings, device, dtype), measure)
