"""The dimensions of a decoder-only transformer, read from its config alone.

Everything that reasons about sub-networks without weights (validation, search spaces,
cost, cluster planning) reads the model through `ModelDims`, so a 70B config is as cheap
to reason about as a 135M one, and nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelDims:
    """Shapes and bias layout of a Llama-family decoder."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @property
    def q_per_kv(self) -> int:
        """Query heads per key/value head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def unsplit_width(self, ranks: int) -> tuple[str, int] | None:
        """The first width that `ranks` tensor-parallel ranks cannot share evenly (key-value
        heads, query heads, MLP neurons), as (config field, size); None if all split."""
        for name, size in (("num_key_value_heads", self.num_kv_heads),
                           ("num_attention_heads", self.num_heads),
                           ("intermediate_size", self.intermediate_size)):
            if size % ranks:
                return name, size
        return None

    @classmethod
    def of(cls, model_config: Any) -> "ModelDims":
        """`model_config` itself if it is already a `ModelDims`, else read from the config."""
        return model_config if isinstance(model_config, cls) else cls.from_config(model_config)

    @classmethod
    def from_config(cls, config: Any) -> "ModelDims":
        """Read a Hugging Face config object (or a plain mapping of its fields)."""
        get = _getter(config)
        model_type = get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported architecture {model_type!r}: prunetune supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        num_kv = get("num_key_value_heads", None) or num_heads
        head_dim = get("head_dim", None) or hidden // num_heads
        attention_bias = bool(get("attention_bias", False))
        return cls(
            model_type=model_type,
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=int(num_kv),
            head_dim=int(head_dim),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(get("mlp_bias", False)),
        )


def _getter(config: Any) -> Callable[..., Any]:
    fields = dict(config) if isinstance(config, Mapping) else config.to_dict()
    required = object()

    def get(name: str, default: Any = required) -> Any:
        if fields.get(name) is not None:
            return fields[name]
        if default is required:
            raise ValueError(f"model config has no field {name!r}")
        return default

    return get


@dataclass(frozen=True)
class Adapter:
    """Where a family keeps its decoder parts; every supported family is Llama-shaped."""

    model_type: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    input_norm: str = "input_layernorm"
    post_attn_norm: str = "post_attention_layernorm"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


ADAPTERS: dict[str, Adapter] = {name: Adapter(name) for name in SUPPORTED_MODEL_TYPES}


def adapter_for(model_or_config: Any) -> Adapter:
    """The adapter of a model or config; an error names unsupported architectures."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"unsupported architecture {model_type!r}: prunetune supports "
            f"{', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]
