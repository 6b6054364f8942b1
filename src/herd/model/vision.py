"""Images for a frozen backbone: an image encoder and gated cross-attention layers (the Mllama layout).

Llama 3 adds images without changing its language model (paper section 7). Meta released the
architecture as Llama 3.2 Vision; ``transformers`` implements it as ``MllamaForConditionalGeneration``.
:class:`VisionLanguageModel` composes it around an unchanged :class:`~herd.model.Transformer`:

- :class:`ImageEncoder`. Each image arrives cut into tiles (up to ``max_num_tiles``, see
  :mod:`herd.data.kinds.image`), and each tile into patches. A class token and position embeddings
  are added; tile-position embeddings are chosen by the image's aspect ratio and are tanh-gated.
  Then come the "local" ViT layers over all the patches of the image, and the "global" layers,
  whose residual branches are tanh-gated. The output is the final layer's features concatenated
  with those of a few local layers (``feature_layers``; the paper's layers 4, 8, 16, 24 and 31).
- A projection of those features to the backbone's width: the *vision tokens*.
- :class:`CrossAttentionBlock`: text queries attend the vision tokens, with grouped-query
  attention and RMSNorm on queries and keys. The attention and its MLP are each scaled by
  tanh(gate), and the gates start at zero. One such block runs before selected backbone blocks:
  the fusion schedule, :meth:`VisionConfig.cross_attention_positions` (one may also run after the
  last block).
- Embeddings for the 8 token ids that follow the backbone's vocabulary. The first of them,
  ``vocab_size``, is ``<|image|>``: it marks where an image sits in the text.

Which images a text position sees follows Llama 3.2 Vision's rule. A position attends the
images of the latest run of consecutive ``<|image|>`` tokens at or before it, within its own
document. A position with no image before it in its document, and every position of a row
without images, passes the cross-attention block unchanged, exactly: both residual branches are
skipped there. This is what Meta's reference code does. ``transformers`` differs at such
positions when its batch holds images: it lets them attend every image tile of the row (of the
batch's padding images, in a row without images) and adds the gated attention output, masking
only the MLP. Rows laid out as Llama 3.2 Vision's processor lays them out
(``<|image|><|begin_of_text|>...``) have no such position, and there both implementations agree;
a row without images agrees with ``transformers`` run on that row alone.

The backbone is never modified:
- with no image in the batch, ``forward`` is the backbone's own forward, so the logits are the
  backbone's bit for bit;
- with images, the backbone's blocks run in order with the cross-attention blocks between them;
- with all gates at zero, or in a row without images, every cross-attention block returns its
  input unchanged.

Tiles: by default each image is encoded with just its own tiles. Images of equal tile count
share one encoder call, so nothing is padded to ``max_num_tiles``. The released Llama 3.2 Vision
checkpoints were trained differently: every image was padded to ``max_num_tiles`` tiles of zero
pixels, and the real patches attend those padding tiles. ``pad_to_max_tiles=True`` reproduces
that, and the Llama 3.2 presets and :func:`herd.interop.mllama.load_vision` set it. The two
modes agree for images that have ``max_num_tiles`` tiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from herd.model.attention import build_attention_mask
from herd.model.config import AdapterConfigMixin, ModelConfig
from herd.model.transformer import FeedForward, RMSNorm, Transformer, default_position_ids

# CLIP's pixel statistics, which Llama 3.2 Vision's image processor normalises with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEW_TOKENS = 8  # embedding rows after the backbone's vocabulary; the first is <|image|>
_PATCH_ALIGNMENT = 8  # each tile's patch sequence is padded to a multiple of this (as in Mllama)


@dataclass(frozen=True)
class VisionConfig(AdapterConfigMixin):
    """Shape of the image encoder and of the fusion schedule; the backbone's shape is its own ModelConfig.

    ``image_size`` is the side of a square tile in pixels, cut into ``patch_size`` patches.
    The encoder has ``n_layers`` local and ``n_global_layers`` gated global layers of width
    ``dim``, ``n_heads`` heads and an MLP of ``ffn_dim``. ``feature_layers`` are 0-based local
    layers whose outputs are concatenated with the final one.

    The cross-attention blocks run before backbone blocks ``cross_attention_layers``, or when
    that is null before every ``cross_attention_every``-th block (3, 7, 11, ... for 4).
    ``pad_to_max_tiles`` is described in the module docstring. ``image_mean``/``image_std``
    normalise pixels (the data side reads them).
    """

    section = "vision"

    image_size: int = 560
    patch_size: int = 14
    dim: int = 1280
    n_layers: int = 32
    n_global_layers: int = 8
    n_heads: int = 16
    ffn_dim: int = 5120
    feature_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    max_num_tiles: int = 4
    norm_eps: float = 1e-5
    cross_attention_every: int = 4
    cross_attention_layers: tuple[int, ...] | None = None
    pad_to_max_tiles: bool = False
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        for name in ("feature_layers", "cross_attention_layers", "image_mean", "image_std"):
            value = getattr(self, name)
            if isinstance(value, Sequence) and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        for name in ("image_size", "patch_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_num_tiles",
                     "cross_attention_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"vision.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.n_global_layers, int) or self.n_global_layers < 0:
            raise ValueError(f"vision.n_global_layers must be an integer >= 0, got {self.n_global_layers!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size={self.image_size} is not a multiple of vision.patch_size="
                             f"{self.patch_size}; a tile must be cut into whole patches")
        if self.dim % self.n_heads:
            raise ValueError(f"vision.dim={self.dim} is not divisible by vision.n_heads={self.n_heads}")
        bad = [i for i in self.feature_layers if not 0 <= i < self.n_layers]
        if bad or len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"vision.feature_layers={list(self.feature_layers)} must be distinct local layers "
                             f"in 0..{self.n_layers - 1}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("vision.image_mean and vision.image_std need 3 values (RGB), the std ones > 0")

    @property
    def head_dim(self) -> int:
        """Width of one encoder attention head."""
        return self.dim // self.n_heads

    @property
    def num_patches(self) -> int:
        """Tokens per tile: its patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def output_dim(self) -> int:
        """Width of the encoder's features: the final layer's plus one per feature layer."""
        return self.dim * (1 + len(self.feature_layers))

    @property
    def aspect_ratios(self) -> list[tuple[int, int]]:
        """Tile grids an image may be cut into: every (a, b) with a * b <= max_num_tiles.

        An image's aspect-ratio id is its grid's index here plus one (0 is reserved), in the
        order Llama 3.2 Vision's image processor numbers them.
        """
        n = self.max_num_tiles
        return [(a, b) for a in range(1, n + 1) for b in range(1, n + 1) if a * b <= n]

    def cross_attention_positions(self, n_layers: int) -> tuple[int, ...]:
        """The backbone blocks (0-based) a cross-attention block runs before; ``n_layers`` means
        after the last block, before the final norm.

        ``cross_attention_layers`` if set, else every ``cross_attention_every``-th block
        counted from 1: blocks 3, 7, ..., 31 for k = 4 and 32 blocks (Llama 3.2 11B).
        """
        if self.cross_attention_layers is not None:
            positions = tuple(self.cross_attention_layers)
            bad = [p for p in positions if not isinstance(p, int) or not 0 <= p <= n_layers]
            if bad or list(positions) != sorted(set(positions)):
                raise ValueError(f"vision.cross_attention_layers={list(positions)} must be increasing backbone "
                                 f"blocks in 0..{n_layers} ({n_layers}: after the last block)")
            return positions
        return tuple(b for b in range(n_layers) if (b + 1) % self.cross_attention_every == 0)


