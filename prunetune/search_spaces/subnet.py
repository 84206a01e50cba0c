"""What a sub-network is: which layers stay, and how wide each kept part is.

Counts, not masks: the model's weights are sorted by importance first (see
`prunetune.evaluators.importance`), so keeping k heads, neurons or channels means keeping the first k.
The canonical JSON of a SubnetConfig is the cache key of the whole search.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from prunetune.search_spaces.dims import ModelDims

_FIELDS = ("layers", "kv_heads", "q_per_kv", "mlp", "embed")


@dataclass(frozen=True)
class SubnetConfig:
    """A sub-network of a decoder: kept layers and the width of every kept part.

    `layers` are original layer indices, ascending; `kv_heads`, `q_per_kv` and `mlp` have
    one entry per kept layer; `embed` is the number of embedding channels kept everywhere.
    New optional fields (such as per-block embedding widths) are left out of the JSON
    while unset, so the JSON and hash of today's configs never change.
    """

    layers: tuple[int, ...]
    kv_heads: tuple[int, ...]
    q_per_kv: tuple[int, ...]
    mlp: tuple[int, ...]
    embed: int

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "q_per_kv", "mlp"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "embed", int(self.embed))

    @classmethod
    def dense(cls, model_config: Any) -> "SubnetConfig":
        """The whole model, nothing removed."""
        d = ModelDims.of(model_config)
        n = d.num_layers
        return cls(
            layers=tuple(range(n)),
            kv_heads=(d.num_kv_heads,) * n,
            q_per_kv=(d.q_per_kv,) * n,
            mlp=(d.intermediate_size,) * n,
            embed=d.hidden_size,
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        """True when every kept layer has the same widths (a plain HF config fits it)."""
        return all(len(set(v)) <= 1 for v in (self.kv_heads, self.q_per_kv, self.mlp))

    def to_dict(self) -> dict[str, Any]:
        return {name: list(v) if isinstance(v, tuple) else v
                for name, v in ((f, getattr(self, f)) for f in _FIELDS)}

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no spaces; equal configs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SubnetConfig":
        unknown = sorted(set(data) - set(_FIELDS))
        missing = [f for f in _FIELDS if f not in data]
        if unknown or missing:
            raise ValueError(
                f"SubnetConfig JSON: unknown fields {unknown}, missing fields {missing}"
            )
        return cls(**{f: data[f] for f in _FIELDS})

    @classmethod
    def from_json(cls, text: str) -> "SubnetConfig":
        return cls.from_dict(json.loads(text))

    def config_hash(self) -> str:
        """A short stable id of the canonical JSON (the result log's key)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def validate(self, model_config: Any) -> "SubnetConfig":
        """Raise ValueError naming the field and its bound if this does not fit the model."""
        d = ModelDims.of(model_config)
        n = len(self.layers)
        if n == 0:
            raise ValueError("layers: at least 1 layer must be kept, got none")
        for i, idx in enumerate(self.layers):
            if not 0 <= idx < d.num_layers:
                raise ValueError(
                    f"layers[{i}] = {idx}: layer index must be in [0, {d.num_layers - 1}]"
                )
        if list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers: must be strictly ascending, got {list(self.layers)}")
        bounds = {"kv_heads": d.num_kv_heads, "q_per_kv": d.q_per_kv, "mlp": d.intermediate_size}
        for name, upper in bounds.items():
            values = getattr(self, name)
            if len(values) != n:
                raise ValueError(
                    f"{name}: needs one entry per kept layer ({n}), got {len(values)}"
                )
            for i, v in enumerate(values):
                if not 1 <= v <= upper:
                    raise ValueError(f"{name}[{i}] = {v}: must be in [1, {upper}]")
        if not 1 <= self.embed <= d.hidden_size:
            raise ValueError(f"embed = {self.embed}: must be in [1, {d.hidden_size}]")
        return self

