"""FP8 row-wise quantization of the feed-forward layers (herd.model.quantize)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from herd.model import Float8RowwiseLinear, ModelConfig, Transformer, generate, quantize, quantize_fp8_rowwise
from herd.model.quantize import FP8_DTYPE, quantize_rowwise, scaled_matmul

CONFIG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, max_seq_len=64)


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CONFIG).eval()


def reference_fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale_ub: float | None = None) -> torch.Tensor:
    """Per-row absmax / 448 scales, clamp, cast to float8_e4m3fn, dequantize, matmul in float32."""

    def roundtrip(t: torch.Tensor, bound: float | None) -> torch.Tensor:
        amax = t.abs().amax(dim=-1, keepdim=True)
        if bound is not None:
            amax = amax.clamp(max=bound)
        scale = amax / 448.0
        return (t / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * scale

    return roundtrip(x, scale_ub) @ roundtrip(weight, None).t()


def test_fp8_linear_matches_a_hand_written_reference():
    torch.manual_seed(1)
    linear = nn.Linear(96, 48, bias=False)
    x = torch.randn(2, 5, 96) * 3
    fp8 = Float8RowwiseLinear.from_linear(linear)
    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight_scale.dtype == torch.float32
    assert fp8.weight_scale.shape == (48,)
    out = fp8(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 48)
    expected = reference_fp8_linear(x.reshape(-1, 96), linear.weight.detach()).reshape(2, 5, 48)
    # same fp8 values and scales: only the bf16 rounding of the output differs
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)
    # and fp8 stays close to the full-precision layer (a few % of the output range)
    full = linear(x).detach()
    assert (out.float() - full).abs().max() < 0.06 * full.abs().max()


def test_scaled_mm_and_the_dequantizing_fallback_agree():
    torch.manual_seed(2)
    x, w = torch.randn(7, 64), torch.randn(32, 64)
    xq, xs = quantize_rowwise(x)
    wq, ws = quantize_rowwise(w)
    fast = scaled_matmul(xq, xs, wq, ws.view(-1))
    slow = ((xq.float() * xs) @ (wq.float() * ws).t()).to(torch.bfloat16)
    torch.testing.assert_close(fast.float(), slow.float(), rtol=1e-2, atol=1e-2)


def test_the_scale_bound_clips_a_token_with_an_outlier():
    row = torch.tensor([[5000.0, 1.0, -2.0, 600.0], [3.0, -1.5, 0.5, 2.0]])
    values, scale = quantize_rowwise(row, scale_ub=1200.0)
    assert scale[0, 0] == pytest.approx(1200.0 / 448.0)  # bounded: not 5000 / 448
    assert scale[1, 0] == pytest.approx(3.0 / 448.0)  # rows within the bound keep their own absmax
    dequantized = values.float() * scale
    assert dequantized[0, 0] == pytest.approx(1200.0)  # the outlier saturates at the bound
    assert dequantized[0, 3] == pytest.approx(600.0, rel=0.07)  # the rest keeps its resolution
    _, big = quantize_rowwise(row)
    assert big[0, 0] == pytest.approx(5000.0 / 448.0)
    # the module applies the bound to its input tokens
    linear = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    out = Float8RowwiseLinear.from_linear(linear, scale_ub=1200.0)(row)
    assert out[0, 0].item() == pytest.approx(1200.0, rel=0.01)


def test_only_the_ffn_of_the_middle_blocks_is_quantized():
    model = tiny_model()
    original = copy.deepcopy(model)
    keep = {i: (model.layers[i], model.layers[i].feed_forward.w1) for i in range(4)}
    attention = [block.attention for block in model.layers]
    quantize_fp8_rowwise(model)
    for i, block in enumerate(model.layers):
        assert block is keep[i][0] and block.attention is attention[i]
        for name in ("w1", "w2", "w3"):
            module = getattr(block.feed_forward, name)
            assert isinstance(module, Float8RowwiseLinear) == (i in (1, 2)), (i, name)
    for i in (0, 3):
        assert model.layers[i].feed_forward.w1 is keep[i][1]
    quantized_names = {f"layers.{i}.feed_forward.{n}.{s}" for i in (1, 2) for n in ("w1", "w2", "w3")
                       for s in ("weight", "weight_scale")}
    state, before = model.state_dict(), original.state_dict()
    for name, tensor in state.items():
        if name not in quantized_names:
            assert torch.equal(tensor, before[name]), name
    assert set(state) - set(before) == {n for n in quantized_names if n.endswith("weight_scale")}
    explicit = quantize_fp8_rowwise(tiny_model(), skip_layers=(0, -1, 2))
    assert [isinstance(b.feed_forward.w2, Float8RowwiseLinear) for b in explicit.layers] == [False, True, False,
                                                                                            False]
    with pytest.raises(ValueError, match="has 4 blocks"):
        quantize_fp8_rowwise(tiny_model(), skip_layers=(7,))


def test_greedy_generation_runs_on_a_quantized_model():
    model = quantize_fp8_rowwise(tiny_model())
    out = generate(model, [[1, 2, 3], [4, 5]], 6)
    assert [len(row) for row in out] == [6, 6]
    logits = model(torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(logits).all()


def test_quantizing_a_meta_model_then_loading_weights_matches_quantizing_the_loaded_model():
    source = tiny_model()
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 12))
    expected = quantize_fp8_rowwise(copy.deepcopy(source))
    with torch.device("meta"):
        model = Transformer(CONFIG)
    quantize_fp8_rowwise(model)
    assert model.layers[1].feed_forward.w1.weight.is_meta
    model.load_state_dict(source.state_dict(), strict=True, assign=True)  # the high-precision checkpoint
    model.rope.to_empty(device="cpu")
    model.rope.reset_parameters()
    w1 = model.layers[1].feed_forward.w1
    assert w1.weight.device.type == "cpu" and w1.weight.dtype == FP8_DTYPE
    assert torch.equal(w1.weight_scale, expected.layers[1].feed_forward.w1.weight_scale)
    torch.testing.assert_close(model.eval()(tokens), expected(tokens), rtol=0, atol=0)
    # a quantized state dict round-trips into another quantized model
    again = quantize_fp8_rowwise(Transformer(CONFIG)).eval()
    again.load_state_dict(expected.state_dict(), strict=True)
    torch.testing.assert_close(again(tokens), expected(tokens), rtol=0, atol=0)


def test_dtype_changes_leave_fp8_buffers_alone():
    model = quantize_fp8_rowwise(tiny_model()).to(torch.bfloat16)
    w1 = model.layers[1].feed_forward.w1
    assert w1.weight.dtype == FP8_DTYPE and w1.weight_scale.dtype == torch.float32
    assert model.layers[0].feed_forward.w1.weight.dtype == torch.bfloat16
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]]))).all()


def test_quantize_by_name():
    model = quantize(tiny_model(), "fp8_rowwise")
    assert isinstance(model.layers[1].feed_forward.w3, Float8RowwiseLinear)
    plain = tiny_model()
    assert quantize(plain, None) is plain and isinstance(plain.layers[1].feed_forward.w3, nn.Linear)
    with pytest.raises(ValueError, match=r"quantize='int4'.*fp8_rowwise.*null"):
        quantize(tiny_model(), "int4")
