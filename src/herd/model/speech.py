"""The speech adapter of Llama 3 (paper 8.2): a Conformer encoder and an adapter whose outputs the
frozen language model reads as token embeddings.

Frames, from the features to the language model:

- **10 ms**: 80-bin log-mel features (``herd.data`` computes them with ``transformers``'
  ``WhisperFeatureExtractor``: 16 kHz audio, a hop of 160 samples);
- **40 ms**: :class:`SpeechEncoder` stacks 4 consecutive frames (320 values) and projects them
  to its width, then runs its Conformer blocks;
- **80 ms**: :class:`SpeechAdapter` runs a convolution of kernel 3 and stride 2, one rotary
  transformer layer, and a linear map to the language model's width.

:class:`SpeechLanguageModel` puts the adapter's frames into the backbone's input in place of
token embeddings, through the one general entry the backbone has for that
(``Transformer.forward(tokens, input_embeddings=..., embedding_mask=...)``). A dialog holds
``<|speech_start|>``, one position per adapter frame, then ``<|speech_end|>``; the data side
expands those positions (:meth:`SpeechConfig.output_frames` gives their number). Without speech
the model is the backbone, bit for bit.

A Conformer block (Gulati et al., 2020), as the paper describes it: Macaron feed-forwards (two
half-step FFNs around attention and convolution), rotary self-attention, a convolution module
(pointwise + GLU, depthwise of kernel 7, pointwise), and a final LayerNorm. Two choices are
herd's own and written here so nobody has to guess:

- the convolution module normalises with LayerNorm where the original has BatchNorm, so that a
  clip's output does not depend on the other clips of its batch or on their padding;
- attention never reads padded frames (a key padding mask), and padded frames are zeroed
  before every convolution, so a clip encodes the same alone or in a padded batch.

The paper's shape (24 layers, width 1536, FFN 4096, 24 heads: about 1B parameters; an adapter
of about 100M with a transformer layer of width 3072 and FFN 4096) is ``configs/speech/llama3_1b``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.config import AdapterConfigMixin, ModelConfig
from herd.model.generate import generate as generate_tokens
from herd.model.rope import RotaryEmbedding, apply_rotary
from herd.model.transformer import FeedForward, RMSNorm, Transformer

MEL_FRAME_MS = 10  # the features' hop: 160 samples at 16 kHz


@dataclass(frozen=True)
class SpeechConfig(AdapterConfigMixin):
    """Shape of the speech encoder and adapter; the backbone's shape is its own ModelConfig.

    Encoder: ``n_mels`` features per 10 ms frame, ``stack`` frames stacked into one, then
    ``n_layers`` Conformer blocks of width ``dim``, ``n_heads`` heads, Macaron FFNs of ``ffn_dim``
    and depthwise convolutions of ``conv_kernel``. Adapter: a convolution of ``adapter_kernel``
    and ``adapter_stride`` to width ``adapter_dim``, one rotary transformer layer with
    ``adapter_heads`` heads and a SwiGLU FFN of ``adapter_ffn_dim``, then a linear map to the
    language model's width.
    """

    section = "speech"

    n_mels: int = 80
    stack: int = 4
    dim: int = 1536
    n_layers: int = 24
    n_heads: int = 24
    ffn_dim: int = 4096
    conv_kernel: int = 7
    adapter_dim: int = 3072
    adapter_heads: int = 24
    adapter_ffn_dim: int = 4096
    adapter_kernel: int = 3
    adapter_stride: int = 2
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("n_mels", "stack", "dim", "n_layers", "n_heads", "ffn_dim", "conv_kernel", "adapter_dim",
                     "adapter_heads", "adapter_ffn_dim", "adapter_kernel", "adapter_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"speech.{name} must be a positive integer, got {value!r}")
        for width, heads in (("dim", "n_heads"), ("adapter_dim", "adapter_heads")):
            if getattr(self, width) % getattr(self, heads) or (getattr(self, width) // getattr(self, heads)) % 2:
                raise ValueError(f"speech.{width}={getattr(self, width)} must split into speech.{heads}="
                                 f"{getattr(self, heads)} heads of an even width (rotary positions pair them)")
        for name in ("conv_kernel", "adapter_kernel"):
            if getattr(self, name) % 2 == 0:
                raise ValueError(f"speech.{name} must be odd (a centred convolution), got {getattr(self, name)}")

    def encoder_frames(self, mel_frames: int | torch.Tensor) -> int | torch.Tensor:
        """Encoder frames of a clip of ``mel_frames`` features: whole stacks only (a last partial
        stack, under 40 ms, is dropped)."""
        return mel_frames // self.stack

    def output_frames(self, mel_frames: int | torch.Tensor) -> int | torch.Tensor:
        """Adapter frames (positions in the language model) of a clip of ``mel_frames`` features."""
        pad = self.adapter_kernel // 2
        return (self.encoder_frames(mel_frames) + 2 * pad - self.adapter_kernel) // self.adapter_stride + 1

    @property
    def frame_ms(self) -> dict[str, int]:
        """Milliseconds per frame at each stage: features, encoder, adapter (10, 40, 80 by default)."""
        encoder = MEL_FRAME_MS * self.stack
        return {"features": MEL_FRAME_MS, "encoder": encoder, "adapter": encoder * self.adapter_stride}


# ------------------------------------------------------------------------------------------ blocks


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with rotary positions; padded frames are never keys."""

    def __init__(self, dim: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (batch, frames, dim); cos/sin (batch, frames, head_dim); mask (batch, 1, 1, frames) True on real frames."""
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, self.n_heads, self.head_dim) for proj in (self.wq, self.wk, self.wv))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(batch, length, -1))  # (batch, frames, dim)


class MacaronFeedForward(nn.Module):
    """LayerNorm -> Linear -> SiLU (Swish) -> Linear, with biases; the block adds half of it."""

    def __init__(self, dim: int, hidden_dim: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(self.norm(x))))


class ConvolutionModule(nn.Module):
    """LayerNorm -> pointwise (to 2 x dim) -> GLU -> depthwise (kernel k) -> LayerNorm -> SiLU -> pointwise."""

    def __init__(self, dim: int, kernel: int, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise_in = nn.Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.depthwise_norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (batch, frames, dim), valid (batch, frames) bool -> (batch, frames, dim)."""
        h = F.glu(self.pointwise_in(self.norm(x)), dim=-1)
        h = h.masked_fill(~valid[..., None], 0.0)  # padding never leaks into a real frame
        h = self.depthwise(h.transpose(1, 2)).transpose(1, 2)
        return self.pointwise_out(F.silu(self.depthwise_norm(h)))


class ConformerBlock(nn.Module):
    """x + FFN/2 -> + attention -> + convolution -> + FFN/2 -> LayerNorm (Macaron Conformer)."""

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        eps = config.norm_eps
        self.ffn_in = MacaronFeedForward(config.dim, config.ffn_dim, eps)
        self.attention_norm = nn.LayerNorm(config.dim, eps=eps)
        self.attention = SelfAttention(config.dim, config.n_heads)
        self.conv = ConvolutionModule(config.dim, config.conv_kernel, eps)
        self.ffn_out = MacaronFeedForward(config.dim, config.ffn_dim, eps)
        self.final_norm = nn.LayerNorm(config.dim, eps=eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x (batch, frames, dim) -> (batch, frames, dim); ``valid`` (batch, frames) marks real frames."""
        x = x + 0.5 * self.ffn_in(x)
        x = x + self.attention(self.attention_norm(x), cos, sin, valid[:, None, None, :])
        x = x + self.conv(x, valid)
        x = x + 0.5 * self.ffn_out(x)
        return self.final_norm(x)


def frame_mask(lengths: torch.Tensor, frames: int) -> torch.Tensor:
    """(batch, frames) bool: True on each clip's first ``lengths[i]`` frames."""
    return torch.arange(frames, device=lengths.device)[None, :] < lengths[:, None]


class SpeechEncoder(nn.Module):
    """Log-mel features (batch, n_mels, mel_frames) -> Conformer states (batch, frames, dim) at 40 ms."""

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        self.config = config
        self.input_projection = nn.Linear(config.n_mels * config.stack, config.dim)
        self.rope = RotaryEmbedding(config.dim // config.n_heads, config.rope_theta)
        self.layers = nn.ModuleList(ConformerBlock(config) for _ in range(config.n_layers))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (batch, n_mels, mel_frames), lengths (batch,) real mel frames ->
        (states (batch, frames, dim), frame lengths (batch,))."""
        config = self.config
        batch, n_mels, mel_frames = features.shape
        if n_mels != config.n_mels:
            raise ValueError(f"the speech encoder takes {config.n_mels} mel bins per frame, got {n_mels}")
        frames = mel_frames // config.stack
        stacked = features[:, :, : frames * config.stack].transpose(1, 2)  # (batch, frames * stack, n_mels)
        x = self.input_projection(stacked.reshape(batch, frames, config.stack * n_mels))
        lengths = self.config.encoder_frames(lengths).clamp(max=frames)
        valid = frame_mask(lengths, frames)
        cos, sin = self.rope(torch.arange(frames, device=x.device).expand(batch, frames))
        for layer in self.layers:
            x = layer(x, cos, sin, valid)
        return x, lengths


class AdapterLayer(nn.Module):
    """Pre-norm rotary transformer layer (RMSNorm, bidirectional attention, SwiGLU)."""

    def __init__(self, config: SpeechConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.adapter_dim, config.norm_eps)
        self.attention = SelfAttention(config.adapter_dim, config.adapter_heads)
        self.ffn_norm = RMSNorm(config.adapter_dim, config.norm_eps)
        self.feed_forward = FeedForward(config.adapter_dim, config.adapter_ffn_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, valid[:, None, None, :])
        return h + self.feed_forward(self.ffn_norm(h))


class SpeechAdapter(nn.Module):
    """Encoder states (batch, frames, dim) at 40 ms -> language-model embeddings (batch, out_frames, lm_dim) at 80 ms."""

    def __init__(self, config: SpeechConfig, lm_dim: int) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv1d(config.dim, config.adapter_dim, config.adapter_kernel, stride=config.adapter_stride,
                              padding=config.adapter_kernel // 2)
        self.rope = RotaryEmbedding(config.adapter_dim // config.adapter_heads, config.rope_theta)
        self.layer = AdapterLayer(config)
        self.output = nn.Linear(config.adapter_dim, lm_dim)

    def forward(self, states: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """states (batch, frames, dim), lengths (batch,) -> (embeddings (batch, out, lm_dim), lengths (batch,))."""
        valid = frame_mask(lengths, states.shape[1])
        x = self.conv(states.masked_fill(~valid[..., None], 0.0).transpose(1, 2)).transpose(1, 2)
        batch, frames, _ = x.shape
        pad, kernel, stride = self.config.adapter_kernel // 2, self.config.adapter_kernel, self.config.adapter_stride
        lengths = ((lengths + 2 * pad - kernel) // stride + 1).clamp(min=0, max=frames)
        cos, sin = self.rope(torch.arange(frames, device=x.device).expand(batch, frames))
        x = self.layer(x, cos, sin, frame_mask(lengths, frames))
        return self.output(x), lengths


# --------------------------------------------------------------------------------------- the model


class SpeechLanguageModel(nn.Module):
    """A frozen-able backbone plus the speech encoder and adapter; see the module docstring.

    ``backbone`` is used as it is (the caller freezes it); :meth:`adapter_modules` are what the
    speech stage trains. Build big models on the meta device and call :meth:`init_weights` after
    materialising, as for the backbone.
    """

    def __init__(self, backbone: Transformer, speech: SpeechConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.speech_config = speech
        self.encoder = SpeechEncoder(speech)
        self.adapter = SpeechAdapter(speech, backbone.config.dim)
        if not self.adapter.output.weight.is_meta:
            self.init_adapter_weights()

    @property
    def config(self) -> ModelConfig:
        """The backbone's ModelConfig."""
        return self.backbone.config

    def adapter_modules(self) -> list[nn.Module]:
        """What the speech stage trains: the encoder and the adapter."""
        return [self.encoder, self.adapter]

    def init_weights(self) -> None:
        """Initialise the backbone and the speech modules (after ``to_empty``)."""
        self.backbone.init_weights()
        self.init_adapter_weights()

    @torch.no_grad()
    def init_adapter_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) projections, PyTorch's default for convolutions, zero biases, unit norms."""
        for module in [*self.encoder.modules(), *self.adapter.modules()]:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Conv1d, nn.LayerNorm, RMSNorm, RotaryEmbedding)):
                module.reset_parameters()

    def encode(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (batch, n_mels, mel_frames), feature_lengths (batch,) -> the adapter's embeddings
        (batch, frames, lm_dim) and each clip's number of them (batch,)."""
        states, lengths = self.encoder(features, feature_lengths)
        return self.adapter(states, lengths)

    def speech_embeddings(
        self, tokens: torch.Tensor, features: torch.Tensor, feature_lengths: torch.Tensor, speech_mask: torch.Tensor
    ) -> torch.Tensor:
        """(batch, seq, lm_dim): clip i's adapter frames, in order, at the true positions of row i of
        ``speech_mask`` (zeros elsewhere). A row must have exactly as many positions as frames."""
        embeddings, lengths = self.encode(features, feature_lengths)
        positions = speech_mask.sum(dim=1)
        if not torch.equal(positions, lengths.to(positions.dtype)):
            raise ValueError(f"speech_mask has {positions.tolist()} positions per row but the clips give "
                             f"{lengths.tolist()} adapter frames; the data must expand each clip to "
                             "SpeechConfig.output_frames(mel_frames) positions")
        out = embeddings.new_zeros(*tokens.shape, embeddings.shape[-1])
        out[speech_mask] = embeddings[frame_mask(lengths, embeddings.shape[1])]
        return out

    def forward(
        self,
        tokens: torch.Tensor,
        features: torch.Tensor | None = None,
        feature_lengths: torch.Tensor | None = None,
        speech_mask: torch.Tensor | None = None,
        *,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab), or the final normed hidden states with ``output_hidden``.

        ``features``/``feature_lengths`` are each row's clip; ``speech_mask`` (batch, seq) marks the
        positions its adapter frames fill. Without features this is the backbone's forward.
        """
        if features is None:
            return self.backbone(tokens, position_ids=position_ids, document_ids=document_ids,
                                 output_hidden=output_hidden)
        if feature_lengths is None or speech_mask is None:
            raise ValueError("speech features need feature_lengths and speech_mask")
        embeddings = self.speech_embeddings(tokens, features, feature_lengths, speech_mask)
        return self.backbone(tokens, position_ids=position_ids, document_ids=document_ids,
                             input_embeddings=embeddings, embedding_mask=speech_mask, output_hidden=output_hidden)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[torch.Tensor],
        speech_masks: Sequence[torch.Tensor],
        features: torch.Tensor,
        feature_lengths: torch.Tensor,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (1-D token tensors of any lengths, each with its 1-D
        ``speech_masks`` row), hearing clip i of ``features``; one KV cache, one prefill.

        The stop token is not returned.
        """
        embeddings, lengths = self.encode(features, feature_lengths)
        valid = frame_mask(lengths, embeddings.shape[1])
        prompt_embeddings = []
        for row, (prompt, mask) in enumerate(zip(prompts, speech_masks, strict=True)):
            if int(mask.sum()) != int(lengths[row]):
                raise ValueError(f"prompt {row} has {int(mask.sum())} speech positions for {int(lengths[row])} frames")
            row_embeddings = embeddings.new_zeros(len(prompt), embeddings.shape[-1])
            row_embeddings[mask] = embeddings[row][valid[row]]
            prompt_embeddings.append((row_embeddings, mask))
        out = generate_tokens(self.backbone, list(prompts), max_new_tokens, stop_ids=stop_ids,
                              prompt_embeddings=prompt_embeddings)
        return [ids[:-1] if ids and ids[-1] in stop_ids else ids for ids in out]