# ------------------------------------------------------------------------------------------ images


@dataclass
class ImageBatch:
    """The images of a batch in row order: image i belongs to row ``rows[i]``.

    ``pixels`` (n_images, tiles, 3, image_size, image_size) holds each image's tiles first; tiles
    beyond ``num_tiles[i]`` are padding (any value; they are never read as image content).
    ``aspect_ratio_ids`` (n_images,) are 1-based indices into :attr:`VisionConfig.aspect_ratios`.
    The k-th image of a row belongs to the k-th ``<|image|>`` token of that row.
    """

    pixels: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    num_tiles: torch.Tensor
    rows: torch.Tensor

    def __len__(self) -> int:
        return int(self.rows.numel())

    def to(self, device: torch.device | str) -> ImageBatch:
        """The same images on ``device``."""
        return ImageBatch(*(t.to(device) for t in (self.pixels, self.aspect_ratio_ids, self.num_tiles, self.rows)))


@dataclass
class VisionTokens:
    """Projected vision tokens, gathered per row for cross-attention.

    ``states`` (batch, keys, dim): row b's images' tokens in order, then padding;
    ``key_image`` (batch, keys): the index (within its row) of the image a key belongs to, -1 on padding;
    ``images_per_row`` (batch,).
    """

    states: torch.Tensor
    key_image: torch.Tensor
    images_per_row: torch.Tensor
    per_image: list[torch.Tensor] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- encoder


