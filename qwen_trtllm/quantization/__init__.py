"""Weight-only quantisation (int8 per channel, int4 per group; symmetric, fp16 scales) and fp8 (e4m3 weights with
per-channel scales, activations per token: fp8.py) of the QWen linears."""

from qwen_trtllm.quantization.fp8 import (
    Fp8Linear,
    check_fp8_supported,
    dequantize_fp8,
    fp8_linear_reference,
    quantize_fp8_activation,
    quantize_fp8_weight,
)
from qwen_trtllm.quantization.weight_only import (
    KINDS,
    LM_HEAD,
    PRECISIONS,
    QUANTIZED_LAYERS,
    WeightOnlyLinear,
    check_group_size,
    dequantize_int4,
    dequantize_int8,
    dequantize_weight,
    is_quantized_layer,
    make_quantized_skeleton,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_state_dict,
    quantize_weight,
    quantized_state_dict_names,
    unpack_int4,
)

__all__ = [
    "KINDS", "Fp8Linear", "check_fp8_supported", "dequantize_fp8", "fp8_linear_reference", "quantize_fp8_activation",
    "quantize_fp8_weight", "LM_HEAD", "PRECISIONS", "QUANTIZED_LAYERS", "WeightOnlyLinear", "check_group_size",
    "dequantize_int4", "dequantize_int8", "dequantize_weight", "is_quantized_layer", "make_quantized_skeleton",
    "pack_int4",
    "quantize_int4", "quantize_int8", "quantize_model", "quantize_state_dict", "quantize_weight",
    "quantized_state_dict_names", "unpack_int4",
]
