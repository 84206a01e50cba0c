"""What a sub-network is: which layers stay, and how wide each kept part is.

Counts, not masks: the model's weights are sorted by importance first (see
`prunetune.evaluators.importance`), so keeping k heads, neurons or channels means keeping the first k.
The canonical JSON of a SubnetConfig is the cache key of the whole search.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from prunetune.search_spaces.dims import ModelDims

_FIELDS = ("layers", "kv_heads", "q_per_kv", "mlp", "embed")
_OPTIONAL_FIELDS = ("sparsity", "channels")

SPARSITY_METHODS = ("magnitude", "wanda")
"""How a weight's score is computed: |W| (magnitude), or |W| times the L2 norm of its
input channel over the calibration tokens (Wanda, Sun et al. 2023)."""
UNSTRUCTURED = "unstructured"
_N_M = re.compile(r"^(?P<n>[1-9][0-9]*):(?P<m>[1-9][0-9]*)$")
_LEVEL_TOLERANCE = 1e-9


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) of an `N:M` pattern, None for `unstructured`; a ValueError for anything else."""
    if pattern == UNSTRUCTURED:
        return None
    match = _N_M.match(pattern)
    if match is None or not int(match["n"]) < int(match["m"]):
        raise ValueError(f"must be {UNSTRUCTURED!r} or 'N:M' with 0 < N < M (e.g. '2:4'), "
                         f"got {pattern!r}")
    return int(match["n"]), int(match["m"])


def level_error(pattern: str, level: float) -> str | None:
    """Why `level` is not a level of `pattern` (a valid one), or None: unstructured takes
    any level in [0, 1), N:M only 0 and 1 - N/M."""
    if not 0 <= level < 1:
        return "must be in [0, 1)"
    n_m = parse_pattern(pattern)
    if n_m is None or level == 0:
        return None
    n_m_level = 1 - n_m[0] / n_m[1]
    if abs(level - n_m_level) > _LEVEL_TOLERANCE:
        return f"pattern {pattern} allows 0 or {n_m_level:g}"
    return None


