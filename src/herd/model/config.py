"""One dataclass describes every backbone size, from the tiny CPU preset to Llama 3 405B."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

ATTENTION_BACKENDS = ("sdpa", "flex")
# Fields that change what the weights mean; two configs that differ in any of them are different models.
ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_hidden_dim",
                       "norm_eps", "tie_embeddings")


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 "llama3" RoPE frequency scaling (Meta's reference code)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                "rope_scaling needs high_freq_factor > low_freq_factor > 0, got "
                f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}"
            )
        if self.original_max_position_embeddings <= 0:
            raise ValueError("rope_scaling.original_max_position_embeddings must be > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-3-style decoder.

    Derived values (``head_dim``, ``ffn_hidden_dim``) are computed once in ``__post_init__``.
    ``ffn_hidden_dim`` follows Meta's rule from ``ffn_dim_multiplier`` and ``multiple_of``
    unless ``intermediate_size`` pins it (checkpoints imported from Hugging Face do that).
    """

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None
    vocab_size: int = 8192
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    intermediate_size: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention: str = "sdpa"
    head_dim: int = field(init=False)
    ffn_hidden_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        self._validate()
        object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "ffn_hidden_dim", self._ffn_hidden_dim())

    def _validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ValueError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads that divides dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs each KV head to serve a whole group of query heads"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"head_dim = model.dim / model.n_heads = {self.dim // self.n_heads} must be even for RoPE"
            )
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention={self.attention!r}; choose one of {ATTENTION_BACKENDS}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model.norm_eps and model.rope_theta must be > 0")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"model.intermediate_size must be > 0, got {self.intermediate_size}")

    def _ffn_hidden_dim(self) -> int:
        """Meta's SwiGLU sizing: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a plain mapping (a preset YAML), naming any unknown key."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(values) - known - {"_target_"})
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def architecture_differences(self, other: ModelConfig) -> list[str]:
        """``"field: self vs other"`` for each of :data:`ARCHITECTURE_FIELDS` that differs.

        The context fields (``max_seq_len``, ``rope_theta``, ``rope_scaling``) and the attention
        backend are left out: stages change them on the same weights.
        """
        return [f"model.{name}: {getattr(self, name)} (checkpoint) vs {getattr(other, name)} (config)"
                for name in ARCHITECTURE_FIELDS if getattr(self, name) != getattr(other, name)]

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping of the init fields (round-trips through ``from_dict``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if self.rope_scaling is not None:
            out["rope_scaling"] = asdict(self.rope_scaling)
        return out

    @property
    def n_kv_groups(self) -> int:
        """Query heads served by each KV head."""
        return self.n_heads // self.n_kv_heads

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count computed from the shape alone (no model needed)."""
        kv_dim = self.n_kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        feed_forward = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attention + feed_forward + 2 * self.dim
        embedding = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = self.n_layers * per_layer + self.dim + embedding + head
        return total - embedding if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N plus attention 12 * layers * dim * seq (the paper's MFU formula).

        N excludes the input embedding (a lookup, not a matmul); the output head counts.
        """
        n = self.num_params(exclude_embeddings=True)
        if self.tie_embeddings:
            n += self.vocab_size * self.dim
        return 6.0 * n + 12.0 * self.n_layers * self.dim * seq_len


def _rope_scaling_from_dict(values: dict[str, Any]) -> RopeScaling | None:
    values = dict(values)
    kind = values.pop("rope_type", values.pop("type", "llama3"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ValueError(f"model.rope_scaling type {kind!r} is not supported; herd implements 'llama3'")
    values.pop("rope_theta", None)
    known = {f.name for f in fields(RopeScaling)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown model.rope_scaling key(s) {unknown}; valid keys are {sorted(known)}")
    return RopeScaling(**values)


class AdapterConfigMixin:
    """``from_dict``/``to_dict`` for the frozen dataclasses that shape an adapter (``speech``, ``vision``).

    A subclass sets ``section``, the config key its presets live under, which error messages name.
    """

    section = "adapter"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a plain mapping (a preset YAML), naming any unknown key."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - {"_target_"})
        if unknown:
            raise ValueError(f"unknown {cls.section} config key(s) {unknown}; valid keys are {sorted(known)}")
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (lists for tuples) that round-trips through :meth:`from_dict`."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
