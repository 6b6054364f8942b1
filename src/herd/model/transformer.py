"""The Llama 3 decoder: embeddings -> blocks (RMSNorm, GQA + RoPE, SwiGLU) -> norm -> head."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.attention import Attention, KVCache, build_attention_mask
from herd.model.config import ModelConfig
from herd.model.context import ContextParallel
from herd.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * normed

    def reset_parameters(self) -> None:
        """Unit gain."""
        nn.init.ones_(self.weight)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); ``bias`` gives all three linears a bias (``mlp_bias``)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, hidden_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: attention then feed-forward."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim, bias=config.mlp_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None,
                context: ContextParallel | None = None) -> torch.Tensor:
        """x (batch, seq, dim) -> (batch, seq, dim)."""
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, cache, context)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """A Llama-3-style decoder-only language model.

    Build big models on the meta device and materialise them after sharding::

        with torch.device("meta"):
            model = Transformer(config)
        model.to_empty(device="cuda")   # or shard first, then to_empty
        model.init_weights()
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        if not self.tok_embeddings.weight.is_meta:
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Initialise every parameter and buffer in place (works after ``to_empty``).

        Normal(0, std) for embeddings and projections; the projections that write into the
        residual stream (wo, w2) are scaled by 1/sqrt(2 * n_layers); biases (``attention_bias``,
        ``mlp_bias``) start at 0; norms start at 1.
        """
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for block in self.layers:
            attn, ffn = block.attention, block.feed_forward
            for linear in (attn.wq, attn.wk, attn.wv, ffn.w1, ffn.w3):
                nn.init.normal_(linear.weight, std=std)
            for linear in (attn.wo, ffn.w2):
                nn.init.normal_(linear.weight, std=residual_std)
            for linear in (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w2, ffn.w3):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        self.rope.reset_parameters()

    def set_context(self, **changes) -> None:
        """Change context settings in place: ``max_seq_len``, ``rope_theta``, ``rope_scaling``, ``attention``.

        Weights are untouched; the RoPE table is recomputed. Long-context stages call this.
        """
        allowed = {"max_seq_len", "rope_theta", "rope_scaling", "attention"}
        unknown = sorted(set(changes) - allowed)
        if unknown:
            raise ValueError(f"set_context cannot change {unknown}; it changes {sorted(allowed)}")
        self.config = dataclasses.replace(self.config, **changes)
        self.rope.theta, self.rope.scaling = self.config.rope_theta, self.config.rope_scaling
        self.rope.reset_parameters()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for decoding up to ``max_len`` positions."""
        c = self.config
        weight = self.tok_embeddings.weight
        return KVCache(
            c.n_layers, batch, max_len, c.n_kv_heads, c.head_dim, dtype=dtype or weight.dtype, device=weight.device
        )

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        response_ids: torch.Tensor | None = None,
        input_embeddings: torch.Tensor | None = None,
        embedding_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        output_hidden: bool = False,
        context: ContextParallel | None = None,
    ) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab), or with ``output_hidden`` the final
        normed hidden states (batch, seq, dim) without the output head.

        ``document_ids`` (batch, seq) marks packed documents: attention never crosses a boundary
        and positions restart at 0 per document unless ``position_ids`` is given.
        ``response_ids`` (batch, seq) marks shared-prompt rows: 0 on a document's prompt, k on its
        k-th response; each response attends to the prompt and itself only, and its positions
        continue from the end of the prompt, so it is computed as if it followed the prompt alone.
        ``input_embeddings`` (batch, seq, dim) replace the token embeddings where ``embedding_mask``
        (batch, seq) is true: this is how an adapter (speech) feeds its outputs to the model as
        token embeddings. The ids of ``tokens`` at those positions are not read; elsewhere the
        embeddings are the model's own, so an all-false mask changes nothing.
        With a ``cache``, positions continue from what it holds (left padding excluded, see
        :meth:`KVCache.pad_left`) and it is advanced.
        With ``context`` parallelism (:mod:`herd.model.context`) every input is the whole row, the
        same on every rank of the group; positions and masks are those of the whole row, and each
        rank computes and returns its own ``seq / size`` places (``context.shard`` of the row).
        """
        batch, seq = tokens.shape
        if context is not None and context.size > 1 and cache is not None:
            raise ValueError("context parallelism computes whole rows spread over ranks; decode with a KV cache "
                             "without it")
        if position_ids is None and cache is not None:
            position_ids = cache.positions(seq)  # continues each row, counted from its first real token
        elif position_ids is None:
            position_ids = default_position_ids(tokens, document_ids, response_ids=response_ids)
        cos, sin = self.rope(position_ids)  # of the whole row (length-dependent scalings see all of it)
        if context is not None and context.size > 1:
            index = context.local_index(seq, tokens.device)
            mask = build_attention_mask(self.config, batch, index.numel(), tokens.device, document_ids=document_ids,
                                        response_ids=response_ids, query_index=index, kv_len=seq)
            cos, sin = context.shard(cos), context.shard(sin)
            tokens = context.shard(tokens)
            if input_embeddings is not None:
                input_embeddings = context.shard(input_embeddings)
            if embedding_mask is not None:
                embedding_mask = context.shard(embedding_mask)
        else:
            context = None
            mask = build_attention_mask(self.config, batch, seq, tokens.device, document_ids=document_ids,
                                        response_ids=response_ids, cache=cache)
        h = self.embed(tokens, input_embeddings, embedding_mask)
        for block in self.layers:
            h = block(h, cos, sin, mask, cache, context)
        if cache is not None:
            cache.advance(seq)
        h = self.norm(h)
        return h if output_hidden else self.output(h)

    def embed(
        self,
        tokens: torch.Tensor,
        input_embeddings: torch.Tensor | None = None,
        embedding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The input of the first block (batch, seq, dim): token embeddings, with ``input_embeddings``
        where ``embedding_mask`` is true (see :meth:`forward`)."""
        h = self.tok_embeddings(tokens)
        if input_embeddings is None and embedding_mask is None:
            return h
        if input_embeddings is None or embedding_mask is None:
            raise ValueError("input_embeddings and embedding_mask go together: give both or neither")
        if input_embeddings.shape != h.shape or embedding_mask.shape != tokens.shape:
            raise ValueError(f"input_embeddings must be (batch, seq, dim) = {tuple(h.shape)} and embedding_mask "
                             f"(batch, seq) = {tuple(tokens.shape)}; got {tuple(input_embeddings.shape)} and "
                             f"{tuple(embedding_mask.shape)}")
        return torch.where(embedding_mask[..., None], input_embeddings.to(h.dtype), h)

    def hidden_states(self, tokens: torch.Tensor, **kwargs) -> torch.Tensor:
        """Final normed hidden states (batch, seq, dim): ``forward`` without the output head.

        Stages that never need full logits (chunked cross-entropy, a reward head) call this. It
        goes through ``__call__``, so hooks of wrappers such as FSDP2 run.
        """
        return self(tokens, output_hidden=True, **kwargs)