@dataclass(frozen=True)
class Sparsity:
    """Weight sparsity of a sub-network's kept linear weights (attention q/k/v/o and the MLP
    projections), one level per kept layer.

    Each output row of a kept weight (of the extracted shapes) loses its lowest-scoring
    inputs: `unstructured` zeros the `zeros_per_row` lowest of the row (Wanda's per-row
    comparison group); `N:M` keeps the N highest of every M consecutive inputs of a layer
    whose level is 1 - N/M (a trailing group of fewer than M inputs stays dense).
    """

    method: str
    pattern: str
    levels: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(float(v) for v in self.levels))

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern; None when unstructured."""
        return parse_pattern(self.pattern)

    def zeros_per_row(self, level: float, width: int) -> int:
        """Weights a row of `width` inputs loses at `level`: the one rule of masks and cost."""
        if level <= 0:
            return 0
        n_m = self.n_m
        if n_m is None:
            return math.floor(level * width + _LEVEL_TOLERANCE)
        n, m = n_m
        return (width // m) * (m - n)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "pattern": self.pattern, "levels": list(self.levels)}

    def validate(self, kept_layers: int) -> "Sparsity":
        """Raise ValueError naming the field if this is not a valid sparsity of `kept_layers`."""
        if self.method not in SPARSITY_METHODS:
            raise ValueError(f"sparsity.method: must be one of {', '.join(SPARSITY_METHODS)}, "
                             f"got {self.method!r}")
        try:
            parse_pattern(self.pattern)
        except ValueError as exc:
            raise ValueError(f"sparsity.pattern: {exc}") from None
        if len(self.levels) != kept_layers:
            raise ValueError(f"sparsity.levels: needs one entry per kept layer ({kept_layers}), "
                             f"got {len(self.levels)}")
        for i, level in enumerate(self.levels):
            reason = level_error(self.pattern, level)
            if reason:
                raise ValueError(f"sparsity.levels[{i}] = {level}: {reason}")
        return self


@dataclass(frozen=True)
class Channels:
    """Per-block residual channels (DISP-LLM, Gao et al. 2024): per kept layer, how many
    channels of the full-width residual stream its attention reads and writes (`attn`)
    and its MLP reads and writes (`mlp`).

    A sub-layer reads the kept channels of its normalised input (the RMSNorm still runs
    over the whole stream) and adds its output back into as many channels; which ones is
    each block's own choice, by its calibration activations
    (`prunetune.evaluators.importance.InputNorms.block_channels`), not a global order.
    """

    attn: tuple[int, ...]
    mlp: tuple[int, ...]

    def __post_init__(self) -> None:
        for name in ("attn", "mlp"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))

    @classmethod
    def unless_full(cls, attn: Sequence[int], mlp: Sequence[int], hidden: int) -> "Channels | None":
        """The channels, or None when every sub-layer keeps all `hidden` (nothing removed)."""
        if all(c == hidden for c in (*attn, *mlp)):
            return None
        return cls(tuple(attn), tuple(mlp))

    def to_dict(self) -> dict[str, Any]:
        return {"attn": list(self.attn), "mlp": list(self.mlp)}

    def validate(self, kept_layers: int, hidden: int) -> "Channels":
        """Raise ValueError naming the field if these are not channels of `kept_layers`
        layers of a `hidden`-wide residual stream."""
        for name in ("attn", "mlp"):
            values = getattr(self, name)
            if len(values) != kept_layers:
                raise ValueError(f"channels.{name}: needs one entry per kept layer "
                                 f"({kept_layers}), got {len(values)}")
            for i, v in enumerate(values):
                if not 1 <= v <= hidden:
                    raise ValueError(f"channels.{name}[{i}] = {v}: must be in [1, {hidden}]")
        return self


@dataclass(frozen=True)
class SubnetConfig:
    """A sub-network of a decoder: kept layers and the width of every kept part.

    `layers` are original layer indices, ascending; `kv_heads`, `q_per_kv` and `mlp` have
    one entry per kept layer; `embed` is the number of embedding channels kept everywhere.
    New optional fields (such as per-block embedding widths) are left out of the JSON
    while unset, so the JSON and hash of today's configs never change. `sparsity` is
    such a field: None, or the weight sparsity of the kept layers; a sparsity whose levels
    are all 0 is stored as None, since it removes nothing. `channels` is another: None, or
    the residual channels each kept layer's attention and MLP read and write (`Channels`;
    the residual stream and embeddings keep their full width, so `embed` is then the
    hidden size).
    """

    layers: tuple[int, ...]
    kv_heads: tuple[int, ...]
    q_per_kv: tuple[int, ...]
    mlp: tuple[int, ...]
    embed: int
    sparsity: Sparsity | None = None
    channels: Channels | None = None

    def __post_init__(self) -> None:
        for name in ("layers", "kv_heads", "q_per_kv", "mlp"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, "embed", int(self.embed))
        sparsity = self.sparsity
        if isinstance(sparsity, dict):
            sparsity = Sparsity(**sparsity)
        if sparsity is not None and not any(sparsity.levels):
            sparsity = None
        object.__setattr__(self, "sparsity", sparsity)
        if isinstance(self.channels, dict):
            object.__setattr__(self, "channels", Channels(**self.channels))

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
        """True when every kept layer has the same widths (a plain HF config fits it);
        never with per-block channels, whose modules carry channel indices."""
        return self.channels is None and all(len(set(v)) <= 1 for v in
                                             (self.kv_heads, self.q_per_kv, self.mlp))

    def sublayer_channels(self) -> tuple[tuple[int, int], ...]:
        """Per kept layer, the residual channels its attention and its MLP read and write:
        `embed` for both, or the layer's own `channels`."""
        if self.channels is None:
            return ((self.embed, self.embed),) * self.num_layers
        return tuple(zip(self.channels.attn, self.channels.mlp))

    def to_dict(self) -> dict[str, Any]:
        out = {name: list(v) if isinstance(v, tuple) else v
               for name, v in ((f, getattr(self, f)) for f in _FIELDS)}
        if self.sparsity is not None:
            out["sparsity"] = self.sparsity.to_dict()
        if self.channels is not None:
            out["channels"] = self.channels.to_dict()
        return out

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no spaces; equal configs give equal strings."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SubnetConfig":
        unknown = sorted(set(data) - set(_FIELDS) - set(_OPTIONAL_FIELDS))
        missing = [f for f in _FIELDS if f not in data]
        if unknown or missing:
            raise ValueError(
                f"SubnetConfig JSON: unknown fields {unknown}, missing fields {missing}"
            )
        return cls(**{f: data[f] for f in (*_FIELDS, *_OPTIONAL_FIELDS) if f in data})

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
        if self.sparsity is not None:
            self.sparsity.validate(n)
        if self.channels is not None:
            if self.embed != d.hidden_size:
                raise ValueError(f"embed = {self.embed}: with per-block channels the residual "
                                 f"stream keeps its full width ({d.hidden_size})")
            self.channels.validate(n, d.hidden_size)
        return self