class TileEmbedding(nn.Module):
    """A tanh-gated embedding per tile, looked up by the image's aspect-ratio id."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.max_num_tiles, self.dim = config.max_num_tiles, config.dim
        self.embedding = nn.Embedding(len(config.aspect_ratios) + 1, config.max_num_tiles * config.dim)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (images, tiles, tokens, dim) -> the same plus each tile's embedding times tanh(gate)."""
        tiles = x.shape[1]
        table = self.embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, 1, self.dim)[:, :tiles]
        return x + table * self.gate.tanh()


class PositionEmbedding(nn.Module):
    """A patch-position embedding shared by every tile, blended by tanh(gate) with a per-tile one."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.max_num_tiles, self.num_patches, self.dim = config.max_num_tiles, config.num_patches, config.dim
        self.embedding = nn.Parameter(torch.empty(config.num_patches, config.dim))
        self.gate = nn.Parameter(torch.zeros(1))
        self.tile_embedding = nn.Embedding(len(config.aspect_ratios) + 1,
                                           config.max_num_tiles * config.num_patches * config.dim)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x (images, tiles, patches + 1, dim) -> positions added."""
        gate = self.gate.tanh()
        x = x + (1 - gate) * self.embedding
        tiles = x.shape[1]
        table = self.tile_embedding(aspect_ratio_ids).view(-1, self.max_num_tiles, self.num_patches, self.dim)
        return x + gate * table[:, :tiles]