def default_position_ids(
    tokens: torch.Tensor,
    document_ids: torch.Tensor | None = None,
    offset: int = 0,
    response_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Positions 0.. per row, restarting at 0 where ``document_ids`` changes.

    With ``response_ids`` (shared-prompt rows: a document is its prompt, marked 0, then its
    responses, marked 1, 2, ...), each response's positions continue from the end of the prompt,
    as if it followed the prompt alone.
    """
    batch, seq = tokens.shape
    index = torch.arange(seq, device=tokens.device).expand(batch, seq)
    if document_ids is None and response_ids is None:
        return index + offset
    if document_ids is None:
        document_ids = torch.zeros_like(response_ids)
    positions = index - _run_starts(index, document_ids)
    if response_ids is None:
        return positions
    # A response token's position: the prompt's length plus its offset in its own response.
    in_prompt = response_ids == 0
    prompt_before = torch.cumsum(in_prompt, dim=1) - in_prompt.long()  # prompt tokens left of each position
    doc_start = _run_starts(index, document_ids)
    response_start = _run_starts(index, document_ids, response_ids)
    prompt_length = prompt_before.gather(1, response_start) - prompt_before.gather(1, doc_start)
    return torch.where(in_prompt, positions, prompt_length + index - response_start)


def _run_starts(index: torch.Tensor, *labels: torch.Tensor) -> torch.Tensor:
    """For each position, the index where its run (along the row) of equal ``labels`` starts."""
    starts = torch.zeros_like(labels[0], dtype=torch.bool)
    starts[:, 0] = True
    for label in labels:
        starts[:, 1:] |= label[:, 1:] != label[:, :-1]
    return torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
