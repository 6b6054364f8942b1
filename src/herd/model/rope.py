"""Rotary position embeddings: theta, long-context frequency scaling, rotate-half layout.

herd uses the Hugging Face "rotate half" layout (the first half of each head is paired with the
second half), so Hugging Face Llama checkpoints load without permuting wq/wk.

The scaling types are those of transformers' Llama (``modeling_rope_utils``), with the same
formulas: ``linear``, ``dynamic`` (NTK), ``yarn``, ``longrope`` and Llama 3.1's ``llama3``.
Two of them depend on the length of the forward: ``dynamic`` grows theta and ``longrope``
switches to its long factors once the positions of a forward reach past
``original_max_position_embeddings`` (the length is the largest position id + 1, over the whole
batch, as in transformers). ``yarn`` and ``longrope`` also scale cos/sin by an attention factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from herd.model.config import RopeScaling

# The types whose frequencies depend on the length of the forward.
LENGTH_DEPENDENT = ("dynamic", "longrope")


def inverse_frequencies(
    head_dim: int, theta: float, scaling: RopeScaling | None = None, *, long: bool = False
) -> torch.Tensor:
    """The head_dim/2 rotation frequencies, with the long-context scaling applied.

    ``long`` selects the frequencies of a forward past ``original_max_position_embeddings`` for
    ``longrope`` (its long factors); ``dynamic`` past that length is :func:`dynamic_frequencies`.
    Within it, both are plain RoPE (longrope: divided by its short factors).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    freqs = 1.0 / (theta**exponents)
    if scaling is None or scaling.rope_type == "dynamic":
        pass
    elif scaling.rope_type == "llama3":
        freqs = _llama3_scale(freqs, scaling)
    elif scaling.rope_type == "linear":
        freqs = freqs / scaling.factor
    elif scaling.rope_type == "yarn":
        freqs = _yarn_scale(freqs, head_dim, theta, scaling)
    elif scaling.rope_type == "longrope":
        factors = scaling.long_factor if long else scaling.short_factor
        freqs = freqs / torch.tensor(factors, dtype=torch.float64)
    else:  # pragma: no cover - RopeScaling refuses other types
        raise ValueError(f"unknown rope_type {scaling.rope_type!r}")
    return freqs.to(torch.float32)


def _llama3_scale(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Divide low frequencies by ``factor``, keep high ones, blend the band between."""
    wavelength = 2 * math.pi / freqs
    low_freq_wavelength = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelength = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelength - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * freqs / s.factor + smooth * freqs
    scaled = torch.where(wavelength > low_freq_wavelength, freqs / s.factor, blended)
    return torch.where(wavelength < high_freq_wavelength, freqs, scaled)


def _yarn_scale(freqs: torch.Tensor, head_dim: int, theta: float, s: RopeScaling) -> torch.Tensor:
    """YaRN: original frequencies above ``beta_fast`` rotations over the original context,
    frequencies divided by ``factor`` below ``beta_slow``, a linear ramp between."""
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1  # transformers' defaults (0 counts as unset)

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times
        return head_dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate is not False:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no singular ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: divide it by factor
    return freqs / s.factor * (1 - extrapolation) + freqs * extrapolation


def dynamic_frequencies(head_dim: int, theta: float, scaling: RopeScaling, seq_len: torch.Tensor) -> torch.Tensor:
    """Dynamic NTK frequencies for a forward of ``seq_len`` positions (a tensor: no host sync).

    theta grows to ``theta * (factor * L / original - (factor - 1)) ** (head_dim / (head_dim - 2))``
    with L = max(seq_len, original); computed in float32 on seq_len's device, as transformers does.
    """
    original = scaling.original_max_position_embeddings
    length = seq_len.clamp(min=original).float()
    base = theta * (scaling.factor * length / original - (scaling.factor - 1)) ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=seq_len.device).float() / head_dim
    return 1.0 / (base**exponents)


def attention_factor(scaling: RopeScaling | None) -> float:
    """The factor ``yarn`` and ``longrope`` multiply cos/sin by (1.0 for the other types)."""
    if scaling is None or scaling.rope_type not in ("yarn", "longrope"):
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)
    if scaling.rope_type == "yarn":
        if scaling.mscale and scaling.mscale_all_dim:
            return float(_yarn_mscale(scaling.factor, scaling.mscale) / _yarn_mscale(scaling.factor,
                                                                                  scaling.mscale_all_dim))
        return _yarn_mscale(scaling.factor)
    if scaling.factor <= 1.0:  # longrope
        return 1.0
    return math.sqrt(1 + math.log(scaling.factor) / math.log(scaling.original_max_position_embeddings))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN paper, eq. 21: 0.1 * mscale * ln(scale) + 1 (1 when not scaled up)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for arbitrary position ids (packed documents restart at 0).

    Buffers: ``inv_freq``, the frequencies within the original context, and ``long_inv_freq``,
    longrope's frequencies past it (a copy of ``inv_freq`` for the other types).
    """

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.register_buffer("long_inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the frequency tables; needed after building on the meta device."""
        if self.inv_freq.is_meta:
            return
        with torch.no_grad():
            self.inv_freq.copy_(inverse_frequencies(self.head_dim, self.theta, self.scaling))
            self.long_inv_freq.copy_(inverse_frequencies(self.head_dim, self.theta, self.scaling, long=True))

    @property
    def attention_factor(self) -> float:
        """What cos/sin are multiplied by (see :func:`attention_factor`)."""
        return attention_factor(self.scaling)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) -> cos, sin each (batch, seq, head_dim), in float32."""
        angles = position_ids[..., None].float() * self.frequencies(position_ids)  # (batch, seq, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos(), angles.sin()
        scale = self.attention_factor
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        return cos, sin

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The (head_dim/2,) frequencies of a forward over ``position_ids``.

        ``inv_freq``, except for the length-dependent types once the largest position id
        reaches ``original_max_position_embeddings``: then longrope's long frequencies, or
        dynamic NTK's for that length. Chosen on the device (``torch.where``), without a sync.
        """
        if self.scaling is None or self.scaling.rope_type not in LENGTH_DEPENDENT:
            return self.inv_freq
        seq_len = position_ids.max() + 1
        if self.scaling.rope_type == "longrope":
            long = self.long_inv_freq
        else:
            long = dynamic_frequencies(self.head_dim, self.theta, self.scaling, seq_len)
        return torch.where(seq_len > self.scaling.original_max_position_embeddings, long, self.inv_freq)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by the per-position angles (rotate-half layout).

    The angles are computed in float32; the rotation runs in x's dtype (bf16 under autocast).
    """
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
