"""Measured latency of a sub-network on the evaluator's own device.

Prefill of a P-token prompt and per-token decode with a KV cache, batch B: warm-up runs,
then several timed repetitions, reported as the median with its spread. Latency depends on
the shapes only, so it runs on random weights of the sub-network's shapes and is cached by
shape: two sub-networks with the same widths (whichever layers they keep) share a result.
"""

from __future__ import annotations

import json
import socket
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunetune.evaluators.model import cache_dir
from prunetune.evaluators.settings import LatencySettings
from prunetune.evaluators.surgery import random_subnet_model
from prunetune.search_spaces.subnet import SubnetConfig


class _Timer:
    """Wall time on CPU; CUDA events on GPU, so that queued kernels are counted."""

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


@torch.inference_mode()
def measure_latency(model: nn.Module, settings: LatencySettings) -> dict[str, float]:
    """Median, min and max of prefill time and of per-token decode time, in milliseconds."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    timer = _Timer(device)
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


def shape_key(subnet: SubnetConfig, settings: LatencySettings, device: torch.device | str,
              dtype: torch.dtype) -> str:
    """What latency depends on: widths of the kept layers, embed, settings, device, dtype."""
    widths = list(zip(subnet.kv_heads, subnet.q_per_kv, subnet.mlp))
    return json.dumps({"widths": widths, "embed": subnet.embed, "settings": asdict(settings),
                       "device": str(device), "dtype": str(dtype)}, sort_keys=True)


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
    """Latency of `subnet` measured on random weights of its shapes (cached by shape)."""
    def measure() -> dict[str, float]:
        model = random_subnet_model(model_config, subnet, dtype, device)
        try:
            return measure_latency(model, settings)
        finally:
            del model
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()

    cache = cache or LatencyCache()
    return cache.get_or_measure(shape_key(subnet, settings, device, dtype), measure)
