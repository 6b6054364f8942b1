"""The speech encoder and adapter around an unchanged backbone: exact text-only behaviour, the Conformer
block against a reference written here, frame arithmetic, padding invariance, presets, decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from herd.model import ModelConfig, Transformer
from herd.model.generate import generate
from herd.model.speech import ConformerBlock, SpeechConfig, SpeechLanguageModel, frame_mask
from herd.presets import model_preset, speech_preset

VOCAB = 97
PAD = 0


def backbone() -> Transformer:
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB, multiple_of=16,
                         max_seq_len=256)
    return Transformer(config).eval()


def speech_config(**changes) -> SpeechConfig:
    values = dict(n_mels=80, stack=4, dim=32, n_layers=2, n_heads=4, ffn_dim=64, conv_kernel=7, adapter_dim=48,
                  adapter_heads=4, adapter_ffn_dim=64)
    return SpeechConfig(**{**values, **changes})


def model() -> SpeechLanguageModel:
    torch.manual_seed(0)
    return SpeechLanguageModel(backbone(), speech_config()).eval()


def dialog(frames: int, prefix: int = 5, suffix: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and speech mask of ``prefix`` text tokens, ``frames`` speech positions, ``suffix`` tokens."""
    tokens = torch.tensor([*range(1, prefix + 1), *[PAD] * frames, *range(10, 10 + suffix)])
    mask = torch.zeros(len(tokens), dtype=torch.bool)
    mask[prefix:prefix + frames] = True
    return tokens, mask


def test_without_speech_the_logits_are_the_backbones_bit_for_bit():
    slm = model()
    tokens = torch.randint(0, VOCAB, (3, 21))
    assert torch.equal(slm(tokens), slm.backbone(tokens))
    # The backbone's embedding entry with nothing masked changes nothing either.
    nothing = torch.zeros(3, 21, dtype=torch.bool)
    embeddings = torch.randn(3, 21, 64)
    assert torch.equal(slm.backbone(tokens, input_embeddings=embeddings, embedding_mask=nothing),
                       slm.backbone(tokens))


def test_input_embeddings_replace_exactly_the_masked_positions():
    lm = backbone()
    tokens = torch.randint(1, VOCAB, (2, 12))
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[0, 3:6] = True
    mask[1, 7] = True
    embeddings = torch.randn(2, 12, 64)
    want = torch.where(mask[..., None], embeddings, lm.tok_embeddings(tokens))
    assert torch.equal(lm.embed(tokens, embeddings, mask), want)
    # Causal: the logits before the first replaced position are the text-only ones.
    got, plain = lm(tokens, input_embeddings=embeddings, embedding_mask=mask), lm(tokens)
    # Bitwise: both are (2, 12) forwards, and causal attention gives later positions exact zero weight.
    assert torch.equal(got[0, :3], plain[0, :3]) and torch.equal(got[1, :7], plain[1, :7])
    assert not torch.allclose(got[0, 3:], plain[0, 3:])
    with pytest.raises(ValueError, match="give both or neither"):
        lm(tokens, input_embeddings=embeddings)
    with pytest.raises(ValueError, match="must be"):
        lm(tokens, input_embeddings=embeddings[:, :5], embedding_mask=mask)


def test_frames_are_10_then_40_then_80_ms():
    config = speech_config()
    assert config.frame_ms == {"features": 10, "encoder": 40, "adapter": 80}
    slm = model()
    one_second = 100  # mel frames of 1 s at a 10 ms hop
    features = torch.randn(1, 80, 4 * one_second)  # 4 s
    states, lengths = slm.encoder(features, torch.tensor([4 * one_second]))
    assert states.shape[1] == int(lengths) == 4 * 25  # 25 encoder frames per second: 40 ms
    embeddings, out = slm.adapter(states, lengths)
    assert embeddings.shape == (1, 50, 64) and int(out) == 50  # 12.5 per second: 80 ms, at the LM's width
    for mel in (0, 3, 4, 7, 8, 9, 401, 1000):
        encoder = mel // 4
        assert config.encoder_frames(mel) == encoder
        assert config.output_frames(mel) == math.ceil(encoder / 2)
        assert int(config.output_frames(torch.tensor(mel))) == math.ceil(encoder / 2)


