"""FP8 row-wise inference quantization of the feed-forward layers (Llama 3 paper, section 6.2).

Applied from outside the model, like the parallelism wrappers::

    model = hf.load(model_dir, dtype=torch.bfloat16)
    quantize_fp8_rowwise(model)          # blocks 1 .. n_layers-2: w1, w2, w3 become FP8

- Only the SwiGLU linears (``feed_forward.w1/w2/w3``) are replaced, by :class:`Float8RowwiseLinear`;
  attention, embeddings, norms, the output head and the first and last Transformer blocks keep
  their precision (the paper skips the first and last layers).
- Weights are stored in ``torch.float8_e4m3fn`` with one float32 scale per output row
  (``absmax(row) / 448``).
- Activations are quantized per token (one scale per row of the input) at run time. The paper
  bounds these dynamic scaling factors at 1200: each token's absolute maximum is clamped to at
  most ``scale_ub`` before the scale ``amax / 448`` is taken, so a token with an outlier above
  1200 keeps the resolution of its other values and the outlier saturates at +-1200 (this is
  the ``scale_ub`` of FBGEMM's ``quantize_fp8_per_row``, which Meta's Llama 3 inference code
  calls with 1200). Weights are static and get no bound.
- The matmul is ``torch._scaled_mm`` with row-wise scales, output in bfloat16. Where a device
  refuses it (an older GPU, a shape its kernels do not take), the same result is computed by
  dequantizing both operands and multiplying; the choice is remembered per device type.

A model built on the meta device can be quantized first and loaded afterwards: a
:class:`Float8RowwiseLinear` accepts the high-precision ``weight`` of the ``nn.Linear`` it
replaced (and quantizes it while loading) as well as its own ``weight`` + ``weight_scale``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from herd.model.transformer import Transformer

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
SCALE_UB = 1200.0  # the paper's upper bound on the dynamic (activation) scaling factor
_EPS = 1e-12  # an all-zero row gets a tiny scale instead of a division by zero
_SCALED_MM_WORKS: dict[str, bool] = {}  # device type -> whether torch._scaled_mm ran there


def quantize_rowwise(x: torch.Tensor, scale_ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, cols) -> (float8_e4m3fn values (rows, cols), float32 scales (rows, 1)).

    Each row's scale is ``min(absmax(row), scale_ub) / 448``; ``x / scale`` is clamped to
    +-448 and cast, so ``values.float() * scales`` approximates ``x`` (values beyond
    ``scale_ub`` saturate there).
    """
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    if scale_ub is not None:
        amax = amax.clamp(max=scale_ub)
    scale = amax.clamp(min=_EPS) / FP8_MAX
    values = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scale


def scaled_matmul(
    x_fp8: torch.Tensor, x_scale: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """(x_fp8 * x_scale) @ (w_fp8 * w_scale).T: x (tokens, in) with scales (tokens, 1), w (out, in)
    with scales (out,) -> (tokens, out) in ``out_dtype``.

    Uses ``torch._scaled_mm`` with row-wise scales; falls back to dequantize + matmul on a
    device where it fails.
    """
    device = x_fp8.device.type
    if _SCALED_MM_WORKS.get(device, True):
        try:
            out = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1),
                                   out_dtype=out_dtype)
            _SCALED_MM_WORKS[device] = True
            return out
        except (RuntimeError, NotImplementedError, ValueError):
            if _SCALED_MM_WORKS.get(device):
                raise  # it ran on this device before: this failure is not about support
            _SCALED_MM_WORKS[device] = False
    return ((x_fp8.float() * x_scale) @ (w_fp8.float() * w_scale[:, None]).t()).to(out_dtype)


