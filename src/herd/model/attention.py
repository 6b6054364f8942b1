"""Grouped-query attention with document masking, on SDPA (CPU and GPU) or FlexAttention (GPU).

Masks are built once per forward by :func:`build_attention_mask` and shared by every layer:
- ``None``: plain causal attention (no packing, no padding; a prefill or a single decoded query
  with a cache) - SDPA's fastest path;
- a boolean tensor (batch, 1, q_len, kv_len), True where a query may attend a key (with a KV
  cache: causal, never a left-padding slot, see :meth:`KVCache.pad_left`);
- a FlexAttention ``BlockMask`` when ``config.attention == "flex"`` and the tensors are on a GPU.

Under context parallelism (:mod:`herd.model.context`) a rank holds some of a row's queries and
attends them to the whole row's keys: the mask is then (batch, 1, local queries, seq), built from
the whole row's ids at the global places of its queries (``query_index``).

Packed rows mark their documents with ``document_ids``: attention never crosses a document.
Shared-prompt rows (preference data: one prompt followed by several responses to it) also mark
``response_ids``, 0 on the prompt and k = 1, 2, ... on the k-th response of the document. A
response attends to its document's prompt and to itself, never to a sibling response, so each
response is computed exactly as if it followed the prompt alone (its positions continue from the
end of the prompt, see :func:`herd.model.transformer.default_position_ids`), while the prompt is
encoded once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.config import ModelConfig
from herd.model.context import ContextParallel
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

    Prompts of different lengths share a batch by left padding: :meth:`pad_left` marks each row's
    leading padding slots, which are then never attended, and positions count from each row's
    first real token. :meth:`select` keeps, reorders or repeats rows in place (dropping finished
    rows, or expanding one prefill into several samples).
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
        self._key_storage = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self._value_storage = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.keys = list(self._key_storage)  # the rows in use: a prefix of each storage tensor
        self.values = list(self._value_storage)
        self.max_len = max_len
        self.length = 0
        self.starts: torch.Tensor | None = None  # (batch,) first real slot of each row; None: no padding
        self.key_mask: torch.Tensor | None = None  # (batch, max_len) True where a slot may be attended

    @property
    def batch(self) -> int:
        """Number of rows in use."""
        return self.keys[0].shape[0]

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
        """Forget everything cached (the buffers are reused) and any padding."""
        self.length = 0
        self.starts = self.key_mask = None

    def pad_left(self, pad_lengths: torch.Tensor) -> None:
        """Declare that row i starts with ``pad_lengths[i]`` padding slots (call before the prompt).

        Padding slots are never attended by real tokens, and RoPE positions of row i count from
        its first real token, so a left-padded prompt decodes exactly as it would alone.
        """
        device = self.keys[0].device
        self.starts = pad_lengths.to(device=device, dtype=torch.long)
        slots = torch.arange(self.max_len, device=device)
        self.key_mask = slots[None, :] >= self.starts[:, None]  # (batch, max_len)

    def positions(self, seq: int) -> torch.Tensor:
        """RoPE positions (batch, seq) of the next ``seq`` tokens of every row."""
        index = torch.arange(self.length, self.length + seq, device=self.keys[0].device)
        if self.starts is None:
            return index.expand(self.batch, seq)
        return (index[None, :] - self.starts[:, None]).clamp(min=0)  # padding slots sit at 0

    def attention_mask(self, q_len: int) -> torch.Tensor | None:
        """The mask of the next ``q_len`` queries over every slot so far (see :func:`build_attention_mask`)."""
        end = self.length + q_len
        if self.key_mask is None:
            if self.length == 0 or q_len == 1:  # causal prefill, or one query that sees every key
                return None
            q_pos = torch.arange(self.length, end, device=self.keys[0].device)
            k_pos = torch.arange(end, device=self.keys[0].device)
            return (k_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, q_len, kv_len)
        keys = self.key_mask[:, None, None, :end]  # (batch, 1, 1, kv_len): a view, nothing built
        if q_len == 1:
            return keys
        q_pos = torch.arange(self.length, end, device=self.key_mask.device)
        k_pos = torch.arange(end, device=self.key_mask.device)
        causal = k_pos[None, :] <= q_pos[:, None]
        own = k_pos[None, :] == q_pos[:, None]  # a padding query sees itself, so no row is all masked
        return (causal & keys) | own  # (batch, 1, q_len, kv_len)

    def select(self, rows: torch.Tensor) -> None:
        """Keep, reorder or repeat rows in place: new row i is the old row ``rows[i]``.

        ``rows`` may drop rows (finished sequences) or repeat them (``repeat_interleave`` to
        sample several continuations of one prefill). The storage allocated by the constructor
        is reused while the rows fit in it; only the filled positions are copied.
        """
        rows = rows.to(device=self.keys[0].device, dtype=torch.long)
        n = rows.numel()
        for cached, storage in ((self.keys, self._key_storage), (self.values, self._value_storage)):
            for layer, tensor in enumerate(cached):
                kept = tensor[:, :, : self.length].index_select(0, rows)  # a copy: safe to write back
                if n > storage[layer].shape[0]:
                    storage[layer] = tensor.new_zeros((n, *tensor.shape[1:]))
                cached[layer] = storage[layer][:n]
                cached[layer][:, :, : self.length] = kept
        if self.starts is not None:
            self.starts = self.starts.index_select(0, rows)
            self.key_mask = self.key_mask.index_select(0, rows)


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
    response_ids: torch.Tensor | None = None,
    cache: KVCache | None = None,
    query_index: torch.Tensor | None = None,
    kv_len: int | None = None,
) -> Any:
    """The mask every layer uses this forward (see the module docstring for its forms).

    ``response_ids`` (batch, seq), for shared-prompt rows: 0 on a document's prompt, k on its
    k-th response; a response sees the prompt and itself only.
    ``query_index`` (q_len,), under context parallelism: the places in the row of the queries of
    this rank, whose keys are the whole row (``kv_len`` places; ``document_ids`` and
    ``response_ids`` are then the whole row's). Plain causal attention then needs a mask too.
    """
    if cache is not None:
        if document_ids is not None or response_ids is not None or query_index is not None:
            raise ValueError("document_ids cannot be combined with a KV cache (nor can response_ids or context "
                             "parallelism); decode one document per row")
        return cache.attention_mask(q_len)
    if query_index is None and document_ids is None and response_ids is None:
        return None
    whole_row = query_index is None
    if whole_row:
        query_index = torch.arange(q_len, device=device)
    kv_len = kv_len if kv_len is not None else q_len
    if document_ids is None and response_ids is not None:
        document_ids = torch.zeros_like(response_ids)
    if use_flex(config, device):
        return document_block_mask(document_ids, response_ids, query_index=query_index, batch=batch, kv_len=kv_len)
    causal = query_index[:, None] >= torch.arange(kv_len, device=device)[None, :]  # (q_len, kv_len)
    if document_ids is None:
        return causal[None, None]  # (1, 1, q_len, kv_len)
    query_documents = document_ids if whole_row else document_ids.index_select(1, query_index)
    allowed = query_documents[:, :, None] == document_ids[:, None, :]  # (batch, q_len, kv_len): same document
    if response_ids is not None:
        key_is_prompt = (response_ids == 0)[:, None, :]
        query_responses = response_ids if whole_row else response_ids.index_select(1, query_index)
        allowed = allowed & (key_is_prompt | (query_responses[:, :, None] == response_ids[:, None, :]))
    return (allowed & causal)[:, None]  # (batch, 1, q_len, kv_len)


def document_block_mask(
    document_ids: torch.Tensor | None,
    response_ids: torch.Tensor | None = None,
    *,
    query_index: torch.Tensor | None = None,
    batch: int | None = None,
    kv_len: int | None = None,
) -> Any:
    """A FlexAttention block mask: causal, never across packed documents, and (with ``response_ids``)
    never from one response of a shared prompt to another. ``query_index`` maps the queries to their
    places in the row (context parallelism; default: the queries are the row)."""
    if document_ids is not None:
        batch, kv_len = document_ids.shape
    device = document_ids.device if document_ids is not None else query_index.device
    if query_index is None:
        query_index = torch.arange(kv_len, device=device)

    def causal_mask(b, h, q_idx, kv_idx):
        return query_index[q_idx] >= kv_idx

    def document_mask(b, h, q_idx, kv_idx):
        return causal_mask(b, h, q_idx, kv_idx) & (document_ids[b, query_index[q_idx]] == document_ids[b, kv_idx])

    def shared_prompt_mask(b, h, q_idx, kv_idx):
        key_response = response_ids[b, kv_idx]
        own_or_prompt = (key_response == 0) | (key_response == response_ids[b, query_index[q_idx]])
        return document_mask(b, h, q_idx, kv_idx) & own_or_prompt

    mask_mod = (causal_mask if document_ids is None else document_mask if response_ids is None
                else shared_prompt_mask)
    return create_block_mask(mask_mod, batch if document_ids is not None else None, None, query_index.numel(),
                             kv_len, device=device)


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
    """Grouped-query self-attention with rotary positions (q/k/v/o biases with ``attention_bias``)."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        q_dim, kv_dim = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        bias = config.attention_bias
        self.wq = nn.Linear(config.dim, q_dim, bias=bias)
        self.wk = nn.Linear(config.dim, kv_dim, bias=bias)
        self.wv = nn.Linear(config.dim, kv_dim, bias=bias)
        self.wo = nn.Linear(q_dim, config.dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: Any,
        cache: KVCache | None = None,
        context: ContextParallel | None = None,
    ) -> torch.Tensor:
        """x (batch, seq, dim) -> (batch, seq, dim). Under ``context`` parallelism x holds this rank's
        places of the row, and the keys and values of the whole row are gathered from the group."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if context is not None:
            k, v = context.gather(k), context.gather(v)  # (batch, row, n_kv_heads, head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (batch, heads, seq, head_dim)
        if cache is not None:
            k, v = cache.update(self.layer_id, k, v)
        out = attend(q, k, v, mask)  # (batch, n_heads, seq, head_dim)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
