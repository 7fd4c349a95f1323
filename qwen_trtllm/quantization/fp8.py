"""FP8 (e4m3) weights and activations of the QWen linears (build.py --use_fp8; TensorRT-LLM's --use_fp8 with
per-channel weight scales and dynamic per-token activation scales, vLLM's "fp8 dynamic").

Weights, at build: one float32 scale per output channel, scale = max|w_row| / 448, codes = w * (448 / max|w_row|)
rounded to the nearest e4m3 value (torch.float8_e4m3fn, ties to even), both quotients correctly rounded in
float32; an all-zero row gets a tiny scale (SCALE_MIN) and zero codes. Activations, per call: one float32 scale
per token (row of x), computed and applied the same way (on CUDA by one Triton kernel, kernels/fp8_quant.py, bit
for bit).

The product, y = (codes_x * scale_x) @ (codes_w * scale_w)^T, is computed three ways:
  * more than GEMV_MAX_ROWS rows on CUDA (prefill, large batches): the activations quantised per token by one
    kernel (with SiLU(gate) * up fused for c_proj), then torch._scaled_mm (cuBLASLt) on e4m3 codes with row-wise
    scales, float32 accumulation, output in the engine dtype;
  * up to GEMV_MAX_ROWS rows on CUDA (decode at batch 1-16): the Triton FP8 GEMV of kernels/fp8_gemv.py. Its
    activations are *not* quantised: at these sizes the step streams the weights once and their bytes are all
    that count (a 4096 x 4096 layer: 16 MiB of e4m3 against 8 KiB of fp16 activations per row), so quantising x
    would add an amax pass and error for no bandwidth gain (W8A16 in e4m3). The MLP's c_proj hands it
    [gate | up] (Fp8Linear.forward(x, gated=True)) and SiLU(gate) * up is computed in the GEMV, not by a kernel
    of its own (up to GATED_MAX_ROWS rows);
  * anywhere else (the CPU, --kernels torch, shapes cuBLASLt refuses): fp8_linear_reference, which dequantises
    in float32 and follows the CUDA path's choice for the same number of rows (activations quantised above
    GEMV_MAX_ROWS rows, not at or below), so the CPU engine computes what the GPU engine computes.

State-dict keys of a quantised layer: <layer>.qweight (float8_e4m3fn [out, in]), <layer>.scales (float32 [out])
and, for attn.qkv, <layer>.bias (the engine dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qwen_trtllm import QWenError
from qwen_trtllm.quantization.absmax import QMAX, quantize_absmax

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = QMAX[FP8_DTYPE]  # the largest finite e4m3 value
# Rows of x up to which the Triton GEMV runs on CUDA (torch._scaled_mm above).
GEMV_MAX_ROWS = 16
# Rows up to which the MLP's c_proj hands the GEMV [gate | up] and SiLU*mul is fused: its elementwise kernel's
# (kernels/fp8_gemv.py GEMV_ROWS, which says why not above); above, silu_mul runs first.
GATED_MAX_ROWS = 1
SCALE_MIN = 2.0**-30  # keeps all-zero rows from a zero scale (their codes are 0 whatever the scale)
MIN_CAPABILITY = (8, 9)  # e4m3 tensor cores and conversions: Ada (sm_89), Hopper (sm_90) and later


def _quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [..., K] -> (e4m3 codes [..., K], float32 scales [...]): one scale per row, amax / 448, codes = x * (448 /
    amax) rounded to e4m3 (absmax.py: the KV cache's arithmetic, one division per row), scales at least
    SCALE_MIN."""
    codes, scales = quantize_absmax(x, FP8_DTYPE)
    return codes, scales.clamp_min(SCALE_MIN)


def quantize_fp8_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [out, in] -> (qweight float8_e4m3fn [out, in], scales float32 [out]); symmetric per output channel."""
    if w.dim() != 2:
        raise QWenError(f"fp8 quantisation needs a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    codes, scales = _quantize_rows(w)
    return codes.contiguous(), scales.contiguous()


def quantize_fp8_activation(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (codes float8_e4m3fn [M, K], scales float32 [M]): one scale per token (dynamic)."""
    return _quantize_rows(x)