class Float8RowwiseLinear(nn.Module):
    """A bias-free linear layer with FP8 (e4m3) weights and per-token FP8 activations.

    Buffers: ``weight`` (out_features, in_features) float8_e4m3fn and ``weight_scale``
    (out_features,) float32. The output is bfloat16. Inference only (no gradients). Moving the
    module (``.to(device)``) moves the buffers; a dtype change (``.to(torch.bfloat16)``) leaves
    them as they are.
    """

    def __init__(self, in_features: int, out_features: int, *, scale_ub: float | None = SCALE_UB,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale_ub = in_features, out_features, scale_ub
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, scale_ub: float | None = SCALE_UB) -> Float8RowwiseLinear:
        """Quantize a bias-free ``nn.Linear`` (on any device, meta included)."""
        if linear.bias is not None:
            raise ValueError("Float8RowwiseLinear has no bias; a model with mlp_bias cannot be quantized to FP8")
        module = cls(linear.in_features, linear.out_features, scale_ub=scale_ub, device=linear.weight.device)
        module.set_weight(linear.weight)
        return module

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a high-precision (out_features, in_features) weight into this module."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(weight.shape)} does not fit a "
                             f"{self.in_features} -> {self.out_features} linear layer")
        values, scale = quantize_rowwise(weight)
        self.weight, self.weight_scale = values, scale.view(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features) in bfloat16."""
        leading = x.shape[:-1]
        x_fp8, x_scale = quantize_rowwise(x.reshape(-1, self.in_features), self.scale_ub)  # per token
        out = scaled_matmul(x_fp8, x_scale, self.weight, self.weight_scale)
        return out.reshape(*leading, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.dtype != FP8_DTYPE:  # the nn.Linear weight this module replaced
            try:
                self.set_weight(weight.to(self.weight.device) if not self.weight.is_meta else weight)
            except ValueError as err:
                error_msgs.append(f"{prefix}weight: {err}")
            return
        if weight is not None:  # our own layout: assign the float8 values and their scales
            scale = state_dict.get(prefix + "weight_scale")
            if scale is None:
                missing_keys.append(prefix + "weight_scale")
                return
            device = weight.device if self.weight.is_meta else self.weight.device
            self.weight = weight.to(device)
            self.weight_scale = scale.to(device=device, dtype=torch.float32).reshape(-1)
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _apply(self, fn, recurse=True):
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale_ub={self.scale_ub}"


def quantize_fp8_rowwise(
    model: Transformer, *, skip_layers: Sequence[int] | None = None, scale_ub: float | None = SCALE_UB,
) -> Transformer:
    """Replace ``feed_forward.w1/w2/w3`` of every block not in ``skip_layers`` by FP8 linears, in place.

    ``skip_layers`` (block indices, negative ones count from the end) defaults to the first and
    the last block, as in the paper. ``scale_ub`` bounds each token's activation range
    (None: no bound). Works on a model on the meta device: load the high-precision state dict
    afterwards and the FFN weights are quantized while loading. Returns ``model``.
    """
    n = len(model.layers)
    skip = {0, n - 1} if skip_layers is None else set()
    for index in skip_layers or ():
        if not -n <= int(index) < n:
            raise ValueError(f"skip_layers has block {index} but the model has {n} blocks (0..{n - 1})")
        skip.add(int(index) % n)
    for i, block in enumerate(model.layers):
        if i in skip:
            continue
        ffn = block.feed_forward
        for name in ("w1", "w2", "w3"):
            linear = getattr(ffn, name)
            if isinstance(linear, nn.Linear):
                setattr(ffn, name, Float8RowwiseLinear.from_linear(linear, scale_ub=scale_ub))
    return model


QUANTIZE_METHODS: dict[str, Callable[[Transformer], Transformer]] = {"fp8_rowwise": quantize_fp8_rowwise}


def check_quantize(method: str | None) -> None:
    """Raise a ValueError naming the choices unless ``method`` is None or one of :data:`QUANTIZE_METHODS`."""
    if method is not None and method not in QUANTIZE_METHODS:
        raise ValueError(f"quantize={method!r} is not a quantization method; use one of "
                         f"{sorted(QUANTIZE_METHODS)} or null (no quantization)")


def quantize(model: Transformer, method: str | None) -> Transformer:
    """Apply the named quantization (``"fp8_rowwise"``) to ``model`` in place; None leaves it as it is."""
    check_quantize(method)
    return model if method is None else QUANTIZE_METHODS[method](model)
