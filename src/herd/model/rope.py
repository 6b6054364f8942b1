"""Rotary position embeddings: theta, llama3 frequency scaling, rotate-half layout.

herd uses the Hugging Face "rotate half" layout (the first half of each head is paired with the
second half), so Hugging Face Llama checkpoints load without permuting wq/wk.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from herd.model.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """The head_dim/2 rotation frequencies, with Llama 3.1's long-context scaling applied."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    freqs = 1.0 / (theta**exponents)
    if scaling is not None:
        freqs = _llama3_scale(freqs, scaling)
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


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for arbitrary position ids (packed documents restart at 0)."""

    def __init__(self, head_dim: int, theta: float, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the frequency table; needed after building on the meta device."""
        if self.inv_freq.is_meta:
            return
        with torch.no_grad():
            self.inv_freq.copy_(inverse_frequencies(self.head_dim, self.theta, self.scaling))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) -> cos, sin each (batch, seq, head_dim), in float32."""
        angles = position_ids[..., None].float() * self.inv_freq  # (batch, seq, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, seq, heads, head_dim) by the per-position angles (rotate-half layout).

    The angles are computed in float32; the rotation runs in x's dtype (bf16 under autocast).
    """
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