class EncoderAttention(nn.Module):
    """Multi-head self-attention of the image encoder (no rotary positions, no biases)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.q_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.dim, bias=False)
        self.o_proj = nn.Linear(config.dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (images, tokens, dim), mask (images, 1, tokens, tokens) True where allowed."""
        batch, length, _ = x.shape
        q, k, v = (proj(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (images, heads, tokens, head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class EncoderMLP(nn.Module):
    """fc2(gelu(fc1 x)), with biases."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.dim, config.ffn_dim)
        self.fc2 = nn.Linear(config.ffn_dim, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer; ``gated`` layers scale both residual branches by tanh(gate)."""

    def __init__(self, config: VisionConfig, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.input_layernorm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.self_attn = EncoderAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.dim, eps=config.norm_eps)
        self.mlp = EncoderMLP(config)
        if gated:
            self.gate_attn = nn.Parameter(torch.full((1,), math.pi / 4))
            self.gate_ffn = nn.Parameter(torch.full((1,), math.pi / 4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), mask)
        h = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        ffn = self.mlp(self.post_attention_layernorm(h))
        return h + (self.gate_ffn.tanh() * ffn if self.gated else ffn)


class EncoderStack(nn.Module):
    """A list of encoder layers (a module of its own so that parameter names follow Mllama's)."""

    def __init__(self, config: VisionConfig, n_layers: int, gated: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config, gated) for _ in range(n_layers))


class ImageEncoder(nn.Module):
    """Tiles -> features (images, tiles, num_patches, output_dim); see the module docstring.

    Parameter names follow ``transformers``' ``MllamaVisionModel``, so a checkpoint maps by prefix.
    """

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embedding = nn.Conv2d(3, config.dim, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(config.dim))
        self.gated_positional_embedding = PositionEmbedding(config)
        self.pre_tile_positional_embedding = TileEmbedding(config)
        self.post_tile_positional_embedding = TileEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(config.dim)  # eps 1e-5, whatever norm_eps is (as in Mllama)
        self.layernorm_post = nn.LayerNorm(config.dim)
        self.transformer = EncoderStack(config, config.n_layers, gated=False)
        self.global_transformer = EncoderStack(config, config.n_global_layers, gated=True)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) projections and tile tables; scaled-normal class and position embeddings;
        tile gates at 0 and global-layer gates at pi/4 (Meta's reference values)."""
        scale = self.config.dim**-0.5
        nn.init.normal_(self.patch_embedding.weight, std=std)
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.gated_positional_embedding.embedding, std=scale)
        for table in (self.gated_positional_embedding, self.pre_tile_positional_embedding,
                      self.post_tile_positional_embedding):
            nn.init.zeros_(table.gate)
        for embedding in (self.gated_positional_embedding.tile_embedding, self.pre_tile_positional_embedding.embedding,
                          self.post_tile_positional_embedding.embedding):
            nn.init.normal_(embedding.weight, std=std)
        for norm in (self.layernorm_pre, self.layernorm_post):
            norm.reset_parameters()
        for layer in [*self.transformer.layers, *self.global_transformer.layers]:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.fc1, mlp.fc2):
                nn.init.normal_(linear.weight, std=std)
            for bias in (mlp.fc1.bias, mlp.fc2.bias):
                nn.init.zeros_(bias)
            layer.input_layernorm.reset_parameters()
            layer.post_attention_layernorm.reset_parameters()
            if layer.gated:
                nn.init.constant_(layer.gate_attn, math.pi / 4)
                nn.init.constant_(layer.gate_ffn, math.pi / 4)

    def forward(self, pixels: torch.Tensor, aspect_ratio_ids: torch.Tensor, num_tiles: torch.Tensor) -> torch.Tensor:
        """pixels (images, tiles, 3, H, W), aspect_ratio_ids (images,), num_tiles (images,) ->
        features (images, tiles, num_patches, output_dim). Tiles past ``num_tiles`` are padding:
        their tokens attend only real tokens, while real tokens attend every token of the image."""
        n, tiles = pixels.shape[:2]
        dim, patches = self.config.dim, self.config.num_patches
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixels.flatten(0, 1).to(weight.device, weight.dtype))  # (n*tiles, dim, g, g)
        x = x.flatten(2).transpose(1, 2).reshape(n, tiles, patches - 1, dim)
        x = self.pre_tile_positional_embedding(x, aspect_ratio_ids)
        x = torch.cat([self.class_embedding.to(x.dtype).expand(n, tiles, 1, dim), x], dim=2)  # class token first
        x = self.layernorm_pre(self.gated_positional_embedding(x, aspect_ratio_ids))
        length = patches + (-patches) % _PATCH_ALIGNMENT
        x = F.pad(x, (0, 0, 0, length - patches))  # (n, tiles, length, dim)
        mask = _encoder_mask(num_tiles, tiles, patches, length)
        x = x.reshape(n, tiles * length, dim)
        features = {}
        for index, layer in enumerate(self.transformer.layers):
            x = layer(x, mask)
            if index in self.config.feature_layers:
                features[index] = x
        x = self.layernorm_post(x).view(n, tiles, length, dim)
        x = self.post_tile_positional_embedding(x, aspect_ratio_ids).view(n, tiles * length, dim)
        for layer in self.global_transformer.layers:
            x = layer(x, mask)
        x = x.view(n, tiles, length, dim)[:, :, :patches]
        # Mllama's feature layout: the feature layers are stacked last, so channel c of layer j is c * k + j.
        stacked = torch.stack([features[i] for i in self.config.feature_layers], dim=-1)
        stacked = stacked.reshape(n, tiles, length, -1)[:, :, :patches]
        return torch.cat([x, stacked], dim=-1)


def _encoder_mask(num_tiles: torch.Tensor, tiles: int, patches: int, length: int) -> torch.Tensor:
    """(images, 1, tiles * length, tiles * length): a pair is masked only when both tokens are padding
    (alignment padding of a tile, or a padding tile), as in Mllama."""
    device = num_tiles.device
    real_tile = torch.arange(tiles, device=device)[None, :] < num_tiles[:, None]  # (images, tiles)
    real_token = torch.arange(length, device=device) < patches  # (length,)
    real = (real_tile[:, :, None] & real_token).flatten(1)  # (images, tiles * length)
    return (real[:, :, None] | real[:, None, :])[:, None]


# ------------------------------------------------------------------------------- cross-attention