def dequantize_fp8(codes: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(e4m3 [rows, K], float32 [rows]) -> [rows, K] values in dtype (computed in float32)."""
    return (codes.float() * scales.float()[..., None]).to(dtype)


def fp8_linear_reference(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None,
                         quantize_activations: bool | None = None) -> Tensor:
    """x [..., K] @ dequant(qweight, scales)^T (+ bias) in float32 -> [..., N] in x.dtype. quantize_activations:
    quantise x per token first (what torch._scaled_mm computes); None = as the CUDA path does for this many rows
    (above GEMV_MAX_ROWS)."""
    x2 = x.reshape(-1, x.shape[-1])
    if quantize_activations is None:
        quantize_activations = x2.shape[0] > GEMV_MAX_ROWS
    xf = dequantize_fp8(*quantize_fp8_activation(x2)) if quantize_activations else x2.float()
    y = xf @ dequantize_fp8(qweight, scales).t()
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], qweight.shape[0])


# torch._scaled_mm's row-wise scaling gives fp16 / fp32 outputs only with recent cuBLASLt / CUTLASS builds
# (older ones: "Only bf16 high precision output types are supported for row-wise scaling"); the first refusal of
# a dtype is remembered and its products come out in bfloat16, cast back (the accumulation is float32 either way).
_BF16_OUTPUT_ONLY: set[torch.dtype] = set()


def scaled_mm_supported(M: int, N: int, K: int, device: torch.device) -> bool:
    """Whether torch._scaled_mm takes these shapes: CUDA, K and N multiples of 16 (cuBLASLt's fp8 layouts)."""
    return device.type == "cuda" and K % 16 == 0 and N % 16 == 0 and M > 0


def fp8_scaled_mm(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None,
                  gated: bool = False) -> Tensor:
    """x [M, K] (fp16/bf16/fp32, CUDA; gated: [M, 2K] = [gate | up], SiLU(gate) * up quantised) -> per-token e4m3
    (kernels/fp8_quant.py) -> torch._scaled_mm with row-wise scales -> [M, N] in x.dtype."""
    from qwen_trtllm.kernels.fp8_quant import quantize_fp8_rows

    xq, xs = quantize_fp8_rows(x, gated)
    out = x.dtype

    def mm(dtype: torch.dtype) -> Tensor:
        # the bias in cuBLASLt's epilogue (one kernel, not two); it refuses one with float32 outputs
        epilogue = bias is not None and dtype != torch.float32
        y = torch._scaled_mm(xq, qweight.t(), bias=bias.to(dtype) if epilogue else None, scale_a=xs[:, None],
                             scale_b=scales[None, :], out_dtype=dtype)
        return y if bias is None or epilogue else y + bias.to(dtype)

    if out in _BF16_OUTPUT_ONLY:
        return mm(torch.bfloat16).to(out)
    try:
        return mm(out)
    except RuntimeError as e:
        if "bf16" not in str(e) or out == torch.bfloat16:
            raise
        _BF16_OUTPUT_ONLY.add(out)
        return mm(torch.bfloat16).to(out)


def check_fp8_supported(device: torch.device | str) -> None:
    """QWenError unless `device` runs fp8 engines: the CPU always (the reference), CUDA from sm_89 on."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < MIN_CAPABILITY:
        raise QWenError(f"this engine has fp8 weights (build.py --use_fp8), which need an sm_89+ GPU (Ada, Hopper), "
                        f"but {torch.cuda.get_device_name(device)} is sm_{major}{minor}: rebuild it with "
                        "--use_weight_only --weight_only_precision int8")


class Fp8Linear(nn.Module):
    """y = x @ (qweight * scales)^T + bias with e4m3 weights and per-channel float32 scales.

    use_triton: None = the CUDA kernels on CUDA (GEMV up to GEMV_MAX_ROWS rows, torch._scaled_mm above), the
    reference elsewhere; True also runs the Triton GEMV on CPU under TRITON_INTERPRET=1 (tests); False never
    (fp8_linear_reference). accepts_gated: forward(x, gated=True) takes the MLP's [gate | up] and applies
    SiLU(gate) * up itself (fused into the GEMV up to GATED_MAX_ROWS rows and into the activation quantiser above
    GEMV_MAX_ROWS, silu_mul then the GEMV between);
    Kernels.linear hands it gated inputs instead of running silu_mul first."""

    accepts_gated = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.precision = "fp8"
        self.use_triton: bool | None = None
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        w, b = linear.weight.detach(), linear.bias
        mod = cls(linear.in_features, linear.out_features, b is not None,
                  dtype=b.dtype if b is not None else w.dtype, device="meta")
        q, s = quantize_fp8_weight(w)
        mod.load_state_dict({"qweight": q, "scales": s, **({"bias": b.detach().clone()} if b is not None else {})},
                            assign=True)
        return mod

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_fp8(self.qweight, self.scales, dtype)

    def forward(self, x: Tensor, gated: bool = False) -> Tensor:
        """x [..., in_features] (gated: [..., 2 * in_features] = [gate | up]) -> [..., out_features] in x.dtype."""
        use = self.use_triton if self.use_triton is not None else x.is_cuda
        x2 = x.reshape(-1, 2 * self.in_features if gated else self.in_features)
        M, out_shape = x2.shape[0], (*x.shape[:-1], self.out_features)
        kernels = False
        if use:
            from qwen_trtllm.kernels import triton_available

            kernels = triton_available(x.device)
        if kernels and M > GEMV_MAX_ROWS and scaled_mm_supported(M, self.out_features, self.in_features, x.device):
            return fp8_scaled_mm(x2, self.qweight, self.scales, self.bias, gated=gated).view(out_shape)
        gemv = kernels and 0 < M <= GEMV_MAX_ROWS
        fused = gated and gemv and M <= GATED_MAX_ROWS
        if gated and not fused:
            from qwen_trtllm.kernels import silu_mul, silu_mul_reference

            x2 = silu_mul(x2) if kernels else silu_mul_reference(x2)
        if gemv:
            from qwen_trtllm.kernels.fp8_gemv import fp8_gemv

            return fp8_gemv(x2, self.qweight, self.scales, self.bias, gated=fused).view(out_shape)
        return fp8_linear_reference(x2, self.qweight, self.scales, self.bias).view(out_shape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               "precision=fp8"
