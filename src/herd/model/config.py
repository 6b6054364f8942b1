"""One dataclass describes every backbone size, from the tiny CPU preset to Llama 3 405B."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

ATTENTION_BACKENDS = ("sdpa", "flex")
# Fields that change what the weights mean; two configs that differ in any of them are different models.
ARCHITECTURE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "ffn_hidden_dim",
                       "norm_eps", "tie_embeddings", "attention_bias", "mlp_bias")

# The RoPE scaling types of transformers' Llama (``default`` is ``rope_scaling: null``), and the
# RopeScaling fields each one reads besides ``rope_type``; the others stay None.
ROPE_TYPE_FIELDS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
             "attention_factor", "truncate"),
    "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor", "attention_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
ROPE_TYPES = tuple(ROPE_TYPE_FIELDS)
_ROPE_REQUIRED = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "longrope": ("factor", "original_max_position_embeddings", "short_factor", "long_factor"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# Meta's Llama 3.1 values: what a RopeScaling without fields (and every config before rope_type) means.
_LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class RopeScaling:
    """Long-context RoPE frequency scaling: one of the ``rope_type`` s of transformers' Llama.

    - ``linear``: every frequency divided by ``factor`` (position interpolation).
    - ``dynamic``: NTK-aware theta, grown from the length of each forward once it passes
      ``original_max_position_embeddings`` (for a checkpoint: its ``max_position_embeddings``).
    - ``yarn``: frequencies blended between interpolated and original by a ramp over
      ``beta_fast``/``beta_slow`` rotations, and cos/sin scaled by an attention factor.
    - ``longrope``: per-frequency ``short_factor`` within the original context, ``long_factor``
      past it, and cos/sin scaled by an attention factor.
    - ``llama3``: Meta's Llama 3.1 scaling (the default; its fields default to Meta's values).

    Each type reads the fields :data:`ROPE_TYPE_FIELDS` lists; a field another type reads must
    stay None. The formulas live in :mod:`herd.model.rope`.
    """

    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    rope_type: str = "llama3"
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    truncate: bool | None = None

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model.rope_scaling.rope_type={self.rope_type!r} is not supported; choose one of "
                             f"{ROPE_TYPES}, or rope_scaling: null for plain RoPE")
        for name in ("short_factor", "long_factor"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.rope_type == "llama3":
            for name, value in _LLAMA3_DEFAULTS.items():
                if getattr(self, name) is None:
                    object.__setattr__(self, name, value)
        reads = ROPE_TYPE_FIELDS[self.rope_type]
        unused = [f.name for f in fields(self) if f.name != "rope_type" and f.name not in reads
                  and getattr(self, f.name) is not None]
        if unused:
            raise ValueError(f"model.rope_scaling.{unused[0]} is not used by rope_type {self.rope_type!r}, which "
                             f"reads {list(reads)}; remove it")
        missing = [name for name in _ROPE_REQUIRED[self.rope_type] if getattr(self, name) is None]
        if missing:
            raise ValueError(f"model.rope_scaling.{missing[0]} is required by rope_type {self.rope_type!r}")
        self._validate_values()

    def _validate_values(self) -> None:
        if self.factor <= 0:
            raise ValueError(f"model.rope_scaling.factor must be > 0, got {self.factor}")
        original = self.original_max_position_embeddings
        if original is not None and (not isinstance(original, int) or original <= 0):
            raise ValueError(f"model.rope_scaling.original_max_position_embeddings must be a positive integer, "
                             f"got {original!r}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ValueError(
                "rope_scaling needs high_freq_factor > low_freq_factor > 0, got "
                f"high_freq_factor={self.high_freq_factor}, low_freq_factor={self.low_freq_factor}"
            )
        if self.attention_factor is not None and self.attention_factor <= 0:
            raise ValueError(f"model.rope_scaling.attention_factor must be > 0, got {self.attention_factor}")
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if values is not None and not all(x > 0 for x in values):
                raise ValueError(f"model.rope_scaling.{name} must hold numbers > 0 (one per frequency)")
        if self.truncate is not None and not isinstance(self.truncate, bool):
            raise ValueError(f"model.rope_scaling.truncate must be true or false, got {self.truncate!r}")

    def to_dict(self) -> dict[str, Any]:
        """``rope_type`` and the fields it reads (lists for tuples); round-trips through ModelConfig."""
        out: dict[str, Any] = {"rope_type": self.rope_type}
        for name in ROPE_TYPE_FIELDS[self.rope_type]:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-3-style decoder.

    Derived values (``head_dim``, ``ffn_hidden_dim``) are computed once in ``__post_init__``.
    ``head_dim`` is ``dim / n_heads`` unless given (checkpoints such as Llama 3.2 3B's kin pin
    it; the attention projections are then ``n_heads * head_dim`` wide). ``ffn_hidden_dim``
    follows Meta's rule from ``ffn_dim_multiplier`` and ``multiple_of`` unless
    ``intermediate_size`` pins it (checkpoints imported from Hugging Face do that).
    ``attention_bias`` adds biases to the q/k/v/o projections and ``mlp_bias`` to the
    feed-forward's three (Llama 3 has neither; some Llama-architecture checkpoints do).
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
    head_dim: int | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    ffn_hidden_dim: int = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _rope_scaling_from_dict(self.rope_scaling))
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        self._validate()
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        object.__setattr__(self, "ffn_hidden_dim", self._ffn_hidden_dim())
        self._validate_rope()

    def _validate(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:  # also with head_dim given: transformers' LlamaConfig requires it
            raise ValueError(
                f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                "choose n_heads that divides dim"
            )
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ValueError(f"model.head_dim must be a positive integer or null (dim / n_heads), got "
                             f"{self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}; "
                "grouped-query attention needs each KV head to serve a whole group of query heads"
            )
        if self.head_dim is None and (self.dim // self.n_heads) % 2:
            raise ValueError(
                f"head_dim = model.dim / model.n_heads = {self.dim // self.n_heads} must be even for RoPE"
            )
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention={self.attention!r}; choose one of {ATTENTION_BACKENDS}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model.norm_eps and model.rope_theta must be > 0")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"model.intermediate_size must be > 0, got {self.intermediate_size}")
        for name in ("attention_bias", "mlp_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name} must be true or false, got {getattr(self, name)!r}")

    def _validate_rope(self) -> None:
        """The RoPE scaling checks that need head_dim."""
        s = self.rope_scaling
        if s is None:
            return
        if s.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(s, name)) != self.head_dim // 2:
                    raise ValueError(f"model.rope_scaling.{name} has {len(getattr(s, name))} values; it needs one "
                                     f"per frequency, head_dim / 2 = {self.head_dim // 2}")
        if s.rope_type == "dynamic" and self.head_dim <= 2:
            raise ValueError("rope_type 'dynamic' needs model.head_dim > 2 (its theta grows as head_dim / "
                             "(head_dim - 2))")

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
        """Plain mapping of the init fields (round-trips through ``from_dict``).

        ``head_dim`` is None when it is the derived ``dim / n_heads``, so a mapping edited to
        another ``dim`` or ``n_heads`` derives it again.
        """
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        if self.rope_scaling is not None:
            out["rope_scaling"] = self.rope_scaling.to_dict()
        if self.head_dim == self.dim // self.n_heads:
            out["head_dim"] = None
        return out

    @property
    def n_kv_groups(self) -> int:
        """Query heads served by each KV head."""
        return self.n_heads // self.n_kv_heads

    def num_params(self, *, exclude_embeddings: bool = False) -> int:
        """Parameter count computed from the shape alone (no model needed)."""
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = self.dim * q_dim * 2 + self.dim * kv_dim * 2
        if self.attention_bias:
            attention += q_dim + 2 * kv_dim + self.dim
        feed_forward = 3 * self.dim * self.ffn_hidden_dim
        if self.mlp_bias:
            feed_forward += 2 * self.ffn_hidden_dim + self.dim
        per_layer = attention + feed_forward + 2 * self.dim
        embedding = self.vocab_size * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        total = self.n_layers * per_layer + self.dim + embedding + head
        return total - embedding if exclude_embeddings else total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6N plus attention 12 * layers * dim * seq (the paper's MFU formula).

        N excludes the input embedding (a lookup, not a matmul); the output head counts. The
        attention term uses the query width ``n_heads * head_dim`` (``dim`` unless head_dim is pinned).
        """
        n = self.num_params(exclude_embeddings=True)
        if self.tie_embeddings:
            n += self.vocab_size * self.dim
        return 6.0 * n + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len


def _rope_scaling_from_dict(values: dict[str, Any]) -> RopeScaling | None:
    """A RopeScaling from a mapping (preset YAML, stored config, transformers' rope_parameters);
    None for ``rope_type: default``. ``type`` is the old name of ``rope_type``; without either the
    mapping is Llama 3.1's ``llama3`` scaling (every config before rope_type)."""
    values = dict(values)
    kind = values.pop("rope_type", values.pop("type", "llama3"))
    if kind in (None, "default"):
        return None
    values.pop("rope_theta", None)
    known = {f.name for f in fields(RopeScaling)} - {"rope_type"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown model.rope_scaling key(s) {unknown}; valid keys are {sorted(known)}")
    return RopeScaling(rope_type=kind, **values)


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