class CrossAttention(nn.Module):
    """Grouped-query attention from text to vision tokens, with RMSNorm on each head's queries and keys."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x: torch.Tensor, vision: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, dim), vision (batch, keys, dim), mask (batch, 1, seq, keys) -> (batch, seq, dim)."""
        batch, seq, _ = x.shape
        keys = vision.shape[1]
        q = self.q_norm(self.wq(x).view(batch, seq, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.wk(vision).view(batch, keys, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(vision).view(batch, keys, self.n_kv_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class CrossAttentionBlock(nn.Module):
    """x + tanh(attention_gate) * attention, then + tanh(ffn_gate) * MLP; the input itself where
    ``has_image`` is false. Both gates start at zero."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = CrossAttention(config)
        self.attention_gate = nn.Parameter(torch.zeros(1))
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, vision: torch.Tensor, mask: torch.Tensor, has_image: torch.Tensor
                ) -> torch.Tensor:
        """x (batch, seq, dim) -> (batch, seq, dim); has_image (batch, seq) bool."""
        keep = has_image[..., None]
        attn = self.attention(self.attention_norm(x), vision, mask)
        h = x + self.attention_gate.tanh() * torch.where(keep, attn, 0.0)
        ffn = self.feed_forward(self.ffn_norm(h))
        out = h + self.ffn_gate.tanh() * torch.where(keep, ffn, 0.0)
        return torch.where(keep, out, x)


def cross_attention_mask(
    tokens: torch.Tensor,
    image_token_id: int,
    key_image: torch.Tensor,
    images_per_row: torch.Tensor,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which vision keys each text position attends; see the module docstring for the rule.

    Returns ``mask`` (batch, 1, seq, keys) for the attention and ``has_image`` (batch, seq). Rows
    of ``mask`` where ``has_image`` is false allow every key (their output is discarded), so
    softmax never sees an empty row. Raises ValueError when a row's ``<|image|>`` tokens and its
    images differ in number.
    """
    batch, seq = tokens.shape
    is_image = tokens == image_token_id
    counts = is_image.sum(dim=1)
    if not torch.equal(counts.cpu(), images_per_row.cpu()):
        row = int((counts.cpu() != images_per_row.cpu()).nonzero()[0])
        raise ValueError(f"row {row} has {int(counts[row])} <|image|> token(s) (id {image_token_id}) but "
                         f"{int(images_per_row[row])} image(s): each image needs exactly one <|image|> token, in order")
    index = torch.arange(seq, device=tokens.device)
    run_start = is_image.clone()
    run_start[:, 1:] &= ~is_image[:, :-1]  # the first <|image|> of each run of consecutive ones
    latest_run = torch.where(run_start, index, -1).cummax(dim=1).values  # (batch, seq); -1: no image yet
    n_images = max(int(images_per_row.max()), 1) if batch else 1
    order = torch.cumsum(is_image, dim=1) - 1  # the image index at each <|image|> position
    image_position = torch.full((batch, n_images), seq, device=tokens.device, dtype=torch.long)
    rows, cols = is_image.nonzero(as_tuple=True)
    image_position[rows, order[rows, cols]] = cols
    sees = ((image_position[:, None, :] >= latest_run[:, :, None]) & (image_position[:, None, :] <= index[:, None])
            & (latest_run[:, :, None] >= 0))  # (batch, seq, images)
    if document_ids is not None:
        image_document = document_ids.gather(1, image_position.clamp(max=seq - 1))
        sees &= image_document[:, None, :] == document_ids[:, :, None]
    keys = key_image.shape[1]
    allowed = sees.gather(2, key_image.clamp(min=0)[:, None, :].expand(batch, seq, keys))
    allowed &= (key_image >= 0)[:, None, :]
    has_image = allowed.any(dim=-1)
    return (allowed | ~has_image[..., None])[:, None], has_image


# --------------------------------------------------------------------------------------- the model


class VisionLanguageModel(nn.Module):
    """A frozen-able backbone plus the vision adapter; see the module docstring.

    ``backbone`` is used as it is (the caller freezes it). The adapter's parameters are
    :meth:`adapter_modules`. Build big models on the meta device and call :meth:`init_weights`
    after materialising, as for the backbone.
    """

    def __init__(self, backbone: Transformer, vision: VisionConfig) -> None:
        super().__init__()
        config = backbone.config
        self.backbone = backbone
        self.vision_config = vision
        self.cross_positions = vision.cross_attention_positions(config.n_layers)
        self.extra_embeddings = nn.Embedding(NEW_TOKENS, config.dim)
        self.encoder = ImageEncoder(vision)
        self.projection = nn.Linear(vision.output_dim, config.dim)
        self.cross_layers = nn.ModuleList(CrossAttentionBlock(config) for _ in self.cross_positions)
        if not self.projection.weight.is_meta:
            self.init_adapter_weights()

    @property
    def config(self) -> ModelConfig:
        """The backbone's ModelConfig."""
        return self.backbone.config

    @property
    def image_token_id(self) -> int:
        """``<|image|>``: the first id after the backbone's vocabulary (Mllama's layout)."""
        return self.config.vocab_size

    def adapter_modules(self) -> list[nn.Module]:
        """What the vision stage trains: new-token embeddings, encoder, projection, cross-attention blocks."""
        return [self.extra_embeddings, self.encoder, self.projection, self.cross_layers]

    def init_weights(self) -> None:
        """Initialise the backbone and the adapter (after ``to_empty``)."""
        self.backbone.init_weights()
        self.init_adapter_weights()

    @torch.no_grad()
    def init_adapter_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) weights, zero biases, unit norms and every cross-attention gate at zero."""
        nn.init.normal_(self.extra_embeddings.weight, std=std)
        self.encoder.init_weights(std)
        nn.init.normal_(self.projection.weight, std=std)
        nn.init.zeros_(self.projection.bias)
        for block in self.cross_layers:
            attn = block.attention
            for linear in (attn.wq, attn.wk, attn.wv, attn.wo, *block.feed_forward.children()):
                nn.init.normal_(linear.weight, std=std)
            for norm in (block.attention_norm, block.ffn_norm, attn.q_norm, attn.k_norm):
                norm.reset_parameters()
            nn.init.zeros_(block.attention_gate)
            nn.init.zeros_(block.ffn_gate)

    def encode_images(self, images: ImageBatch, batch: int) -> VisionTokens:
        """Encode and project every image, then gather each of the ``batch`` rows' vision tokens.

        Images of equal tile count share one encoder call (all of them, padded to
        ``max_num_tiles``, with ``pad_to_max_tiles``). Each image contributes the tokens of its
        real tiles only: (num_tiles * num_patches, dim).
        """
        config = self.vision_config
        num_tiles = images.num_tiles.tolist()
        per_image: list[torch.Tensor | None] = [None] * len(num_tiles)
        if config.pad_to_max_tiles:
            groups = {config.max_num_tiles: list(range(len(num_tiles)))}
        else:
            groups: dict[int, list[int]] = {}
            for i, n in enumerate(num_tiles):
                groups.setdefault(n, []).append(i)
        for tiles, members in groups.items():
            if max(num_tiles[i] for i in members) > tiles or tiles > config.max_num_tiles:
                raise ValueError(f"an image has more tiles than vision.max_num_tiles={config.max_num_tiles}")
            index = torch.tensor(members, device=images.pixels.device)
            pixels = images.pixels.index_select(0, index)[:, :tiles]
            if pixels.shape[1] < tiles:  # padding tiles of zero pixels, as Mllama's processor gives
                pixels = F.pad(pixels, (0, 0, 0, 0, 0, 0, 0, tiles - pixels.shape[1]))
            features = self.encoder(pixels, images.aspect_ratio_ids.index_select(0, index),
                                    images.num_tiles.index_select(0, index))
            projected = self.projection(features)  # (members, tiles, num_patches, dim)
            for j, i in enumerate(members):
                per_image[i] = projected[j, : num_tiles[i]].flatten(0, 1)
        return gather_rows(per_image, images.rows, batch)

    def forward(
        self,
        tokens: torch.Tensor,
        images: ImageBatch | None = None,
        *,
        vision: VisionTokens | None = None,
        document_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        output_hidden: bool = False,
    ) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab), or final normed hidden states with ``output_hidden``.

        ``images`` belong to the ``<|image|>`` tokens of ``tokens`` (see :class:`ImageBatch`);
        ``vision`` may replace them with tokens from :meth:`encode_images` (decoding reuses them).
        Without either, this is the backbone's forward (an ``<|image|>`` token is then refused).
        """
        if vision is None and images is not None and len(images):
            vision = self.encode_images(images, batch=tokens.shape[0])
        if vision is None:
            if bool((tokens >= self.config.vocab_size).any()):
                raise ValueError(f"tokens hold <|image|> (id {self.image_token_id}) or another id past the backbone's "
                                 "vocabulary, but no images were given")
            return self.backbone(tokens, position_ids=position_ids, document_ids=document_ids,
                                 output_hidden=output_hidden)
        batch, seq = tokens.shape
        mask, has_image = cross_attention_mask(tokens, self.image_token_id, vision.key_image, vision.images_per_row,
                                               document_ids)
        backbone = self.backbone
        if position_ids is None:
            position_ids = default_position_ids(tokens, document_ids)
        self_mask = build_attention_mask(self.config, batch, seq, tokens.device, document_ids=document_ids)
        cos, sin = backbone.rope(position_ids)
        h = self.embed(tokens)
        cross = dict(zip(self.cross_positions, self.cross_layers, strict=True))
        for index, block in enumerate(backbone.layers):
            if index in cross:
                h = cross[index](h, vision.states.to(h.dtype), mask, has_image)
            h = block(h, cos, sin, self_mask)
        if len(backbone.layers) in cross:  # a cross-attention block after the last backbone block
            h = cross[len(backbone.layers)](h, vision.states.to(h.dtype), mask, has_image)
        h = backbone.norm(h)
        return h if output_hidden else backbone.output(h)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings (batch, seq, dim): the backbone's rows, then the 8 new ones (``<|image|>`` first)."""
        vocab = self.config.vocab_size
        new = tokens >= vocab
        h = self.backbone.tok_embeddings(tokens.masked_fill(new, 0))
        extra = self.extra_embeddings((tokens - vocab).clamp(min=0, max=NEW_TOKENS - 1))
        return torch.where(new[..., None], extra.to(h.dtype), h)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        images: ImageBatch | None,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
    ) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (one per row, any lengths) looking at ``images``.

        Prompts are left-padded as a document of their own, so padding is never attended and
        positions start at each prompt's first token. Every step recomputes the whole sequence
        (captions are short; there is no cross-attention KV cache). A row stops at a token of
        ``stop_ids`` (which is not returned).
        """
        device = self.projection.weight.device
        longest = max(len(p) for p in prompts)
        tokens = torch.zeros(len(prompts), longest, dtype=torch.long, device=device)
        documents = torch.zeros_like(tokens)
        for row, prompt in enumerate(prompts):
            if prompt:
                tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), device=device)
                documents[row, longest - len(prompt):] = 1
        vision = self.encode_images(images.to(device), batch=len(prompts)) if images is not None else None
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new_tokens):
            logits = self(tokens, vision=vision, document_ids=documents)[:, -1]
            step = logits.argmax(dim=-1)
            for row, token in enumerate(step.tolist()):
                if not done[row]:
                    if token in stop_ids:
                        done[row] = True
                    else:
                        out[row].append(token)
            if all(done):
                break
            tokens = torch.cat([tokens, step[:, None]], dim=1)
            documents = torch.cat([documents, torch.ones_like(step)[:, None]], dim=1)
        return out


def gather_rows(per_image: Sequence[torch.Tensor], rows: torch.Tensor, batch: int) -> VisionTokens:
    """Concatenate each row's images' tokens (in image order) into (batch, keys, dim), padding shorter rows."""
    rows_list = rows.tolist()
    if any(b > a for a, b in zip(rows_list[1:], rows_list[:-1], strict=False)):
        raise ValueError("ImageBatch.rows must be in row order (the images of row 0, then of row 1, ...)")
    lengths = [0] * batch
    for row, tokens in zip(rows_list, per_image, strict=True):
        lengths[row] += tokens.shape[0]
    keys = max(max(lengths), 1)
    first = per_image[0]
    states = first.new_zeros(batch, keys, first.shape[-1])
    key_image = torch.full((batch, keys), -1, dtype=torch.long, device=first.device)
    images_per_row = torch.zeros(batch, dtype=torch.long)
    filled = [0] * batch
    for row, tokens in zip(rows_list, per_image, strict=True):
        start, end = filled[row], filled[row] + tokens.shape[0]
        states[row, start:end] = tokens
        key_image[row, start:end] = int(images_per_row[row])
        images_per_row[row] += 1
        filled[row] = end
    return VisionTokens(states, key_image, images_per_row.to(first.device), list(per_image))


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model`` (works on the meta device; tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
