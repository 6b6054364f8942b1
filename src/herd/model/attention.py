"""Grouped-query attention with document masking, on SDPA (CPU and GPU) or FlexAttention (GPU).

Masks are built once per forward by :func:`build_attention_mask` and shared by every layer:
- ``None``: plain causal attention (no packing, no cache) - SDPA's fastest path;
- a boolean tensor (batch, 1, q_len, kv_len), True where a query may attend a key;
- a FlexAttention ``BlockMask`` when ``config.attention == "flex"`` and the tensors are on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.config import ModelConfig
from herd.model.rope import apply_rotary

try:  # FlexAttention ships with torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    BlockMask = create_block_mask = flex_attention = None

_compiled_flex_attention = None


class KVCache:
    """Preallocated keys/values for incremental decoding.

    Usage: ``cache = model.new_cache(batch, max_len)``; then call ``model(tokens, cache=cache)``
    with the prompt and afterwards one (or a few) new tokens at a time. Positions continue from
    ``cache.length`` automatically.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, n_kv_heads, new, head_dim) after the cached ones; return all so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, cache was built for {self.max_len}")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        # Under autocast the new k/v may be bf16 while the cache is fp32: attend in the new dtype.
        return self.keys[layer][:, :, :end].to(k.dtype), self.values[layer][:, :, :end].to(v.dtype)

    def advance(self, n: int) -> None:
        """Mark n more positions as filled (called by the model after all layers ran)."""
        self.length += n

    def reset(self) -> None:
        """Forget everything cached (the buffers are reused)."""
        self.length = 0


def use_flex(config: ModelConfig, device: torch.device) -> bool:
    """FlexAttention runs where it is selected, available and on a GPU; SDPA everywhere else."""
    return config.attention == "flex" and flex_attention is not None and device.type == "cuda"


def build_attention_mask(
    config: ModelConfig,
    batch: int,
    q_len: int,
    device: torch.device,
    *,
    document_ids: torch.Tensor | None = None,
    cache: KVCache | None = None,
) -> Any:
    """The mask every layer uses this forward (see the module docstring for its forms)."""
    if cache is not None:
        if document_ids is not None:
            raise ValueError("document_ids cannot be combined with a KV cache; decode one document per row")
        if cache.length == 0:
            return None
        q_pos = torch.arange(cache.length, cache.length + q_len, device=device)
        k_pos = torch.arange(cache.length + q_len, device=device)
        return (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, q_len, kv_len)
    if document_ids is None:
        return None
    if use_flex(config, device):
        return document_block_mask(document_ids)
    same_document = document_ids[:, :, None] == document_ids[:, None, :]  # (batch, seq, seq)
    causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
    return (same_document & causal)[:, None]  # (batch, 1, seq, seq)


def document_block_mask(document_ids: torch.Tensor) -> Any:
    """A FlexAttention block mask: causal and never across packed documents."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    batch, seq = document_ids.shape
    return create_block_mask(mask_mod, batch, None, seq, seq, device=document_ids.device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any) -> torch.Tensor:
    """Scaled dot-product attention; q (batch, heads, q_len, d), k/v (batch, kv_heads, kv_len, d)."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        return _flex(q, k, v, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> torch.Tensor:
    global _compiled_flex_attention
    if q.device.type != "cuda":  # eager FlexAttention: reference speed, forward only on CPU
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        kv_dim = config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, kv_dim, bias=False)
        self.wv = nn.Linear(config.dim, kv_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Any,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (batch, seq, dim) -> (batch, seq, dim)."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        out = attend(q, k, v, mask)  # (batch, n_heads, seq, head_dim)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
