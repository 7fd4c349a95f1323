"""Weight-only quantisation (TensorRT-LLM's W8A16 / W4A16 semantics): int8 or int4 weights, fp16 scales,
activations and accumulation in floating point.

int8: symmetric, one scale per output channel: scale = max|w_row| / 127, q = round(w / scale) in [-127, 127].
int4: symmetric, one scale per group of `group_size` consecutive input channels of a row:
      scale = max|w_group| / 7, q = round(w / scale) in [-7, 7] (the nibble range [-8, 7] is never filled at -8),
      stored as the unsigned nibble q + 8, two per byte: byte j of a row holds input 2j in its low nibble and
      input 2j + 1 in its high nibble. No zero points (symmetric), so there is no `zeros` tensor.
Scales are rounded to fp16 *before* q is computed, so |w - q * scale| <= scale / 2 holds with the stored scale.

Linear layers in the runtime's layout ([out, in]) become WeightOnlyLinear modules whose state-dict keys are
<layer>.qweight (int8 [out, in] | uint8 [out, in / 2]), <layer>.scales (fp16 [out] | fp16 [out, in / group_size])
and, for attn.qkv, <layer>.bias (the engine dtype).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qwen_trtllm import QWenError
from qwen_trtllm.models.qwen.weights import ENGINE_LINEARS

PRECISIONS = ("int8", "int4")
GEMV_ROWS = 1  # rows up to which int8 layers run int8_gemv: kernels/fp8_gemv.py's GEMV_ROWS (a test checks)
KINDS = PRECISIONS + ("fp8",)  # what the model-level functions below take: fp8 = quantization/fp8.py's Fp8Linear
# The runtime's linear layers that weight-only quantisation replaces (lm_head only on request).
QUANTIZED_LAYERS = ENGINE_LINEARS  # ("attn.qkv", "attn.dense", "mlp.gate_up", "mlp.c_proj")
LM_HEAD = "lm_head"
_SCALE_MIN = 2.0**-24  # smallest fp16 subnormal: keeps all-zero (and tiny) rows/groups from a zero scale
_SCALE_MAX = 65504.0  # largest finite fp16


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise QWenError(f"weight-only precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def _check_kind(precision: str) -> None:
    if precision not in KINDS:
        raise QWenError(f"quantisation precision {precision!r} is not one of {', '.join(KINDS)}")


def _fp16_scale(amax: Tensor, qmax: int) -> Tensor:
    return (amax / qmax).clamp(_SCALE_MIN, _SCALE_MAX).to(torch.float16)


# --- int8 ------------------------------------------------------------------------------------------------------
def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [out, in] -> (qweight int8 [out, in], scales fp16 [out]); symmetric per output channel."""
    if w.dim() != 2:
        raise QWenError(f"weight-only quantisation needs a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    wf = w.float()
    scales = _fp16_scale(wf.abs().amax(dim=1), 127)
    q = torch.round(wf / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def dequantize_int8(qweight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(int8 [out, in], fp16 [out]) -> [out, in] weights in dtype (computed in fp32)."""
    return (qweight.float() * scales.float()[:, None]).to(dtype)


# --- int4 ------------------------------------------------------------------------------------------------------
def pack_int4(q: Tensor) -> Tensor:
    """int values in [-8, 7], [out, in] (in even) -> uint8 [out, in / 2]: low nibble = even input index."""
    if q.shape[-1] % 2:
        raise QWenError(f"int4 packing needs an even number of input channels, got {q.shape[-1]}")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [out, in / 2] -> int8 [out, in] in [-8, 7] (inverse of pack_int4)."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def check_group_size(shape: tuple[int, ...] | torch.Size, group_size: int, name: str = "") -> None:
    """Raise a QWenError unless group_size is even, positive and divides the input width of weight `shape`."""
    where = f"layer {name} " if name else "layer "
    out_f, in_f = shape
    if group_size <= 0 or group_size % 2:
        raise QWenError(f"int4 --group_size must be a positive even number, got {group_size}")
    if in_f % group_size:
        raise QWenError(f"int4 {where}with weight [out={out_f}, in={in_f}]: --group_size {group_size} does not "
                        f"divide its {in_f} input channels; choose a group size that divides {in_f} (e.g. 64 "
                        "or 128 for Qwen-7B)")


def quantize_int4(w: Tensor, group_size: int = 128) -> tuple[Tensor, Tensor, None]:
    """w [out, in] -> (qweight uint8 [out, in/2], scales fp16 [out, in/group_size], zeros=None); symmetric."""
    if w.dim() != 2:
        raise QWenError(f"weight-only quantisation needs a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    check_group_size(w.shape, group_size)
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group_size, group_size)
    scales = _fp16_scale(wg.abs().amax(dim=2), 7)
    q = torch.round(wg / scales.float()[..., None]).clamp_(-8, 7).reshape(out_f, in_f)
    return pack_int4(q), scales, None


def dequantize_int4(qweight: Tensor, scales: Tensor, group_size: int, zeros: Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
    """(uint8 [out, in/2], fp16 [out, in/group_size]) -> [out, in] weights in dtype (computed in fp32).

    zeros is accepted for API symmetry with asymmetric schemes; this scheme is symmetric and it must be None.
    """
    if zeros is not None:
        raise QWenError("this int4 scheme is symmetric (no zero points); zeros must be None")
    q = unpack_int4(qweight).float()
    out_f, in_f = q.shape
    if scales.shape != (out_f, in_f // group_size) or in_f % group_size:
        raise QWenError(f"int4 scales of shape {tuple(scales.shape)} do not match weight [{out_f}, {in_f}] with "
                        f"group size {group_size}")
    w = q.reshape(out_f, -1, group_size) * scales.float()[..., None]
    return w.reshape(out_f, in_f).to(dtype)


def quantize_weight(w: Tensor, precision: str, group_size: int = 128) -> dict[str, Tensor]:
    """{'qweight': ..., 'scales': ...} for one [out, in] weight (precision int8, int4 or fp8)."""
    _check_kind(precision)
    if precision == "fp8":
        from qwen_trtllm.quantization.fp8 import quantize_fp8_weight

        q, s = quantize_fp8_weight(w)
    elif precision == "int8":
        q, s = quantize_int8(w)
    else:
        q, s, _ = quantize_int4(w, group_size)
    return {"qweight": q, "scales": s}


def dequantize_weight(qweight: Tensor, scales: Tensor, precision: str, group_size: int = 128,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    _check_precision(precision)
    if precision == "int8":
        return dequantize_int8(qweight, scales, dtype)
    return dequantize_int4(qweight, scales, group_size, dtype=dtype)


# --- the module -------------------------------------------------------------------------------------------------
class WeightOnlyLinear(nn.Module):
    """y = x @ dequant(qweight)^T + bias with int8 / int4 weights; the Triton kernel on CUDA.

    Buffers: qweight (int8 [out, in] | uint8 [out, in/2]), scales (fp16 [out] | [out, in/group_size]),
    bias (optional, [out], the engine dtype). use_triton: None = the kernels on CUDA, the dequantise + F.linear
    fallback elsewhere; True also runs them on CPU under TRITON_INTERPRET=1 (tests); False never. The kernels:
    int8 at one row (GEMV_ROWS) the elementwise 1-byte-code GEMV (kernels/fp8_gemv.py int8_gemv: CUDA-core products,
    as the fp16 and e4m3 GEMVs), otherwise kernels/weight_only_gemm.py. accepts_gated: forward(x, gated=True)
    takes the MLP's [gate | up] and applies SiLU(gate) * up itself (inside int8_gemv, else silu_mul first).
    """

    accepts_gated = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, precision: str = "int8",
                 group_size: int = 128, dtype: torch.dtype = torch.float16, device: torch.device | str | None = None):
        super().__init__()
        _check_precision(precision)
        self.in_features, self.out_features = in_features, out_features
        self.precision, self.group_size = precision, group_size
        self.use_triton: bool | None = None
        if precision == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float16, device=device))
        else:
            check_group_size((out_features, in_features), group_size)
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(out_features, in_features // group_size,
                                                       dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, precision: str = "int8", group_size: int = 128,
                    name: str = "") -> WeightOnlyLinear:
        """Quantise an nn.Linear (weights on any device; the buffers stay on it)."""
        w = linear.weight.detach()
        if precision == "int4":
            check_group_size(w.shape, group_size, name)
        b = linear.bias
        mod = cls(linear.in_features, linear.out_features, b is not None, precision, group_size,
                  dtype=b.dtype if b is not None else w.dtype, device="meta")
        mod.load_state_dict({**quantize_weight(w, precision, group_size),
                             **({"bias": b.detach().clone()} if b is not None else {})}, assign=True)
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_weight(self.qweight, self.scales, self.precision, self.group_size, dtype)

    def forward(self, x: Tensor, gated: bool = False) -> Tensor:
        """x [..., in_features] (gated: [..., 2 * in_features] = [gate | up]) -> [..., out_features] in x.dtype."""
        use = self.use_triton if self.use_triton is not None else x.is_cuda
        from qwen_trtllm.kernels import triton_available

        kernels = use and triton_available(x.device)
        width = 2 * self.in_features if gated else self.in_features
        if x.shape[-1] != width:
            what = "[gate | up], gated=True" if gated else "in_features; gated=True takes twice"
            raise ValueError(f"{self.precision} weight-only linear: x [..., {x.shape[-1]}] needs a last dimension of "
                             f"{width} ({what})")
        x2 = x.reshape(-1, width)
        out_shape = (*x.shape[:-1], self.out_features)
        if kernels and self.precision == "int8" and 0 < x2.shape[0] <= GEMV_ROWS:
            from qwen_trtllm.kernels.fp8_gemv import int8_gemv

            return int8_gemv(x2, self.qweight, self.scales, self.bias, gated=gated).view(out_shape)
        if gated:
            from qwen_trtllm.kernels import silu_mul, silu_mul_reference

            x2 = silu_mul(x2) if kernels else silu_mul_reference(x2)
        if kernels:
            from qwen_trtllm.kernels.weight_only_gemm import weight_only_matmul

            y = weight_only_matmul(x2, self.qweight, self.scales, self.precision, self.group_size, self.bias)
            return y.view(out_shape)
        w = self.dequantized_weight(x.dtype)
        return F.linear(x2, w, self.bias.to(x.dtype) if self.bias is not None else None).view(out_shape)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.precision == "int4" else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"precision={self.precision}{g}")


# --- whole models and state dicts --------------------------------------------------------------------------------
def is_quantized_layer(name: str, quantize_lm_head: bool = False) -> bool:
    """Whether the module `name` (e.g. 'layers.3.attn.qkv') is weight-only quantised."""
    return name.endswith(QUANTIZED_LAYERS) or (quantize_lm_head and name == LM_HEAD)


def _targets(model: nn.Module, quantize_lm_head: bool) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and is_quantized_layer(n,
                                                                                                      quantize_lm_head)]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _validate(targets: list[tuple[str, nn.Linear]], precision: str, group_size: int) -> None:
    _check_kind(precision)
    if precision == "int4":
        for name, lin in targets:
            check_group_size(lin.weight.shape, group_size, name)


def quantize_model(model: nn.Module, precision: str = "int8", group_size: int = 128,
                   quantize_lm_head: bool = False) -> nn.Module:
    """Replace attn.qkv, attn.dense, mlp.gate_up, mlp.c_proj (+ lm_head if asked) by WeightOnlyLinear (Fp8Linear
    for precision fp8), in place.

    Every layer is checked before any is changed. The embedding and norms keep their dtype. Returns model.
    """
    targets = _targets(model, quantize_lm_head)
    _validate(targets, precision, group_size)
    for name, lin in targets:
        if precision == "fp8":
            from qwen_trtllm.quantization.fp8 import Fp8Linear

            _replace(model, name, Fp8Linear.from_linear(lin))
        else:
            _replace(model, name, WeightOnlyLinear.from_linear(lin, precision, group_size, name))
    return model


def make_quantized_skeleton(model: nn.Module, precision: str = "int8", group_size: int = 128,
                            quantize_lm_head: bool = False) -> nn.Module:
    """Swap the quantised layers of a (meta-device) model for empty WeightOnlyLinear modules (Fp8Linear for fp8), in
    place, so that model.load_state_dict(quantized_state, assign=True) fills it. Returns model."""
    targets = _targets(model, quantize_lm_head)
    _validate(targets, precision, group_size)
    for name, lin in targets:
        b = lin.bias
        dtype = b.dtype if b is not None else lin.weight.dtype
        if precision == "fp8":
            from qwen_trtllm.quantization.fp8 import Fp8Linear

            layer: nn.Module = Fp8Linear(lin.in_features, lin.out_features, b is not None, dtype, lin.weight.device)
        else:
            layer = WeightOnlyLinear(lin.in_features, lin.out_features, b is not None, precision, group_size,
                                     dtype=dtype, device=lin.weight.device)
        _replace(model, name, layer)
    return model


def quantized_state_dict_names(names: Iterable[str], precision: str = "int8",
                               quantize_lm_head: bool = False) -> list[str]:
    """Map fp state-dict keys to the quantised model's: '<layer>.weight' -> '<layer>.qweight', '<layer>.scales'
    for quantised layers; every other key (biases included) is unchanged. precision is validated only (the
    symmetric schemes of all precisions have no '<layer>.zeros')."""
    _check_kind(precision)
    out: list[str] = []
    for key in names:
        layer, _, leaf = key.rpartition(".")
        if leaf == "weight" and is_quantized_layer(layer, quantize_lm_head):
            out += [f"{layer}.qweight", f"{layer}.scales"]
        else:
            out.append(key)
    return out


def quantize_state_dict(state: dict[str, Tensor], precision: str = "int8", group_size: int = 128,
                        quantize_lm_head: bool = False) -> dict[str, Tensor]:
    """The runtime's fp state dict ([out, in] linears) -> the quantised model's state dict (for the builder).

    Cast float weights to the engine dtype *before* this; do not cast the result (qweight is int8 / uint8,
    scales are fp16; fp8: qweight float8_e4m3fn, scales float32). Every int4 layer is checked against group_size
    before anything is quantised.
    """
    _check_kind(precision)
    layers = [k[: -len(".weight")] for k in state if k.endswith(".weight")
              and is_quantized_layer(k[: -len(".weight")], quantize_lm_head)]
    if precision == "int4":
        for layer in layers:
            check_group_size(state[layer + ".weight"].shape, group_size, layer)
    out: dict[str, Tensor] = {}
    for key, t in state.items():
        layer = key[: -len(".weight")] if key.endswith(".weight") else None
        if layer in layers:
            for leaf, v in quantize_weight(t, precision, group_size).items():
                out[f"{layer}.{leaf}"] = v
        else:
            out[key] = t
    return out