def reference_conformer_block(block: ConformerBlock, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """A Macaron Conformer block written out with functional ops, reading ``block``'s weights; one clip, no padding."""

    def linear(layer, h):
        return h @ layer.weight.T + (layer.bias if layer.bias is not None else 0)

    def layer_norm(norm, h):
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        return (h - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    def feed_forward(ffn, h):
        h = linear(ffn.fc1, layer_norm(ffn.norm, h))
        return linear(ffn.fc2, h * torch.sigmoid(h))  # Swish

    def rotate(h, positions, head_dim):  # rotate-half rotary positions, theta 10000
        freqs = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = positions[:, None].double() * freqs[None]
        cos, sin = torch.cat([angles.cos()] * 2, -1).float(), torch.cat([angles.sin()] * 2, -1).float()
        first, second = h[..., : head_dim // 2], h[..., head_dim // 2:]
        return h * cos[:, None] + torch.cat([-second, first], -1) * sin[:, None]

    def attention(attn, h):
        frames, dim = h.shape
        head_dim = dim // n_heads
        q, k, v = (linear(w, h).view(frames, n_heads, head_dim) for w in (attn.wq, attn.wk, attn.wv))
        positions = torch.arange(frames)
        q, k = rotate(q, positions, head_dim), rotate(k, positions, head_dim)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(frames, dim)
        return linear(attn.wo, out)

    def convolution(conv, h):
        h = linear(conv.pointwise_in, layer_norm(conv.norm, h))
        half = h.shape[-1] // 2
        h = h[:, :half] * torch.sigmoid(h[:, half:])  # GLU
        kernel = conv.depthwise.weight[:, 0]  # (dim, k)
        pad = kernel.shape[1] // 2
        padded = F.pad(h.T, (pad, pad))  # (dim, frames + 2 pad)
        h = torch.stack([(padded[:, t:t + kernel.shape[1]] * kernel).sum(-1) for t in range(h.shape[0])], 0)
        h = layer_norm(conv.depthwise_norm, h + conv.depthwise.bias)
        return linear(conv.pointwise_out, h * torch.sigmoid(h))

    x = x + 0.5 * feed_forward(block.ffn_in, x)
    x = x + attention(block.attention, layer_norm(block.attention_norm, x))
    x = x + convolution(block.conv, x)
    x = x + 0.5 * feed_forward(block.ffn_out, x)
    return layer_norm(block.final_norm, x)


def test_the_conformer_block_matches_the_reference_written_out():
    torch.manual_seed(1)
    config = speech_config()
    block = ConformerBlock(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that every term is checked
        for name, param in block.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    x = torch.randn(1, 23, config.dim)
    encoder = SpeechLanguageModel(backbone(), config).encoder
    cos, sin = encoder.rope(torch.arange(23)[None])
    got = block(x, cos, sin, torch.ones(1, 23, dtype=torch.bool))
    want = reference_conformer_block(block, x[0], config.n_heads)
    torch.testing.assert_close(got[0], want, atol=2e-5, rtol=1e-4)


def test_a_clip_encodes_the_same_alone_or_padded_in_a_batch():
    slm = model()
    short, long = torch.randn(1, 80, 96), torch.randn(1, 80, 160)
    batch = torch.cat([F.pad(short, (0, 64), value=3.0), long])  # padding of any value is never read
    lengths = torch.tensor([96, 160])
    embeddings, out = slm.encode(batch, lengths)
    alone, alone_len = slm.encode(short, torch.tensor([96]))
    assert out.tolist() == [12, 20] and int(alone_len) == 12
    torch.testing.assert_close(embeddings[0, :12], alone[0], atol=1e-5, rtol=1e-5)


def test_speech_frames_fill_the_masked_positions_in_order_and_counts_are_checked():
    slm = model()
    features = torch.randn(2, 80, 64)
    lengths = torch.tensor([64, 40])  # 8 and 5 adapter frames
    rows = [dialog(8), dialog(5, prefix=3, suffix=9)]
    width = max(len(t) for t, _ in rows)
    tokens = torch.stack([F.pad(t, (0, width - len(t)), value=PAD) for t, _ in rows])
    mask = torch.stack([F.pad(m, (0, width - len(m))) for _, m in rows])
    embeddings, frames = slm.encode(features, lengths)
    placed = slm.speech_embeddings(tokens, features, lengths, mask)
    assert torch.equal(placed[0, 5:13], embeddings[0, :8]) and torch.equal(placed[1, 3:8], embeddings[1, :5])
    assert torch.equal(placed[~mask], torch.zeros_like(placed[~mask]))
    logits = slm(tokens, features, lengths, mask)
    assert torch.equal(logits, slm.backbone(tokens, input_embeddings=placed, embedding_mask=mask))
    wrong = mask.clone()
    wrong[0, 4] = True
    with pytest.raises(ValueError, match=r"\[9, 5\] positions per row but the clips give \[8, 5\]"):
        slm(tokens, features, lengths, wrong)


def test_greedy_decoding_with_one_prefill_matches_full_recomputation():
    slm = model()
    features, lengths = torch.randn(2, 80, 72), torch.tensor([72, 48])  # 9 and 6 frames
    prompts = [dialog(9), dialog(6, prefix=7, suffix=2)]
    got = slm.generate([t for t, _ in prompts], [m for _, m in prompts], features, lengths, max_new_tokens=6)
    for row, (tokens, mask) in enumerate(prompts):
        tokens, mask, out = tokens[None], mask[None], []
        for _ in range(6):  # no cache: the whole sequence each step
            logits = slm(tokens, features[row:row + 1, :, : int(lengths[row])], lengths[row:row + 1], mask)
            next_token = logits[0, -1].argmax()
            out.append(int(next_token))
            tokens = torch.cat([tokens, next_token.view(1, 1)], 1)
            mask = torch.cat([mask, torch.zeros(1, 1, dtype=torch.bool)], 1)
        assert got[row] == out
    # Without the speech, the same prompts continue otherwise: the prefill read the embeddings.
    assert generate(slm.backbone, [t for t, _ in prompts], 6) != got


def test_the_papers_presets_have_1b_and_100m_parameters():
    config = speech_preset("llama3_1b")
    assert (config.dim, config.n_layers, config.n_heads, config.ffn_dim, config.conv_kernel) == (1536, 24, 24, 4096, 7)
    with torch.device("meta"):
        slm = SpeechLanguageModel(Transformer(model_preset("llama3_8b")), config)
    encoder = sum(p.numel() for p in slm.encoder.parameters())
    adapter = sum(p.numel() for p in slm.adapter.parameters())
    assert 0.95e9 < encoder < 1.05e9, encoder  # "1B parameters"
    assert 90e6 < adapter < 110e6, adapter  # "~100M parameters"
    tiny = speech_preset("tiny")
    assert tiny.frame_ms == {"features": 10, "encoder": 40, "adapter": 80}


def test_bad_shapes_are_refused_with_the_key():
    with pytest.raises(ValueError, match="speech.dim=30 must split into speech.n_heads=4"):
        speech_config(dim=30)
    with pytest.raises(ValueError, match="speech.conv_kernel must be odd"):
        speech_config(conv_kernel=6)
    with pytest.raises(ValueError, match="unknown speech config key"):
        SpeechConfig.from_dict({"layers": 3})
    slm = model()
    with pytest.raises(ValueError, match="takes 80 mel bins"):
        slm.encode(torch.randn(1, 40, 16), torch.tensor([16]))


def test_frame_mask():
    assert frame_mask(torch.tensor([0, 2, 3]), 3).tolist() == [[False] * 3, [True, True, False], [True] * 3]
